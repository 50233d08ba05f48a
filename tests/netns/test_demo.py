"""Tier 3: `ambit demo` for real (sandbox, control plane, ztunnels, waypoint, app, load).

Each test runs the command as a user would, with a short duration, and checks what it
printed and that it left nothing behind: no netns with its prefix, no process started
for it, no nftables table outside its namespaces.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from config.demo import report
from config.demo.runner import teardown
from netsetup.sandbox import unique_prefix
from tests.conftest import require_root_and_tools

PY = sys.executable
ROOT = str(Path(__file__).parents[2])


def _netns(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _processes(marker: str) -> list[str]:
    """Processes whose command line mentions `marker` (the demo's state dir)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if marker in cmd:
            out.append(f"{pid}: {cmd[:200]}")
    return out


def _host_tables() -> str:
    return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True,
                          check=False).stdout


class DemoRun:
    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")},
                    "AMBIT_DEMO_DIR": str(root)}

    def argv(self, *args: str) -> list[str]:
        return [PY, "-m", "config", "demo", "--prefix", self.prefix, *args]

    def run(self, *args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), env=self.env, cwd=ROOT, capture_output=True,
                              text=True, check=False, timeout=timeout)

    def leftovers(self) -> list[str]:
        return _netns(self.prefix) + _processes(str(self.root / self.prefix))


@pytest.fixture
def demo() -> Iterator[DemoRun]:
    require_root_and_tools("ip", "nft", "curl")
    root = Path(tempfile.mkdtemp(prefix="ambdemo-t"))
    d = DemoRun(root, unique_prefix("tdemo"))
    try:
        yield d
    finally:
        teardown(d.prefix, root)
        shutil.rmtree(root, ignore_errors=True)


def _assert_summary(out: str) -> None:
    for section in report.SECTIONS:
        assert f"\n{section}" in out, f"section {section} missing from:\n{out}"


def test_demo_with_waypoint_measures_and_leaves_nothing(demo: DemoRun) -> None:
    tables = _host_tables()
    r = demo.run("--duration", "8")
    left = demo.leftovers()
    assert left == [], f"left behind: {left}"
    assert _host_tables() == tables
    assert not (demo.root / demo.prefix).exists()
    _assert_summary(r.stdout)
    assert "[FAIL]" not in r.stdout, r.stdout + r.stderr
    assert "Result: the measurements agree" in r.stdout
    assert "waypoint requests" in r.stdout
    assert r.returncode == 0, r.stdout + r.stderr


def test_demo_keep_explore_then_teardown(demo: DemoRun) -> None:
    r = demo.run("--duration", "4", "--no-waypoint", "--keep")
    assert r.returncode == 0, r.stdout + r.stderr
    _assert_summary(r.stdout)
    assert "mutual_tls" in r.stdout and "[FAIL]" not in r.stdout
    assert "cluster.local/ns/shop/sa/frontend" in r.stdout
    # Still running: the printed commands work.
    assert len(_netns(demo.prefix)) == 10
    explore = next(ln.strip() for ln in r.stdout.splitlines()
                   if ln.strip().startswith("ip netns exec") and "/items/" in ln)
    got = subprocess.run([*explore.split(), "-m", "10"], capture_output=True, text=True,
                         check=False, timeout=20)
    assert '"version": "v' in got.stdout, got.stdout + got.stderr
    status = next(ln.strip() for ln in r.stdout.splitlines() if ln.strip().endswith(" status"))
    st = subprocess.run(status.split(), capture_output=True, text=True, check=False,
                        timeout=20, cwd=ROOT, env=demo.env)
    assert "synced" in st.stdout, st.stdout + st.stderr
    down = next(ln.strip() for ln in r.stdout.splitlines() if "--teardown" in ln)
    assert down.endswith(f"demo --teardown {demo.prefix}")
    t = demo.run("--teardown", demo.prefix)
    assert t.returncode == 0, t.stderr
    assert "stopped ztunnel-n1" in t.stdout
    assert demo.leftovers() == []
    assert not (demo.root / demo.prefix).exists()


def test_demo_interrupted_tears_everything_down(demo: DemoRun) -> None:
    proc = subprocess.Popen(demo.argv("--duration", "60", "--no-waypoint"), env=demo.env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 90
        for line in proc.stdout:
            if "driving traffic" in line or time.monotonic() > deadline:
                break
        assert _netns(demo.prefix), "the sandbox was not built"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted, tearing down" in err
    assert demo.leftovers() == []
