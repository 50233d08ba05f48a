"""Tier 2: the benchmark harness runs end to end in a short mode; its relays keep bytes intact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.certs import write_pki
from bench.harness import STARTERS, Processes, echo_target
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


def _echo_round_trip(port: int, payload: bytes) -> bytes:
    """Send `payload` through 127.0.0.1:`port` to the echo server and read as many bytes
    back (no half-close: the TLS relay pair cannot carry one, see DESIGN pitfalls)."""
    received = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        while len(received) < len(payload) and (chunk := sock.recv(1 << 20)):
            received += chunk
        sender.join()
    return bytes(received)


@pytest.mark.parametrize("path", ["hbone", "tls", "stunnel"])
def test_bench_relays_carry_bytes_exactly(tmp_path: Path, path: str) -> None:
    require_tools("stunnel4")
    payload = os.urandom(3 * 1024 * 1024) + bytes(range(256)) * 64
    pki = write_pki(tmp_path / "pki")
    with echo_target(tmp_path) as echo_port, Processes(tmp_path) as procs:
        chain = STARTERS[path](procs, pki, echo_port)
        assert len(chain.relay_pids) == 2
        for _ in range(2):  # a second connection reuses the pooled HBONE connection
            got = _echo_round_trip(chain.entry_port, payload)
            assert len(got) == len(payload)
            assert got == payload
