"""ztunnel.service's capability set is enough for what ztunnel does, and each one is needed.

The unit bounds ztunnel to CAP_NET_ADMIN, CAP_SYS_ADMIN and CAP_SYS_PTRACE. A probe
process is started under exactly that bounding set (setpriv, no-new-privs, root, as
systemd starts the unit) and does, for real, what ztunnel does: open another user's
/proc/PID/ns/net, setns into a workload netns, open an IP_TRANSPARENT listener with
SO_MARK 0x539 there, and install the capture rules (nftables + policy routing). Then each
capability is dropped in turn and the operation that needs it must fail with EPERM.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require_root_and_tools
from tests.netns.test_capture import bare_netns

pytestmark = pytest.mark.netns

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ztunnel.service"
REPO = Path(__file__).resolve().parents[2]

PROBE = textwrap.dedent("""
    import errno, json, os, socket, sys
    from netsetup import capture, netns as nsmod
    netns, other_pid = sys.argv[1], int(sys.argv[2])
    out = {}
    def attempt(name, fn):
        try:
            fn()
            out[name] = "ok"
        except OSError as e:
            out[name] = errno.errorcode.get(e.errno, str(e.errno))
        except Exception as e:  # netsetup wraps kernel errors in its own exceptions
            text = str(e)
            out[name] = "EPERM" if ("EPERM" in text or "ermission" in text
                                    or "not permitted" in text) else "error: " + text
    def open_other():
        os.close(os.open(f"/proc/{other_pid}/ns/net", os.O_RDONLY))
    def listener():
        s = nsmod.run_in_netns(netns, socket.socket, socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_IP, 19, 1)  # IP_TRANSPARENT
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
            s.bind(("127.0.0.1", 15001))
            s.listen()
        finally:
            s.close()
    def enroll():
        capture.enroll(capture.Workload("probe", netns, "10.250.0.2"))
    attempt("proc_ns_of_other_user", open_other)
    attempt("setns", lambda: nsmod.run_in_netns(netns, lambda: None))
    attempt("transparent_marked_listener", listener)
    attempt("capture_rules", enroll)
    print(json.dumps(out))
""")


def _unit_caps() -> list[str]:
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            return line.split("=", 1)[1].split()
    raise AssertionError("ztunnel.service has no CapabilityBoundingSet=")


@pytest.fixture
def workload_netns() -> Iterator[str]:
    require_root_and_tools("ip", "setpriv")
    with bare_netns("unitcap") as name:
        yield name


@pytest.fixture
def other_users_process() -> Iterator[int]:
    """A process of user nobody: its /proc/PID/ns/net needs ptrace access to open.
    (Each test gets a fresh netns; the probe's capture rules go with it.)"""
    proc = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             "sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def _probe(caps: list[str], netns: str, other_pid: int) -> dict[str, str]:
    bounding = ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        ["setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--no-new-privs",
         sys.executable, "-c", PROBE, netns, str(other_pid)],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert r.returncode == 0, f"probe failed: {r.stderr}"
    result: dict[str, str] = json.loads(r.stdout.strip().splitlines()[-1])
    return result


def test_the_unit_capabilities_are_enough(workload_netns: str, other_users_process: int) -> None:
    caps = _unit_caps()
    assert set(caps) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_SYS_PTRACE"}
    got = _probe(caps, workload_netns, other_users_process)
    assert got == {"proc_ns_of_other_user": "ok", "setns": "ok",
                   "transparent_marked_listener": "ok", "capture_rules": "ok"}, got


@pytest.mark.parametrize(("dropped", "fails"), [
    ("CAP_SYS_PTRACE", {"proc_ns_of_other_user"}),
    ("CAP_SYS_ADMIN", {"setns", "transparent_marked_listener", "capture_rules"}),
    ("CAP_NET_ADMIN", {"transparent_marked_listener", "capture_rules"}),
])
def test_each_capability_is_needed(workload_netns: str, other_users_process: int,
                                   dropped: str, fails: set[str]) -> None:
    caps = [c for c in _unit_caps() if c != dropped]
    got = _probe(caps, workload_netns, other_users_process)
    failed = {k for k, v in got.items() if v != "ok"}
    assert failed == fails, f"without {dropped}: {got}"
    for k in fails:
        assert got[k] in ("EPERM", "EACCES"), f"without {dropped}, {k}: {got[k]}"
