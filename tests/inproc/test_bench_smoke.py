"""Tier 2: the benchmark harness runs end to end in a very short mode and reports every path."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.interop.peers import require_tools

REPO = Path(__file__).resolve().parents[2]


def test_bench_produces_numbers_for_every_path(tmp_path: Path) -> None:
    require_tools("iperf3", "stunnel4")
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--seconds",
            "1",
            "--rtt-count",
            "300",
            "--conn-count",
            "50",
            "--repeat",
            "1",
            "--out",
            str(out),
            "--analysis",
            str(tmp_path / "none.md"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads((out / "results.json").read_text())
    results = {r["name"]: r for r in doc["results"]}
    assert set(results) == {"hbone", "tls", "stunnel", "direct"}
    for name, r in results.items():
        assert r["error"] is None, (name, r["error"])
        assert r["gbps_single"] > 0 and r["gbps_multi"] > 0, r
        assert 0 < r["rtt_median_us"] <= r["rtt_p99_us"], r
        assert r["conn_per_s"] > 0, r
        if name == "direct":
            assert r["cpu_s_per_gb_single"] is None
        else:
            assert r["cpu_s_per_gb_single"] > 0 and r["cpu_s_per_gb_multi"] > 0, r
    assert len(doc["goals"]) == 5 and all(g["met"] is not None for g in doc["goals"])
    md = (out / "RESULTS.md").read_text()
    for label in ("(a) HBONE", "(b) Python mTLS", "(c) stunnel", "(d) direct", "## Goals"):
        assert label in md
    assert "python -m bench --seconds 1" in md
    png = (out / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
