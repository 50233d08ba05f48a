"""Preflight for real: passes as root here, names the missing privilege when run unprivileged."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from netsetup.check import _nft_check, _table, check
from netsetup.sandbox import Sandbox
from tests.netns.fixtures import SandboxFactory, sandbox_factory

__all__ = ["sandbox_factory"]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXPECTED = [
    "CAP_NET_ADMIN", "CAP_SYS_ADMIN", "network namespace", "nftables", "nft tproxy",
    "nft socket transparent", "nft fib", "policy routing", "policy routing IPv6",
    "IP_TRANSPARENT", "SO_MARK",
]


def _check_netns() -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(f"ambitcheck{os.getpid()}x")]


def test_all_checks_pass_as_root_and_leave_nothing_behind() -> None:
    results = check()
    assert [r.name for r in results] == EXPECTED
    failed = [r for r in results if not r.ok]
    assert failed == []
    assert _check_netns() == []


def test_cli_exit_status_as_root() -> None:
    out = subprocess.run([sys.executable, "-m", "netsetup", "check"], cwd=REPO,
                         capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.splitlines()[-1] == f"all {len(EXPECTED)} checks passed"


def _check_cli_as(setpriv_args: list[str]) -> list[str]:
    out = subprocess.run(
        ["setpriv", *setpriv_args, sys.executable, "-m", "netsetup", "check"],
        cwd=REPO, capture_output=True, text=True, check=False, timeout=60,
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    return out.stdout.splitlines()


def _row(lines: list[str], name: str) -> tuple[str, str]:
    """(PASS|FAIL, the fix line under it or "")."""
    i = next(i for i, ln in enumerate(lines) if ln.startswith(name + "  "))
    status = lines[i][len(name):].split()[0]
    nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
    return status, nxt if nxt.startswith("fix:") else ""


@pytest.mark.parametrize(
    "setpriv_args",
    [
        # an ordinary user
        ["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"],
        # root without capabilities (a container that was not granted them)
        ["--inh-caps=-all", "--bounding-set=-all"],
    ],
    ids=["nobody", "root-without-caps"],
)
def test_unprivileged_run_names_the_missing_capability_and_remedy(
    setpriv_args: list[str],
) -> None:
    lines = _check_cli_as(setpriv_args)
    status, fix = _row(lines, "CAP_NET_ADMIN")
    assert status == "FAIL"
    assert fix.startswith("fix: CAP_NET_ADMIN missing: grant CAP_NET_ADMIN and CAP_SYS_ADMIN")
    assert _row(lines, "network namespace")[0] == "FAIL"
    assert lines[-1].endswith("checks failed: transparent capture will not work")


def test_net_admin_without_sys_admin_is_reported_precisely() -> None:
    lines = _check_cli_as(["--inh-caps=-all", "--bounding-set=-all,+net_admin"])
    assert _row(lines, "CAP_NET_ADMIN") == ("PASS", "")
    status, fix = _row(lines, "CAP_SYS_ADMIN")
    assert status == "FAIL" and "CAP_SYS_ADMIN missing" in fix
    status, fix = _row(lines, "network namespace")
    assert status == "FAIL" and "CAP_SYS_ADMIN" in fix


def test_unsupported_nft_expression_names_the_kernel_option(
    sandbox_factory: SandboxFactory,
) -> None:
    sb: Sandbox = sandbox_factory(nodes=1, workloads_per_node=1, area="pre")
    # tproxy is only valid in prerouting: the kernel refuses it in output, as it refuses
    # it everywhere when built without CONFIG_NFT_TPROXY.
    bad = _table("output", "filter", "meta l4proto tcp tproxy ip to 127.0.0.1:15001")
    res = _nft_check(sb.workloads[0].netns, "nft tproxy", bad, "CONFIG_NFT_TPROXY", "nft_tproxy")
    assert not res.ok
    assert res.detail.startswith("applying a test table failed: Error:")
    assert res.remedy == (
        "the kernel lacks CONFIG_NFT_TPROXY: `modprobe nft_tproxy`, or use a kernel built "
        "with it (=y or =m)"
    )
    listed = sb.exec(sb.workloads[0].netns, ["nft", "list", "tables"])
    assert "ambit_check" not in listed.stdout, "a refused table must not be half-applied"
