"""Capture ruleset rendering (golden files) and the ordering of the nftables apply plan.

Regenerate the golden files after an intended change with
`AMBIT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/test_rules.py` and review the diff.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from netsetup import nft
from netsetup.nft import (
    AddRule,
    ChainState,
    CreateChain,
    CreateTable,
    DeleteChain,
    DeleteRule,
    InsertRule,
    ReplaceRule,
    RuleState,
    TableState,
    check_state,
    encode_rule,
    plan_apply,
)
from netsetup.rules import (
    AddrMatch,
    CaptureSpec,
    MetaMatch,
    PortMatch,
    Rule,
    Ruleset,
    Tproxy,
    Verdict,
    render_nft_text,
    render_ruleset,
)

GOLDEN = Path(__file__).parent / "golden"
V4 = CaptureSpec(workload_ip="10.244.1.2")
DUAL = CaptureSpec(workload_ip="10.244.1.2", workload_ip6="fd00:244:1::2")


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("AMBIT_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with AMBIT_UPDATE_GOLDEN=1 to create it"
    assert text == path.read_text(), (
        f"rendered ruleset differs from {path}; if intended, regenerate with "
        "AMBIT_UPDATE_GOLDEN=1 and review the diff"
    )


def test_golden_ipv4_only() -> None:
    _check_golden("capture_ipv4.nft", render_nft_text(render_ruleset(V4)))


def test_golden_dual_stack() -> None:
    _check_golden("capture_dual_stack.nft", render_nft_text(render_ruleset(DUAL)))


def test_ipv4_only_has_no_ipv6_capture() -> None:
    text = render_nft_text(render_ruleset(V4))
    assert "ip6" not in text and "nfproto ipv6" not in text


def test_ruleset_content_follows_the_spec() -> None:
    spec = CaptureSpec(
        workload_ip="10.1.2.3", iface="veth7", outbound_port=25001, inbound_plain_port=25006,
        inbound_hbone_port=25008, dns_port=25053, proxy_mark=0x77, capture_mark=0x4,
    )  # fmt: skip
    text = render_nft_text(render_ruleset(spec))
    assert "meta mark 0x00000077 ct state new ct mark set 0x00000077 return" in text
    assert 'iifname "veth7" ip daddr 10.1.2.3 tcp dport != 25008 tproxy ip to :25006' in text
    assert "tproxy ip to 127.0.0.1:25001" in text
    assert "udp dport 53 tproxy ip to 127.0.0.1:25053" in text
    assert "tcp dport 53 tproxy ip to 127.0.0.1:25053" in text
    assert "meta mark set 0x00000004" in text
    assert "15001" not in text and "0x00000539" not in text


def test_digest_changes_with_content_only() -> None:
    assert render_ruleset(V4).digest == render_ruleset(CaptureSpec("10.244.1.2")).digest
    assert render_ruleset(V4).digest != render_ruleset(CaptureSpec("10.244.1.3")).digest
    assert render_ruleset(V4).digest != render_ruleset(DUAL).digest


def test_with_slot_renames_chains_and_jumps() -> None:
    rs = render_ruleset(V4).with_slot("b")
    names = {c.name for c in rs.chains}
    assert names == {"capture_out_b", "capture_pre_b", "output", "prerouting"}
    jumps = {c.name: c.rules[0].statements[0] for c in rs.base_chains}
    assert jumps == {
        "output": Verdict("jump", "capture_out_b"),
        "prerouting": Verdict("jump", "capture_pre_b"),
    }


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"workload_ip": "10.0.0.300"}, "is not an IP address"),
        ({"workload_ip": "fd00::1"}, "is IPv6"),
        ({"workload_ip": "0.0.0.0"}, "not a unicast workload address"),
        ({"workload_ip": "127.0.0.1"}, "not a unicast workload address"),
        ({"workload_ip": "10.0.0.1", "workload_ip6": "fe80::1"}, "not a unicast workload"),
        ({"workload_ip": "10.0.0.1", "workload_ip6": "10.0.0.2"}, "is not IPv6"),
        ({"workload_ip": "10.0.0.1", "iface": "a-very-long-interface"}, "interface name"),
        ({"workload_ip": "10.0.0.1", "dns_port": 0}, "dns_port=0"),
        ({"workload_ip": "10.0.0.1", "proxy_mark": 1}, "proxy_mark and capture_mark are equal"),
        ({"workload_ip": "10.0.0.1", "route_table": 254}, "route_table=254"),
    ],
)
def test_bad_spec_is_rejected_with_a_reason(kwargs: dict[str, object], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        CaptureSpec(**kwargs)  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


# -- netlink encoding mirrors what `nft -f` compiles ---------------------------------------------


def _names(exprs: list[dict[str, object]]) -> list[str]:
    out = []
    for e in exprs:
        attrs = dict(e["attrs"])  # type: ignore[call-overload]
        out.append(str(attrs["NFTA_EXPR_NAME"]))
    return out


def test_encoding_adds_protocol_dependencies_once() -> None:
    rule = Rule(
        (
            MetaMatch("iifname", "eth0"),
            AddrMatch(4, "10.0.0.1"),
            PortMatch("tcp", 15008, "!="),
            Tproxy(4, 15006),
            Verdict("accept"),
        )
    )
    assert _names(encode_rule(rule)) == [
        "meta", "cmp",  # iifname
        "meta", "cmp", "payload", "cmp",  # nfproto ipv4 (implicit), ip daddr
        "meta", "cmp", "payload", "cmp",  # l4proto tcp (implicit), tcp dport
        "immediate", "tproxy",  # port, tproxy
        "immediate",  # accept
    ]  # fmt: skip


def test_encoding_skips_dependency_given_explicitly() -> None:
    rule = Rule((MetaMatch("nfproto", "ipv6"), AddrMatch(6, "::1"), Verdict("return")))
    assert _names(encode_rule(rule)) == ["meta", "cmp", "payload", "cmp", "immediate"]


def test_encoding_of_prefix_loads_only_the_prefix_bytes() -> None:
    exprs = encode_rule(Rule((AddrMatch(4, "127.0.0.0/8"),)))
    payload = dict(dict(exprs[2]["attrs"])["NFTA_EXPR_DATA"]["attrs"])
    assert payload["NFTA_PAYLOAD_LEN"] == 1 and payload["NFTA_PAYLOAD_OFFSET"] == 16
    odd = encode_rule(Rule((AddrMatch(4, "10.0.0.0/12"),)))
    assert _names(odd) == ["meta", "cmp", "payload", "bitwise", "cmp"]


# -- apply plan ordering ---------------------------------------------------------------------


def _state_from(ruleset: Ruleset, slot: str, drop_rules: int = 0) -> TableState:
    """The TableState the kernel would hold after applying `ruleset` under `slot`."""
    rs = ruleset.with_slot(slot)
    handle = iter(range(100, 1000))
    chains = []
    for c in rs.chains:
        rules = tuple(
            RuleState(next(handle), r.comment, nft._jump_target(r), nft.fingerprint(encode_rule(r)))
            for r in c.rules
        )
        if c.hook is None and drop_rules:
            rules = rules[:-drop_rules]
        chains.append(ChainState(c.name, c.hook, c.comment, rules))
    return TableState(rs.table, tuple(chains))


def _kinds(steps: tuple[nft.Step, ...]) -> list[str]:
    return [type(s).__name__ for s in steps]


def test_first_apply_builds_everything_before_one_switch_hooks_both_chains() -> None:
    desired = render_ruleset(DUAL)
    plan = plan_apply(None, desired)
    assert plan.slot == "a"
    assert isinstance(plan.build[0], CreateTable)
    assert all(not (isinstance(s, CreateChain) and s.chain.hook is not None) for s in plan.build), (
        "nothing is hooked while rules are being added"
    )
    n_rules = sum(len(c.rules) for c in desired.regular_chains)
    assert sum(isinstance(s, AddRule) for s in plan.build) == n_rules
    # the switch: both base chains created and given their jump, in one transaction
    assert _kinds(plan.switch) == ["CreateChain", "AddRule", "CreateChain", "AddRule"]
    hooked = [s.chain.name for s in plan.switch if isinstance(s, CreateChain)]
    assert hooked == ["prerouting", "output"]
    assert plan.cleanup == ()


def test_reapply_of_complete_ruleset_is_a_noop() -> None:
    desired = render_ruleset(V4)
    current = _state_from(desired, "a")
    assert check_state(current, desired) == ()
    plan = plan_apply(current, desired)
    assert plan.noop and plan.slot == "a"


def test_change_builds_other_slot_switches_by_replace_and_deletes_old_last() -> None:
    old, new = render_ruleset(V4), render_ruleset(DUAL)
    current = _state_from(old, "a")
    plan = plan_apply(current, new)
    assert plan.slot == "b"
    assert "CreateTable" not in _kinds(plan.steps)
    assert all(isinstance(s, CreateChain | AddRule) for s in plan.build)
    assert all(isinstance(s, CreateChain) and s.chain.hook is None for s in plan.build
               if isinstance(s, CreateChain))  # fmt: skip
    assert plan.switch == (
        ReplaceRule("prerouting", current.chain("prerouting").rules[0].handle,  # type: ignore[union-attr]
                    Rule((Verdict("jump", "capture_pre_b"),))),
        ReplaceRule("output", current.chain("output").rules[0].handle,  # type: ignore[union-attr]
                    Rule((Verdict("jump", "capture_out_b"),))),
    )  # fmt: skip
    assert plan.cleanup == (DeleteChain("capture_out_a"), DeleteChain("capture_pre_a"))


def test_partial_chain_of_a_crashed_apply_is_deleted_then_rebuilt() -> None:
    desired = render_ruleset(V4)
    complete = _state_from(desired, "a")
    leftover = _state_from(render_ruleset(DUAL), "b", drop_rules=2)
    # the crashed apply built part of slot b; nothing jumps to it
    current = TableState(
        complete.name,
        complete.chains + tuple(c for c in leftover.chains if c.hook is None),
    )
    problems = check_state(current, desired)
    assert any("stray chain capture_out_b" in p for p in problems)
    plan = plan_apply(current, desired)
    assert plan.steps[0] == DeleteChain("capture_out_b")
    assert plan.steps[1] == DeleteChain("capture_pre_b")
    assert plan.slot == "b"


def test_missing_rule_is_detected_and_repaired_under_a_fresh_slot() -> None:
    desired = render_ruleset(V4)
    current = _state_from(desired, "a", drop_rules=1)
    assert any("has" in p and "rules" in p for p in check_state(current, desired))
    plan = plan_apply(current, desired)
    assert plan.slot == "b" and not plan.noop


def test_mixed_slots_after_crash_mid_switch_use_the_third_slot() -> None:
    old, new = render_ruleset(V4), render_ruleset(DUAL)
    a, b = _state_from(old, "a"), _state_from(new, "b")
    # prerouting already switched to b, output still on a
    chains = (
        a.chain("capture_out_a"), a.chain("capture_pre_a"), b.chain("capture_out_b"),
        b.chain("capture_pre_b"), b.chain("prerouting"), a.chain("output"),
    )  # fmt: skip
    current = TableState("ambit", tuple(c for c in chains if c is not None))
    plan = plan_apply(current, new)
    assert plan.slot == "c"
    deleted = {s.chain for s in plan.steps if isinstance(s, DeleteChain)}
    # capture_pre_a is referenced by nothing and goes first; the rest after the switch
    assert deleted == {"capture_out_a", "capture_pre_a", "capture_out_b", "capture_pre_b"}


def test_base_chain_with_extra_rules_gets_jump_inserted_before_the_rest_is_deleted() -> None:
    desired = render_ruleset(V4)
    current = _state_from(desired, "a")
    extra = RuleState(999, None, None)
    chains = tuple(
        ChainState(c.name, c.hook, c.comment, (*c.rules, extra)) if c.name == "output" else c
        for c in current.chains
    )
    plan = plan_apply(TableState("ambit", chains), desired)
    out_steps = [s for s in plan.switch if getattr(s, "chain", None) == "output"]
    assert isinstance(out_steps[0], InsertRule)
    assert all(isinstance(s, DeleteRule) for s in out_steps[1:]) and len(out_steps) == 3


# -- properties over any valid spec -------------------------------------------------------------

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ports = st.integers(min_value=1, max_value=65535)
_specs = st.builds(
    CaptureSpec,
    workload_ip=st.ip_addresses(network="10.0.0.0/8").map(str),
    workload_ip6=st.none() | st.ip_addresses(network="fd00::/8").map(str),
    iface=st.from_regex(r"[a-z][a-z0-9]{0,14}", fullmatch=True),
    outbound_port=_ports,
    inbound_plain_port=_ports,
    inbound_hbone_port=_ports,
    dns_port=_ports,
    proxy_mark=st.integers(min_value=2, max_value=2**32 - 1),
    capture_mark=st.just(1),
)


@settings(max_examples=60, deadline=None)
@given(_specs)
def test_any_valid_spec_renders_encodes_and_plans(spec: CaptureSpec) -> None:
    rs = render_ruleset(spec)
    text = render_nft_text(rs)
    assert text.count("{") == text.count("}")
    assert f"ip daddr {spec.workload_ip} " in text
    if spec.workload_ip6 is not None:
        assert f"ip6 daddr {spec.workload_ip6} tcp dport" in text
    else:
        assert "ip6" not in text
    for chain in rs.chains:
        for rule in chain.rules:
            assert encode_rule(rule), rule
    assert render_ruleset(spec).digest == rs.digest
    plan = plan_apply(None, rs)
    assert not plan.noop and check_state(_state_from(rs, plan.slot), rs) == ()


def test_cached_messages_encode_to_the_same_bytes_as_pyroute2() -> None:
    plan = plan_apply(None, render_ruleset(DUAL))
    for seq, step in enumerate(plan.steps, start=1000):
        fresh = nft._messages(step, "ambit")
        again = nft._prepared(step, "ambit")
        assert len(fresh) == len(again) == 1
        for m in (fresh[0], again[0]):
            m["header"]["sequence_number"] = seq
            m["header"]["pid"] = 4242
            m.encode()
        assert bytes(again[0].data) == bytes(fresh[0].data), step
