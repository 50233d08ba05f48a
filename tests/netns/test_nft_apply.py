"""Applying the capture ruleset through pyroute2's nftables netlink API: what the kernel holds
equals what `nft -f` makes of the rendered text, re-applies change nothing, damage is repaired,
and a crash between any two transactions leaves the old, the new or no capture in force."""

from __future__ import annotations

import contextlib
import errno
import json
import socket
import subprocess
from typing import Any

import pytest

from netsetup import nft
from netsetup.nft import Step, apply_ruleset, check_state, plan_apply, read_table, remove_table
from netsetup.rules import CaptureSpec, Ruleset, Tproxy, render_nft_text, render_ruleset
from netsetup.sandbox import Sandbox
from tests.netns.fixtures import sandbox, sandbox_factory  # noqa: F401
from tests.netns.test_capture import accept_one, bare_netns, connect_from, listener

V4 = CaptureSpec(workload_ip="10.244.1.2")
DUAL = CaptureSpec(workload_ip="10.244.1.2", workload_ip6="fd00:244:1::2")


def nft_json(netns: str, table: str = "ambit", handles: bool = False) -> dict[str, Any] | None:
    """The table as `nft -j` lists it: chains by name, rules per chain in order (no handles)."""
    r = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "table", "inet", table],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if r.returncode != 0:
        assert "No such file or directory" in r.stderr, r.stderr
        return None
    chains: dict[str, Any] = {}
    rules: dict[str, list[Any]] = {}
    drop = {"family", "table"} | (set() if handles else {"handle"})
    for item in json.loads(r.stdout)["nftables"]:
        if "chain" in item:
            c = {k: v for k, v in item["chain"].items() if k not in drop}
            chains[c.pop("name")] = c
        elif "rule" in item:
            rule = {k: v for k, v in item["rule"].items() if k not in drop}
            rules.setdefault(rule.pop("chain"), []).append(rule)
    return {"chains": chains, "rules": rules}


def compiled(ruleset: Ruleset, slot: str) -> dict[str, Any]:
    """What `nft -f` makes of the rendered text (in a scratch netns)."""
    with bare_netns("nftref") as ns:
        text = render_nft_text(ruleset.with_slot(slot))
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=text, text=True,
                       check=True)  # fmt: skip
        got = nft_json(ns)
    assert got is not None
    return got


def effective(js: dict[str, Any] | None) -> dict[str, Any]:
    """Per hook, the rules a packet runs through (following jumps; chain names erased)."""
    out: dict[str, Any] = {}
    if js is None:
        return out
    for name, chain in js["chains"].items():
        if "hook" not in chain:
            continue
        flat: list[Any] = []
        for rule in js["rules"].get(name, []):
            for expr in rule["expr"]:
                if "jump" in expr:
                    flat.extend(js["rules"].get(expr["jump"]["target"], []))
        if flat:
            out[chain["hook"]] = (chain["type"], chain["prio"], chain["policy"], flat)
    return out


@pytest.mark.parametrize("spec", [V4, DUAL], ids=["ipv4", "dual-stack"])
def test_applied_table_equals_what_nft_compiles_from_the_rendered_text(spec: CaptureSpec) -> None:
    ruleset = render_ruleset(spec)
    with bare_netns("nftapply") as ns:
        result = apply_ruleset(ns, ruleset)
        assert result.changed and result.created_table and result.slot == "a"
        assert nft_json(ns) == compiled(ruleset, "a")
        assert check_state(read_table(ns), ruleset) == ()


def test_applying_again_changes_nothing() -> None:
    ruleset = render_ruleset(DUAL)
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, ruleset)
        before = nft_json(ns, handles=True)
        again = apply_ruleset(ns, ruleset)
        assert not again.changed and again.steps == 0
        assert nft_json(ns, handles=True) == before


def test_a_changed_spec_replaces_the_rules_without_duplicates() -> None:
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, render_ruleset(V4))
        result = apply_ruleset(ns, render_ruleset(DUAL))
        assert result.changed and result.slot == "b" and not result.created_table
        assert nft_json(ns) == compiled(render_ruleset(DUAL), "b")
        back = apply_ruleset(ns, render_ruleset(V4))
        assert back.slot == "a"
        assert nft_json(ns) == compiled(render_ruleset(V4), "a")


def test_a_rule_deleted_behind_our_back_is_repaired() -> None:
    ruleset = render_ruleset(V4)
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, ruleset)
        js = nft_json(ns, handles=True)
        assert js is not None
        victim = js["rules"]["capture_pre_a"][2]["handle"]
        subprocess.run(["ip", "netns", "exec", ns, "nft", "delete", "rule", "inet", "ambit",
                        "capture_pre_a", "handle", str(victim)], check=True)  # fmt: skip
        problems = check_state(read_table(ns), ruleset)
        assert problems and "capture_pre_a" in problems[0]
        assert apply_ruleset(ns, ruleset).changed
        assert check_state(read_table(ns), ruleset) == ()
        assert nft_json(ns) == compiled(ruleset, "b")


def test_a_rule_changed_behind_our_back_is_detected_and_repaired() -> None:
    ruleset = render_ruleset(V4)
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, ruleset)
        js = nft_json(ns, handles=True)
        assert js is not None
        rule = next(r for r in js["rules"]["capture_out_a"] if r.get("comment") == "outbound tcp")
        # same comment, weaker match: only port 80 would still be captured
        subprocess.run(["ip", "netns", "exec", ns, "nft", "replace", "rule", "inet", "ambit",
                        "capture_out_a", "handle", str(rule["handle"]), "tcp", "dport", "80",
                        "meta", "mark", "set", "1", "comment", '"outbound tcp"'],
                       check=True)  # fmt: skip
        assert check_state(read_table(ns), ruleset), "a changed rule went unnoticed"
        apply_ruleset(ns, ruleset)
        assert nft_json(ns) == compiled(ruleset, "b")


def test_an_unhooked_base_chain_is_repaired() -> None:
    ruleset = render_ruleset(V4)
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, ruleset)
        subprocess.run(["ip", "netns", "exec", ns, "nft", "flush", "chain", "inet", "ambit",
                        "output"], check=True)  # fmt: skip
        assert check_state(read_table(ns), ruleset)
        apply_ruleset(ns, ruleset)
        assert effective(nft_json(ns)) == effective(compiled(ruleset, "a"))
        assert check_state(read_table(ns), ruleset) == ()


def test_remove_deletes_the_whole_table_at_once() -> None:
    with bare_netns("nftapply") as ns:
        apply_ruleset(ns, render_ruleset(DUAL))
        assert remove_table(ns)
        assert nft_json(ns) is None
        assert not remove_table(ns)


class Crash(BaseException):
    """A simulated crash of the process between two transactions (no rollback runs)."""


def fault_points(current_netns: str, desired: Ruleset) -> list[int]:
    plan = plan_apply(read_table(current_netns), desired)
    switch = [len(plan.build)] if plan.switch else []
    first_cleanup = len(plan.build) + len(plan.switch)
    return [*range(len(plan.build)), *switch,
            *range(first_cleanup, first_cleanup + len(plan.cleanup))]  # fmt: skip


def crash_at(point: int) -> nft.FaultHook:
    def fault(index: int, step: Step) -> None:
        if index == point:
            raise Crash(f"crash before step {index}: {step}")

    return fault


@pytest.mark.parametrize("old_spec", [None, V4], ids=["first-apply", "replace"])
def test_crash_between_any_two_transactions_leaves_old_new_or_nothing(
    old_spec: CaptureSpec | None,
) -> None:
    new = render_ruleset(DUAL)
    new_eff = effective(compiled(new, "a"))
    old_eff = effective(compiled(render_ruleset(old_spec), "a")) if old_spec else {}
    seen: set[str] = set()
    with bare_netns("nftcrash") as ns:
        if old_spec:
            apply_ruleset(ns, render_ruleset(old_spec))
        points = fault_points(ns, new)
        assert len(points) > 10
        for point in points:
            if old_spec:
                apply_ruleset(ns, render_ruleset(old_spec))
            else:
                remove_table(ns)
            with pytest.raises(Crash):
                apply_ruleset(ns, new, fault=crash_at(point))
            now = effective(nft_json(ns))
            state = {id(new_eff): "new", id(old_eff): "old" if old_spec else "none"}
            kind = next((state[id(e)] for e in (new_eff, old_eff) if now == e), None)
            assert kind is not None, f"crash at step {point} left a mixed ruleset in force: {now}"
            seen.add(kind)
            # whatever the crash left, the next apply completes it
            apply_ruleset(ns, new)
            assert check_state(read_table(ns), new) == ()
            assert effective(nft_json(ns)) == new_eff
            js = nft_json(ns)
            assert js is not None and len(js["chains"]) == 4, "leftover chains after repair"
    # a first apply has nothing after its switch; a replace deletes the old chains after it
    assert seen == ({"old", "new"} if old_spec else {"none"})


def _where_does_it_go(a_netns: str, b_ip: str, proxy: socket.socket, app: socket.socket) -> str:
    with connect_from(a_netns, b_ip, 80):
        got = accept_one(proxy, app)
        assert got is not None, "connection reached neither the proxy nor the app"
        lst, conn = got
        with conn:
            if lst is proxy:
                assert conn.getsockname() == (b_ip, 80)
                return "captured"
            return "direct"


def test_traffic_during_a_crashed_first_apply_is_captured_completely_or_untouched(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    a, b = sandbox.workload("w1-1"), sandbox.workload("w2-1")
    new = render_ruleset(CaptureSpec(workload_ip=a.ip))
    # the policy route is in place, as enroll installs it before the ruleset
    subprocess.run(["ip", "-n", a.netns, "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                    "table", "100"], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", a.netns, "rule", "add", "fwmark", "1", "lookup", "100",
                    "priority", "100"], check=True)  # fmt: skip
    outcomes = []
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        app = stack.enter_context(listener(b.netns, b.ip, 80, transparent=False))
        for point in fault_points(a.netns, new):
            remove_table(a.netns)
            with pytest.raises(Crash):
                apply_ruleset(a.netns, new, fault=crash_at(point))
            where = _where_does_it_go(a.netns, b.ip, proxy, app)
            hooked = effective(nft_json(a.netns)) != {}
            assert where == ("captured" if hooked else "direct"), f"crash before step {point}"
            outcomes.append(where)
        apply_ruleset(a.netns, new)
        assert _where_does_it_go(a.netns, b.ip, proxy, app) == "captured"
    # the switch is the last transaction of a first apply: before it, nothing is captured
    assert set(outcomes) == {"direct"}


def test_traffic_during_a_crashed_replace_is_always_captured(sandbox: Sandbox) -> None:  # noqa: F811
    a, b = sandbox.workload("w1-1"), sandbox.workload("w2-1")
    old = render_ruleset(CaptureSpec(workload_ip=a.ip))
    new = render_ruleset(CaptureSpec(workload_ip=a.ip, dns_port=15054))
    subprocess.run(["ip", "-n", a.netns, "route", "add", "local", "0.0.0.0/0", "dev", "lo",
                    "table", "100"], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", a.netns, "rule", "add", "fwmark", "1", "lookup", "100",
                    "priority", "100"], check=True)  # fmt: skip
    apply_ruleset(a.netns, old)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        app = stack.enter_context(listener(b.netns, b.ip, 80, transparent=False))
        for point in fault_points(a.netns, new):
            apply_ruleset(a.netns, old)
            with pytest.raises(Crash):
                apply_ruleset(a.netns, new, fault=crash_at(point))
            assert _where_does_it_go(a.netns, b.ip, proxy, app) == "captured", point


def test_kernel_without_tproxy_gives_one_line_error_and_leaves_nothing() -> None:
    """The kernel here has TPROXY, so its absence is simulated: the rule that needs it fails
    the way the kernel fails it (ENOENT for an unknown expression)."""
    from pyroute2.netlink.exceptions import NetlinkError

    def no_tproxy(index: int, step: Step) -> None:
        if isinstance(step, nft.AddRule) and any(
            isinstance(s, Tproxy) for s in step.rule.statements
        ):
            raise NetlinkError(errno.ENOENT, "No such file or directory")

    with bare_netns("nftnotp") as ns:
        with pytest.raises(nft.NftError) as info:
            apply_ruleset(ns, render_ruleset(V4), fault=no_tproxy)
        msg = str(info.value)
        assert "\n" not in msg
        assert msg.startswith("kernel lacks nftables TPROXY (CONFIG_NFT_TPROXY)")
        assert nft_json(ns) is None, "a half-built table was left behind"
        # with a previous complete ruleset in place, that one stays untouched
        apply_ruleset(ns, render_ruleset(V4))
        before = nft_json(ns, handles=True)
        with pytest.raises(nft.NftError):
            apply_ruleset(ns, render_ruleset(DUAL), fault=no_tproxy)
        assert nft_json(ns, handles=True) == before
