"""Benchmark harness: start each path's processes on loopback, measure, stop them by pid."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench import measure
from bench.certs import BenchPKI, write_pki
from bench.relays import stunnel_config

LOOPBACK = "127.0.0.1"

PATHS: dict[str, str] = {
    "hbone": "(a) HBONE client+server pair",
    "tls": "(b) Python mTLS relay pair",
    "stunnel": "(c) stunnel mTLS pair",
    "direct": "(d) direct",
}


@dataclass(frozen=True)
class Settings:
    """What to run and for how long."""

    seconds: int = 5
    rtt_count: int = 20_000
    conn_count: int = 1000
    repeat: int = 3
    paths: tuple[str, ...] = tuple(PATHS)
    profile: bool = False
    profile_seconds: int = 5


@dataclass(frozen=True)
class Sample:
    """One measurement of one path."""

    single: measure.Throughput
    multi: measure.Throughput
    latency: measure.Latency
    conn_per_s: float
    cpu_single: float
    cpu_multi: float
    rss_bytes: int
    other_cpus: float = 0.0  # other processes' load during the throughput runs, in CPUs
    cpu_per_rtt_us: float | None = None  # relay CPU time per 1-byte round trip


@dataclass(frozen=True)
class PathResult:
    """The figures of one path (medians over repeats), or why it could not be measured."""

    name: str
    label: str
    gbps_single: float = 0.0
    gbps_multi: float = 0.0
    rtt_median_us: float = 0.0
    rtt_p99_us: float = 0.0
    relay_cpu_per_rtt_us: float | None = None
    conn_per_s: float = 0.0
    cpu_s_per_gb_single: float | None = None
    cpu_s_per_gb_multi: float | None = None
    relay_rss_mib: float | None = None
    other_cpus: float = 0.0
    samples: int = 0
    runs: list[dict[str, float | None]] = field(default_factory=list)
    failed_runs: int = 0
    error: str | None = None
    profile: dict[str, list[tuple[str, float]]] = field(default_factory=dict)
    # (relay side, syscall, calls per GB, mean bytes per call) from an strace'd transfer
    syscalls: list[tuple[str, str, float, float]] = field(default_factory=list)


@dataclass(frozen=True)
class Chain:
    """A running path: where clients connect and which relay processes carry the bytes."""

    entry_port: int
    relay_pids: tuple[int, ...]


class Processes:
    """Child processes of one benchmark step; every one is stopped by pid on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(self, cmd: Sequence[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        try:
            proc = subprocess.Popen(
                list(cmd), stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL
            )
        finally:
            log.close()
        self.children.append(proc)
        return proc

    def start_announcing(
        self, cmd: Sequence[str], name: str, timeout: float = 20.0
    ) -> tuple[subprocess.Popen[bytes], int]:
        """Start a process that prints `READY <port>`; return it and its port."""
        proc = self.start(cmd, name)
        assert proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([proc.stdout], [], [], max(left, 0))
            if not ready:
                raise RuntimeError(
                    f"{name} did not report READY within {timeout:.0f}s: see "
                    f"{self.workdir / (name + '.log')}"
                )
            chunk = os.read(proc.stdout.fileno(), 1)
            if not chunk:
                raise RuntimeError(
                    f"{name} exited with {proc.wait()} before listening: see "
                    f"{self.workdir / (name + '.log')}"
                )
            line += chunk
        word, _, port = line.decode().strip().partition(" ")
        if word != "READY" or not port.isdigit():
            raise RuntimeError(f"{name} printed {line!r} instead of 'READY <port>'")
        return proc, int(port)

    def stop_all(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.children:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        self.children.clear()


async def stop_async(proc: asyncio.subprocess.Process, grace: float = 10.0) -> None:
    """SIGTERM a still-running asyncio child, SIGKILL it after `grace` seconds, reap it."""
    if proc.returncode is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(grace):
            await proc.wait()
    except TimeoutError:
        proc.kill()
        await proc.wait()


def free_port() -> int:
    """A port that was free a moment ago (for tools that cannot report their own)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(
    port: int,
    proc: subprocess.Popen[bytes],
    name: str,
    timeout: float = 10.0,
    host: str = LOOPBACK,
) -> None:
    """Poll until something accepts on `host`:`port`; fail early if `proc` died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} is not listening on {host}:{port} after {timeout:.0f}s")


def _py(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _tls_args(pki: BenchPKI, side: str) -> list[str]:
    leaf = pki.client if side == "client" else pki.server
    return ["--ca", str(pki.ca), "--cert", str(leaf.cert), "--key", str(leaf.key)]


def start_direct(procs: Processes, pki: BenchPKI, target: int) -> Chain:
    return Chain(entry_port=target, relay_pids=())


def start_tls(procs: Processes, pki: BenchPKI, target: int) -> Chain:
    server, sport = procs.start_announcing(
        _py(
            "bench.relays",
            "tls-server",
            "--connect",
            f"{LOOPBACK}:{target}",
            *_tls_args(pki, "server"),
        ),
        "tls-server",
    )
    client, cport = procs.start_announcing(
        _py(
            "bench.relays",
            "tls-client",
            "--connect",
            f"{LOOPBACK}:{sport}",
            "--server-identity",
            pki.server.spiffe_id,
            *_tls_args(pki, "client"),
        ),
        "tls-client",
    )
    return Chain(entry_port=cport, relay_pids=(client.pid, server.pid))


def start_hbone(procs: Processes, pki: BenchPKI, target: int) -> Chain:
    server, sport = procs.start_announcing(
        _py("bench.hbone", "server", *_tls_args(pki, "server")), "hbone-server"
    )
    client, cport = procs.start_announcing(
        _py(
            "bench.hbone",
            "client",
            "--connect",
            f"{LOOPBACK}:{sport}",
            "--target",
            f"{LOOPBACK}:{target}",
            "--server-identity",
            pki.server.spiffe_id,
            *_tls_args(pki, "client"),
        ),
        "hbone-client",
    )
    return Chain(entry_port=cport, relay_pids=(client.pid, server.pid))


def stunnel_binary() -> str:
    for name in ("stunnel4", "stunnel"):
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("stunnel is not installed: apt-get install stunnel4 (or `make deps`)")


def start_stunnel(procs: Processes, pki: BenchPKI, target: int) -> Chain:
    binary = stunnel_binary()
    sport, cport = free_port(), free_port()
    pids = []
    for side, accept, connect in (("server", sport, target), ("client", cport, sport)):
        leaf = pki.client if side == "client" else pki.server
        conf = procs.workdir / f"stunnel-{side}-{target}.conf"
        conf.write_text(
            stunnel_config(
                client=side == "client",
                accept=(LOOPBACK, accept),
                connect=(LOOPBACK, connect),
                ca=pki.ca,
                cert=leaf.cert,
                key=leaf.key,
            )
        )
        proc = procs.start([binary, str(conf)], f"stunnel-{side}")
        wait_listening(accept, proc, f"stunnel {side}")
        pids.append(proc.pid)
    return Chain(entry_port=cport, relay_pids=tuple(reversed(pids)))


STARTERS: dict[str, Callable[[Processes, BenchPKI, int], Chain]] = {
    "hbone": start_hbone,
    "tls": start_tls,
    "stunnel": start_stunnel,
    "direct": start_direct,
}


def start_iperf3_server(procs: Processes) -> tuple[int, int]:
    """A fresh iperf3 server on loopback (one per measurement: a test that went wrong
    cannot leave it busy for the next path): (port, pid)."""
    port = free_port()
    server = procs.start(["iperf3", "-s", "-p", str(port), "-B", LOOPBACK], "iperf3-server")
    wait_listening(port, server, "iperf3 server")
    return port, server.pid


@contextlib.contextmanager
def echo_target(workdir: Path) -> Iterator[int]:
    """The TCP echo server the round trips go to, for the whole run: its port."""
    with Processes(workdir) as procs:
        _, echo_port = procs.start_announcing(_py("bench.relays", "echo"), "echo")
        yield echo_port


def _gb(nbytes: int) -> float:
    return nbytes / 1e9


def measure_once(name: str, pki: BenchPKI, workdir: Path, *, echo_port: int, s: Settings) -> Sample:
    """Throughput (1 and 8 streams, with relay CPU) and round trips of one path, once."""
    start = STARTERS[name]
    with Processes(workdir) as procs:
        iperf_port, iperf_pid = start_iperf3_server(procs)
        chain = start(procs, pki, iperf_port)
        own = (*chain.relay_pids, iperf_pid)
        snap0 = measure.cpu_snapshot(own)
        cpu0 = measure.cpu_seconds(chain.relay_pids)
        single = measure.run_iperf3(chain.entry_port, seconds=s.seconds, streams=1)
        cpu1 = measure.cpu_seconds(chain.relay_pids)
        multi = measure.run_iperf3(chain.entry_port, seconds=s.seconds, streams=8)
        cpu2 = measure.cpu_seconds(chain.relay_pids)
        other = measure.other_load(snap0, measure.cpu_snapshot(own))
        rss = sum(measure.rss_bytes(p) for p in chain.relay_pids)
    with Processes(workdir) as procs:
        chain = start(procs, pki, echo_port)
        rtt_cpu0 = measure.cpu_seconds(chain.relay_pids)
        latency = measure.ping_pong(chain.entry_port, count=s.rtt_count)
        rtt_cpu = measure.cpu_seconds(chain.relay_pids) - rtt_cpu0
        conn_per_s = measure.connection_rate(chain.entry_port, count=s.conn_count)
    # warm-up round trips are included in the CPU time: count them too
    cpu_per_rtt_us = rtt_cpu / (s.rtt_count + 200) * 1e6 if chain.relay_pids else None
    return Sample(
        single, multi, latency, conn_per_s, cpu1 - cpu0, cpu2 - cpu1, rss, other, cpu_per_rtt_us
    )


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def summarise(name: str, samples: Sequence[Sample]) -> PathResult:
    """Median of each figure over the repeats of one path."""
    has_relays = name != "direct"
    rtt_cpu = [x.cpu_per_rtt_us for x in samples if x.cpu_per_rtt_us is not None]

    def per_gb(cpu: Sequence[float], tput: Sequence[measure.Throughput]) -> float | None:
        if not has_relays:
            return None
        return _median([c / _gb(t.bytes) for c, t in zip(cpu, tput, strict=True) if t.bytes])

    return PathResult(
        name=name,
        label=PATHS[name],
        gbps_single=_median([x.single.bits_per_second / 1e9 for x in samples]),
        gbps_multi=_median([x.multi.bits_per_second / 1e9 for x in samples]),
        rtt_median_us=_median([x.latency.median_us for x in samples]),
        rtt_p99_us=_median([x.latency.p99_us for x in samples]),
        relay_cpu_per_rtt_us=_median(rtt_cpu) if has_relays and rtt_cpu else None,
        conn_per_s=_median([x.conn_per_s for x in samples]),
        cpu_s_per_gb_single=per_gb([x.cpu_single for x in samples], [x.single for x in samples]),
        cpu_s_per_gb_multi=per_gb([x.cpu_multi for x in samples], [x.multi for x in samples]),
        relay_rss_mib=_median([x.rss_bytes / 2**20 for x in samples]) if has_relays else None,
        other_cpus=_median([x.other_cpus for x in samples]),
        samples=len(samples),
        runs=[
            {
                "gbps_single": x.single.bits_per_second / 1e9,
                "gbps_multi": x.multi.bits_per_second / 1e9,
                "rtt_median_us": x.latency.median_us,
                "rtt_p99_us": x.latency.p99_us,
                "relay_cpu_per_rtt_us": x.cpu_per_rtt_us,
                "conn_per_s": x.conn_per_s,
                "other_cpus": x.other_cpus,
                "cpu_s_per_gb_single": per_gb([x.cpu_single], [x.single]),
                "cpu_s_per_gb_multi": per_gb([x.cpu_multi], [x.multi]),
            }
            for x in samples
        ],
    )


def _profile_workload(
    name: str,
    pki: BenchPKI,
    workdir: Path,
    *,
    echo_port: int,
    workload: str,
    s: Settings,
) -> dict[str, list[tuple[str, float]]]:
    from bench.profile import library_resolver, py_spy_binary, top_frames

    spy = py_spy_binary()
    out: dict[str, list[tuple[str, float]]] = {}
    with Processes(workdir) as procs:
        target = start_iperf3_server(procs)[0] if workload == "throughput" else echo_port
        chain = STARTERS[name](procs, pki, target)
        spies = []
        for role, pid in zip(("client", "server"), chain.relay_pids, strict=True):
            raw = workdir / f"profile-{name}-{workload}-{role}.txt"
            cmd = [
                spy,
                "record",
                "--pid",
                str(pid),
                "--duration",
                str(int(s.profile_seconds)),
                "--rate",
                "200",
                "--native",  # uvloop and OpenSSL frames too (pauses the process per sample)
                "--format",
                "raw",
                "--output",
                str(raw),
            ]
            spies.append((role, raw, procs.start(cmd, f"py-spy-{role}")))
        time.sleep(0.5)
        deadline = time.monotonic() + s.profile_seconds
        if workload == "throughput":
            measure.run_iperf3(chain.entry_port, seconds=s.profile_seconds, streams=1)
        elif workload == "round trips":
            while time.monotonic() < deadline:
                measure.ping_pong(chain.entry_port, count=2000, warmup=0)
        else:
            while time.monotonic() < deadline:
                measure.connection_rate(chain.entry_port, count=50)
        for (role, raw, spy_proc), pid in zip(spies, chain.relay_pids, strict=True):
            spy_proc.wait(timeout=s.profile_seconds + 30)
            resolve = library_resolver(pid)
            if raw.exists():
                text = raw.read_text()
                out[f"{workload}, {role} side, self"] = top_frames(
                    text, inclusive=False, resolve=resolve
                )
                out[f"{workload}, {role} side, inclusive, Python functions only"] = top_frames(
                    text, inclusive=True, resolve=resolve, python_only=True
                )
    return out


def profile_path(
    name: str, pki: BenchPKI, workdir: Path, *, echo_port: int, s: Settings
) -> dict[str, list[tuple[str, float]]]:
    """Sample both relays with py-spy during a single-stream iperf3 run, during 1-byte
    ping-pongs and while connections are opened one after another. These runs are not
    measured: native sampling pauses the process."""
    out: dict[str, list[tuple[str, float]]] = {}
    for workload in ("throughput", "round trips", "new connections"):
        out |= _profile_workload(name, pki, workdir, echo_port=echo_port, workload=workload, s=s)
    return out


STRACE_BYTES = 1_000_000_000


def strace_path(
    name: str, pki: BenchPKI, workdir: Path, *, nbytes: int = STRACE_BYTES
) -> list[tuple[str, str, float, float]]:
    """Count the data syscalls of both relays while iperf3 moves `nbytes` through them in
    one stream (strace slows the run down; only the counts are used, per GB)."""
    from bench.profile import syscall_counts

    strace = shutil.which("strace")
    if strace is None:
        raise RuntimeError("strace is not installed: apt-get install strace (profiling only)")
    rows: list[tuple[str, str, float, float]] = []
    with Processes(workdir) as procs:
        iperf_port, _ = start_iperf3_server(procs)
        chain = STARTERS[name](procs, pki, iperf_port)
        # warm up: the pooled HBONE connection and TLS sessions exist before tracing
        measure.run_iperf3(chain.entry_port, seconds=1, streams=1)
        tracers = []
        for role, pid in zip(("client", "server"), chain.relay_pids, strict=True):
            log = workdir / f"strace-{name}-{role}.txt"
            cmd = [
                strace,
                "-f",
                "-s",
                "0",
                "-e",
                "signal=none",
                "-o",
                str(log),
                "-p",
                str(pid),
                "-e",
                "trace=read,write,writev,readv,sendmsg,recvmsg,sendto,recvfrom",
            ]
            tracers.append((role, log, procs.start(cmd, f"strace-{role}")))
        time.sleep(1.0)  # strace attaches asynchronously
        cmd = ["iperf3", "-c", LOOPBACK, "-p", str(chain.entry_port), "-n", str(nbytes), "-J"]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
        received = int(json.loads(done.stdout)["end"]["sum_received"]["bytes"])
        for role, log, tracer in tracers:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(timeout=30)
            for call, (calls, total) in syscall_counts(log.read_text()).items():
                if calls:
                    rows.append((role, call, calls / _gb(received), total / calls))
    return rows


def run(s: Settings, *, log: Callable[[str], None] = print) -> list[PathResult]:
    """Run every selected path `s.repeat` times, interleaved, and summarise each.

    A failed run is logged and counted; a path fails only when none of its runs worked.
    """
    results: list[PathResult] = []
    with tempfile.TemporaryDirectory(prefix="ambit-bench-") as tmp:
        workdir = Path(tmp)
        pki = write_pki(workdir / "pki")
        samples: dict[str, list[Sample]] = {n: [] for n in s.paths}
        errors: dict[str, list[str]] = {n: [] for n in s.paths}
        profiles: dict[str, dict[str, list[tuple[str, float]]]] = {}
        syscalls: dict[str, list[tuple[str, str, float, float]]] = {}
        with echo_target(workdir) as echo_port:
            for round_no in range(s.repeat):
                for name in s.paths:
                    log(f"[{round_no + 1}/{s.repeat}] {PATHS[name]} ...")
                    try:
                        x = measure_once(name, pki, workdir, echo_port=echo_port, s=s)
                    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                        errors[name].append(str(exc))
                        log(f"    FAILED: {exc}")
                        continue
                    samples[name].append(x)
                    log(
                        f"    {x.single.bits_per_second / 1e9:.2f} Gbit/s x1, "
                        f"{x.multi.bits_per_second / 1e9:.2f} Gbit/s x8, "
                        f"rtt median {x.latency.median_us:.1f} us p99 {x.latency.p99_us:.1f} us, "
                        f"{x.conn_per_s:.0f} new connections/s; other load {x.other_cpus:.2f} CPUs"
                    )
            if s.profile:
                for name in s.paths:
                    if name in ("hbone", "tls") and samples[name]:
                        log(f"profiling {PATHS[name]} with py-spy ...")
                        try:
                            profiles[name] = profile_path(
                                name, pki, workdir, echo_port=echo_port, s=s
                            )
                        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
                            log(f"    profile FAILED: {exc}")
                        log(f"counting system calls of {PATHS[name]} with strace ...")
                        try:
                            syscalls[name] = strace_path(name, pki, workdir)
                        except (
                            RuntimeError,
                            OSError,
                            ValueError,
                            KeyError,
                            subprocess.SubprocessError,
                        ) as exc:
                            log(f"    strace FAILED: {exc}")
        for name in s.paths:
            if not samples[name]:
                results.append(
                    PathResult(name=name, label=PATHS[name], error="; ".join(errors[name]))
                )
                continue
            r = summarise(name, samples[name])
            results.append(
                dataclasses.replace(
                    r,
                    failed_runs=len(errors[name]),
                    profile=profiles.get(name, {}),
                    syscalls=syscalls.get(name, []),
                )
            )
    return results
