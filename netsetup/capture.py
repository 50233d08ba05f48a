"""Enroll, unenroll and reconcile transparent capture of workload netns (nftables + policy routes).

Enroll order: the `local default dev lo table 100` route, then `ip rule fwmark 0x1 lookup 100`
(both inert until something carries the mark), then the nftables ruleset, whose last
transaction (netsetup.nft) hooks prerouting and output at once. Unenroll order is the reverse:
delete the table first (one transaction unhooks all capture at once), then the ip rules, then
the routes. A failed enroll leaves nothing behind that it created; enrolling an enrolled
workload changes nothing, and one whose rules were damaged is repaired without a gap.

Sockets the proxy opens in an enrolled netns: listeners on 15001, 15006 and 15053 need
IP_TRANSPARENT (they are TPROXY targets); every socket it creates there should carry SO_MARK
0x539 (proxy_mark), which the rules let through; onward connections that keep the client's
address as source also need IP_TRANSPARENT, and their replies are routed back to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from netsetup import nft
from netsetup.netns import NetnsError, netns_inode, netns_path
from netsetup.rules import TABLE_NAME, CaptureSpec, Ruleset, render_ruleset

RULE_PRIORITY = 100
RTN_LOCAL = 2
LO_IFINDEX = 1
_FAMILIES: tuple[int, ...] = (int(socket.AF_INET), int(socket.AF_INET6))


class CaptureError(Exception):
    """Capture could not be set up, inspected or removed; the message says what to do."""


@dataclass(frozen=True)
class Workload:
    """A workload netns to capture: its netns (name or path), addresses and interface."""

    name: str
    netns: str
    ip: str
    ip6: str | None = None
    iface: str = "eth0"

    def spec(self) -> CaptureSpec:
        try:
            return CaptureSpec(workload_ip=self.ip, workload_ip6=self.ip6, iface=self.iface)
        except ValueError as exc:
            raise CaptureError(f"workload {self.name!r}: {exc}") from None


@dataclass(frozen=True)
class CaptureState:
    """What netsetup finds in one netns (independent of what is desired there)."""

    netns: str
    table: nft.TableState | None
    #: (family, fwmark, table) of our `ip rule`s found; family is "ipv4" or "ipv6".
    ip_rules: tuple[tuple[str, int, int], ...]
    #: families that have the `local default dev lo` route in our table.
    local_routes: tuple[str, ...]

    @property
    def empty(self) -> bool:
        """No trace of capture: no table, no ip rule, no route."""
        return self.table is None and not self.ip_rules and not self.local_routes

    @property
    def hooked(self) -> bool:
        return self.table is not None and self.table.live_slot() is not None


@dataclass(frozen=True)
class ReconcileReport:
    """What `reconcile` changed, by workload name (desired) or netns (removed)."""

    enrolled: tuple[str, ...] = ()
    repaired: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    errors: tuple[tuple[str, str], ...] = field(default=())

    @property
    def changed(self) -> bool:
        return bool(self.enrolled or self.repaired or self.removed)


def _fam_name(family: int) -> str:
    return "ipv4" if family == socket.AF_INET else "ipv6"


def _check_netns(netns: str) -> None:
    try:
        netns_path(netns)
    except NetnsError as exc:
        raise CaptureError(str(exc)) from None


def _routing_error(exc: BaseException, what: str, netns: str) -> CaptureError:
    code = getattr(exc, "code", None)
    if code == errno.EPERM or isinstance(exc, PermissionError):
        return CaptureError(
            f"cannot {what} in netns {netns!r} (EPERM): run as root or grant CAP_NET_ADMIN"
        )
    return CaptureError(f"cannot {what} in netns {netns!r}: {exc}")


def _iproute() -> Any:
    from pyroute2 import IPRoute

    return IPRoute()


def _our_rules(ipr: Any, spec: CaptureSpec) -> list[tuple[int, Any]]:
    found: list[tuple[int, Any]] = []
    for family in _FAMILIES:
        for r in ipr.get_rules(family=family):
            if r.get("FRA_FWMARK") == spec.capture_mark and r.get("FRA_TABLE") == spec.route_table:
                found.append((family, r))
    return found


def _our_routes(ipr: Any, spec: CaptureSpec) -> list[tuple[int, Any]]:
    found: list[tuple[int, Any]] = []
    for family in _FAMILIES:
        for r in ipr.get_routes(table=spec.route_table, family=family):
            if (
                r.get("table") == spec.route_table
                and r.get("type") == RTN_LOCAL
                and r.get("dst_len") == 0
                and r.get("oif") == LO_IFINDEX
            ):
                found.append((family, r))
    return found


def _state_with(session: nft.Session, ipr: Any, netns: str, spec: CaptureSpec) -> CaptureState:
    table = session.read(TABLE_NAME)
    try:
        rules = _our_rules(ipr, spec)
        routes = _our_routes(ipr, spec)
    except Exception as exc:
        raise _routing_error(exc, "read ip rules and routes", netns) from exc
    return CaptureState(
        netns=netns,
        table=table,
        ip_rules=tuple(
            (_fam_name(f), int(r.get("FRA_FWMARK")), int(r.get("FRA_TABLE"))) for f, r in rules
        ),
        local_routes=tuple(sorted({_fam_name(f) for f, _ in routes})),
    )


@contextlib.contextmanager
def _handles(netns: str) -> Iterator[tuple[nft.Session, Any]]:
    """One nftables and one rtnetlink socket in the current netns, closed on exit."""
    with nft.Session(netns) as session:
        try:
            ipr = _iproute()
        except Exception as exc:
            raise _routing_error(exc, "open rtnetlink", netns) from exc
        try:
            yield session, ipr
        finally:
            ipr.close()


def _state_here(netns: str, spec: CaptureSpec) -> CaptureState:
    with _handles(netns) as (session, ipr):
        return _state_with(session, ipr, netns, spec)


def _families(spec: CaptureSpec) -> list[int]:
    return list(_FAMILIES) if spec.workload_ip6 is not None else [_FAMILIES[0]]


def _problems(state: CaptureState, spec: CaptureSpec, ruleset: Ruleset) -> list[str]:
    problems = list(nft.check_state(state.table, ruleset))
    for family in _families(spec):
        name = _fam_name(family)
        if (name, spec.capture_mark, spec.route_table) not in state.ip_rules:
            problems.append(
                f"{name} rule `fwmark {spec.capture_mark:#x} lookup {spec.route_table}` missing"
            )
        if name not in state.local_routes:
            problems.append(f"{name} route `local default dev lo table {spec.route_table}` missing")
    return problems


def _add_routing(ipr: Any, netns: str, spec: CaptureSpec) -> list[tuple[str, int]]:
    """Add the missing local routes, then the missing ip rules; return what was added."""
    added: list[tuple[str, int]] = []
    try:
        lo = ipr.get_links(LO_IFINDEX)[0]
        if not lo.get("flags", 0) & 1:  # IFF_UP: TPROXY to 127.0.0.1 / ::1 needs lo up
            ipr.link("set", index=LO_IFINDEX, state="up")
        have_routes = {f for f, _ in _our_routes(ipr, spec)}
        have_rules = {f for f, _ in _our_rules(ipr, spec)}
        for family in _families(spec):
            if family in have_routes:
                continue
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            ipr.route(
                "add", dst=dst, type="local", scope="host", oif=LO_IFINDEX,
                table=spec.route_table, family=family,
            )  # fmt: skip
            added.append(("route", family))
        for family in _families(spec):
            if family in have_rules:
                continue
            ipr.rule(
                "add", fwmark=spec.capture_mark, fwmask=0xFFFFFFFF, table=spec.route_table,
                priority=RULE_PRIORITY, family=family,
            )  # fmt: skip
            added.append(("rule", family))
    except Exception as exc:
        _remove_routing(ipr, netns, spec, only=added)
        raise _routing_error(exc, "add the capture policy route", netns) from exc
    return added


def _remove_routing(
    ipr: Any, netns: str, spec: CaptureSpec, only: list[tuple[str, int]] | None = None,
    families: Iterable[int] = _FAMILIES,
) -> bool:  # fmt: skip
    """Delete our ip rules, then our local routes (only those in `only` when given)."""
    fams = set(families)
    changed = False
    try:
        for family, r in _our_rules(ipr, spec):
            if family not in fams or (only is not None and ("rule", family) not in only):
                continue
            ipr.rule(
                "del", fwmark=spec.capture_mark, fwmask=r.get("FRA_FWMASK") or 0xFFFFFFFF,
                table=spec.route_table, priority=r.get("FRA_PRIORITY"), family=family,
            )  # fmt: skip
            changed = True
        for family, _r in _our_routes(ipr, spec):
            if family not in fams or (only is not None and ("route", family) not in only):
                continue
            dst = "0.0.0.0/0" if family == socket.AF_INET else "::/0"
            scope = {"scope": "host"} if family == socket.AF_INET else {}
            ipr.route(
                "del", dst=dst, type="local", oif=LO_IFINDEX, table=spec.route_table,
                family=family, **scope,
            )  # fmt: skip
            changed = True
    except Exception as exc:
        raise _routing_error(exc, "remove the capture policy route", netns) from exc
    return changed


def _enroll_here(w: Workload, spec: CaptureSpec, fault: nft.FaultHook | None) -> str:
    """Enroll in the current netns; returns "unchanged", "enrolled" or "repaired"."""
    ruleset = render_ruleset(spec)
    with _handles(w.netns) as (session, ipr):
        before = _state_with(session, ipr, w.netns, spec)
        if not _problems(before, spec, ruleset):
            return "unchanged"
        added = _add_routing(ipr, w.netns, spec)
        try:
            session.apply(ruleset, current=before.table, fault=fault)
        except nft.NftError as exc:
            if not before.hooked:
                # nothing of ours was in force before: leave nothing behind
                if before.table is None:
                    session.remove(TABLE_NAME)
                _remove_routing(ipr, w.netns, spec, only=added)
            raise CaptureError(f"workload {w.name!r}: {exc}") from None
        if spec.workload_ip6 is None and "ipv6" in before.local_routes + tuple(
            f for f, _m, _t in before.ip_rules
        ):
            # a previous enrollment with IPv6: drop the IPv6 policy route it left
            _remove_routing(ipr, w.netns, spec, families=(socket.AF_INET6,))
    return "enrolled" if before.empty else "repaired"


def _unenroll_here(netns: str, spec: CaptureSpec) -> bool:
    with _handles(netns) as (session, ipr):
        try:
            removed_table = session.remove(TABLE_NAME)
        except nft.NftError as exc:
            raise CaptureError(str(exc)) from None
        removed_routing = _remove_routing(ipr, netns, spec)
    return removed_table or removed_routing


def _default_spec(w: Workload | None = None) -> CaptureSpec:
    # rules and routes are recognised by mark and table, which do not depend on addresses
    return w.spec() if w is not None else CaptureSpec(workload_ip="192.0.2.1")


def _run(netns: str, fn: Any) -> Any:
    _check_netns(netns)
    try:
        return nft.in_netns(netns, fn)
    except NetnsError as exc:
        raise CaptureError(str(exc)) from None
    except nft.NftError as exc:
        raise CaptureError(str(exc)) from None


def enroll(w: Workload, *, _fault: nft.FaultHook | None = None) -> None:
    """Capture `w`'s traffic. Idempotent: enrolling again replaces, never duplicates."""
    spec = w.spec()
    _run(w.netns, lambda: _enroll_here(w, spec, _fault))


def unenroll(w: Workload) -> None:
    """Stop capturing `w`: no table, chain, ip rule or route of ours is left in its netns."""
    spec = w.spec()
    _run(w.netns, lambda: _unenroll_here(w.netns, spec))


def inspect(netns: str) -> CaptureState:
    """What capture state `netns` holds."""
    spec = _default_spec()
    state: CaptureState = _run(netns, lambda: _state_here(netns, spec))
    return state


def problems(w: Workload) -> list[str]:
    """What is missing or different from `w`'s complete capture (empty: enrolled)."""
    spec = w.spec()
    state: CaptureState = _run(w.netns, lambda: _state_here(w.netns, spec))
    return _problems(state, spec, render_ruleset(spec))


def is_enrolled(w: Workload) -> bool:
    """True when `w`'s netns holds its complete, current capture rules and routes."""
    return not problems(w)


def _identity(netns: str) -> str:
    try:
        return f"inode:{netns_inode(netns)}"
    except NetnsError:
        return f"name:{os.path.normpath(netns)}"


def reconcile(desired: Iterable[Workload], known_netns: Iterable[str]) -> ReconcileReport:
    """After a restart: enroll or repair every desired workload; remove our capture from every
    netns in `known_netns` that holds no desired workload. One failure does not stop the rest."""
    enrolled: list[str] = []
    repaired: list[str] = []
    removed: list[str] = []
    unchanged: list[str] = []
    errors: list[tuple[str, str]] = []
    wanted: set[str] = set()
    for w in desired:
        wanted.add(_identity(w.netns))
        try:
            spec = w.spec()
            outcome = _run(w.netns, lambda w=w, spec=spec: _enroll_here(w, spec, None))
        except CaptureError as exc:
            errors.append((w.name, str(exc)))
            continue
        {"enrolled": enrolled, "repaired": repaired, "unchanged": unchanged}[outcome].append(w.name)
    spec = _default_spec()
    for netns in known_netns:
        if _identity(netns) in wanted:
            continue
        try:
            if _run(netns, lambda netns=netns: _unenroll_here(netns, spec)):
                removed.append(netns)
        except CaptureError as exc:
            errors.append((netns, str(exc)))
    return ReconcileReport(
        tuple(enrolled), tuple(repaired), tuple(removed), tuple(unchanged), tuple(errors)
    )


# -- asyncio adapters: the netlink work runs on a worker thread, never on the event loop ----------


async def aenroll(w: Workload) -> None:
    """`enroll` for asyncio code."""
    await asyncio.to_thread(enroll, w)


async def aunenroll(w: Workload) -> None:
    """`unenroll` for asyncio code."""
    await asyncio.to_thread(unenroll, w)


async def ainspect(netns: str) -> CaptureState:
    """`inspect` for asyncio code."""
    return await asyncio.to_thread(inspect, netns)


async def areconcile(desired: Iterable[Workload], known_netns: Iterable[str]) -> ReconcileReport:
    """`reconcile` for asyncio code (arguments are materialised before the thread starts)."""
    return await asyncio.to_thread(reconcile, list(desired), list(known_netns))
