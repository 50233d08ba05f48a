"""Apply, read and remove a capture ruleset in a netns through pyroute2's nftables netlink API.

Ordering (why no packet ever sees a half-built ruleset)
-------------------------------------------------------
pyroute2's NFTables sends every call as its own nftables transaction. An apply is a sequence
of transactions ordered so that every state in between is harmless:

1. build (one transaction per step, nothing hooked refers to what they touch):
   create the table if missing (an empty table hooks nothing); delete leftovers no base chain
   references (e.g. chains of a crashed apply); create the new regular chains complete,
   under a fresh *slot* name (`capture_out_a`, `_b` or `_c`: one not referenced now);
2. switch (ONE transaction, sent as a single netlink batch): create the base chains that are
   missing (prerouting, output) with their single jump rule, or replace the jump rule of the
   existing ones, so both hooks move from the old slot (or nothing) to the new slot at once;
3. cleanup (one transaction per step): delete the old slot's chains, which nothing
   references any more.

A crash between any two transactions leaves either the old complete ruleset, the new
complete ruleset, or (first apply) no capture: traffic is captured completely or passes
untouched, never marked without being delivered. A failure during build or switch rolls back
what the apply built. Removal is a single transaction (delete the table) that unhooks
everything at once.

`read_table` reads the table back (raw netlink: pyroute2 decodes tproxy/socket rules only
partially, so rules are recognised by the chain's comment (a digest of its rules), each
rule's comment and expression count, and the base chains' jump targets).
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
import struct
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from netsetup.netns import run_in_netns
from netsetup.rules import (
    TABLE_NAME,
    AddrMatch,
    Chain,
    CtMatch,
    CtSetMark,
    FibDaddrLocal,
    Hook,
    MetaMatch,
    PortMatch,
    Rule,
    Ruleset,
    SetMark,
    SocketTransparent,
    Statement,
    TcpSyn,
    Tproxy,
    Verdict,
)

T = TypeVar("T")

NFPROTO_INET = 1
NFPROTO_IPV4 = 2
NFPROTO_IPV6 = 10
SLOTS = ("a", "b", "c")  # two base chains reference at most two: one is always free

_HOOKNUMS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
_HOOKNAMES = {v: k for k, v in _HOOKNUMS.items()}
_NF_ACCEPT = 1
_NFT_RETURN = -5
_NFT_JUMP = -3
_META = {"len": 0, "protocol": 1, "mark": 3, "iif": 4, "iifname": 6, "nfproto": 15, "l4proto": 16}
_L4 = {"tcp": 6, "udp": 17}
_NFPROTO = {"ipv4": NFPROTO_IPV4, "ipv6": NFPROTO_IPV6}
_RTN_LOCAL = 2
_NFT_FIB_RESULT_ADDRTYPE = 3
_NFTA_FIB_F_DADDR = 1 << 1
_PAYLOAD_NETWORK = 1
_PAYLOAD_TRANSPORT = 2
_CT_STATE = 0
_TCP_SYN = 0x02
_TCP_FSRA = 0x17  # fin | syn | rst | ack
_CT_DIRECTION = 1
_CT_STATE_BITS = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
_CT_MARK = 3
_NFNL_MSG_BATCH_BEGIN = 0x10
_NFNL_MSG_BATCH_END = 0x11


class NftError(Exception):
    """Applying or reading nftables state failed; the message says what to do."""


# -- observed state ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleState:
    handle: int
    comment: str | None
    jump: str | None  # target when the rule is a single `jump CHAIN`
    #: expression names and constants (compared values, immediates, masks), in order
    fingerprint: tuple[str | bytes, ...] = ()


@dataclass(frozen=True)
class ChainState:
    name: str
    hook: Hook | None
    comment: str | None
    rules: tuple[RuleState, ...]


@dataclass(frozen=True)
class TableState:
    name: str
    chains: tuple[ChainState, ...]

    def chain(self, name: str) -> ChainState | None:
        for c in self.chains:
            if c.name == name:
                return c
        return None

    def live_slot(self) -> str | None:
        """The slot the base chains jump to (None: nothing hooked)."""
        for c in self.chains:
            if c.hook is None:
                continue
            for r in c.rules:
                if r.jump and "_" in r.jump:
                    slot = r.jump.rsplit("_", 1)[1]
                    if slot in SLOTS:
                        return slot
        return None

    def referenced(self) -> set[str]:
        return {r.jump for c in self.chains if c.hook is not None for r in c.rules if r.jump}


def check_state(current: TableState | None, desired: Ruleset) -> tuple[str, ...]:
    """What differs between the table in the kernel and `desired` (empty: complete and equal)."""
    if current is None:
        return (f"table {desired.family} {desired.table} is missing",)
    problems: list[str] = []
    slot = current.live_slot()
    if slot is None:
        return (f"table {desired.family} {desired.table} hooks none of its chains",)
    want = desired.with_slot(slot)
    wanted_names = {c.name for c in want.chains}
    for chain in want.chains:
        have = current.chain(chain.name)
        if have is None:
            problems.append(f"chain {chain.name} is missing")
            continue
        if have.hook != chain.hook:
            problems.append(f"chain {chain.name} has hook {have.hook}, want {chain.hook}")
        if chain.hook is not None:
            jumps = [r.jump for r in have.rules]
            expected = [_jump_target(r) for r in chain.rules]
            if jumps != expected:
                problems.append(f"base chain {chain.name} jumps to {jumps}, want {expected}")
            continue
        if have.comment != chain.comment:
            problems.append(
                f"chain {chain.name} holds ruleset {have.comment}, want {chain.comment}"
            )
        got = [(r.comment, r.fingerprint) for r in have.rules]
        if got != [(r.comment, fingerprint(encode_rule(r))) for r in chain.rules]:
            problems.append(
                f"chain {chain.name} has {len(have.rules)} rules, want {len(chain.rules)} "
                "(or they were changed)"
            )
    for have in current.chains:
        if have.name not in wanted_names:
            problems.append(f"stray chain {have.name}")
    return tuple(problems)


def fingerprint(exprs: Sequence[Any]) -> tuple[str | bytes, ...]:
    """Expression names and data constants of a rule, from our encoding or from a kernel
    dump decoded by pyroute2 (both are nested `{"attrs": [(name, value), ...]}`)."""
    out: list[str | bytes] = []

    def walk(node: Any) -> None:
        attrs = node.get("attrs") if hasattr(node, "get") else None
        if not attrs:
            return
        for item in attrs:
            name, value = item[0], item[1]
            if name == "NFTA_EXPR_NAME":
                out.append(str(value))
            elif name == "NFTA_DATA_VALUE":
                out.append(value.encode() if isinstance(value, str) else bytes(value))
            else:
                walk(value)

    for expr in exprs:
        walk(expr)
    return tuple(out)


def _jump_target(rule: Rule) -> str | None:
    if len(rule.statements) == 1:
        s = rule.statements[0]
        if isinstance(s, Verdict) and s.kind == "jump":
            return s.target
    return None


# -- plan -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CreateTable:
    table: str
    comment: str | None


@dataclass(frozen=True)
class CreateChain:
    chain: Chain  # created empty; rules follow as AddRule steps


@dataclass(frozen=True)
class AddRule:
    chain: str
    rule: Rule


@dataclass(frozen=True)
class ReplaceRule:
    chain: str
    handle: int
    rule: Rule


@dataclass(frozen=True)
class InsertRule:
    chain: str
    rule: Rule


@dataclass(frozen=True)
class DeleteRule:
    chain: str
    handle: int


@dataclass(frozen=True)
class DeleteChain:
    chain: str


@dataclass(frozen=True)
class DeleteTable:
    table: str


Step = (
    CreateTable
    | CreateChain
    | AddRule
    | ReplaceRule
    | InsertRule
    | DeleteRule
    | DeleteChain
    | DeleteTable
)


@dataclass(frozen=True)
class ApplyPlan:
    """`build` runs as one transaction per step (nothing jumps to what it builds), `switch` as
    ONE transaction (hooks the new chains and unhooks the old), `cleanup` one per step."""

    table: str
    family: Literal["inet"]
    slot: str
    build: tuple[Step, ...] = ()
    switch: tuple[Step, ...] = ()
    cleanup: tuple[Step, ...] = ()

    @property
    def steps(self) -> tuple[Step, ...]:
        return self.build + self.switch + self.cleanup

    @property
    def noop(self) -> bool:
        return not self.steps


def plan_apply(current: TableState | None, desired: Ruleset) -> ApplyPlan:
    """The ordered transactions that turn `current` into `desired` (see the module docstring)."""
    if not check_state(current, desired):
        slot = current.live_slot() if current else None
        return ApplyPlan(desired.table, desired.family, slot or SLOTS[0])
    referenced = current.referenced() if current else set()
    slot = next(
        s for s in SLOTS if not any(f"{c.name}_{s}" in referenced for c in desired.regular_chains)
    )
    want = desired.with_slot(slot)
    build: list[Step] = []
    if current is None:
        build.append(CreateTable(desired.table, desired.comment))
    base_names = {c.name for c in want.base_chains}
    # 2. unreferenced leftovers (including any half-built chain of the slot we build now)
    if current is not None:
        for c in current.chains:
            if c.name not in base_names and c.name not in referenced:
                build.append(DeleteChain(c.name))
    # 3. the new regular chains, complete, before anything jumps to them
    for chain in want.regular_chains:
        build.append(CreateChain(chain))
        build.extend(AddRule(chain.name, r) for r in chain.rules)
    # 4. one transaction: every base chain jumps to the new slot (prerouting listed first)
    switch: list[Step] = []
    for chain in sorted(
        want.base_chains, key=lambda c: c.hook is not None and c.hook.hook == "output"
    ):
        have = current.chain(chain.name) if current else None
        if have is not None and have.hook != chain.hook:
            switch.append(DeleteChain(chain.name))
            have = None
        if have is None:
            switch.append(CreateChain(chain))
            switch.extend(AddRule(chain.name, r) for r in chain.rules)
            continue
        if len(have.rules) == 1 and len(chain.rules) == 1:
            switch.append(ReplaceRule(chain.name, have.rules[0].handle, chain.rules[0]))
            continue
        switch.extend(InsertRule(chain.name, r) for r in reversed(chain.rules))
        switch.extend(DeleteRule(chain.name, r.handle) for r in have.rules)
    # 5. the old slot's chains (and strays that a base chain referenced)
    cleanup: list[Step] = []
    if current is not None:
        keep = {c.name for c in want.chains}
        for c in current.chains:
            if c.name in referenced and c.name not in keep:
                cleanup.append(DeleteChain(c.name))
    return ApplyPlan(
        desired.table, desired.family, slot, tuple(build), tuple(switch), tuple(cleanup)
    )


# -- netlink encoding -----------------------------------------------------------------------------


def _ex(name: str, **kwargs: Any) -> dict[str, Any]:
    data = [(f"NFTA_{name.upper()}_{k.upper()}", v) for k, v in kwargs.items()]
    return {"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]}


def _data(value: bytes) -> dict[str, Any]:
    return {"attrs": [("NFTA_DATA_VALUE", value)]}


def _cmp(value: bytes, op: str = "==") -> dict[str, Any]:
    return _ex("cmp", sreg=1, op=0 if op == "==" else 1, data=_data(value))


def _u32(value: int) -> bytes:
    return struct.pack("=I", value)  # host byte order, like nft's meta mark / ifindex


def _verdict(code: int, chain: str | None = None) -> dict[str, Any]:
    attrs: list[tuple[str, Any]] = [("NFTA_VERDICT_CODE", code)]
    if chain is not None:
        attrs.append(("NFTA_VERDICT_CHAIN", chain))
    return _ex("immediate", dreg=0, data={"attrs": [("NFTA_DATA_VERDICT", {"attrs": attrs})]})


def _fib_result_flags(value: int) -> frozenset[str]:
    # pyroute2 0.9.7 declares NFTA_FIB_RESULT as a bit set (it is an enum in the kernel) and
    # NFTA_FIB_FLAGS as an enum (it is a bit set): express the enum value as the bits it is.
    names = (
        "NFT_FIB_RESULT_UNSPEC",
        "NFT_FIB_RESULT_OIF",
        "NFT_FIB_RESULT_OIFNAME",
        "NFT_FIB_RESULT_ADDRTYPE",
    )
    return frozenset(n for i, n in enumerate(names) if value & (1 << i))


def encode_rule(rule: Rule) -> list[dict[str, Any]]:
    """Netlink expressions for `rule`, as `nft -f` compiles the same text in an inet table."""
    out: list[dict[str, Any]] = []
    nfproto: int | None = None
    l4: str | None = None

    def need_nfproto(value: int) -> None:
        nonlocal nfproto
        if nfproto != value:
            out.append(_ex("meta", key=_META["nfproto"], dreg=1))
            out.append(_cmp(bytes([value])))
            nfproto = value

    def need_l4(proto: str) -> None:
        nonlocal l4
        if l4 != proto:
            out.append(_ex("meta", key=_META["l4proto"], dreg=1))
            out.append(_cmp(bytes([_L4[proto]])))
            l4 = proto

    for s in rule.statements:
        out.extend(_encode_statement(s, need_nfproto, need_l4))
        if isinstance(s, MetaMatch) and s.op == "==":
            if s.key == "nfproto":
                nfproto = _NFPROTO[str(s.value)]
            elif s.key == "l4proto":
                l4 = str(s.value)
    return out


def _encode_statement(
    s: Statement, need_nfproto: Callable[[int], None], need_l4: Callable[[str], None]
) -> list[dict[str, Any]]:
    if isinstance(s, MetaMatch):
        load = _ex("meta", key=_META[s.key], dreg=1)
        if s.key == "mark":
            assert isinstance(s.value, int)
            return [load, _cmp(_u32(s.value), s.op)]
        if s.key == "l4proto":
            return [load, _cmp(bytes([_L4[str(s.value)]]), s.op)]
        if s.key == "nfproto":
            return [load, _cmp(bytes([_NFPROTO[str(s.value)]]), s.op)]
        if s.key == "iif":
            if s.value != "lo":
                raise ValueError(f'iif {s.value!r}: only iif "lo" is supported; use iifname')
            return [load, _cmp(_u32(1), s.op)]  # lo is ifindex 1 in every netns
        name = str(s.value).encode()
        return [load, _cmp(name.ljust(16, b"\0"), s.op)]
    if isinstance(s, AddrMatch):
        net = ipaddress.ip_network(s.prefix, strict=False)
        need_nfproto(NFPROTO_IPV4 if s.family == 4 else NFPROTO_IPV6)
        if s.family == 4:
            offset = 12 if s.field == "saddr" else 16
        else:
            offset = 8 if s.field == "saddr" else 24
        nbytes = (net.prefixlen + 7) // 8
        raw = net.network_address.packed[:nbytes]
        exprs = [_ex("payload", dreg=1, base=_PAYLOAD_NETWORK, offset=offset, len=nbytes)]
        if net.prefixlen % 8:
            mask = net.netmask.packed[:nbytes]
            exprs.append(
                _ex(
                    "bitwise",
                    sreg=1,
                    dreg=1,
                    len=nbytes,
                    mask=_data(mask),
                    xor=_data(bytes(nbytes)),
                )
            )
        exprs.append(_cmp(raw))
        return exprs
    if isinstance(s, PortMatch):
        need_l4(s.proto)
        offset = 0 if s.field == "sport" else 2
        return [
            _ex("payload", dreg=1, base=_PAYLOAD_TRANSPORT, offset=offset, len=2),
            _cmp(struct.pack(">H", s.port), s.op),
        ]
    if isinstance(s, CtMatch):
        if s.key == "mark":
            assert isinstance(s.value, int)
            return [_ex("ct", dreg=1, key=_CT_MARK), _cmp(_u32(s.value))]
        if s.key == "state":
            bit = _CT_STATE_BITS[str(s.value)]
            return [
                _ex("ct", dreg=1, key=_CT_STATE),
                _ex("bitwise", sreg=1, dreg=1, len=4, mask=_data(_u32(bit)), xor=_data(_u32(0))),
                _cmp(_u32(0), "!="),
            ]
        direction = {"original": 0, "reply": 1}[str(s.value)]
        return [_ex("ct", dreg=1, key=_CT_DIRECTION), _cmp(bytes([direction]))]
    if isinstance(s, CtSetMark):
        return [
            _ex("immediate", dreg=1, data=_data(_u32(s.mark))),
            _ex("ct", key=_CT_MARK, sreg=1),
        ]
    if isinstance(s, TcpSyn):
        need_l4("tcp")
        return [
            _ex("payload", dreg=1, base=_PAYLOAD_TRANSPORT, offset=13, len=1),
            _ex("bitwise", sreg=1, dreg=1, len=1, mask=_data(bytes([_TCP_FSRA])),
                xor=_data(b"\x00")),
            _cmp(bytes([_TCP_SYN])),
        ]  # fmt: skip
    if isinstance(s, SocketTransparent):
        return [_ex("socket", key=0, dreg=1), _cmp(b"\x01")]
    if isinstance(s, FibDaddrLocal):
        return [
            _ex(
                "fib",
                dreg=1,
                result=_fib_result_flags(_NFT_FIB_RESULT_ADDRTYPE),
                flags=_NFTA_FIB_F_DADDR,
            ),
            _cmp(_u32(_RTN_LOCAL)),
        ]
    if isinstance(s, SetMark):
        return [
            _ex("immediate", dreg=1, data=_data(_u32(s.mark))),
            _ex("meta", key=_META["mark"], sreg=1),
        ]
    if isinstance(s, Tproxy):
        fam = NFPROTO_IPV4 if s.family == 4 else NFPROTO_IPV6
        port = struct.pack(">H", s.port)
        if s.addr is None:
            return [
                _ex("immediate", dreg=1, data=_data(port)),
                _ex("tproxy", family=fam, reg_port=1),
            ]
        addr = socket.inet_pton(socket.AF_INET if s.family == 4 else socket.AF_INET6, s.addr)
        return [
            _ex("immediate", dreg=1, data=_data(addr)),
            _ex("immediate", dreg=2, data=_data(port)),
            _ex("tproxy", family=fam, reg_addr=1, reg_port=2),
        ]
    if s.kind == "accept":
        return [_verdict(_NF_ACCEPT)]
    if s.kind == "return":
        return [_verdict(_NFT_RETURN)]
    return [_verdict(_NFT_JUMP, s.target)]


# -- execution ------------------------------------------------------------------------------------

_worker_lock = threading.Lock()


def _in_worker(fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread: pyroute2's sync API needs a thread without a running loop,
    and switching a thread's netns must never happen on an event loop's thread."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:  # re-raised in the caller's thread
            error.append(exc)

    with _worker_lock:  # one netlink writer at a time keeps transactions strictly ordered
        t = threading.Thread(target=target, name="netsetup-nft", daemon=True)
        t.start()
        t.join()
    if error:
        raise error[0]
    return result[0]


def in_netns(netns: str, fn: Callable[[], T]) -> T:
    """Run `fn` inside `netns` on a worker thread (safe to call from an event loop thread)."""
    return _in_worker(lambda: run_in_netns(netns, fn))


def _open(family: int = NFPROTO_INET) -> Any:
    from pyroute2.nftables.main import NFTables

    return NFTables(nfgen_family=family)


def _netlink_code(exc: BaseException) -> int | None:
    code = getattr(exc, "code", None)
    return code if isinstance(code, int) else None


def _describe(step: Step) -> str:
    if isinstance(step, CreateTable):
        return f"create table {step.table}"
    if isinstance(step, CreateChain):
        return f"create chain {step.chain.name}"
    if isinstance(step, AddRule | InsertRule | ReplaceRule):
        return f"add rule to {step.chain}"
    if isinstance(step, DeleteRule):
        return f"delete rule {step.handle} of {step.chain}"
    if isinstance(step, DeleteChain):
        return f"delete chain {step.chain}"
    return f"delete table {step.table}"


def _error_for(exc: BaseException, step: Step, netns: str) -> NftError:
    code = _netlink_code(exc)
    where = f"in netns {netns!r}"
    if code == errno.EPERM:
        return NftError(
            f"nftables refused to {_describe(step)} {where} (EPERM): "
            "run as root or grant CAP_NET_ADMIN"
        )
    if code in (errno.ENOENT, errno.EOPNOTSUPP) and isinstance(
        step, AddRule | InsertRule | ReplaceRule
    ):
        kinds = {type(s) for s in step.rule.statements}
        if Tproxy in kinds:
            return NftError(
                "kernel lacks nftables TPROXY (CONFIG_NFT_TPROXY): load module nft_tproxy or "
                "use a kernel built with it"
            )
        if SocketTransparent in kinds:
            return NftError(
                "kernel lacks the nftables socket match (CONFIG_NFT_SOCKET): load module "
                "nft_socket or use a kernel built with it"
            )
        if kinds & {CtMatch, CtSetMark}:
            return NftError(
                "kernel lacks nftables conntrack support (CONFIG_NFT_CT, CONFIG_NF_CONNTRACK): "
                "load module nft_ct or use a kernel built with it"
            )
        if FibDaddrLocal in kinds:
            return NftError(
                "kernel lacks the nftables fib expression (CONFIG_NFT_FIB_INET): load module "
                "nft_fib_inet or use a kernel built with it"
            )
    if code in (errno.ENOENT, errno.EOPNOTSUPP) and isinstance(step, CreateChain | CreateTable):
        return NftError(
            f"kernel refused to {_describe(step)} {where} ({errno.errorcode.get(code, code)}): "
            "it needs nf_tables with inet family and route chains (CONFIG_NF_TABLES_INET, "
            "CONFIG_NFT_CHAIN_ROUTE_IPV4/IPV6)"
        )
    return NftError(f"nftables failed to {_describe(step)} {where}: {exc}")


def _messages(step: Step, table: str) -> list[Any]:
    """The netlink message(s) of one step, as pyroute2's NFTables would build them."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE
    from pyroute2.netlink import NLM_F_REQUEST as REQ
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES
    from pyroute2.netlink.nfnetlink import nftsocket as ns

    def msg(cls: Any, mtype: int, flags: int, **kw: Any) -> Any:
        m = cls()
        m["attrs"] = [[cls.name2nla(k), v] for k, v in kw.items()]
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | mtype
        m["header"]["flags"] = REQ | NLM_F_ACK | flags
        m["nfgen_family"] = NFPROTO_INET
        return m

    add = NLM_F_CREATE | NLM_F_APPEND
    if isinstance(step, CreateTable):
        kw: dict[str, Any] = {"name": table}
        if step.comment:
            kw["userdata"] = step.comment
        return [msg(ns.nft_table_msg, ns.NFT_MSG_NEWTABLE, add, **kw)]
    if isinstance(step, CreateChain):
        c = step.chain
        kw = {"table": table, "name": c.name}
        if c.hook is not None:
            kw["hook"] = {
                "attrs": [
                    ["NFTA_HOOK_HOOKNUM", _HOOKNUMS[c.hook.hook]],
                    ["NFTA_HOOK_PRIORITY", c.hook.priority],
                ]
            }
            kw["policy"] = _NF_ACCEPT
            kw["type"] = c.hook.type
        if c.comment:
            kw["userdata"] = c.comment
        return [msg(ns.nft_chain_msg, ns.NFT_MSG_NEWCHAIN, add, **kw)]
    if isinstance(step, AddRule | InsertRule | ReplaceRule):
        kw = {"table": table, "chain": step.chain}
        flags = {AddRule: add, InsertRule: NLM_F_CREATE, ReplaceRule: NLM_F_REPLACE}[type(step)]
        if isinstance(step, ReplaceRule):
            kw["handle"] = step.handle
        kw["expressions"] = encode_rule(step.rule)
        if step.rule.comment:
            kw["userdata"] = step.rule.comment
        return [msg(ns.nft_rule_msg, ns.NFT_MSG_NEWRULE, flags, **kw)]
    if isinstance(step, DeleteRule):
        return [
            msg(ns.nft_rule_msg, ns.NFT_MSG_DELRULE, 0, table=table, chain=step.chain,
                handle=step.handle)
        ]  # fmt: skip
    if isinstance(step, DeleteChain):
        return [msg(ns.nft_chain_msg, ns.NFT_MSG_DELCHAIN, 0, table=table, name=step.chain)]
    return [msg(ns.nft_table_msg, ns.NFT_MSG_DELTABLE, 0, name=step.table)]


_NLMSG_HEADER = struct.Struct("=IHHII")  # length, type, flags, sequence number, port id


@functools.lru_cache(maxsize=4096)
def _template(step: Step, table: str) -> tuple[tuple[type, bytes, int, int], ...]:
    """The messages of `step` encoded once: pyroute2's encoder costs about a millisecond per
    rule, and the same rules are sent again on every repair and re-enroll."""
    out = []
    for m in _messages(step, table):
        m.encode()
        out.append((type(m), bytes(m.data), m["header"]["type"], m["header"]["flags"]))
    return tuple(out)


def _prepared(step: Step, table: str) -> list[Any]:
    """pyroute2 message objects that encode to the cached bytes with a fresh header."""
    msgs = []
    for cls, data, mtype, flags in _template(step, table):
        msg = _prepared_class(cls)()
        msg.template = data
        msg["header"]["type"] = mtype
        msg["header"]["flags"] = flags
        msgs.append(msg)
    return msgs


@functools.cache
def _prepared_class(cls: type) -> type:
    def encode(self: Any) -> None:
        data = bytearray(self.template)
        h = self["header"]
        _NLMSG_HEADER.pack_into(data, 0, len(data), h["type"], h["flags"],
                                h["sequence_number"], h["pid"])  # fmt: skip
        self.data[self.offset :] = data
        self.length = len(data)

    return type(f"Prepared{cls.__name__}", (cls,), {"encode": encode, "template": b""})


def _transact(nft: Any, table: str, steps: Sequence[Step]) -> None:
    """Run `steps` as ONE nftables transaction: all of them take effect, or none."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg

    def marker(kind: int) -> Any:
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = kind
        m["header"]["flags"] = NLM_F_REQUEST
        return m

    msgs = [m for step in steps for m in _prepared(step, table)]
    nft.nlm_request_batch([marker(_NFNL_MSG_BATCH_BEGIN), *msgs, marker(_NFNL_MSG_BATCH_END)])


def _comment(msg: Any, attr: str) -> str | None:
    value = msg.get_attr(attr)
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    return str(value)


def _read(nft: Any, table: str) -> TableState | None:
    tables = [t.get_attr("NFTA_TABLE_NAME") for t in nft.get_tables()]
    if table not in tables:
        return None
    rules: dict[str, list[RuleState]] = {}
    for r in nft.get_rules():
        if r.get_attr("NFTA_RULE_TABLE") != table:
            continue
        exprs = r.get_attr("NFTA_RULE_EXPRESSIONS") or []
        jump = None
        if len(exprs) == 1 and exprs[0].get_attr("NFTA_EXPR_NAME") == "immediate":
            data = exprs[0].get_attr("NFTA_EXPR_DATA").get_attr("NFTA_IMMEDIATE_DATA")
            verdict = data.get_attr("NFTA_DATA_VERDICT") if data else None
            if verdict is not None and verdict.get_attr("NFTA_VERDICT_CODE") == "NFT_JUMP":
                jump = verdict.get_attr("NFTA_VERDICT_CHAIN")
        rules.setdefault(r.get_attr("NFTA_RULE_CHAIN"), []).append(
            RuleState(
                handle=int(r.get_attr("NFTA_RULE_HANDLE")),
                comment=_comment(r, "NFTA_RULE_USERDATA"),
                jump=jump,
                fingerprint=fingerprint(exprs),
            )
        )
    chains = []
    for c in nft.get_chains():
        if c.get_attr("NFTA_CHAIN_TABLE") != table:
            continue
        name = c.get_attr("NFTA_CHAIN_NAME")
        hook = None
        h = c.get_attr("NFTA_CHAIN_HOOK")
        if h is not None:
            policy = c.get_attr("NFTA_CHAIN_POLICY")
            hook = Hook(
                type=c.get_attr("NFTA_CHAIN_TYPE"),
                hook=_HOOKNAMES.get(h.get_attr("NFTA_HOOK_HOOKNUM"), "?"),  # type: ignore[arg-type]
                priority=int(h.get_attr("NFTA_HOOK_PRIORITY")),
                policy="accept" if policy == _NF_ACCEPT else "drop",  # type: ignore[arg-type]
            )
        chains.append(
            ChainState(name, hook, _comment(c, "NFTA_CHAIN_USERDATA"), tuple(rules.get(name, ())))
        )
    return TableState(table, tuple(chains))


def _wrap_read_error(exc: BaseException, netns: str) -> NftError:
    if _netlink_code(exc) == errno.EPERM or isinstance(exc, PermissionError):
        return NftError(
            f"cannot read nftables in netns {netns!r} (EPERM): run as root or grant CAP_NET_ADMIN"
        )
    return NftError(f"cannot read nftables in netns {netns!r}: {exc}")


class Session:
    """One nftables netlink socket in the calling thread's current netns (open it there, on a
    thread without a running event loop, e.g. inside `in_netns`); use as a context manager."""

    def __init__(self, netns: str = "") -> None:
        self.netns = netns
        try:
            self._nft = _open()
        except Exception as exc:
            raise _wrap_read_error(exc, netns) from exc

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._nft.close()

    def read(self, table: str = TABLE_NAME) -> TableState | None:
        try:
            return _read(self._nft, table)
        except Exception as exc:
            raise _wrap_read_error(exc, self.netns) from exc

    def apply(
        self,
        ruleset: Ruleset,
        current: TableState | Literal["read"] | None = "read",
        fault: FaultHook | None = None,
    ) -> ApplyResult:
        """Make the table equal to `ruleset`; `current`: its state if just read."""
        if current == "read":
            current = self.read(ruleset.table)
        assert not isinstance(current, str)
        plan = plan_apply(current, ruleset)
        # (index of first step, steps in one transaction, phase)
        groups: list[tuple[int, tuple[Step, ...], str]] = [
            (i, (step,), "build") for i, step in enumerate(plan.build)
        ]
        if plan.switch:
            groups.append((len(plan.build), plan.switch, "switch"))
        start = len(plan.build) + len(plan.switch)
        groups += [(start + i, (step,), "cleanup") for i, step in enumerate(plan.cleanup)]
        done: list[Step] = []
        for index, steps, phase in groups:
            try:
                if fault is not None:
                    fault(index, steps[0])
                _transact(self._nft, plan.table, steps)
            except Exception as exc:
                err = _error_for(exc, _blame(steps), self.netns)
                if phase != "cleanup":
                    _rollback(self._nft, plan.table, done)
                else:
                    err = NftError(
                        f"{err} (the new capture rules are in force; run enroll again or "
                        "reconcile to remove the unused chains)"
                    )
                raise err from exc
            done.extend(steps)
        return ApplyResult(
            bool(plan.steps),
            plan.slot,
            len(plan.steps),
            any(isinstance(s, CreateTable) for s in plan.steps),
        )

    def remove(self, table: str = TABLE_NAME) -> bool:
        """Delete the table in one transaction; False when it was absent."""
        step = DeleteTable(table)
        try:
            _transact(self._nft, table, [step])
        except Exception as exc:
            if _netlink_code(exc) == errno.ENOENT:
                return False
            raise _error_for(exc, step, self.netns) from exc
        return True


def read_table_here(table: str = TABLE_NAME, netns: str = "") -> TableState | None:
    """`read_table` for the calling thread's current netns (must not run on an event loop)."""
    with Session(netns) as session:
        return session.read(table)


def read_table(netns: str, table: str = TABLE_NAME) -> TableState | None:
    """The inet table `table` in `netns` as the kernel holds it, or None."""
    return in_netns(netns, lambda: read_table_here(table, netns))


@dataclass(frozen=True)
class ApplyResult:
    changed: bool
    slot: str
    steps: int
    created_table: bool


#: Called before each step with its index and the step; tests use it to simulate a crash.
FaultHook = Callable[[int, Step], None]


def apply_here(ruleset: Ruleset, netns: str = "", fault: FaultHook | None = None) -> ApplyResult:
    """`apply_ruleset` in the calling thread's current netns (must not run on an event loop)."""
    with Session(netns) as session:
        return session.apply(ruleset, fault=fault)


def _blame(steps: Sequence[Step]) -> Step:
    """The step to name in an error about a transaction of several (the one needing most)."""
    for step in steps:
        if isinstance(step, AddRule | InsertRule | ReplaceRule):
            kinds = {type(x) for x in step.rule.statements}
            if kinds & {Tproxy, SocketTransparent, FibDaddrLocal, CtMatch, CtSetMark}:
                return step
    return steps[0]


def _rollback(nft: Any, table: str, done: Sequence[Step]) -> None:
    """Undo what an apply built before its switch failed (best effort; nothing is hooked)."""
    if any(isinstance(s, CreateTable) for s in done):
        try:
            _transact(nft, table, [DeleteTable(table)])
        except Exception as exc:  # pragma: no cover - reported, not fatal
            print(f"netsetup: rollback: cannot delete table {table}: {exc}", file=sys.stderr)
        return
    for step in reversed(done):
        if isinstance(step, CreateChain):
            try:
                _transact(nft, table, [DeleteChain(step.chain.name)])
            except Exception as exc:  # pragma: no cover
                print(
                    f"netsetup: rollback: cannot delete chain {step.chain.name}: {exc}",
                    file=sys.stderr,
                )


def apply_ruleset(netns: str, ruleset: Ruleset, fault: FaultHook | None = None) -> ApplyResult:
    """Make the table in `netns` equal to `ruleset` (no-op when it already is); see above."""
    return in_netns(netns, lambda: apply_here(ruleset, netns, fault))


def remove_table_here(table: str = TABLE_NAME, netns: str = "") -> bool:
    """Delete the table in the current netns in one transaction; False when it was absent."""
    with Session(netns) as session:
        return session.remove(table)


def remove_table(netns: str, table: str = TABLE_NAME) -> bool:
    """Unhook and delete our table in `netns` atomically (one transaction)."""
    return in_netns(netns, lambda: remove_table_here(table, netns))
