"""Find the network namespace that owns an address: named netns first, then /proc/*/ns/net."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Iterator
from dataclasses import dataclass

from netsetup.netns import (
    NETNS_RUN_DIR,
    NetnsError,
    iproute_in_netns,
    netns_path,
    run_in_fresh_thread,
)

IFF_LOOPBACK = 0x8


@dataclass(frozen=True)
class NetnsCandidate:
    """One distinct network namespace: how to name it, and its identity (device, inode)."""

    ref: str  # a name from /run/netns, or /proc/PID/ns/net
    dev: int
    inode: int


def _parse_ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(ip.strip("[]"))
    except ValueError:
        raise NetnsError(
            f"{ip!r} is not an IP address: give a workload address such as 10.244.1.2"
        ) from None


def iter_netns(name_prefix: str | None = None) -> Iterator[NetnsCandidate]:
    """Every distinct netns: named ones (sorted), then those only processes hold.

    With `name_prefix`, only named netns whose name starts with it (no /proc scan).
    """
    seen: set[tuple[int, int]] = set()
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        names = []
    for name in names:
        if name_prefix is not None and not name.startswith(name_prefix):
            continue
        try:
            st = os.stat(os.path.join(NETNS_RUN_DIR, name))
        except OSError:
            continue  # deleted meanwhile
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        yield NetnsCandidate(name, st.st_dev, st.st_ino)
    if name_prefix is not None:
        return
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        path = f"/proc/{pid}/ns/net"
        try:
            st = os.stat(path)
        except OSError:
            continue  # exited, or a kernel thread we may not look at
        key = (st.st_dev, st.st_ino)
        if key in seen:
            continue
        seen.add(key)
        yield NetnsCandidate(path, st.st_dev, st.st_ino)


def _owned_addresses(netns: str) -> set[str]:
    with iproute_in_netns(netns) as ipr:
        loopback = {link["index"] for link in ipr.get_links() if link["flags"] & IFF_LOOPBACK}
        found: set[str] = set()
        for a in ipr.get_addr():
            if a["index"] in loopback:
                continue
            addr = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
            if addr:
                found.add(str(ipaddress.ip_address(addr)))
        return found


def addresses_in_netns(netns: str) -> set[str]:
    """The addresses on the non-loopback interfaces of `netns` (canonical text form)."""
    return run_in_fresh_thread(lambda: _owned_addresses(netns))


def find_netns_by_address(ip: str, *, name_prefix: str | None = None) -> str:
    """The netns that has `ip` on a non-loopback interface: its name, or /proc/PID/ns/net.

    Scans named netns, then netns held only by processes. Raises NetnsError when none
    or several own it. `name_prefix` limits the scan to named netns with that prefix
    (useful when several sandboxes use the same addresses). Blocking (one netlink dump
    per namespace); from async code call it through `asyncio.to_thread`.
    """
    want = str(_parse_ip(ip))

    def scan() -> list[str]:
        owners: list[str] = []
        for cand in iter_netns(name_prefix):
            try:
                if want in _owned_addresses(cand.ref):
                    owners.append(cand.ref)
            except (NetnsError, OSError):
                continue  # gone while scanning (process exited, netns deleted)
        return owners

    owners = run_in_fresh_thread(scan)
    if not owners:
        where = f"named netns {name_prefix}*" if name_prefix is not None else "network namespace"
        raise NetnsError(
            f"no {where} owns {want}: is the workload running? "
            "pass its netns name or path explicitly"
        )
    if len(owners) > 1:
        raise NetnsError(
            f"{want} is owned by {len(owners)} network namespaces ({', '.join(owners)}): "
            "pass the workload's netns name or path explicitly"
        )
    return owners[0]


def resolve_workload_netns(netns: str | None, ip: str, *, name_prefix: str | None = None) -> str:
    """The workload's netns: the explicit name/path when given (checked), else found by `ip`."""
    if netns:
        netns_path(netns)  # raises NetnsError with what to do when it does not exist
        return netns
    return find_netns_by_address(ip, name_prefix=name_prefix)
