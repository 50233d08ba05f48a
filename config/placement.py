"""Placement of WorkloadEntries without an `ambit.dev/node` annotation, by claimed address.

Each ztunnel reports the addresses that live in network namespaces on its host (a
"claims" message: address -> netns name or path). An address claimed by exactly one
node is placed there, with the claimed netns; an address claimed by several nodes is
placed nowhere (a conflict, reported with the nodes' names) until only one claims it.
Everything here is pure: claims and workloads in, a typed placement out.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

#: most addresses one node may claim in one message (the rest are ignored)
MAX_CLAIMS = 512
#: longest netns name or path accepted in a claim
MAX_NETNS_LEN = 128
#: largest encoded claims message a node sends (the control plane reads 64 KiB lines)
MAX_CLAIMS_BYTES = 48 * 1024


class ClaimsError(ValueError):
    """A claims message that cannot be used."""


@dataclass(frozen=True)
class Claim:
    """The node (and the netns on it) that owns an address."""

    node: str
    netns: str


@dataclass(frozen=True)
class Conflict:
    """A workload whose address several nodes claim: placed on none of them."""

    workload: str  # NS/NAME
    address: str
    nodes: tuple[str, ...]

    def message(self) -> str:
        return (
            f"WorkloadEntry {self.workload} ({self.address}) is claimed by nodes "
            f"{', '.join(self.nodes)}: it runs on no node until only one of them has "
            "that address, or annotate it with ambit.dev/node"
        )


@dataclass(frozen=True)
class Placement:
    """Who owns each claimed address: one node (`owners`) or several (`conflicts`)."""

    owners: Mapping[str, Claim]
    conflicts: Mapping[str, tuple[str, ...]]  # address -> the claiming nodes, sorted

    def lookup(self, address: str) -> Claim | None:
        """The claim placing `address` (any spelling), None when unclaimed or contested."""
        try:
            return self.owners.get(canonical(address))
        except ClaimsError:
            return None

    def changed_addresses(self, other: Placement) -> set[str]:
        """Addresses placed differently in `other` (owner, netns or conflict changed)."""
        out = {a for a in self.owners.keys() | other.owners.keys()
               if self.owners.get(a) != other.owners.get(a)}
        out |= {a for a in self.conflicts.keys() | other.conflicts.keys()
                if self.conflicts.get(a) != other.conflicts.get(a)}
        return out


EMPTY = Placement(owners={}, conflicts={})


def canonical(address: str) -> str:
    """The canonical text form of an IP address (raises ClaimsError when it is not one)."""
    try:
        return str(ipaddress.ip_address(address.strip("[]")))
    except ValueError:
        raise ClaimsError(f"{address!r} is not an IP address") from None


def parse_claims(raw: object) -> dict[str, str]:
    """A claims message's `addresses` object, checked: canonical address -> netns.

    Raises ClaimsError on a malformed message; more than MAX_CLAIMS entries is malformed
    too (a ztunnel sends at most that many).
    """
    if not isinstance(raw, dict):
        raise ClaimsError("claims: `addresses` must be an object of address -> netns")
    if len(raw) > MAX_CLAIMS:
        raise ClaimsError(f"claims: {len(raw)} addresses, at most {MAX_CLAIMS} are accepted")
    out: dict[str, str] = {}
    for addr, netns in raw.items():
        if not isinstance(addr, str) or not isinstance(netns, str):
            raise ClaimsError("claims: addresses and netns must be strings")
        if not netns or len(netns) > MAX_NETNS_LEN or "\x00" in netns:
            raise ClaimsError(f"claims: bad netns {netns[:MAX_NETNS_LEN]!r} for {addr}")
        out[canonical(addr)] = netns
    return out


def bound_claims(claims: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """What a node may send: (claims that fit, addresses left out).

    Leaves out netns names or paths longer than MAX_NETNS_LEN, and then the highest
    addresses (sorted as text) beyond MAX_CLAIMS or MAX_CLAIMS_BYTES, so the message is
    always accepted.
    """
    kept: dict[str, str] = {}
    left: list[str] = []
    size = 64  # the message around the entries
    for addr in sorted(claims):
        netns = claims[addr]
        entry = len(json.dumps(addr)) + len(json.dumps(netns)) + 2
        if (not netns or len(netns) > MAX_NETNS_LEN or "\x00" in netns
                or len(kept) >= MAX_CLAIMS or size + entry > MAX_CLAIMS_BYTES):
            left.append(addr)
            continue
        kept[addr] = netns
        size += entry
    return kept, left


def plan_placement(claims: Mapping[str, Mapping[str, str]]) -> Placement:
    """Placement from every connected node's claims (node -> address -> netns)."""
    by_addr: dict[str, list[Claim]] = {}
    for node in sorted(claims):
        for addr, netns in claims[node].items():
            by_addr.setdefault(addr, []).append(Claim(node, netns))
    owners: dict[str, Claim] = {}
    conflicts: dict[str, tuple[str, ...]] = {}
    for addr, cs in by_addr.items():
        if len(cs) == 1:
            owners[addr] = cs[0]
        else:
            conflicts[addr] = tuple(c.node for c in cs)
    return Placement(owners=owners, conflicts=conflicts)


def conflicts_for(placement: Placement, workloads: Iterable[tuple[str, str]]) -> list[Conflict]:
    """The contested ones among unannotated workloads given as (NS/NAME, address)."""
    out: list[Conflict] = []
    for name, address in workloads:
        try:
            addr = canonical(address)
        except ClaimsError:
            continue
        nodes = placement.conflicts.get(addr)
        if nodes is not None:
            out.append(Conflict(name, addr, nodes))
    return sorted(out, key=lambda c: c.workload)
