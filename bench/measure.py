"""Measurements: iperf3 throughput, 1-byte round trips, process CPU time from /proc, the machine."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Throughput:
    """One iperf3 run: what the receiver got."""

    streams: int
    bits_per_second: float
    bytes: int
    seconds: float


@dataclass(frozen=True)
class Latency:
    """Round-trip statistics in microseconds."""

    count: int
    median_us: float
    p99_us: float
    mean_us: float


def parse_iperf3_json(text: str, streams: int) -> Throughput:
    """The receiver-side totals of `iperf3 -J` output; raises ValueError on an iperf3 error."""
    doc = json.loads(text)
    if "error" in doc:
        raise ValueError(f"iperf3 failed: {doc['error']}")
    rcv = doc["end"]["sum_received"]
    return Throughput(
        streams=streams,
        bits_per_second=float(rcv["bits_per_second"]),
        bytes=int(rcv["bytes"]),
        seconds=float(rcv["seconds"]),
    )


def run_iperf3(
    port: int, *, seconds: int, streams: int, host: str = "127.0.0.1", attempts: int = 2
) -> Throughput:
    """Run an iperf3 client against `host:port` and return the receiver's figures.

    A failed attempt (e.g. the iperf3 server still finishing the previous test) is
    retried once after a short pause.
    """
    cmd = ["iperf3", "-c", host, "-p", str(port), "-t", str(seconds), "-P", str(streams), "-J"]
    problem = ""
    for attempt in range(attempts):
        if attempt:
            time.sleep(1.0)
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=seconds + 30, check=False
        )
        try:
            return parse_iperf3_json(proc.stdout, streams)
        except (ValueError, KeyError) as exc:
            problem = f"{exc}; stderr: {proc.stderr.strip()[:200]!r}"
    raise RuntimeError(
        f"iperf3 through {host}:{port} gave no result after {attempts} attempts ({problem}): "
        "is the relay chain up and the iperf3 server free?"
    )


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (`q` in 0..100) of already sorted values."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def latency_stats(samples_ns: Sequence[int]) -> Latency:
    """Median, p99 and mean of round-trip samples given in nanoseconds."""
    us = sorted(s / 1000 for s in samples_ns)
    return Latency(
        count=len(us),
        median_us=percentile(us, 50),
        p99_us=percentile(us, 99),
        mean_us=sum(us) / len(us),
    )


def ping_pong(port: int, *, count: int, warmup: int = 200, host: str = "127.0.0.1") -> Latency:
    """`count` 1-byte round trips (TCP_NODELAY) to an echo server behind `host:port`."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        samples: list[int] = []
        clock = time.perf_counter_ns
        send, recv = sock.send, sock.recv
        for i in range(warmup + count):
            t0 = clock()
            send(b"x")
            if not recv(1):
                raise RuntimeError(
                    f"echo through 127.0.0.1:{port} closed after {i} round trips: "
                    "check the relays' stderr"
                )
            if i >= warmup:
                samples.append(clock() - t0)
    return latency_stats(samples)


def connection_rate(port: int, *, count: int, host: str = "127.0.0.1") -> float:
    """New connections per second, one after another: connect, one 1-byte round trip
    (so the whole path is set up, TLS handshakes and CONNECT included), close."""
    start = time.perf_counter()
    for i in range(count):
        with socket.create_connection((host, port), timeout=10) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"x")
            if not sock.recv(1):
                raise RuntimeError(
                    f"echo through {host}:{port} closed connection {i} before answering: "
                    "check the relays' stderr"
                )
    return count / (time.perf_counter() - start)


def parse_proc_stat(text: str) -> float:
    """utime+stime in seconds from the text of /proc/PID/stat."""
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLK_TCK


def cpu_seconds(pids: Sequence[int]) -> float:
    """Total CPU seconds (user+system, all threads) used so far by `pids`."""
    total = 0.0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            total += parse_proc_stat(f.read())
    return total


def parse_cpu_busy(proc_stat: str) -> float:
    """Busy CPU seconds of the whole machine (all CPUs) from the text of /proc/stat.

    Interrupt and softirq time is left out: with IRQ time accounting it is charged to no
    process, and on loopback it is mostly the benchmark's own packet processing.
    """
    fields = proc_stat.splitlines()[0].split()
    assert fields[0] == "cpu", "first line of /proc/stat is the all-CPU total"
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + steal) / CLK_TCK


@dataclass(frozen=True)
class CpuSnapshot:
    """Machine-wide busy CPU time and this benchmark's own share, at one moment."""

    at: float
    machine_busy: float
    own: float


def cpu_snapshot(pids: Sequence[int]) -> CpuSnapshot:
    """Busy time of the machine and of our processes: `pids`, this process and its reaped
    children (the iperf3 clients)."""
    with open("/proc/stat") as f:
        busy = parse_cpu_busy(f.read())
    t = os.times()
    own = cpu_seconds(pids) + t.user + t.system + t.children_user + t.children_system
    return CpuSnapshot(at=time.monotonic(), machine_busy=busy, own=own)


def other_load(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """CPUs' worth of work done by processes other than ours between two snapshots."""
    wall = after.at - before.at
    if wall <= 0:
        return 0.0
    other = (after.machine_busy - before.machine_busy) - (after.own - before.own)
    return max(other, 0.0) / wall


def rss_bytes(pid: int) -> int:
    """Resident set size of `pid`."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo ("unknown" when it names none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine_facts(
    now: datetime.datetime,
    load_before: tuple[float, float, float],
    extra: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Where the numbers come from, as a JSON-ready dict: date, CPUs, kernel, Python,
    OpenSSL, then `extra` (e.g. tool versions), then the load average before and now."""
    return {
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count() or 0,
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "openssl": ssl.OPENSSL_VERSION,
        **(extra or {}),
        "load_before": list(load_before),
        "load_after": list(os.getloadavg()),
    }


def log_progress(msg: str) -> None:
    """One timestamped progress line on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def exit_on_signal(signum: int, frame: object) -> None:
    """A signal handler that unwinds like Ctrl-C (SIGTERM: every child process is
    stopped by pid on the way out), exiting 128 + the signal number."""
    raise SystemExit(128 + signum)
