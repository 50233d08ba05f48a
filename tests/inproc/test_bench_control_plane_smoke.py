"""Tier 2: the control-plane scale benchmark runs end to end at a tiny scale, every figure set."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from bench.control_plane import GOAL_MS

REPO = Path(__file__).resolve().parents[2]


def test_control_plane_bench_reports_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "bench.control_plane",
        "--workloads",
        "300",
        "--services",
        "60",
        "--nodes",
        "6",
        "--namespaces",
        "6",
        "--changes",
        "3",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"benchmark failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "results-control-plane.json").read_text())
    summary = doc["summary"]
    expected = {
        "apply_s",
        "compute_total_s",
        "compute_per_node_ms",
        "one_node_scratch_ms",
        "server_start_s",
        "initial_sync_s",
        "change_all_streams_median_ms",
        "change_all_streams_p90_ms",
        "change_all_streams_max_ms",
        "change_median_stream_ms",
        "change_commit_median_ms",
        "change_server_fanout_median_ms",
        "model_mib",
        "rss_after_sync_mib",
        "rss_trimmed_mib",
        "rss_started_mib",
        "rss_peak_mib",
    }
    assert set(summary) == expected
    for key, value in summary.items():
        assert math.isfinite(value) and value > 0, (key, value)
    prop = doc["propagation"]
    # every change reached every stream, as a delta carrying exactly the changed workload
    assert len(prop["all_streams_ms"]) == 3 and prop["streams"] == 6
    assert prop["workloads_per_delta"] == [1]
    assert summary["change_median_stream_ms"] <= summary["change_all_streams_max_ms"]
    # the server's writes come before the last stream has read them
    assert len(prop["server_fanout_ms"]) == 3
    for wrote, read in zip(prop["server_fanout_ms"], prop["all_streams_ms"], strict=True):
        assert wrote <= read
    # each node's snapshot holds every workload (all back a service) and every service
    assert doc["compute"]["snapshot_items"] == 360
    assert doc["machine"]["load_before"] and doc["machine"]["load_after"]
    md = (out / "RESULTS-control-plane.md").read_text()
    assert "python -m bench.control_plane --workloads 300" in md
    assert f"under {GOAL_MS:.0f} ms" in md and "Load average" in md
    assert "![change propagation and compute](control-plane.png)" in md
    assert (out / "control-plane.png").read_bytes().startswith(b"\x89PNG")


def test_control_plane_bench_refuses_a_scale_it_cannot_build(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.control_plane",
            "--workloads",
            "10",
            "--services",
            "20",
            "--namespaces",
            "5",
            "--out",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "--workloads >= --services" in proc.stderr
    assert not (tmp_path / "RESULTS-control-plane.md").exists()
