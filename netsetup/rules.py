"""Capture ruleset for one workload netns as pure data, and its `nft -f` text rendering."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field, replace
from typing import Literal

TABLE_NAME = "ambit"
TABLE_COMMENT = "ambit transparent capture (managed by netsetup; do not edit)"
#: Base chains, hooked last when applying (see netsetup.nft).
OUTPUT_CHAIN = "output"
PREROUTING_CHAIN = "prerouting"
#: Regular chains holding the rules; the base chains only jump to them.
CAPTURE_OUT_CHAIN = "capture_out"
CAPTURE_PRE_CHAIN = "capture_pre"
PRIORITY_MANGLE = -150
DIGEST_PREFIX = "ambit:"


@dataclass(frozen=True)
class CaptureSpec:
    """Everything that decides the capture rules of one workload netns."""

    workload_ip: str
    workload_ip6: str | None = None
    iface: str = "eth0"
    outbound_port: int = 15001
    inbound_plain_port: int = 15006
    inbound_hbone_port: int = 15008
    dns_port: int = 15053
    proxy_mark: int = 0x539
    capture_mark: int = 0x1
    route_table: int = 100

    def __post_init__(self) -> None:
        try:
            v4 = ipaddress.ip_address(self.workload_ip)
        except ValueError:
            raise ValueError(
                f"workload_ip {self.workload_ip!r} is not an IP address: give the workload's IPv4"
            ) from None
        if v4.version == 4 and (
            v4.is_unspecified or v4.is_loopback or v4.is_multicast or v4.is_link_local
        ):
            raise ValueError(
                f"workload_ip {self.workload_ip} is not a unicast workload address: give the "
                "address on the workload's interface"
            )
        if v4.version != 4:
            raise ValueError(
                f"workload_ip {self.workload_ip!r} is IPv6: pass it as workload_ip6 and give the "
                "IPv4 address as workload_ip"
            )
        if self.workload_ip6 is not None:
            try:
                v6 = ipaddress.ip_address(self.workload_ip6)
            except ValueError:
                raise ValueError(
                    f"workload_ip6 {self.workload_ip6!r} is not an IP address: give an IPv6 "
                    "address or None"
                ) from None
            if v6.version != 6:
                raise ValueError(
                    f"workload_ip6 {self.workload_ip6!r} is not IPv6: give an IPv6 address or None"
                )
            if v6.is_unspecified or v6.is_loopback or v6.is_multicast or v6.is_link_local:
                raise ValueError(
                    f"workload_ip6 {self.workload_ip6} is not a unicast workload address: give "
                    "the global or unique-local address on the workload's interface"
                )
        if not self.iface or len(self.iface) > 15 or "/" in self.iface or '"' in self.iface:
            raise ValueError(
                f"interface name {self.iface!r} is invalid: give the workload's interface "
                "(1-15 characters, e.g. eth0)"
            )
        for name in ("outbound_port", "inbound_plain_port", "inbound_hbone_port", "dns_port"):
            port = getattr(self, name)
            if not 0 < port < 65536:
                raise ValueError(f"{name}={port} is not a TCP/UDP port: use 1-65535")
        for name in ("proxy_mark", "capture_mark"):
            mark = getattr(self, name)
            if not 0 < mark < 2**32:
                raise ValueError(f"{name}={mark:#x} is not a packet mark: use 1..0xffffffff")
        if self.proxy_mark == self.capture_mark:
            raise ValueError(
                "proxy_mark and capture_mark are equal: the proxy's own sockets would be captured"
            )
        if not 0 < self.route_table < 2**32 or self.route_table in (253, 254, 255):
            raise ValueError(f"route_table={self.route_table} is reserved or invalid: use e.g. 100")


# -- statements: one nft statement each, rendered to text here and to netlink in nft.py --------

MetaKey = Literal["mark", "l4proto", "nfproto", "iif", "iifname"]
Op = Literal["==", "!="]


@dataclass(frozen=True)
class MetaMatch:
    """`meta KEY VALUE` (mark: int; l4proto: tcp/udp; nfproto: ipv4/ipv6; iif/iifname: str)."""

    key: MetaKey
    value: int | str
    op: Op = "=="


@dataclass(frozen=True)
class AddrMatch:
    """`ip daddr PREFIX` / `ip6 daddr PREFIX`."""

    family: Literal[4, 6]
    prefix: str  # an address or a network in CIDR notation
    field: Literal["saddr", "daddr"] = "daddr"


@dataclass(frozen=True)
class PortMatch:
    """`tcp dport N` / `udp dport != N`."""

    proto: Literal["tcp", "udp"]
    port: int
    op: Op = "=="
    field: Literal["sport", "dport"] = "dport"


@dataclass(frozen=True)
class CtMatch:
    """`ct direction reply|original`, `ct state new` or `ct mark MARK` (packet's conntrack)."""

    key: Literal["direction", "state", "mark"]
    value: int | str  # direction: "original"/"reply"; state: "new"; mark: int


@dataclass(frozen=True)
class CtSetMark:
    """`ct mark set MARK`: remember something about the whole connection."""

    mark: int


@dataclass(frozen=True)
class TcpSyn:
    """`tcp flags syn / fin,syn,rst,ack`: the first packet of a TCP connection."""


@dataclass(frozen=True)
class SocketTransparent:
    """`socket transparent 1`: a socket with IP_TRANSPARENT owns the packet."""


@dataclass(frozen=True)
class FibDaddrLocal:
    """`fib daddr type local`: the destination is an address of this netns."""


@dataclass(frozen=True)
class SetMark:
    """`meta mark set MARK`."""

    mark: int


@dataclass(frozen=True)
class Tproxy:
    """`tproxy ip to ADDR:PORT` (addr None: the address of the incoming interface)."""

    family: Literal[4, 6]
    port: int
    addr: str | None = None


@dataclass(frozen=True)
class Verdict:
    """`accept`, `return` or `jump CHAIN`."""

    kind: Literal["accept", "return", "jump"]
    target: str | None = None


Statement = (
    MetaMatch
    | AddrMatch
    | CtMatch
    | CtSetMark
    | PortMatch
    | TcpSyn
    | SocketTransparent
    | FibDaddrLocal
    | SetMark
    | Tproxy
    | Verdict
)


@dataclass(frozen=True)
class Rule:
    statements: tuple[Statement, ...]
    comment: str | None = None


@dataclass(frozen=True)
class Hook:
    """What makes a chain a base chain."""

    type: Literal["filter", "route"]
    hook: Literal["prerouting", "output"]
    priority: int = PRIORITY_MANGLE
    policy: Literal["accept"] = "accept"


@dataclass(frozen=True)
class Chain:
    name: str
    rules: tuple[Rule, ...]
    hook: Hook | None = None
    comment: str | None = None


@dataclass(frozen=True)
class Ruleset:
    """One nftables table. Base chains only jump to regular chains (see netsetup.nft)."""

    chains: tuple[Chain, ...]
    family: Literal["inet"] = "inet"
    table: str = TABLE_NAME
    comment: str | None = TABLE_COMMENT
    #: Digest of the regular chains' rules; stored as their comment, to recognise them later.
    digest: str = field(default="")

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(f"ruleset has no chain {name!r}")

    @property
    def base_chains(self) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.hook is not None)

    @property
    def regular_chains(self) -> tuple[Chain, ...]:
        return tuple(c for c in self.chains if c.hook is None)

    def with_slot(self, slot: str) -> Ruleset:
        """The same ruleset with regular chains named `<name>_<slot>` (and jumps renamed).

        Applying builds the new rules under a fresh slot name, then switches the base chains'
        single jump rule to it, so a packet never sees a half-built chain.
        """
        renames = {c.name: f"{c.name}_{slot}" for c in self.regular_chains}
        chains = []
        for c in self.chains:
            rules = tuple(
                Rule(
                    tuple(
                        Verdict("jump", renames[s.target])
                        if isinstance(s, Verdict) and s.kind == "jump" and s.target in renames
                        else s
                        for s in r.statements
                    ),
                    r.comment,
                )
                for r in c.rules
            )
            chains.append(replace(c, name=renames.get(c.name, c.name), rules=rules))
        return replace(self, chains=tuple(chains))


def _digest(chains: tuple[Chain, ...]) -> str:
    text = "\n".join(f"{c.name}\n" + "\n".join(_rule_text(r) for r in c.rules) for c in chains)
    return DIGEST_PREFIX + hashlib.sha256(text.encode()).hexdigest()[:16]


def render_ruleset(spec: CaptureSpec) -> Ruleset:
    """The capture rules for one workload netns (see DESIGN section 3 and the capture notes).

    Outbound (chain capture_out, on the route-type output hook): everything the proxy's own
    sockets send (mark proxy_mark; connections they open get ct mark proxy_mark), packets of
    transparent sockets (replies of captured inbound connections), loopback and local
    destinations (replies of transparent sockets to local clients) pass. Replies within a
    connection the proxy opened (its onward connection to the local app, made with the
    client's address as source) get capture_mark so they come back to the proxy's socket;
    other replies (connections that came in uncaptured, e.g. to the HBONE port) pass. A TCP
    connection whose SYN leaves after enrollment gets ct mark capture_mark and all its packets
    get capture_mark (connections open before enrollment keep flowing untouched), as does DNS
    over UDP; the policy route (`ip rule fwmark capture_mark lookup route_table` + `local
    default dev lo`) turns the mark into a detour over lo, where capture_pre hands the
    packets to the proxy with TPROXY.

    Inbound (chain capture_pre, prerouting): packets of established transparent sockets are
    delivered to them; marked packets arriving on lo go to 15053 (DNS, UDP and TCP port 53) or
    15001 (all other TCP); TCP to the workload's address on its interface, except the HBONE
    port, goes to 15006.
    """
    cap = spec.capture_mark
    families: list[tuple[Literal[4, 6], str, str, str]] = [
        (4, "ipv4", "127.0.0.1", spec.workload_ip)
    ]
    if spec.workload_ip6 is not None:
        families.append((6, "ipv6", "::1", spec.workload_ip6))

    pm = spec.proxy_mark
    out_rules: list[Rule] = [
        Rule(
            (MetaMatch("mark", pm), CtMatch("state", "new"), CtSetMark(pm), Verdict("return")),
            "new proxy connections",
        ),
        Rule((MetaMatch("mark", pm), Verdict("return")), "proxy sockets"),
        Rule((SocketTransparent(), Verdict("return")), "transparent sockets"),
        Rule((AddrMatch(4, "127.0.0.0/8"), Verdict("return")), "loopback"),
    ]
    if spec.workload_ip6 is not None:
        out_rules.append(Rule((AddrMatch(6, "::1"), Verdict("return")), "loopback"))
    out_rules += [
        Rule((FibDaddrLocal(), Verdict("return")), "local destinations"),
        Rule(
            (CtMatch("direction", "reply"), CtMatch("mark", pm), SetMark(cap), Verdict("return")),
            "replies to proxy connections",
        ),
        Rule((CtMatch("direction", "reply"), Verdict("return")), "replies"),
        Rule((TcpSyn(), CtSetMark(cap)), "new outbound tcp"),
        Rule((MetaMatch("l4proto", "tcp"), CtMatch("mark", cap), SetMark(cap)), "outbound tcp"),
        Rule((PortMatch("udp", 53), SetMark(cap)), "outbound dns"),
    ]

    pre_rules: list[Rule] = [
        Rule(
            (MetaMatch("l4proto", "tcp"), SocketTransparent(), SetMark(cap), Verdict("accept")),
            "established transparent sockets",
        ),
    ]
    for fam, nfproto, loopback, _ip in families:
        lo_match = (MetaMatch("iif", "lo"), MetaMatch("mark", cap), MetaMatch("nfproto", nfproto))
        pre_rules += [
            Rule(
                (
                    *lo_match,
                    PortMatch("udp", 53),
                    Tproxy(fam, spec.dns_port, loopback),
                    Verdict("accept"),
                ),
                "dns udp",
            ),
            Rule(
                (
                    *lo_match,
                    PortMatch("tcp", 53),
                    Tproxy(fam, spec.dns_port, loopback),
                    Verdict("accept"),
                ),
                "dns tcp",
            ),
            Rule(
                (
                    *lo_match,
                    MetaMatch("l4proto", "tcp"),
                    Tproxy(fam, spec.outbound_port, loopback),
                    Verdict("accept"),
                ),
                "outbound",
            ),
        ]
    for fam, _nfproto, _loopback, ip in families:
        pre_rules.append(
            Rule(
                (
                    MetaMatch("iifname", spec.iface),
                    AddrMatch(fam, ip),
                    PortMatch("tcp", spec.inbound_hbone_port, "!="),
                    Tproxy(fam, spec.inbound_plain_port),
                    SetMark(cap),
                    Verdict("accept"),
                ),
                "inbound",
            )
        )

    regular = (
        Chain(CAPTURE_OUT_CHAIN, tuple(out_rules)),
        Chain(CAPTURE_PRE_CHAIN, tuple(pre_rules)),
    )
    digest = _digest(regular)
    regular = (replace(regular[0], comment=digest), replace(regular[1], comment=digest))
    base = (
        Chain(
            PREROUTING_CHAIN,
            (Rule((Verdict("jump", CAPTURE_PRE_CHAIN),)),),
            Hook("filter", "prerouting"),
        ),
        Chain(
            OUTPUT_CHAIN,
            (Rule((Verdict("jump", CAPTURE_OUT_CHAIN),)),),
            Hook("route", "output"),
        ),
    )
    return Ruleset(chains=regular + base, digest=digest)


# -- text rendering -----------------------------------------------------------------------------


def _quote(s: str) -> str:
    return '"' + s.replace('"', "") + '"'


def _statement_text(s: Statement) -> str:
    if isinstance(s, MetaMatch):
        op = "" if s.op == "==" else "!= "
        if s.key == "mark":
            assert isinstance(s.value, int)
            return f"meta mark {op}0x{s.value:08x}"
        if s.key in ("iif", "iifname"):
            return f"{s.key} {op}{_quote(str(s.value))}"
        return f"meta {s.key} {op}{s.value}"
    if isinstance(s, AddrMatch):
        net = ipaddress.ip_network(s.prefix, strict=False)
        addr = str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        return f"{'ip' if s.family == 4 else 'ip6'} {s.field} {addr}"
    if isinstance(s, PortMatch):
        op = "" if s.op == "==" else "!= "
        return f"{s.proto} {s.field} {op}{s.port}"
    if isinstance(s, CtMatch):
        if s.key == "mark":
            assert isinstance(s.value, int)
            return f"ct mark 0x{s.value:08x}"
        return f"ct {s.key} {s.value}"
    if isinstance(s, CtSetMark):
        return f"ct mark set 0x{s.mark:08x}"
    if isinstance(s, TcpSyn):
        return "tcp flags syn / fin,syn,rst,ack"
    if isinstance(s, SocketTransparent):
        return "socket transparent 1"
    if isinstance(s, FibDaddrLocal):
        return "fib daddr type local"
    if isinstance(s, SetMark):
        return f"meta mark set 0x{s.mark:08x}"
    if isinstance(s, Tproxy):
        fam = "ip" if s.family == 4 else "ip6"
        if s.addr is None:
            return f"tproxy {fam} to :{s.port}"
        addr = s.addr if s.family == 4 else f"[{s.addr}]"
        return f"tproxy {fam} to {addr}:{s.port}"
    if s.kind == "jump":
        return f"jump {s.target}"
    return s.kind


def _rule_text(rule: Rule) -> str:
    text = " ".join(_statement_text(s) for s in rule.statements)
    if rule.comment:
        text += f" comment {_quote(rule.comment)}"
    return text


def render_nft_text(ruleset: Ruleset) -> str:
    """`nft -f` input that creates exactly `ruleset` (chains listed regular first, as applied)."""
    lines = [f"table {ruleset.family} {ruleset.table} {{"]
    if ruleset.comment:
        lines.append(f"\tcomment {_quote(ruleset.comment)}")
    for i, chain in enumerate(ruleset.chains):
        if i:
            lines.append("")
        lines.append(f"\tchain {chain.name} {{")
        if chain.comment:
            lines.append(f"\t\tcomment {_quote(chain.comment)}")
        if chain.hook is not None:
            h = chain.hook
            prio = "mangle" if h.priority == PRIORITY_MANGLE else str(h.priority)
            lines.append(f"\t\ttype {h.type} hook {h.hook} priority {prio}; policy {h.policy};")
        lines.extend(f"\t\t{_rule_text(r)}" for r in chain.rules)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"
