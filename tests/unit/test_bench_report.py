"""Pure parts of the benchmark harness: parsing, statistics, goal verdicts, report text."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench.harness import PathResult, Sample, Settings, summarise
from bench.measure import (
    CpuSnapshot,
    Latency,
    Throughput,
    latency_stats,
    other_load,
    parse_cpu_busy,
    parse_iperf3_json,
    parse_proc_stat,
    percentile,
)
from bench.profile import syscall_counts, top_frames
from bench.relays import stunnel_config
from bench.report import (
    Machine,
    evaluate_goals,
    load_results_json,
    ratio_rows,
    render_markdown,
    results_json,
)

MACHINE = Machine(
    date="2026-01-01 00:00 UTC",
    nproc=2,
    cpu="Test CPU",
    kernel="6.0",
    python="3.11.7",
    openssl="OpenSSL 3",
    packages={"uvloop": "0.23"},
    tools={"iperf3": "iperf 3.12", "stunnel": "stunnel 5.68"},
)


def result(name: str, x1: float, x8: float, rtt: float, cpu: float | None = 3.0) -> PathResult:
    labels = {"hbone": "(a) HBONE", "tls": "(b) TLS", "stunnel": "(c) stunnel", "direct": "(d) d"}
    return PathResult(
        name=name,
        label=labels[name],
        gbps_single=x1,
        gbps_multi=x8,
        rtt_median_us=rtt,
        rtt_p99_us=rtt * 2,
        cpu_s_per_gb_single=cpu,
        cpu_s_per_gb_multi=cpu,
        samples=1,
    )


def test_parse_iperf3_json_reads_receiver_totals() -> None:
    doc = {
        "end": {"sum_received": {"bits_per_second": 4.2e9, "bytes": 2_625_000_000, "seconds": 5.0}}
    }
    t = parse_iperf3_json(json.dumps(doc), streams=8)
    assert t == Throughput(streams=8, bits_per_second=4.2e9, bytes=2_625_000_000, seconds=5.0)


def test_parse_iperf3_json_reports_iperf3_error() -> None:
    with pytest.raises(ValueError, match="server is busy"):
        parse_iperf3_json(json.dumps({"error": "the server is busy"}), streams=1)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_latency_stats_in_microseconds() -> None:
    lat = latency_stats([10_000] * 98 + [50_000, 90_000])
    assert lat.count == 100 and lat.median_us == 10.0 and lat.p99_us == 50.0


def test_parse_proc_stat_handles_spaces_and_parens_in_command() -> None:
    fields = ["S"] + ["0"] * 10 + ["250", "150"] + ["0"] * 30
    text = "1234 (python (bench) x) " + " ".join(fields)
    assert parse_proc_stat(text) == pytest.approx(400 / os.sysconf("SC_CLK_TCK"))


def test_cpu_busy_and_other_load() -> None:
    tck = os.sysconf("SC_CLK_TCK")
    text = f"cpu  {tck} 0 {tck} {50 * tck} 0 {tck} {tck} 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n"
    assert parse_cpu_busy(text) == pytest.approx(2.0)  # idle, irq, softirq are not counted
    before = CpuSnapshot(at=10.0, machine_busy=100.0, own=40.0)
    after = CpuSnapshot(at=12.0, machine_busy=103.0, own=42.0)
    assert other_load(before, after) == pytest.approx(0.5)  # 1 CPU-s of others over 2 s
    assert other_load(after, after) == 0.0


def test_goals_met_missed_and_by_how_much() -> None:
    results = [
        result("hbone", 1.0, 2.0, 130.0),
        result("tls", 4.0, 5.0, 85.0),
        result("stunnel", 4.5, 6.0, 85.0),
        result("direct", 30.0, 30.0, 18.0, cpu=None),
    ]
    goals = evaluate_goals(results)
    assert [g.met for g in goals] == [False, False, False, False, False]
    assert "25% of (b)" in goals[0].detail and "short by 2.60 Gbit/s" in goals[0].detail
    assert "+45.0 us" in goals[2].detail and "over by 30.0 us" in goals[2].detail
    fast = [result("hbone", 4.0, 6.0, 90.0), *results[1:]]
    assert [g.met for g in evaluate_goals(fast)] == [True, True, True, False, True]


def test_goals_not_measured_when_a_path_failed() -> None:
    results = [
        PathResult(name="hbone", label="(a) HBONE", error="relay crashed"),
        result("tls", 4.0, 5.0, 85.0),
    ]
    goals = evaluate_goals(results)
    assert all(g.met is None for g in goals)
    assert "relay crashed" in goals[0].detail
    assert "stunnel not measured: not selected" in goals[-1].detail


def test_ratio_rows_against_each_baseline() -> None:
    rows = ratio_rows([result("hbone", 2.0, 4.0, 100.0), result("tls", 4.0, 4.0, 80.0)])
    assert rows == [("(b) TLS", "50%", "100%", "+20.0 us", "n/a", "1.00x")]


def test_markdown_has_command_machine_table_goals_and_plot() -> None:
    md = render_markdown(
        [result("hbone", 2.0, 4.0, 100.0), PathResult(name="stunnel", label="(c) s", error="boom")],
        MACHINE,
        Settings(seconds=5, rtt_count=20_000, repeat=3),
        command="python -m bench",
        plot_name="results.png",
        analysis="Hand-written notes.",
    )
    assert "```\npython -m bench\n```" in md
    assert "2 CPUs (Test CPU)" in md
    assert "| (a) HBONE | 2.00 | 4.00 | 100.0 | 200 | n/a | 0 | 3.00 / 3.00 | n/a | 0.00 |" in md
    assert "| (c) s | failed: boom | | | | | | | | |" in md
    assert "## Goals" in md and "Hand-written notes." in md
    assert "![" in md and "(results.png)" in md


def test_summarise_takes_medians_and_cpu_per_gb() -> None:
    def sample(gbps: float, rtt: float, cpu: float) -> Sample:
        t = Throughput(1, gbps * 1e9, int(gbps * 1e9 / 8 * 5), 5.0)
        return Sample(t, t, Latency(100, rtt, rtt * 2, rtt), 500.0, cpu, cpu, 50 * 2**20)

    r = summarise("tls", [sample(4.0, 80.0, 2.5), sample(5.0, 90.0, 2.5), sample(3.0, 70.0, 2.5)])
    assert r.gbps_single == 4.0 and r.rtt_median_us == 80.0 and r.samples == 3
    assert r.cpu_s_per_gb_single == pytest.approx(1.0)  # 2.5 s for 2.5 GB
    assert r.relay_rss_mib == 50.0
    assert [run["gbps_single"] for run in r.runs] == [4.0, 5.0, 3.0]
    md = render_markdown(
        [r],
        MACHINE,
        Settings(),
        command="python -m bench",
        plot_name=None,
    )
    assert "| 4.00 (3.00-5.00) |" in md and "| 80.0 (70.0-90.0) |" in md
    assert summarise("direct", [sample(30.0, 18.0, 0.0)]).cpu_s_per_gb_single is None


def test_top_frames_self_and_inclusive() -> None:
    raw = "\n".join(
        [
            "process 1;main (bench/hbone.py:10);splice (ztunnel/hbone/stream.py:5) 6",
            "process 1;main (bench/hbone.py:10);send (ztunnel/hbone/h2core.py:9) 4",
        ]
    )
    assert top_frames(raw, inclusive=False)[0] == ("splice (hbone/stream.py)", 60.0)
    inclusive = dict(top_frames(raw, inclusive=True))
    assert "main (bench/hbone.py)" not in inclusive  # in every sample: a root, left out
    assert inclusive["send (hbone/h2core.py)"] == 40.0
    py = dict(top_frames(raw + "\nroot;memcpy (libc) 10", inclusive=True, python_only=True))
    assert "memcpy (libc)" not in py and py["send (hbone/h2core.py)"] == 20.0
    renamed = top_frames("root;0x7f00 1", inclusive=False, resolve=lambda f: f"[{f}]")
    assert renamed == [("[0x7f00]", 100.0)]


def test_stunnel_config_is_mtls_tls13_aes256() -> None:
    conf = stunnel_config(
        client=True,
        accept=("127.0.0.1", 1),
        connect=("127.0.0.1", 2),
        ca=Path("/ca.pem"),
        cert=Path("/c.pem"),
        key=Path("/k.pem"),
    )
    assert "client = yes" in conf and "verifyChain = yes" in conf
    assert "sslVersionMin = TLSv1.3" in conf and "TLS_AES_256_GCM_SHA384" in conf
    assert "accept = 127.0.0.1:1" in conf and "connect = 127.0.0.1:2" in conf


def test_syscall_counts_split_control_sized_calls() -> None:
    log = "\n".join(
        [
            '1234 read(16, ""..., 262144) = 262144',
            '1234 read(16, ""..., 262144) = 131072',
            'write(14, ""..., 37) = 37',
            "[pid 99] writev(16, [...], 3) = 259000",
            "1234 read(16, <unfinished ...>",
            '1234 write(3, "x", 1) = -1 EAGAIN (Resource temporarily unavailable)',
        ]
    )
    assert syscall_counts(log) == {
        "read": (2, 393216),
        "write <1KiB": (1, 37),
        "writev": (1, 259000),
    }


def test_results_json_round_trip() -> None:
    r = PathResult(
        name="hbone",
        label="(a) HBONE",
        gbps_single=2.0,
        runs=[{"gbps_single": 2.0, "cpu_s_per_gb_single": None}],
        profile={"throughput, client side, self": [("read ()", 30.0)]},
        syscalls=[("server", "write <1KiB", 1655.0, 41.0)],
    )
    settings = Settings(seconds=1, repeat=1, paths=("hbone",))
    text = results_json([r], MACHINE, settings, command="python -m bench --quick")
    assert load_results_json(text) == ([r], MACHINE, settings, "python -m bench --quick")
