"""enroll / unenroll / reconcile / inspect: idempotence, nothing left behind, repair after a
restart, and one-line actionable errors with nothing half-applied."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest

from netsetup import nft
from netsetup.capture import (
    CaptureError,
    Workload,
    aenroll,
    ainspect,
    areconcile,
    aunenroll,
    enroll,
    inspect,
    is_enrolled,
    problems,
    reconcile,
    unenroll,
)
from netsetup.rules import Tproxy
from netsetup.sandbox import Sandbox
from tests.conftest import require_root_and_tools
from tests.netns.fixtures import sandbox, sandbox6, sandbox_factory  # noqa: F401
from tests.netns.test_capture import (
    bare_netns,
    default_rule_prefs,
    ip_rules,
    nft_tables,
    table_routes,
    workload,
)
from tests.netns.test_nft_apply import nft_json


def our_rules(netns: str, v6: bool = False) -> list[dict[str, object]]:
    return [r for r in ip_rules(netns, v6) if r.get("table") == "100"]


def assert_clean(netns: str) -> None:
    """No table, chain, ip rule or route of ours (IPv4 and IPv6)."""
    assert nft_tables(netns) == []
    assert our_rules(netns) == [] and our_rules(netns, v6=True) == []
    assert table_routes(netns) == [] and table_routes(netns, v6=True) == []
    assert inspect(netns).empty


def test_enroll_twice_gives_the_same_ruleset_rules_and_routes(
    sandbox6: Sandbox,  # noqa: F811
) -> None:
    w = workload(sandbox6.workload("w1-1"), ipv6=True)
    enroll(w)
    first = nft_json(w.netns, handles=True)
    enroll(w)
    assert nft_json(w.netns, handles=True) == first, "re-enroll changed the ruleset"
    for v6 in (False, True):
        rules = our_rules(w.netns, v6)
        assert len(rules) == 1 and rules[0]["fwmark"] == "0x1", rules
        routes = table_routes(w.netns, v6=v6)
        assert len(routes) == 1 and routes[0]["type"] == "local" and routes[0]["dev"] == "lo"
    assert is_enrolled(w) and problems(w) == []
    state = inspect(w.netns)
    assert state.hooked and state.local_routes == ("ipv4", "ipv6")
    assert sorted(state.ip_rules) == [("ipv4", 1, 100), ("ipv6", 1, 100)]


def test_unenroll_leaves_no_table_chain_rule_or_route(sandbox6: Sandbox) -> None:  # noqa: F811
    w = workload(sandbox6.workload("w1-1"), ipv6=True)
    prefs4, prefs6 = default_rule_prefs(w.netns), default_rule_prefs(w.netns, v6=True)
    enroll(w)
    unenroll(w)
    assert_clean(w.netns)
    assert default_rule_prefs(w.netns) == prefs4
    assert default_rule_prefs(w.netns, v6=True) == prefs6
    unenroll(w)  # unenrolling again is a no-op, not an error
    assert_clean(w.netns)


_CYCLES_SCRIPT = """
import json, os, sys, time
from netsetup.capture import Workload, enroll, unenroll
w = Workload(name=sys.argv[1], netns=sys.argv[2], ip=sys.argv[3])
enroll(w)  # warm up imports and caches before counting
unenroll(w)
fds, threads = len(os.listdir("/proc/self/fd")), len(os.listdir("/proc/self/task"))
start = time.monotonic()
for _ in range(200):
    enroll(w)
    unenroll(w)
elapsed = time.monotonic() - start
# a joined worker thread's OS task exits a moment after join() returns: let it settle
deadline = time.monotonic() + 2
while len(os.listdir("/proc/self/task")) > threads and time.monotonic() < deadline:
    time.sleep(0.01)
print(json.dumps({"elapsed": elapsed,
                  "fds": [fds, len(os.listdir("/proc/self/fd"))],
                  "threads": [threads, len(os.listdir("/proc/self/task"))]}))
"""


def test_enroll_unenroll_200_times_leaks_nothing(sandbox: Sandbox) -> None:  # noqa: F811
    # A fresh interpreter counts only what enroll/unenroll hold: threads and fds that
    # other tests' libraries start lazily in this process would blur the count.
    w = workload(sandbox.workload("w1-1"))
    r = subprocess.run([sys.executable, "-c", _CYCLES_SCRIPT, w.name, w.netns, w.ip],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert_clean(w.netns)
    assert out["fds"][1] == out["fds"][0], f"file descriptors leaked: {out['fds']}"
    assert out["threads"][1] <= out["threads"][0], f"threads leaked: {out['threads']}"
    took = out["elapsed"]
    assert took < 30, f"200 enroll/unenroll cycles took {took:.1f}s (budget 30 s)"


async def test_asyncio_callers_do_not_block_or_break_the_event_loop(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    """ztunnel runs on uvloop: enroll from a coroutine while the loop keeps ticking."""
    import asyncio

    w = workload(sandbox.workload("w1-1"))
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(ticker())
        await aenroll(w)
        assert (await ainspect(w.netns)).hooked
        report = await areconcile([w], [w.netns])
        assert report.unchanged == (w.name,)
        await aunenroll(w)
        assert (await ainspect(w.netns)).empty
        task.cancel()
    assert ticks > 10, "the event loop was blocked while netlink work ran"


def test_switching_to_ipv4_only_drops_the_ipv6_policy_route(sandbox6: Sandbox) -> None:  # noqa: F811
    sw = sandbox6.workload("w1-1")
    dual, v4 = workload(sw, ipv6=True), workload(sw)
    enroll(dual)
    enroll(v4)
    assert is_enrolled(v4) and not is_enrolled(dual)
    assert our_rules(sw.netns, v6=True) == [] and table_routes(sw.netns, v6=True) == []
    assert len(our_rules(sw.netns)) == 1
    js = nft_json(sw.netns)
    assert js is not None and len(js["chains"]) == 4
    unenroll(v4)
    assert_clean(sw.netns)


def test_reconcile_repairs_enrolls_removes_and_reports(
    sandbox_factory: object,  # noqa: F811
) -> None:
    sb = sandbox_factory(nodes=1, workloads_per_node=5, area="recon")  # type: ignore[operator]
    damaged, missing_rule, fresh, gone, intact = (workload(w) for w in sb.workloads)
    for w in (damaged, missing_rule, gone, intact):
        enroll(w)
    # a restart found: one ruleset damaged, one ip rule deleted, one workload that left
    js = nft_json(damaged.netns, handles=True)
    assert js is not None
    handle = js["rules"]["capture_out_a"][-1]["handle"]
    subprocess.run(["ip", "netns", "exec", damaged.netns, "nft", "delete", "rule", "inet",
                    "ambit", "capture_out_a", "handle", str(handle)], check=True)  # fmt: skip
    subprocess.run(["ip", "-n", missing_rule.netns, "rule", "del", "fwmark", "1", "lookup",
                    "100"], check=True)  # fmt: skip
    assert not is_enrolled(damaged) and not is_enrolled(missing_rule)

    desired = [damaged, missing_rule, fresh, intact]
    known = [w.netns for w in sb.workloads] + [f"/run/netns/{gone.netns}"]
    report = reconcile(desired, known)
    assert sorted(report.repaired) == sorted([damaged.name, missing_rule.name])
    assert report.enrolled == (fresh.name,)
    assert report.unchanged == (intact.name,)
    assert report.removed == (gone.netns,), "only the netns with our rules is reported"
    assert report.errors == () and report.changed
    for w in desired:
        assert is_enrolled(w), problems(w)
    assert_clean(gone.netns)

    again = reconcile(desired, known)
    assert not again.changed
    assert sorted(again.unchanged) == sorted(w.name for w in desired)


class Crash(BaseException):
    """The process dies between two transactions: no rollback runs."""


@pytest.mark.parametrize("crash_at", ["build", "switch"])
def test_reconcile_after_a_crash_mid_enroll_completes_the_capture(
    sandbox: Sandbox,  # noqa: F811
    crash_at: str,
) -> None:
    w = workload(sandbox.workload("w1-1"))

    def crash(index: int, step: nft.Step) -> None:
        hooked = isinstance(step, nft.CreateChain) and step.chain.hook is not None
        if (crash_at == "switch" and hooked) or (crash_at == "build" and index == 5):
            raise Crash

    with pytest.raises(Crash):
        enroll(w, _fault=crash)
    state = inspect(w.netns)
    assert not state.hooked and not is_enrolled(w)
    report = reconcile([w], [w.netns])
    assert report.repaired == (w.name,) and report.errors == ()
    assert is_enrolled(w)
    js = nft_json(w.netns)
    assert js is not None and len(js["chains"]) == 4, "leftovers of the crashed enroll remain"


def test_reconcile_goes_on_past_a_bad_workload(sandbox: Sandbox) -> None:  # noqa: F811
    good = workload(sandbox.workload("w1-1"))
    bad = Workload("ghost", "no-such-netns-ambit-test", "10.244.9.9")
    report = reconcile([bad, good], ["no-such-netns-ambit-test-2"])
    assert report.enrolled == (good.name,)
    names = [name for name, _ in report.errors]
    assert names == ["ghost", "no-such-netns-ambit-test-2"]
    assert all("\n" not in msg and "ip netns list" in msg for _, msg in report.errors)
    assert is_enrolled(good)


def test_unknown_netns_is_a_one_line_error() -> None:
    w = Workload("w", "no-such-netns-ambit-test", "10.244.9.9")
    for op in (enroll, unenroll, is_enrolled):
        with pytest.raises(CaptureError) as info:
            op(w)
        msg = str(info.value)
        assert "\n" not in msg
        assert "no-such-netns-ambit-test" in msg and "ip netns list" in msg
    with pytest.raises(CaptureError, match="does not exist: check the path"):
        inspect("/proc/999999999/ns/net")


def test_bad_address_is_a_one_line_error_before_touching_anything() -> None:
    with bare_netns("lcbad") as ns:
        with pytest.raises(CaptureError, match=r"workload 'w': workload_ip '10\.1\.1' is not"):
            enroll(Workload("w", ns, "10.1.1"))
        assert_clean(ns)


def test_kernel_without_tproxy_fails_cleanly_with_nothing_half_applied() -> None:
    """TPROXY is simulated missing: the first rule needing it fails as the kernel fails it."""
    from pyroute2.netlink.exceptions import NetlinkError

    def no_tproxy(index: int, step: nft.Step) -> None:
        if isinstance(step, nft.AddRule) and any(
            isinstance(s, Tproxy) for s in step.rule.statements
        ):
            raise NetlinkError(errno.ENOENT, "No such file or directory")

    with bare_netns("lcnotp") as ns:
        w = Workload("w", ns, "10.244.1.2", "fd00:244:1::2")
        with pytest.raises(CaptureError) as info:
            enroll(w, _fault=no_tproxy)
        msg = str(info.value)
        assert "\n" not in msg
        assert "kernel lacks nftables TPROXY (CONFIG_NFT_TPROXY)" in msg
        assert_clean(ns)


def test_missing_cap_net_admin_is_a_one_line_error_with_nothing_applied() -> None:
    require_root_and_tools("setpriv")
    with bare_netns("lcperm") as ns:
        code = (
            "import sys\n"
            "from netsetup.capture import CaptureError, Workload, enroll\n"
            "try:\n"
            f"    enroll(Workload('w', {ns!r}, '10.244.1.2'))\n"
            "except CaptureError as exc:\n"
            "    print(exc)\n"
            "    sys.exit(3)\n"
        )
        r = subprocess.run(
            ["setpriv", "--bounding-set", "-net_admin", sys.executable, "-c", code],
            capture_output=True, text=True, check=False, timeout=60,
            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))),
        )  # fmt: skip
        assert r.returncode == 3, r.stderr
        lines = r.stdout.strip().splitlines()
        assert len(lines) == 1
        assert "EPERM" in lines[0] and "run as root or grant CAP_NET_ADMIN" in lines[0]
        assert_clean(ns)
