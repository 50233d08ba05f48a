"""`python -m bench.mesh`: two workloads on two nodes, through the full mesh path vs direct.

A `netsetup.sandbox.Sandbox` of two nodes holds a client workload `c` on n1 and a
server workload `s` on n2. One real ztunnel runs in each node's netns from a
`--local-config` file (as tests/netns/test_ztunnel_mesh.py starts them). The same two
workloads are measured twice per repeat:

* direct: both workloads are in the config with `enrolled: false` (no capture rules,
  ztunnels idle), so bytes go workload -> bridge -> underlay -> bridge -> workload;
* mesh: both enrolled: `c`'s connections are captured by ztunnel on n1, carried over
  HBONE (HTTP/2 CONNECT over mTLS) to ztunnel on n2, and delivered to `s` with `c`'s
  address as source.

Scenarios (all inside the sandbox): iperf3 with 1 and 8 streams, 1-byte round trips
(median/p99), and 1 KB HTTP/1.1 request/response at a fixed rate over keep-alive
connections (p50/p99 from send to full response), with the ztunnels' CPU time
(utime+stime of both processes, /proc/PID/stat) and RSS, per 1000 requests/s. Every
path is checked: the destination ztunnel's byte counter must grow during a mesh run
and stay still during a direct run.

Results: `bench/RESULTS-mesh.md`, `bench/results-mesh.json`, `bench/mesh.png`.
`--only connections` runs just the new-connections scenario (direct and mesh, `--repeat`
times, `--conn-count` each) and prints the rates without writing those files.
Needs root, `ip`, `nft`, `iperf3` and `curl`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from bench import measure

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable
TD = "cluster.local"
ECHO_PORT = 9000
HTTP_PORT = 8080
IPERF_PORT = 5201
MiB = 1024 * 1024
PATHS = ("direct", "mesh")
TOOLS = ("ip", "nft", "iperf3", "curl")


@dataclass(frozen=True)
class Settings:
    """What to run and for how long."""

    seconds: int = 5  # per iperf3 run
    rtt_count: int = 10_000
    conn_count: int = 1000  # new connections, one after another
    rate: int = 1000  # requests per second, fixed
    load_seconds: int = 10
    conns: int = 16  # keep-alive connections carrying the fixed-rate load
    size: int = 1024  # request and response body bytes
    repeat: int = 5


@dataclass(frozen=True)
class LoadResult:
    """One fixed-rate run, from the client's point of view."""

    requests: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    p99_from_schedule_ms: float  # including time waiting behind a late response


@dataclass(frozen=True)
class Sample:
    """One repeat of one path."""

    path: str
    gbps_1: float
    gbps_8: float
    rtt_p50_us: float
    rtt_p99_us: float
    conn_per_s: float
    req_p50_ms: float
    req_p99_ms: float
    req_p99_sched_ms: float
    rps: float
    req_errors: int
    zt_cpu_load: float  # ztunnels' CPUs (both processes) during the fixed-rate run
    zt_cpu_per_krps: float  # same, per 1000 requests/s
    zt_rss_mib: float  # both ztunnels after the fixed-rate run
    zt_cpu_s_per_gb: float  # ztunnels' CPU seconds per GB during the iperf3 runs
    bytes_seen_by_ztunnel: float  # destination ztunnel's byte counters' delta
    other_cpus: float  # other processes' load during this sample, in CPUs


@dataclass(frozen=True)
class PathSummary:
    """Medians over the repeats of one path."""

    path: str
    figures: dict[str, float]
    samples: int


@dataclass
class Results:
    settings: Settings
    samples: list[Sample] = field(default_factory=list)
    summaries: dict[str, PathSummary] = field(default_factory=dict)
    ratios: dict[str, float] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)


# the figures compared as mesh/direct ratios, then the ones only summarised
RATIO_FIGURES = (
    "gbps_1",
    "gbps_8",
    "rtt_p50_us",
    "rtt_p99_us",
    "conn_per_s",
    "req_p50_ms",
    "req_p99_ms",
)
FIGURES = (
    *RATIO_FIGURES,
    "req_p99_sched_ms",
    "rps",
    "zt_cpu_load",
    "zt_cpu_per_krps",
    "zt_rss_mib",
    "zt_cpu_s_per_gb",
    "other_cpus",
)


# ---------------------------------------------------------------------------
# workers: run inside the workload netns as `python -m bench.mesh <worker> ...`
# ---------------------------------------------------------------------------


class _Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.t.write(data)


class _Http(asyncio.Protocol):
    """HTTP/1.1 keep-alive: every request (headers + Content-Length body) gets `size` bytes."""

    def __init__(self, size: int) -> None:
        self.buf = b""
        self.response = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\n\r\n" % size
        ) + b"r" * size

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            length = 0
            for line in self.buf[:end].split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            self.buf = self.buf[end + 4 + length :]
            self.t.write(self.response)


async def serve(echo_port: int, http_port: int, size: int) -> None:
    """The server workload's apps: a byte echo and a tiny HTTP/1.1 server."""
    loop = asyncio.get_running_loop()
    echo = await loop.create_server(_Echo, "0.0.0.0", echo_port, backlog=512)
    http = await loop.create_server(lambda: _Http(size), "0.0.0.0", http_port, backlog=512)
    async with echo, http:
        await asyncio.gather(echo.serve_forever(), http.serve_forever())


async def fixed_rate_load(
    host: str, port: int, *, rate: int, seconds: float, conns: int, size: int, warmup: float = 0.5
) -> LoadResult:
    """Open-loop load: request i is due at start + i/rate, on connection i mod `conns`.

    Latency is from the send to the last byte of the response; the p99 "from schedule"
    also counts the time a request waited for its connection (a late earlier response).
    Requests due during the first `warmup` seconds are sent but not counted.
    """
    body = b"q" * size
    request = (
        f"POST /echo HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {size}\r\n"
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode() + body
    total = int(rate * (seconds + warmup))
    lat: list[float] = []
    sched_lat: list[float] = []
    errors = 0
    clock = time.perf_counter  # uvloop's loop.time() has millisecond resolution
    start = clock() + 0.2

    async def conn(idx: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i in range(idx, total, conns):
                due = start + i / rate
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                t0 = clock()
                try:
                    writer.write(request)
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = 0
                    for line in head.split(b"\r\n"):
                        if line.lower().startswith(b"content-length:"):
                            length = int(line.split(b":", 1)[1])
                    await reader.readexactly(length)
                except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    errors += 1
                    return
                t1 = clock()
                if i >= rate * warmup:
                    lat.append(t1 - t0)
                    sched_lat.append(t1 - due)
        finally:
            writer.close()

    t_begin = clock()
    await asyncio.gather(*(conn(c) for c in range(conns)))
    wall = clock() - t_begin - 0.2 - warmup
    if not lat:
        raise RuntimeError(f"no request to {host}:{port} completed ({errors} errors)")
    lat.sort()
    sched_lat.sort()
    return LoadResult(
        requests=len(lat),
        errors=errors,
        seconds=wall,
        rps=len(lat) / max(wall, 1e-9),
        p50_ms=measure.percentile(lat, 50) * 1000,
        p99_ms=measure.percentile(lat, 99) * 1000,
        p99_from_schedule_ms=measure.percentile(sched_lat, 99) * 1000,
    )


# ---------------------------------------------------------------------------
# the sandbox and its processes
# ---------------------------------------------------------------------------


class MeshBench:
    """The sandbox, its app servers and two ztunnels; everything stopped by pid on exit."""

    def __init__(self, workdir: Path, log: Callable[[str], None]) -> None:
        from netsetup.sandbox import Sandbox, unique_prefix

        self.workdir = workdir
        self.log = log
        self.sb = Sandbox(unique_prefix("benchmesh"), nodes=2, workload_names=[["c"], ["s"]])
        self.ztunnels: dict[str, subprocess.Popen[bytes]] = {}
        self.servers: list[subprocess.Popen[bytes]] = []
        self.enrolled: bool | None = None

    # -- setup -------------------------------------------------------------------------

    def start(self) -> None:
        from ztunnel.localconfig import generate_dev_ca

        self.sb.build()
        generate_dev_ca(str(self.workdir / "ca.pem"), str(self.workdir / "ca-key.pem"), TD)
        s_ns = self.sb.workload("s").netns
        with open(self.workdir / "apps.log", "ab") as log:
            self.servers.append(
                self.sb.popen(
                    s_ns,
                    [
                        PY,
                        "-m",
                        "bench.mesh",
                        "serve",
                        "--echo",
                        str(ECHO_PORT),
                        "--http",
                        str(HTTP_PORT),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    cwd=str(ROOT),
                )
            )
            self.servers.append(
                self.sb.popen(
                    s_ns,
                    ["iperf3", "-s", "-p", str(IPERF_PORT)],
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                )
            )
        self.write_config(enrolled=False)
        for node in ("n1", "n2"):
            self._start_ztunnel(node)
        for node in ("n1", "n2"):
            self._wait_ready(node)
        n1 = self.sb.node("n1").netns
        for port in (ECHO_PORT, HTTP_PORT, IPERF_PORT):
            self._wait_port(n1, self.sb.workload("s").ip, port)
        self.enrolled = False

    def _start_ztunnel(self, node: str) -> None:
        with open(self.workdir / f"ztunnel-{node}.log", "ab") as out:
            proc = self.sb.popen(
                self.sb.node(node).netns,
                [
                    PY,
                    "-m",
                    "ztunnel",
                    "--node",
                    node,
                    "--local-config",
                    str(self.workdir / f"{node}.json"),
                    "--data-dir",
                    str(self.workdir / f"data-{node}"),
                    "--drain-timeout",
                    "1",
                    "--log-level",
                    "warning",
                ],
                stdout=subprocess.DEVNULL,
                stderr=out,
                cwd=str(ROOT),
            )
        self.ztunnels[node] = proc

    def close(self) -> None:
        self.sb.teardown()  # every process it started, by pid, then every netns

    def config(self, node: str, enrolled: bool) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": int(time.time() * 1000) % 2**31,
            "node": node,
            "trust_domain": TD,
            "workloads": [],
            "services": [],
            "authorization_policies": [],
            "peer_authentications": [],
            "local_ca": {
                "cert": str(self.workdir / "ca.pem"),
                "key": str(self.workdir / "ca-key.pem"),
            },
        }
        for name, sa in (("c", "client"), ("s", "server")):
            w = self.sb.workload(name)
            doc["workloads"].append(
                {
                    "uid": f"bench/{name}",
                    "name": name,
                    "namespace": "bench",
                    "ip": w.ip,
                    "node": w.node,
                    "netns": w.netns,
                    "service_account": sa,
                    "enrolled": enrolled,
                    "labels": {"app": name},
                }
            )
        return doc

    def write_config(self, *, enrolled: bool) -> None:
        """Both nodes' config files, replaced atomically (ztunnel reloads on change)."""
        for node in ("n1", "n2"):
            tmp = self.workdir / f".{node}.json.tmp"
            tmp.write_text(json.dumps(self.config(node, enrolled)))
            os.replace(tmp, self.workdir / f"{node}.json")

    def set_enrolled(self, enrolled: bool, timeout: float = 20.0) -> None:
        """Enroll or unenroll both workloads and wait until capture is there or gone."""
        if self.enrolled == enrolled:
            return
        self.write_config(enrolled=enrolled)
        deadline = time.monotonic() + timeout
        while True:
            state = [self._captured(n) for n in ("c", "s")]
            if all(x == enrolled for x in state):
                break
            self._check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"capture of c, s is {state} {timeout:.0f}s after writing enrolled="
                    f"{enrolled}: see {self.workdir}/ztunnel-n*.log"
                )
            time.sleep(0.1)
        if enrolled:
            for node in ("n1", "n2"):
                self._wait_ready(node)
            # the listeners come up after the rules: wait until a captured round trip works
            self._wait_echo(deadline)
        self.enrolled = enrolled

    def _captured(self, workload: str) -> bool:
        r = self.sb.exec(self.sb.workload(workload).netns, ["nft", "list", "tables"])
        return any(line.split()[-1:] == ["ambit"] for line in r.stdout.splitlines())

    def _wait_echo(self, deadline: float) -> None:
        last = ""
        while time.monotonic() < deadline:
            r = self.worker(
                "rtt",
                self.sb.workload("s").ip,
                str(ECHO_PORT),
                "--count",
                "5",
                check=False,
                timeout=10,
            )
            if r.returncode == 0:
                return
            last = r.stderr.strip()[-300:]
            time.sleep(0.2)
        raise RuntimeError(f"no round trip through the mesh after enrolling: {last}")

    def _check_alive(self) -> None:
        for node, p in self.ztunnels.items():
            if p.poll() is not None:
                raise RuntimeError(
                    f"ztunnel on {node} exited with {p.returncode}: "
                    f"see {self.workdir}/ztunnel-{node}.log"
                )

    def _wait_ready(self, node: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            self._check_alive()
            r = self.sb.exec(
                self.sb.node(node).netns,
                [
                    "curl",
                    "-s",
                    "-m",
                    "2",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "http://127.0.0.1:15021/healthz/ready",
                ],
            )
            last = r.stdout
            if r.stdout.strip() == "200":
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"ztunnel on {node} not ready after {timeout:.0f}s (last answer "
            f"{last!r}): see {self.workdir}/ztunnel-{node}.log"
        )

    def _wait_port(self, netns: str, ip: str, port: int, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            r = self.sb.exec(
                netns,
                [
                    PY,
                    "-c",
                    "import socket,sys; socket.create_connection("
                    "(sys.argv[1], int(sys.argv[2])), timeout=1).close()",
                    ip,
                    str(port),
                ],
            )
            if r.returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{ip}:{port} in the server workload never accepted: see {self.workdir}/apps.log"
        )

    # -- measuring ---------------------------------------------------------------------

    def conn_rate(self, count: int) -> float:
        """New connections per second, `count` of them one after another, client to s."""
        r = self.worker("conn", self.sb.workload("s").ip, str(ECHO_PORT), "--count", str(count))
        return float(json.loads(r.stdout)["conn_per_s"])

    def worker(
        self, *args: str, check: bool = True, timeout: float = 120.0
    ) -> subprocess.CompletedProcess[str]:
        """Run a bench.mesh worker inside the client workload's netns."""
        r = self.sb.exec(
            self.sb.workload("c").netns,
            [PY, "-m", "bench.mesh", *args],
            cwd=str(ROOT),
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise RuntimeError(
                f"worker {' '.join(args)} failed ({r.returncode}): {r.stderr.strip()[-500:]}"
            )
        return r

    def iperf3(self, seconds: int, streams: int) -> measure.Throughput:
        cmd = [
            "iperf3",
            "-c",
            self.sb.workload("s").ip,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(seconds),
            "-P",
            str(streams),
            "-J",
        ]
        problem = ""
        for attempt in range(2):
            if attempt:
                time.sleep(1.0)
            r = self.sb.exec(self.sb.workload("c").netns, cmd, timeout=seconds + 40)
            try:
                return measure.parse_iperf3_json(r.stdout, streams)
            except (ValueError, KeyError) as exc:
                problem = f"{exc}; stderr {r.stderr.strip()[:200]!r}"
        raise RuntimeError(
            f"iperf3 c -> s ({'mesh' if self.enrolled else 'direct'}) gave no result ({problem})"
        )

    def zt_pids(self) -> list[int]:
        return [p.pid for p in self.ztunnels.values()]

    def all_pids(self) -> list[int]:
        return self.zt_pids() + [p.pid for p in self.servers]

    def counted_bytes(self) -> float:
        """istio_tcp_{sent,received}_bytes_total summed over n2's destination-side series."""
        r = self.sb.exec(
            self.sb.node("n2").netns, ["curl", "-s", "-m", "5", "http://127.0.0.1:15020/metrics"]
        )
        total = 0.0
        for line in r.stdout.splitlines():
            if (
                line.startswith(("istio_tcp_received_bytes_total{", "istio_tcp_sent_bytes_total{"))
                and 'reporter="destination"' in line
            ):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def sample(self, path: str, s: Settings, log: Callable[[str], None]) -> Sample:
        """All scenarios once on the current path."""
        self.set_enrolled(path == "mesh")
        zt = self.zt_pids()
        bytes0 = self.counted_bytes()
        snap0 = measure.cpu_snapshot(self.all_pids())
        cpu0 = measure.cpu_seconds(zt)
        t1 = self.iperf3(s.seconds, 1)
        t8 = self.iperf3(s.seconds, 8)
        cpu_gb = (measure.cpu_seconds(zt) - cpu0) / max((t1.bytes + t8.bytes) / 1e9, 1e-9)
        log(
            f"  {path}: iperf3 {t1.bits_per_second / 1e9:.2f} / "
            f"{t8.bits_per_second / 1e9:.2f} Gbit/s"
        )
        r = self.worker(
            "rtt", self.sb.workload("s").ip, str(ECHO_PORT), "--count", str(s.rtt_count)
        )
        rtt = json.loads(r.stdout)
        conn_per_s = self.conn_rate(s.conn_count)
        cpu_a = measure.cpu_seconds(zt)
        w0 = time.monotonic()
        r = self.worker(
            "load",
            self.sb.workload("s").ip,
            str(HTTP_PORT),
            "--rate",
            str(s.rate),
            "--seconds",
            str(s.load_seconds),
            "--conns",
            str(s.conns),
            "--size",
            str(s.size),
            timeout=s.load_seconds + 60,
        )
        wall = time.monotonic() - w0
        load = LoadResult(**json.loads(r.stdout))
        zt_load = (measure.cpu_seconds(zt) - cpu_a) / wall
        rss = sum(measure.rss_bytes(p) for p in zt) / MiB
        snap1 = measure.cpu_snapshot(self.all_pids())
        seen = self.counted_bytes() - bytes0
        sent = t1.bytes + t8.bytes
        if path == "mesh" and seen < 0.5 * sent:
            raise RuntimeError(
                f"the destination ztunnel counted {seen:.0f} bytes "
                f"for {sent} iperf3 bytes: the mesh run did not go through it"
            )
        # (a mesh connection of the previous sample may still be counted as it closes)
        if path == "direct" and seen > 0.01 * sent:
            raise RuntimeError(
                f"the destination ztunnel counted {seen:.0f} bytes during a "
                "direct run: capture was still active"
            )
        log(
            f"  {path}: rtt {rtt['median_us']:.0f} us, {conn_per_s:.0f} conn/s, "
            f"{load.rps:.0f} req/s p50 "
            f"{load.p50_ms:.2f} ms p99 {load.p99_ms:.2f} ms, ztunnels {zt_load:.2f} CPU"
        )
        krps = max(load.rps / 1000, 1e-9)
        return Sample(
            path=path,
            gbps_1=t1.bits_per_second / 1e9,
            gbps_8=t8.bits_per_second / 1e9,
            rtt_p50_us=float(rtt["median_us"]),
            rtt_p99_us=float(rtt["p99_us"]),
            conn_per_s=conn_per_s,
            req_p50_ms=load.p50_ms,
            req_p99_ms=load.p99_ms,
            req_p99_sched_ms=load.p99_from_schedule_ms,
            rps=load.rps,
            req_errors=load.errors,
            zt_cpu_load=zt_load,
            zt_cpu_per_krps=zt_load / krps,
            zt_rss_mib=rss,
            zt_cpu_s_per_gb=cpu_gb,
            bytes_seen_by_ztunnel=seen,
            other_cpus=measure.other_load(snap0, snap1),
        )


@contextmanager
def mesh_bench(workdir: Path, log: Callable[[str], None]) -> Iterator[MeshBench]:
    mb = MeshBench(workdir, log)
    try:
        mb.start()
        yield mb
    finally:
        mb.close()


def summarize(results: Results) -> None:
    """Medians per path and the mesh/direct ratios."""
    for path in PATHS:
        rows = [s for s in results.samples if s.path == path]
        if not rows:
            continue
        results.summaries[path] = PathSummary(
            path=path,
            samples=len(rows),
            figures={f: statistics.median(float(getattr(s, f)) for s in rows) for f in FIGURES},
        )
    if {"direct", "mesh"} <= results.summaries.keys():
        d, m = results.summaries["direct"].figures, results.summaries["mesh"].figures
        results.ratios = {f: m[f] / d[f] for f in RATIO_FIGURES if d[f] > 0}


def run_connections(
    settings: Settings, workdir: Path, log: Callable[[str], None]
) -> dict[str, list[float]]:
    """Only the new-connection scenario (`--only connections`), direct and mesh
    alternating in every repeat: connections per second of each run, per path."""
    rates: dict[str, list[float]] = {p: [] for p in PATHS}
    with mesh_bench(workdir, log) as mb:
        for i in range(settings.repeat):
            order = PATHS if i % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                mb.set_enrolled(path == "mesh")
                rate = mb.conn_rate(settings.conn_count)
                rates[path].append(rate)
                log(f"repeat {i + 1}/{settings.repeat} {path}: {rate:.0f} conn/s")
    return rates


def run(settings: Settings, workdir: Path, log: Callable[[str], None]) -> Results:
    results = Results(settings=settings)
    with mesh_bench(workdir, log) as mb:
        for i in range(settings.repeat):
            log(f"repeat {i + 1}/{settings.repeat}")
            order = PATHS if i % 2 == 0 else tuple(reversed(PATHS))
            for path in order:
                results.samples.append(mb.sample(path, settings, log))
    summarize(results)
    return results


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def machine(now: datetime.datetime, load_before: tuple[float, float, float]) -> dict[str, Any]:
    iperf = subprocess.run(
        ["iperf3", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return measure.machine_facts(now, load_before, {"iperf3": iperf[0] if iperf else "unknown"})


ROWS: tuple[tuple[str, str, str], ...] = (
    ("gbps_1", "iperf3, 1 stream (Gbit/s)", "{:.2f}"),
    ("gbps_8", "iperf3, 8 streams (Gbit/s)", "{:.2f}"),
    ("rtt_p50_us", "1-byte round trip, median (µs)", "{:.0f}"),
    ("rtt_p99_us", "1-byte round trip, p99 (µs)", "{:.0f}"),
    ("conn_per_s", "new connections/s (connect, 1-byte round trip, close; serial)", "{:.0f}"),
    ("req_p50_ms", "1 KB request/response at fixed rate, p50 (ms)", "{:.2f}"),
    ("req_p99_ms", "same, p99 (ms)", "{:.2f}"),
    ("req_p99_sched_ms", "same, p99 from the scheduled send time (ms)", "{:.2f}"),
    ("rps", "achieved requests/s", "{:.0f}"),
    ("zt_cpu_load", "ztunnels' CPU during the fixed-rate run (CPUs, both nodes)", "{:.3f}"),
    ("zt_cpu_per_krps", "ztunnel CPU per 1000 requests/s (CPUs, both nodes)", "{:.3f}"),
    ("zt_rss_mib", "ztunnel RSS, both nodes (MiB)", "{:.0f}"),
    ("zt_cpu_s_per_gb", "ztunnel CPU seconds per GB (iperf3 runs, both nodes)", "{:.2f}"),
    ("other_cpus", "other processes' load during the sample (CPUs)", "{:.2f}"),
)


def render_markdown(results: Results, command: str, plot_name: str | None) -> str:
    s, mach = results.settings, results.machine
    lb, la = mach.get("load_before", [0, 0, 0]), mach.get("load_after", [0, 0, 0])
    lines = [
        "# Full mesh path vs direct: two workloads on two nodes",
        "",
        f"Command: `{command}` ({mach.get('date', '')})",
        "",
        f"Machine: {mach.get('nproc')} CPUs ({mach.get('cpu')}), kernel {mach.get('kernel')}, "
        f"Python {mach.get('python')}, {mach.get('openssl')}, {mach.get('iperf3')}. "
        f"Load average (1/5/15 min) before: {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}, after: "
        f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}. The machine is shared with other work; "
        "the last row of the table is the CPU that other processes used during each "
        "sample. Direct and mesh alternate in every repeat, so both see the same load.",
        "",
        "Setup: a sandbox of two node netns (bridge per node, routed underlay), client "
        "workload `c` on n1, server workload `s` on n2, one ztunnel per node in the node's "
        "netns with `--local-config`. *direct*: both workloads `enrolled: false` (no "
        "capture). *mesh*: both enrolled: c's connections are captured on n1, carried "
        "over HBONE (HTTP/2 CONNECT, mTLS) to n2 and delivered from c's own address. "
        f"iperf3 runs {s.seconds} s each; {s.rtt_count} 1-byte round trips (TCP_NODELAY); "
        f"{s.conn_count} new connections one after another; "
        f"{s.size}-byte HTTP/1.1 POST answered with {s.size} bytes at a fixed {s.rate} "
        f"requests/s for {s.load_seconds} s over {s.conns} keep-alive connections "
        "(open loop; latency from send to the last response byte). CPU is utime+stime of "
        "the two ztunnel processes from /proc/PID/stat. Each mesh run is checked to have "
        "passed through the destination ztunnel (its byte counters grew) and each "
        "direct run not to.",
        "",
        f"Medians of {s.repeat} repeat{'s' if s.repeat != 1 else ''} (the plot's whiskers "
        "span the lowest to the highest). In the direct rows the ztunnels are running but "
        "idle: their CPU and RSS there are the baseline cost of a ztunnel on a node.",
        "",
        "| figure | direct | mesh | mesh/direct |",
        "|---|---|---|---|",
    ]
    d = results.summaries.get("direct")
    m = results.summaries.get("mesh")
    for key, label, fmt in ROWS:
        dv = fmt.format(d.figures[key]) if d else "-"
        mv = fmt.format(m.figures[key]) if m else "-"
        ratio = results.ratios.get(key)
        lines.append(f"| {label} | {dv} | {mv} | {'-' if ratio is None else f'{ratio:.2f}x'} |")
    lines.append("")
    if m:
        f = m.figures
        lines += [
            f"Per 1000 requests/s of 1 KB request/response the mesh path costs "
            f"**{f['zt_cpu_per_krps']:.3f} CPUs** of ztunnel time (both nodes together) "
            f"and the two ztunnels hold **{f['zt_rss_mib']:.0f} MiB** RSS "
            f"({f['zt_rss_mib'] / max(f['rps'] / 1000, 1e-9):.0f} MiB per 1000 requests/s "
            f"at this rate; RSS is mostly fixed cost, not per request).",
            "",
        ]
    if d and m:
        lines += reading(d.figures, m.figures)
    if plot_name:
        lines += [f"![mesh vs direct]({plot_name})", ""]
    lines += [
        "Every sample:",
        "",
        "| path | " + " | ".join(k for k, _, _ in ROWS) + " |",
        "|---|" + "---|" * len(ROWS),
    ]
    for smp in results.samples:
        lines.append(
            f"| {smp.path} | "
            + " | ".join(fmt.format(getattr(smp, k)) for k, _, fmt in ROWS)
            + " |"
        )
    lines.append("")
    return "\n".join(lines)


def reading(d: dict[str, float], m: dict[str, float]) -> list[str]:
    """What the figures say, computed from them (no hand-written numbers)."""
    return [
        "## Reading",
        "",
        f"- Throughput: the mesh path carries {m['gbps_1'] / d['gbps_1']:.0%} of direct with "
        f"one stream and {m['gbps_8'] / d['gbps_8']:.0%} with eight. Eight streams give "
        f"{m['gbps_8'] / m['gbps_1']:.2f}x one stream through the mesh (each ztunnel is one "
        f"Python event loop: more streams share the same CPU) against "
        f"{d['gbps_8'] / d['gbps_1']:.2f}x direct. Each GB through the mesh costs the two "
        f"ztunnels {m['zt_cpu_s_per_gb']:.1f} CPU-seconds.",
        f"- Latency: the mesh adds {m['rtt_p50_us'] - d['rtt_p50_us']:.0f} µs to a 1-byte "
        f"round trip at the median (capture, two ztunnels, TLS and an HTTP/2 DATA frame "
        f"each way) and {m['req_p50_ms'] - d['req_p50_ms']:.2f} ms to a "
        "1 KB request/response at p50.",
        f"- New connections: {m['conn_per_s']:.0f}/s through the mesh against "
        f"{d['conn_per_s']:.0f}/s direct (each is captured, planned and opens an HBONE "
        "stream on the pooled mTLS connection, whose 200 comes back after the destination "
        "ztunnel has connected to the server from the client's address: the first byte "
        "waits for that round trip between the ztunnels).",
        "- The p99 figures move most with the other load on this shared machine (last "
        "column of every sample): compare medians between runs, and p99s only within one.",
        "",
    ]


def plot(results: Results, path: Path) -> None:
    """Five bar charts: throughput, round trip, request latency, connection rate, ztunnel
    CPU (latencies on a log scale: the p99s of a loaded machine dwarf the medians)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    charts = (
        ("iperf3 (Gbit/s)", ("gbps_1", "1 stream"), ("gbps_8", "8 streams")),
        ("1-byte round trip (µs)", ("rtt_p50_us", "median"), ("rtt_p99_us", "p99")),
        (
            f"{results.settings.size} B request at {results.settings.rate}/s (ms)",
            ("req_p50_ms", "p50"),
            ("req_p99_ms", "p99"),
        ),
    )
    paths = [p for p in PATHS if p in results.summaries]

    def spread(key: str) -> list[list[float]]:
        """Whiskers from the lowest to the highest sample around each median."""
        lo, hi = [], []
        for p in paths:
            vals = [float(getattr(x, key)) for x in results.samples if x.path == p]
            med = results.summaries[p].figures[key]
            lo.append(max(med - min(vals), 0.0))
            hi.append(max(max(vals) - med, 0.0))
        return [lo, hi]

    fig, axes = plt.subplots(1, 5, figsize=(19, 4))
    w = 0.38
    for ax, (title, *series) in zip(axes[:3], charts, strict=True):
        for offset, (key, label) in zip((-w / 2, w / 2), series, strict=True):
            ax.bar(
                [x + offset for x in range(len(paths))],
                [results.summaries[p].figures[key] for p in paths],
                w,
                label=label,
                yerr=spread(key),
                capsize=3,
            )
        ax.set_title(title)
        ax.set_xticks(range(len(paths)), paths)
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    for ax, key, title in (
        (axes[3], "conn_per_s", "new connections/s"),
        (axes[4], "zt_cpu_per_krps", "ztunnel CPUs per 1000 req/s"),
    ):
        ax.bar(
            range(len(paths)),
            [results.summaries[p].figures[key] for p in paths],
            yerr=spread(key),
            capsize=3,
        )
        ax.set_xticks(range(len(paths)), paths)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def results_json(results: Results) -> str:
    return json.dumps(asdict(results), indent=2) + "\n"


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.mesh",
        description="Two workloads on two sandbox nodes: the full mesh path (real ztunnels, "
        "capture, HBONE) vs direct. Needs root.",
    )
    sub = p.add_subparsers(dest="command")
    sv = sub.add_parser("serve", help="(internal) the server workload's apps")
    sv.add_argument("--echo", type=int, required=True)
    sv.add_argument("--http", type=int, required=True)
    sv.add_argument("--size", type=int, default=1024)
    rt = sub.add_parser("rtt", help="(internal) 1-byte round trips to an echo server")
    rt.add_argument("host")
    rt.add_argument("port", type=int)
    rt.add_argument("--count", type=int, required=True)
    cn = sub.add_parser("conn", help="(internal) new connections per second")
    cn.add_argument("host")
    cn.add_argument("port", type=int)
    cn.add_argument("--count", type=int, required=True)
    ld = sub.add_parser("load", help="(internal) fixed-rate HTTP/1.1 requests")
    ld.add_argument("host")
    ld.add_argument("port", type=int)
    ld.add_argument("--rate", type=int, required=True)
    ld.add_argument("--seconds", type=float, required=True)
    ld.add_argument("--conns", type=int, required=True)
    ld.add_argument("--size", type=int, required=True)
    p.add_argument("--quick", action="store_true", help="smoke run: well under a minute")
    p.add_argument("--seconds", type=int, help="iperf3 duration per run (default 5, quick 1)")
    p.add_argument("--rtt-count", type=int, help="round trips per run (default 10000, quick 300)")
    p.add_argument(
        "--conn-count", type=int, help="new connections per run (default 1000, quick 100)"
    )
    p.add_argument("--rate", type=int, help="fixed request rate (default 1000/s, quick 200/s)")
    p.add_argument("--load-seconds", type=int, help="fixed-rate duration (default 10, quick 1)")
    p.add_argument(
        "--conns", type=int, help="keep-alive connections for the load (default 16, quick 4)"
    )
    p.add_argument("--repeat", type=int, help="repeats, medians reported (default 5, quick 1)")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="directory for RESULTS-mesh.md, results-mesh.json and mesh.png (default: bench/)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument(
        "--only",
        choices=("connections",),
        help="run one scenario and print its figures (writes no result files): "
        "`connections` is the new-connections/s figure, direct and mesh",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    q = bool(args.quick)

    def pick(value: int | None, full: int, quick: int) -> int:
        return value if value is not None else (quick if q else full)

    return Settings(
        seconds=pick(args.seconds, 5, 1),
        rtt_count=pick(args.rtt_count, 10_000, 300),
        conn_count=pick(args.conn_count, 1000, 100),
        rate=pick(args.rate, 1000, 200),
        load_seconds=pick(args.load_seconds, 10, 1),
        conns=pick(args.conns, 16, 4),
        repeat=pick(args.repeat, 5, 1),
    )


def _worker(args: argparse.Namespace) -> int:
    import uvloop

    if args.command == "serve":
        uvloop.run(serve(args.echo, args.http, args.size))
    elif args.command == "rtt":
        lat = measure.ping_pong(
            args.port, count=args.count, host=args.host, warmup=min(200, args.count)
        )
        print(json.dumps(asdict(lat)))
    elif args.command == "conn":
        rate = measure.connection_rate(args.port, count=args.count, host=args.host)
        print(json.dumps({"conn_per_s": rate}))
    else:
        res = uvloop.run(
            fixed_rate_load(
                args.host,
                args.port,
                rate=args.rate,
                seconds=args.seconds,
                conns=args.conns,
                size=args.size,
            )
        )
        print(json.dumps(asdict(res)))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, measure.exit_on_signal)
    if args.command is not None:
        return _worker(args)
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if os.geteuid() != 0 or missing:
        print(
            "bench.mesh: needs root and "
            + ", ".join(TOOLS)
            + (
                f" (missing: {', '.join(missing)}; `make deps`)"
                if missing
                else " (run as root: it builds network namespaces)"
            ),
            file=sys.stderr,
        )
        return 2
    settings = settings_from_args(args)
    if min(asdict(settings).values()) < 1:
        print("bench.mesh: every count, rate and duration must be >= 1", file=sys.stderr)
        return 2
    now = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    workdir = Path(tempfile.mkdtemp(prefix="ambit-bench-mesh-"))
    if args.only == "connections":
        try:
            rates = run_connections(settings, workdir, log)
        except BaseException:
            log(f"failed; logs kept in {workdir}")
            raise
        shutil.rmtree(workdir, ignore_errors=True)
        med = {p: statistics.median(v) for p, v in rates.items()}
        for path, values in rates.items():
            print(
                f"{path} conn_per_s median={med[path]:.0f} runs="
                + " ".join(f"{v:.0f}" for v in values)
            )
        print(f"mesh/direct conn_per_s = {med['mesh'] / max(med['direct'], 1e-9):.3f}")
        return 0
    try:
        results = run(settings, workdir, log)
    except BaseException:
        log(f"failed; logs kept in {workdir}")
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    results.machine = machine(now, load_before)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if not args.no_plot:
        plot(results, out / "mesh.png")
        plot_name = "mesh.png"
    command = "python -m bench.mesh " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "RESULTS-mesh.md").write_text(render_markdown(results, command.strip(), plot_name))
    (out / "results-mesh.json").write_text(results_json(results))
    for path, summ in results.summaries.items():
        print(path, " ".join(f"{k}={v:.3g}" for k, v in summ.figures.items()))
    for k, v in results.ratios.items():
        print(f"mesh/direct {k} = {v:.2f}")
    print(f"wrote {out / 'RESULTS-mesh.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
