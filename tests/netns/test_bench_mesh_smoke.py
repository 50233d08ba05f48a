"""Tier 3: the full-mesh-path benchmark runs end to end in a tiny mode and reports every figure."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from netsetup.sandbox import cleanup_leftovers
from tests.conftest import require_root_and_tools

REPO = Path(__file__).resolve().parents[2]
# the figures the report compares as mesh/direct (written out: the test states the contract)
RATIO_KEYS = (
    "gbps_1",
    "gbps_8",
    "rtt_p50_us",
    "rtt_p99_us",
    "conn_per_s",
    "req_p50_ms",
    "req_p99_ms",
)


def test_mesh_bench_reports_every_figure_and_cleans_up(tmp_path: Path) -> None:
    require_root_and_tools("ip", "nft", "iperf3", "curl")
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench.mesh",
        "--quick",
        "--seconds",
        "1",
        "--rtt-count",
        "200",
        "--conn-count",
        "30",
        "--rate",
        "100",
        "--load-seconds",
        "1",
        "--conns",
        "2",
        "--out",
        str(out),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: the benchmark tears its sandbox down on the way out
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        stderr = "timed out after 150 s\n" + stderr
    finally:
        # the child's sandbox is named after the child's pid: sweep whatever it left
        left = cleanup_leftovers(f"benchmes{proc.pid % 100000}x")
    assert proc.returncode == 0, f"benchmark failed:\n{stdout}\n{stderr[-3000:]}"
    assert left == [], f"the benchmark left network namespaces behind: {left}"
    doc = json.loads((out / "results-mesh.json").read_text())
    assert [s["path"] for s in doc["samples"]] == ["direct", "mesh"]
    for path in ("direct", "mesh"):
        figures = doc["summaries"][path]["figures"]
        for key in (*RATIO_KEYS, "req_p99_sched_ms", "rps", "zt_rss_mib"):
            assert math.isfinite(figures[key]) and figures[key] > 0, (path, key, figures)
        assert figures["rtt_p50_us"] <= figures["rtt_p99_us"]
        assert figures["req_p50_ms"] <= figures["req_p99_ms"]
    mesh = doc["summaries"]["mesh"]["figures"]
    # the mesh run went through both ztunnels and cost them CPU; the direct run did not
    assert mesh["zt_cpu_per_krps"] > 0 and mesh["zt_cpu_s_per_gb"] > 0
    samples = {s["path"]: s for s in doc["samples"]}
    assert samples["mesh"]["bytes_seen_by_ztunnel"] > 0
    assert samples["direct"]["bytes_seen_by_ztunnel"] == 0
    assert set(doc["ratios"]) == set(RATIO_KEYS)
    assert doc["machine"]["load_before"] and doc["machine"]["load_after"]
    md = (out / "RESULTS-mesh.md").read_text()
    assert "python -m bench.mesh --quick" in md and "Load average" in md
    assert "| iperf3, 1 stream (Gbit/s) |" in md and "mesh/direct" in md
    assert "## Reading" in md and "new connections" in md
    assert (out / "mesh.png").read_bytes().startswith(b"\x89PNG")
