"""Address discovery: which addresses live in network namespaces on this host, reported as claims.

`plan_claims` is pure (the last claims and one scan in, the new claims out);
`HostScanner` is the blocking scan (named netns, then /proc/*/ns/net) and
`AddressDiscovery.run` the thin adapter that scans off the event loop about once a
second and hands changed claims to the config client.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from config.placement import MAX_CLAIMS
from netsetup.find import addresses_in_netns, iter_netns
from netsetup.netns import NetnsError

log = structlog.get_logger("ztunnel.discovery")

SCAN_INTERVAL = 1.0  # seconds between scans
REFRESH = 5.0  # seconds before the addresses of an already known netns are read again
#: environment variable: only named netns starting with this prefix are scanned (no
#: /proc scan); for hosts that run several nodes side by side (test sandboxes)
PREFIX_ENV = "AMBIT_DISCOVERY_NETNS_PREFIX"


@dataclass(frozen=True)
class NetnsScan:
    """One network namespace found on the host and the addresses on its interfaces."""

    ref: str  # a name from /run/netns, or /proc/PID/ns/net
    addresses: frozenset[str]


@dataclass(frozen=True)
class ClaimsPlan:
    """The claims after one scan, and how they differ from the previous ones."""

    claims: Mapping[str, str]  # address -> netns
    added: tuple[str, ...]
    removed: tuple[str, ...]
    ambiguous: tuple[str, ...]  # addresses in several local netns: not claimed
    dropped: int  # addresses left out over MAX_CLAIMS

    @property
    def changed(self) -> bool:
        return bool(self.added or self.removed)


def _claimable(address: str) -> str | None:
    """The canonical form of an address a workload can be reached at, else None."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_unspecified:
        return None
    return str(ip)


def plan_claims(
    previous: Mapping[str, str], scans: Iterable[NetnsScan], *, limit: int = MAX_CLAIMS
) -> ClaimsPlan:
    """The claims for one scan: each address found in exactly one netns, with that netns.

    An address found in several local netns is not claimed (no way to tell which one
    is the workload). At most `limit` addresses are claimed (the lowest, sorted as text),
    so the report stays bounded.
    """
    owners: dict[str, list[str]] = {}
    for scan in scans:
        for a in scan.addresses:
            addr = _claimable(a)
            if addr is not None:
                owners.setdefault(addr, []).append(scan.ref)
    ambiguous = tuple(sorted(a for a, refs in owners.items() if len(refs) > 1))
    single = sorted(a for a, refs in owners.items() if len(refs) == 1)
    kept = single[:limit]
    claims = {a: owners[a][0] for a in kept}
    added = tuple(sorted(a for a in claims if previous.get(a) != claims[a]))
    removed = tuple(sorted(a for a in previous if a not in claims))
    return ClaimsPlan(claims, added, removed, ambiguous, len(single) - len(kept))


class HostScanner:
    """The blocking scan: every netns on the host except this process's own.

    A netns is read on every scan during its first `refresh` seconds (a workload being
    set up gets its address after its netns exists), then once every `refresh` seconds
    (one netlink dump costs a few ms: a host with many netns is not re-read in full
    every second). With `name_prefix`, only named netns starting with it. Namespaces
    that vanish while being read are skipped.
    """

    def __init__(self, name_prefix: str | None = None, *, refresh: float = REFRESH) -> None:
        self.name_prefix = name_prefix
        self.refresh = refresh
        # (dev, inode) -> (first seen, last read, addresses)
        self._known: dict[tuple[int, int], tuple[float, float, frozenset[str]]] = {}

    def __call__(self) -> list[NetnsScan]:
        now = time.monotonic()
        own = os.stat("/proc/self/ns/net")
        out: list[NetnsScan] = []
        seen: dict[tuple[int, int], tuple[float, float, frozenset[str]]] = {}
        for cand in iter_netns(self.name_prefix):
            key = (cand.dev, cand.inode)
            if key == (own.st_dev, own.st_ino):
                continue  # the node's own addresses are never a workload's
            first, last, addrs = self._known.get(key, (now, -1e18, frozenset()))
            if now - first < self.refresh or now - last >= self.refresh:
                try:
                    addrs, last = frozenset(addresses_in_netns(cand.ref)), now
                except (NetnsError, OSError):
                    continue  # gone while scanning (process exited, netns deleted)
            seen[key] = (first, last, addrs)
            if addrs:
                out.append(NetnsScan(cand.ref, addrs))
        self._known = seen
        return out


class AddressDiscovery:
    """Scans this host's netns every `interval` seconds; reports claims when they change."""

    def __init__(
        self,
        report: Callable[[Mapping[str, str]], None],
        *,
        name_prefix: str | None = None,
        interval: float = SCAN_INTERVAL,
        scan: Callable[[], list[NetnsScan]] | None = None,
    ) -> None:
        self.report = report
        self.interval = interval
        self.scan = scan if scan is not None else HostScanner(name_prefix)
        self.claims: Mapping[str, str] = {}
        self._warned: tuple[str, ...] = ()

    async def step(self) -> ClaimsPlan:
        """One scan (in a worker thread); reports the claims when they changed."""
        scans = await asyncio.to_thread(self.scan)
        plan = plan_claims(self.claims, scans)
        if plan.ambiguous and plan.ambiguous != self._warned:
            log.warning("addresses found in several network namespaces are not claimed: "
                        "annotate their WorkloadEntries with ambit.dev/node and ambit.dev/netns",
                        addresses=list(plan.ambiguous))
        self._warned = plan.ambiguous
        if plan.dropped:
            log.warning("too many local addresses to report; the rest are not claimed",
                        limit=MAX_CLAIMS, dropped=plan.dropped)
        if plan.changed:
            log.info("local workload addresses changed", added=list(plan.added),
                     removed=list(plan.removed), claimed=len(plan.claims))
        self.claims = plan.claims
        self.report(plan.claims)
        return plan

    async def run(self) -> None:
        """Scan forever (cancel to stop); a failed scan is logged and retried."""
        while True:
            try:
                await self.step()
            except (OSError, NetnsError) as e:
                log.warning("scanning network namespaces failed; retrying", reason=str(e))
            await asyncio.sleep(self.interval)
