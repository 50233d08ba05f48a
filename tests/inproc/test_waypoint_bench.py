"""The waypoint benchmark runs end to end (tiny load) and renders its report."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.waypoint import render_markdown, run


def test_waypoint_benchmark_smoke(tmp_path: Path) -> None:
    assert shutil.which("haproxy"), "haproxy is required (apt-get install haproxy)"
    lines: list[str] = []
    results = run(tmp_path, rates=[50.0], seconds=0.5, connections=2, log=lines.append,
                  repeats=1)
    for name in ("waypoint", "haproxy", "floor"):
        runs = results[name]["runs"]
        assert [r["mode"] for r in runs] == ["rate", "max"]
        assert [r["target_rps"] for r in results[name]["repeats"]] == [50.0]
        for r in [*runs, *results[name]["repeats"]]:
            assert r["errors"] == 0 and r["completed"] > 0
            assert set(r["statuses"]) == {"200"}
            assert r["p99_ms"] >= r["p50_ms"] > 0
    text = render_markdown(results, "python -m bench.waypoint --quick",
                           {"cpus": 2, "platform": "test", "python": "3", "when": "now"})
    assert "| waypoint | 50/s |" in text and "| haproxy | max (32 conns) |" in text
    assert "| floor | 50/s |" in text and "The machine's share" in text
    assert "| waypoint | 50/s, repeat 1 |" in text and "(median of 2 runs, " in text
    # the sweep of each proxy, then one interleaved round at the judged rate
    assert len(lines) == 9
    assert [line.split()[0] for line in lines[6:]] == ["waypoint", "haproxy", "floor"]
