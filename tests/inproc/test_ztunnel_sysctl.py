"""The one sysctl ztunnel sets in workload netns (tcp_migrate_req), and its warning when
/proc/sys is read-only (systemd ProtectKernelTunables=yes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import require_root_and_tools

ROOT = str(Path(__file__).parents[2])
CHILD = """
from ztunnel import log
from ztunnel.workloads import MIGRATE_REQ_SYSCTL, _enable_request_migration, \\
    _warn_no_request_migration
log.configure("info", json=True)
reason = _enable_request_migration()
print("RESULT", reason, flush=True)
print("VALUE", open(MIGRATE_REQ_SYSCTL).read().strip(), flush=True)
if reason is not None:
    _warn_no_request_migration("default/app", "app-ns", reason)
"""


def _run(*prefix: str) -> str:
    # a network namespace of its own: the sysctl of the host is never touched
    r = subprocess.run([*prefix, sys.executable, "-c", CHILD], capture_output=True, text=True,
                       cwd=ROOT, timeout=60, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def test_request_migration_is_enabled_in_the_workload_netns() -> None:
    require_root_and_tools("unshare")
    out = _run("unshare", "--net")
    assert "RESULT None" in out and "VALUE 1" in out, out


def test_read_only_proc_sys_is_a_warning_that_says_what_it_costs() -> None:
    require_root_and_tools("unshare", "mount", "sh")
    # what ProtectKernelTunables=yes does: /proc/sys bind-mounted read-only
    out = _run("unshare", "--net", "--mount", "--propagation", "private", "sh", "-c",
               'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys '
               '&& exec "$@"', "sh")
    assert "RESULT /proc/sys/net/ipv4/tcp_migrate_req: Read-only file system" in out, out
    assert "VALUE 0" in out, out
    warning = next(line for line in out.splitlines() if "TCP request migration" in line)
    assert '"level": "warning"' in warning or '"level":"warning"' in warning, warning
    assert "rolling restart" in warning and "ProtectKernelTunables" in warning, warning
    assert "app-ns" in warning
