"""Pure outbound/inbound planning: where a captured connection goes, decided from the snapshot.

Outbound rules (Istio ambient semantics):

* destination port is one of ztunnel's own ports on a mesh address -> `Reject`;
* destination is a service VIP: the service port must exist; if the service has a
  waypoint the next hop is the waypoint (HBONE, `:authority` = original VIP:port);
  otherwise an endpoint is picked (healthy only, random weighted by workload weight,
  locality tiers when `traffic_distribution` asks) and reached over HBONE when it is
  enrolled in the mesh, in plain TCP when not. A workload's own waypoint applies to
  traffic addressed to the workload, not to traffic addressed to one of its
  services (Istio's default `istio.io/waypoint-for: service`);
* destination is a workload IP: its waypoint if it has one, else HBONE when it is
  enrolled, plain TCP when not;
* anything else (outside the mesh) -> `Passthrough`.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from ztunnel.snapshot import (
    HBONE_PORT,
    ZTUNNEL_PORTS,
    Endpoint,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)

__all__ = [
    "WORKLOAD_NETNS_PORTS",
    "Hbone",
    "HboneViaWaypoint",
    "InboundPlan",
    "InboundReject",
    "OutboundPlan",
    "Passthrough",
    "Reject",
    "format_authority",
    "parse_authority",
    "plan_inbound",
    "plan_outbound",
]

#: Ports ztunnel listens on inside every enrolled workload's netns.
WORKLOAD_NETNS_PORTS: Final = frozenset({15001, 15006, 15008, 15053})


@dataclass(frozen=True, slots=True)
class Hbone:
    """Tunnel to a mesh endpoint: HBONE to `host:port` (15008), CONNECT `authority`."""

    host: str
    port: int
    identity: str
    authority: str
    destination: Workload
    service: Service | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to dial."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class HboneViaWaypoint:
    """Tunnel to the waypoint; `authority` is the original destination (VIP:port)."""

    host: str
    port: int
    identity: str
    authority: str
    service: Service | None = None
    destination: Workload | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to dial."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Passthrough:
    """Plain TCP to `host:port` (destination outside the mesh or not enrolled)."""

    host: str
    port: int
    destination: Workload | None = None
    service: Service | None = None

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) to dial."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class Reject:
    """The connection must be refused; `reason` says why and what to do."""

    reason: str


OutboundPlan = Hbone | HboneViaWaypoint | Passthrough


def format_authority(host: str, port: int) -> str:
    """`ip:port`, with IPv6 addresses in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_authority(authority: str) -> tuple[str, int]:
    """Parse `ip:port` / `[ip6]:port` into (canonical ip, port); ValueError when malformed."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            raise ValueError(f"authority {authority!r} is not [ip]:port")
        host, port_text = authority[1:end], authority[end + 2 :]
    else:
        host, sep, port_text = authority.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"authority {authority!r} is not ip:port")
    if not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"authority {authority!r} has no valid port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"authority {authority!r} has port out of range")
    try:
        ip = ipaddress.ip_address(host).compressed
    except ValueError:
        raise ValueError(f"authority {authority!r} does not start with an IP address") from None
    return ip, port


def _is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def _address_for(workload: Workload, like: str) -> str:
    """The workload address of the same family as `like` (IPv6 VIP -> ip6 when present)."""
    if ":" in like and workload.ip6 is not None:
        return workload.ip6
    return workload.ip


_Tier = Callable[[Workload, Workload], bool]


def _same_node(src: Workload, dst: Workload) -> bool:
    return src.node == dst.node


def _same_subzone(src: Workload, dst: Workload) -> bool:
    a, b = src.locality, dst.locality
    return bool(a.subzone) and (a.region, a.zone, a.subzone) == (b.region, b.zone, b.subzone)


def _same_zone(src: Workload, dst: Workload) -> bool:
    a, b = src.locality, dst.locality
    return bool(a.zone) and (a.region, a.zone) == (b.region, b.zone)


def _same_region(src: Workload, dst: Workload) -> bool:
    a, b = src.locality, dst.locality
    return bool(a.region) and a.region == b.region


_TIERS: Final[dict[str, tuple[_Tier, ...]]] = {
    "Any": (),
    "PreferClose": (_same_subzone, _same_zone, _same_region),
    "PreferSameZone": (_same_subzone, _same_zone, _same_region),
    "PreferSameNode": (_same_node, _same_subzone, _same_zone, _same_region),
}


def _pick(
    candidates: Sequence[tuple[Endpoint, Workload]],
    source: Workload,
    traffic_distribution: str,
    rng: random.Random,
) -> tuple[Endpoint, Workload]:
    pool = candidates
    for tier in _TIERS.get(traffic_distribution, ()):
        close = [c for c in candidates if tier(source, c[1])]
        if close:
            pool = close
            break
    if len(pool) == 1:
        return pool[0]
    total = sum(w.weight for _, w in pool)
    x = rng.random() * total
    for cand in pool:
        x -= cand[1].weight
        if x < 0:
            return cand
    return pool[-1]


def _own_port_reject(ip: str, port: int, what: str) -> Reject:
    return Reject(
        f"refusing connection to {format_authority(ip, port)}: port {port} is one of "
        f"ztunnel's own ports on {what}; applications must not use ports "
        f"{', '.join(str(p) for p in sorted(ZTUNNEL_PORTS))} in the mesh"
    )


def plan_outbound(
    snapshot: Snapshot,
    source: Workload,
    dest: tuple[str, int],
    *,
    rng: random.Random,
) -> OutboundPlan | Reject:
    """Decide the next hop of a connection captured from `source` to `dest` (ip, port)."""
    dest_ip, dest_port = dest
    if _is_loopback(dest_ip) and dest_port in ZTUNNEL_PORTS:
        return _own_port_reject(dest_ip, dest_port, "loopback")

    svc = snapshot.service_by_vip(dest_ip)
    if svc is not None:
        return _plan_service(snapshot, source, svc, dest_ip, dest_port, rng=rng)

    wl = snapshot.workload_by_ip(dest_ip)
    if wl is not None:
        if wl.enrolled and dest_port in ZTUNNEL_PORTS:
            return _own_port_reject(dest_ip, dest_port, f"workload {wl.namespace}/{wl.name}")
        authority = format_authority(dest_ip, dest_port)
        if wl.waypoint is not None and wl.waypoint.address not in source.addresses:
            wp = wl.waypoint
            return HboneViaWaypoint(wp.address, wp.port, wp.identity, authority, None, wl)
        if wl.enrolled:
            return Hbone(dest_ip, HBONE_PORT, wl.identity, authority, wl)
        return Passthrough(dest_ip, dest_port, wl)

    wp_dest = snapshot.waypoint_by_address(dest_ip)
    if wp_dest is not None and dest_port in ZTUNNEL_PORTS:
        return _own_port_reject(dest_ip, dest_port, f"waypoint {wp_dest.namespace}/{wp_dest.name}")
    return Passthrough(dest_ip, dest_port)


def _plan_service(
    snapshot: Snapshot,
    source: Workload,
    svc: Service,
    vip: str,
    port: int,
    *,
    rng: random.Random,
) -> OutboundPlan | Reject:
    sp: ServicePort | None = svc.port(port)
    if sp is None:
        known = ", ".join(str(p.port) for p in svc.ports) or "none"
        return Reject(
            f"service {svc.key} ({svc.hostname}) has no port {port} (its ports: {known}): "
            "connect to one of its ports or add the port to the Service"
        )
    if svc.waypoint is not None and svc.waypoint.address not in source.addresses:
        wp = svc.waypoint
        return HboneViaWaypoint(
            wp.address, wp.port, wp.identity, format_authority(vip, port), svc, None
        )
    healthy: list[tuple[Endpoint, Workload]] = []
    for ep in svc.endpoints:
        if not ep.healthy:
            continue
        wl = snapshot.workload_by_uid(ep.workload_uid)
        if wl is not None:
            healthy.append((ep, wl))
    if not healthy:
        detail = (
            f"all {len(svc.endpoints)} endpoints are unhealthy"
            if svc.endpoints
            else "it has no endpoints (does its selector match any workload?)"
        )
        return Reject(f"no healthy endpoint for service {svc.key} ({svc.hostname}): {detail}")
    ep, wl = _pick(healthy, source, svc.traffic_distribution, rng)
    target = ep.target_port(sp)
    ip = _address_for(wl, vip)
    if wl.enrolled:
        if target in ZTUNNEL_PORTS:
            return _own_port_reject(ip, target, f"workload {wl.namespace}/{wl.name}")
        return Hbone(ip, HBONE_PORT, wl.identity, format_authority(ip, target), wl, svc)
    return Passthrough(ip, target, wl, svc)


@dataclass(frozen=True, slots=True)
class InboundPlan:
    """Accept an HBONE stream: connect to `workload` on `host:port` from its netns."""

    workload: Workload
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class InboundReject:
    """Refuse an HBONE stream with HTTP `status` (400 bad authority, 503 port)."""

    status: int
    reason: str


def plan_inbound(
    snapshot: Snapshot,
    authority: str,
    *,
    workload: Workload | None = None,
) -> InboundPlan | InboundReject:
    """Check a CONNECT `authority` received on 15008.

    With `workload` (the workload whose netns the listener is in) the IP must be one
    of its addresses; without it, the IP must belong to a workload on this node.
    """
    try:
        ip, port = parse_authority(authority)
    except ValueError as e:
        return InboundReject(400, f"{e}: CONNECT needs :authority ip:port")
    target = snapshot.workload_by_ip(ip)
    if workload is not None:
        if ip not in workload.addresses:
            return InboundReject(
                400,
                f"authority {authority} is not an address of workload "
                f"{workload.namespace}/{workload.name} ({', '.join(workload.addresses)})",
            )
        target = workload
    elif target is None or target.node != snapshot.node:
        return InboundReject(
            400, f"authority {authority} is not a workload on node {snapshot.node}"
        )
    if port in ZTUNNEL_PORTS:
        return InboundReject(503, f"port {port} is reserved for ztunnel: it is never forwarded")
    if not target.accepts_port(port):
        return InboundReject(
            503,
            f"workload {target.namespace}/{target.name} does not accept port {port} "
            f"(ports: {', '.join(str(p) for p in target.ports)})",
        )
    return InboundPlan(target, ip, port)
