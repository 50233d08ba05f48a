"""Waypoint benchmark: requests/s, p50/p99 and CPU per 1000 requests/s vs haproxy, one run.

    python -m bench.waypoint [--quick] [--rates 250,500,1000,2000] [--seconds 10]

Both L7 proxies do the same routing (`/api*` split 90/10 over two backend services,
everything else to a third) with mutual TLS on both sides, on loopback:

    waypoint:  loadgen -> HBONE client relay -> [waypoint] -> HBONE -> terminator -> backend
    haproxy:   loadgen -TLS-> [haproxy] -TLS-> backend (haproxy terminating TLS)

The backends answer 1 KB (`http-request return` in an haproxy of their own). For each
fixed request rate the load generator (open loop: latency counts from when a request
was due, so a stalled proxy cannot hide its queue) reports p50/p99; the proxy's own
CPU time (/proc/PID/stat) over the run gives vCPU per 1000 requests/s. A closed-loop
run with 32 connections gives the maximum requests/s. A third process, `floor` (a
minimal uvloop server answering the same 1 KB without TLS, routing or proxying), is
driven the same way: its CPU per request at each rate is what one event-loop wakeup per
request costs on the machine, and shows how much of the low-rate cost is the machine's.
Writes RESULTS-waypoint.md and results-waypoint.json (default: bench/).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.certs import BenchPKI, write_pki
from bench.harness import Processes, free_port, wait_listening
from bench.measure import cpu_seconds, exit_on_signal, log_progress, percentile, rss_bytes

HERE = Path(__file__).resolve().parent
LOOPBACK = "127.0.0.1"
BODY_SIZE = 1024
BACKENDS = {"front": "127.0.0.2", "api-v1": "127.0.0.3", "api-v2": "127.0.0.4"}
VIP = "10.96.0.10"
GOAL_VCPU_PER_1000 = 0.25


# ----------------------------------------------------------------------------- load generator


@dataclass
class LoadResult:
    """What one load generator run measured."""

    mode: str  # "rate" or "max"
    target_rps: float
    seconds: float
    completed: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    cpu_seconds: float  # the proxy's CPU time during the measured window
    statuses: dict[str, int] = field(default_factory=dict)


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n"):
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    if length:
        await reader.readexactly(length)
    return status


async def loadgen(
    port: int,
    *,
    rate: float,
    seconds: float,
    connections: int,
    paths: Sequence[str],
    tls: ssl.SSLContext | None,
    pid: int,
) -> LoadResult:
    """Drive HTTP/1.1 keep-alive requests at `rate` (0: as fast as possible); `pid` is
    the proxy whose CPU time is sampled at both ends of the measured window."""
    clock = time.perf_counter
    conns = []
    for _ in range(connections):
        r, w = await asyncio.open_connection(
            LOOPBACK, port, ssl=tls, server_hostname="" if tls else None
        )
        conns.append((r, w))
    reqs = [
        f"GET {p} HTTP/1.1\r\nHost: front.bench.svc.cluster.local\r\n\r\n".encode() for p in paths
    ]
    # warm up: every connection, every path
    for r, w in conns:
        for q in reqs:
            await _request(r, w, q)
    lat: list[float] = []
    statuses: dict[str, int] = {}
    errors = 0
    cpu0 = cpu_seconds([pid])
    start = clock() + 0.02
    end = start + seconds

    async def worker(i: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal errors
        n = 0
        interval = connections / rate if rate > 0 else 0.0
        due = start + (i * interval / connections if rate > 0 else 0.0)
        while True:
            if rate > 0:
                if due >= end:
                    return
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                # late: the wait counts (open loop); woken early: from the actual send
                t0 = min(due, clock())
                due += interval
            else:
                t0 = clock()
                if t0 >= end:
                    return
            try:
                status = await _request(r, w, reqs[(i + n) % len(reqs)])
            except (OSError, asyncio.IncompleteReadError, ValueError):
                errors += 1
                return
            n += 1
            lat.append(clock() - t0)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    async with asyncio.TaskGroup() as tg:
        for i, (r, w) in enumerate(conns):
            tg.create_task(worker(i, r, w))
    took = max(clock() - start, 1e-9)
    cpu = cpu_seconds([pid]) - cpu0
    for _, w in conns:
        w.close()
    lat.sort()
    ms = [x * 1000 for x in lat]
    return LoadResult(
        "rate" if rate > 0 else "max",
        rate,
        took,
        len(lat),
        errors,
        len(lat) / took,
        percentile(ms, 0.5) if ms else 0.0,
        percentile(ms, 0.99) if ms else 0.0,
        cpu,
        statuses,
    )


def _client_tls(pki: BenchPKI) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(str(pki.ca))
    ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return ctx


# ----------------------------------------------------------------------------- terminator


async def _terminator(ca: Path, cert: Path, key: Path) -> None:
    """The destination side of HBONE (what ztunnel does): relay to 127.0.0.0/8 only."""
    from bench.certs import load_identity
    from ztunnel.hbone.request import Accept, ConnectRequest, Decision, Refuse
    from ztunnel.hbone.server import HboneServer
    from ztunnel.tls import server_context

    certificate, trust = load_identity(ca, cert, key)

    async def handle(req: ConnectRequest) -> Decision:
        if not req.host.startswith("127."):
            return Refuse(401, "benchmark terminator relays to loopback only")
        loop = asyncio.get_running_loop()
        s = socket.socket()
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await loop.sock_connect(s, (req.host, req.port))
        except OSError as e:
            s.close()
            return Refuse(503, str(e))
        return Accept(sock=s)

    sock = socket.create_server(("0.0.0.0", 0), backlog=1024)
    sock.setblocking(False)
    server = HboneServer(sock, server_context(certificate, trust), trust, handle)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.run())
        await server.started()
        print(f"READY {server.address[1]}", flush=True)


# ----------------------------------------------------------------------------- floor


async def _floor() -> None:
    """The calibration server: answers every request head with the backends' 1 KB."""
    answer = (b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % BODY_SIZE) + b"f" * BODY_SIZE

    class Responder(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport  # uvloop's TCPTransport is no asyncio.Transport
            self.pending = b""

        def data_received(self, data: bytes) -> None:
            data = self.pending + data
            heads = data.count(b"\r\n\r\n")
            self.pending = data[data.rfind(b"\r\n\r\n") + 4:] if heads else data
            if heads:
                self.transport.write(answer * heads)

    loop = asyncio.get_running_loop()
    server = await loop.create_server(Responder, LOOPBACK, 0, backlog=1024)
    print(f"READY {server.sockets[0].getsockname()[1]}", flush=True)
    await server.serve_forever()


# ----------------------------------------------------------------------------- setups


def _pem_bundle(pki: BenchPKI, side: str, workdir: Path) -> Path:
    leaf = pki.client if side == "client" else pki.server
    out = workdir / f"haproxy-{side}.pem"
    out.write_bytes(leaf.cert.read_bytes() + leaf.key.read_bytes())
    os.chmod(out, 0o600)
    return out


def backend_config(port: int, pki: BenchPKI, workdir: Path, tls_port: int) -> str:
    """Backends: plain on BACKENDS[*]:port (behind the waypoint's terminator) and TLS on
    BACKENDS[*]:tls_port (for haproxy); each answers BODY_SIZE bytes naming itself."""
    crt = _pem_bundle(pki, "server", workdir)
    lines = [
        "global",
        "  maxconn 4000",
        "  nbthread 1",
        "defaults",
        "  mode http",
        "  timeout connect 5s",
        "  timeout client 60s",
        "  timeout server 60s",
    ]
    for name, ip in BACKENDS.items():
        body = (name + ":" + "x" * BODY_SIZE)[:BODY_SIZE]
        lines += [
            f"frontend {name}",
            f"  bind {ip}:{port}",
            f"  bind {ip}:{tls_port} ssl crt {crt} ca-file {pki.ca} verify required "
            "ssl-min-ver TLSv1.3",
            f'  http-request return status 200 content-type text/plain string "{body}"',
        ]
    return "\n".join(lines) + "\n"


def haproxy_l7_config(listen: int, tls_port: int, pki: BenchPKI, workdir: Path) -> str:
    """The haproxy under test: mTLS in, the same routing, mTLS out to the backends."""
    crt_in = _pem_bundle(pki, "server", workdir)
    crt_out = _pem_bundle(pki, "client", workdir)
    b = BACKENDS
    tls_out = f"ssl verify required ca-file {pki.ca} crt {crt_out} ssl-min-ver TLSv1.3"
    return f"""global
  maxconn 4000
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
  http-reuse always
frontend mesh
  bind {LOOPBACK}:{listen} ssl crt {crt_in} ca-file {pki.ca} verify required ssl-min-ver TLSv1.3
  use_backend api if {{ path_beg /api }}
  default_backend front
backend front
  server front {b["front"]}:{tls_port} {tls_out}
backend api
  balance random
  server v1 {b["api-v1"]}:{tls_port} weight 90 {tls_out}
  server v2 {b["api-v2"]}:{tls_port} weight 10 {tls_out}
"""


def waypoint_manifests(port: int) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": "bench",
                "labels": {"istio.io/dataplane-mode": "ambient", "istio.io/use-waypoint": "wp"},
            },
        },
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "wp", "namespace": "bench"},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
            },
        },
    ]
    for i, (name, ip) in enumerate(BACKENDS.items()):
        docs.append(
            {
                "apiVersion": "networking.istio.io/v1",
                "kind": "WorkloadEntry",
                "metadata": {
                    "name": name,
                    "namespace": "bench",
                    "annotations": {"ambit.dev/node": "bench"},
                },
                "spec": {"address": ip, "labels": {"app": name}, "serviceAccount": "server"},
            }
        )
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "bench"},
                "spec": {
                    "selector": {"app": name},
                    "clusterIP": f"10.96.0.{10 + i}",
                    "ports": [{"port": 80, "targetPort": port, "name": "http"}],
                },
            }
        )
    docs.append(
        {
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": {"name": "split", "namespace": "bench"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "front", "port": 80}],
                "rules": [
                    {
                        "matches": [{"path": {"type": "PathPrefix", "value": "/api"}}],
                        "backendRefs": [
                            {"name": "api-v1", "port": 80, "weight": 90},
                            {"name": "api-v2", "port": 80, "weight": 10},
                        ],
                    },
                    {"backendRefs": [{"name": "front", "port": 80}]},
                ],
            },
        }
    )
    return docs


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", *args]


@dataclass
class ProxyResult:
    name: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    #: more runs at the judged rate, interleaved with the other proxies' (see `run`)
    repeats: list[dict[str, Any]] = field(default_factory=list)
    rss_mib: float = 0.0


@dataclass(frozen=True)
class Target:
    """A running proxy under test: its process and where the load generator sends."""

    name: str
    pid: int
    port: int
    tls: ssl.SSLContext | None


def measure_once(t: Target, rate: float, *, seconds: float, connections: int,
                 log: Any) -> dict[str, Any]:
    """One load run against `t` (`rate` 0: closed loop with 32 connections)."""
    conns = connections if rate > 0 else 32
    lr = asyncio.run(
        loadgen(t.port, rate=rate, seconds=seconds, connections=conns,
                paths=["/", "/api/items", "/api/users", "/static/x"], tls=t.tls, pid=t.pid)
    )
    vcpu = lr.cpu_seconds / lr.seconds
    per_1000 = vcpu / (lr.rps / 1000) if lr.rps else 0.0
    log(
        f"{t.name:9s} {'max' if rate == 0 else f'{rate:.0f}/s':>7s}: {lr.rps:8.1f} req/s "
        f"p50 {lr.p50_ms:6.2f} ms p99 {lr.p99_ms:7.2f} ms  {vcpu:5.3f} vCPU "
        f"({per_1000:5.3f} per 1000 req/s) errors {lr.errors} {lr.statuses}"
    )
    return {**asdict(lr), "vcpu": round(vcpu, 4), "vcpu_per_1000_rps": round(per_1000, 4)}


def measure_proxy(
    t: Target,
    *,
    rates: Sequence[float],
    seconds: float,
    connections: int,
    log: Any,
) -> ProxyResult:
    res = ProxyResult(t.name)
    for rate in [*rates, 0.0]:
        res.runs.append(measure_once(t, rate, seconds=seconds, connections=connections, log=log))
    res.rss_mib = rss_bytes(t.pid) / 2**20
    return res


def judged_rate(rates: Sequence[float]) -> float:
    """The rate the goal is judged at: 1000 requests/s (Istio's figure) when it is run,
    else the highest fixed rate."""
    return 1000.0 if 1000.0 in rates else max(rates)


def judged_runs(result: dict[str, Any], rate: float) -> list[dict[str, Any]]:
    """A proxy's runs at `rate`: the sweep's and the interleaved repeats."""
    return [r for r in result["runs"] if r["mode"] == "rate" and r["target_rps"] == rate] + [
        r for r in result.get("repeats", []) if r["target_rps"] == rate
    ]


def median_per_1000(runs: Sequence[dict[str, Any]]) -> float:
    return float(statistics.median(r["vcpu_per_1000_rps"] for r in runs))


def run(
    workdir: Path,
    *,
    rates: Sequence[float],
    seconds: float,
    connections: int,
    log: Any,
    profile: Path | None = None,
    repeats: int = 0,
) -> dict[str, Any]:
    """Sweep `rates` (then a closed loop) through the waypoint, haproxy and the floor
    server in turn; then `repeats` rounds of one run each at the judged rate, the three
    interleaved, so that load elsewhere on the machine weighs on them alike."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        raise RuntimeError("haproxy is not installed: apt-get install haproxy")
    pki = write_pki(workdir / "pki")
    port, tls_port = free_port(), free_port()
    results: dict[str, Any] = {}
    with Processes(workdir) as procs:
        (workdir / "backends.cfg").write_text(backend_config(port, pki, workdir, tls_port))
        backends = procs.start([haproxy, "-f", str(workdir / "backends.cfg"), "-db"], "backends")
        for ip in BACKENDS.values():
            wait_listening(port, backends, "backend haproxy", host=ip)

        # the waypoint path
        term, tport = procs.start_announcing(
            _py(
                "bench.waypoint",
                "terminator",
                "--ca",
                str(pki.ca),
                "--cert",
                str(pki.server.cert),
                "--key",
                str(pki.server.key),
            ),
            "terminator",
        )
        (workdir / "waypoint.yaml").write_text(
            "---\n".join(json.dumps(d) + "\n" for d in waypoint_manifests(port))
        )
        wport, metrics, ready = free_port(), free_port(), free_port()
        prof = ["bench.waypoint", "profile", str(profile)] if profile else ["waypoint"]
        wp = procs.start(
            _py(
                *prof,
                "--gateway",
                "bench/wp",
                "--local-config",
                str(workdir / "waypoint.yaml"),
                "--cert",
                str(pki.server.cert),
                "--key",
                str(pki.server.key),
                "--ca",
                str(pki.ca),
                "--listen",
                f"{LOOPBACK}:{wport}",
                "--metrics",
                f"{LOOPBACK}:{metrics}",
                "--ready",
                f"{LOOPBACK}:{ready}",
                "--upstream-hbone-port",
                str(tport),
                "--no-access-log",
                "--log-level",
                "warning",
            ),
            "waypoint",
        )
        wait_listening(wport, wp, "waypoint", timeout=20)
        relay, rport = procs.start_announcing(
            _py(
                "bench.hbone",
                "client",
                "--connect",
                f"{LOOPBACK}:{wport}",
                "--target",
                f"{VIP}:80",
                "--server-identity",
                pki.server.spiffe_id,
                "--ca",
                str(pki.ca),
                "--cert",
                str(pki.client.cert),
                "--key",
                str(pki.client.key),
            ),
            "hbone-client",
        )
        del term, relay
        sweep = {"rates": rates, "seconds": seconds, "connections": connections, "log": log}
        targets = [Target("waypoint", wp.pid, rport, None)]
        results["waypoint"] = asdict(measure_proxy(targets[-1], **sweep))

        # the haproxy path
        hport = free_port()
        (workdir / "haproxy.cfg").write_text(haproxy_l7_config(hport, tls_port, pki, workdir))
        hp = procs.start([haproxy, "-f", str(workdir / "haproxy.cfg"), "-db"], "haproxy")
        wait_listening(hport, hp, "haproxy")
        targets.append(Target("haproxy", hp.pid, hport, _client_tls(pki)))
        results["haproxy"] = asdict(measure_proxy(targets[-1], **sweep))

        # the calibration: the same load against a server that does nothing but answer
        fl, fport = procs.start_announcing(_py("bench.waypoint", "floor"), "floor")
        targets.append(Target("floor", fl.pid, fport, None))
        results["floor"] = asdict(measure_proxy(targets[-1], **sweep))

        judge = judged_rate(rates)
        for _ in range(repeats):
            for t in targets:
                results[t.name]["repeats"].append(
                    measure_once(t, judge, seconds=seconds, connections=connections, log=log))
    ver = subprocess.run([haproxy, "-v"], capture_output=True, text=True, check=False)
    results["haproxy_version"] = ver.stdout.splitlines()[0] if ver.stdout else "?"
    return results


# ----------------------------------------------------------------------------- report


def render_markdown(results: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    out = [
        "# Waypoint vs haproxy (L7, mTLS on both sides)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine['cpus']} CPUs, {machine['platform']}, Python "
        f"{machine['python']}, {results.get('haproxy_version', '?')}; run at "
        f"{machine['when']}.",
        "",
        "Same routing in both (`/api*` split 90/10 over two services, the rest to a "
        "third); 1 KB responses; HTTP/1.1 keep-alive from the load generator. "
        "The waypoint path is HBONE in (through a client-side HBONE relay) and HBONE "
        "out (to a terminator standing in for the destination ztunnel); haproxy "
        "terminates and originates TLS 1.3 with client certificates. CPU is the "
        "proxy process's own (user+system) time; the load generator, relays and "
        "backends run on the same machine. `floor` is no proxy: a minimal uvloop "
        "server answering the same 1 KB (no TLS, no routing), driven the same way, "
        "for what one event-loop wakeup per request costs on this machine.",
        "",
        "| proxy | load | req/s | p50 ms | p99 ms | vCPU | vCPU per 1000 req/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ("waypoint", "haproxy", "floor"):
        if name not in results:
            continue
        r = results[name]
        rows = [("max (32 conns)" if run["mode"] == "max" else f"{run['target_rps']:.0f}/s",
                 run) for run in r["runs"]]
        rows += [(f"{run['target_rps']:.0f}/s, repeat {i}", run)
                 for i, run in enumerate(r.get("repeats", []), 1)]
        for load, run in rows:
            out.append(
                f"| {name} | {load} | {run['rps']:.0f} | {run['p50_ms']:.2f} | "
                f"{run['p99_ms']:.2f} | {run['vcpu']:.3f} | "
                f"{run['vcpu_per_1000_rps']:.3f} | {run['errors']} |"
            )
    w = [r for r in results["waypoint"]["runs"] if r["mode"] == "rate"]
    h = [r for r in results["haproxy"]["runs"] if r["mode"] == "rate"]
    if w and h:
        wmax = next(r for r in results["waypoint"]["runs"] if r["mode"] == "max")
        hmax = next(r for r in results["haproxy"]["runs"] if r["mode"] == "max")
        # the goal is Istio's figure for its waypoint at 1000 requests/s of 1 KB
        # requests: judged at that rate when it was run, else at the highest fixed one,
        # on the median of the sweep's run and the interleaved repeats
        rate = judged_rate([r["target_rps"] for r in w])
        wj = judged_runs(results["waypoint"], rate)
        hj = judged_runs(results["haproxy"], rate)
        wv, hv = median_per_1000(wj), median_per_1000(hj)
        verdict = "meets" if wv <= GOAL_VCPU_PER_1000 else "misses"
        met = [f"{r['target_rps']:.0f}/s" for r in w
               if r["vcpu_per_1000_rps"] <= GOAL_VCPU_PER_1000]
        each = ", ".join(f"{r['vcpu_per_1000_rps']:.3f}" for r in wj)
        how = (f"median of {len(wj)} runs, {each}; the repeats interleaved with haproxy's "
               "and floor's" if len(wj) > 1 else "one run")
        out += [
            "",
            f"At {rate:.0f} requests/s the waypoint used {wv:.3f} vCPU per 1000 req/s "
            f"({how}): it {verdict} the {GOAL_VCPU_PER_1000} goal (Istio's figure for its "
            f"waypoint at 1000 requests/s of 1 KB); haproxy {hv:.3f} "
            f"({wv / hv if hv else float('inf'):.1f}x). Fixed rates at or under the goal: "
            f"{', '.join(met) or 'none'}. Under saturation the waypoint needed "
            f"{wmax['vcpu_per_1000_rps']:.3f}, haproxy {hmax['vcpu_per_1000_rps']:.3f}. "
            f"RSS: waypoint {results['waypoint']['rss_mib']:.0f} MiB, haproxy "
            f"{results['haproxy']['rss_mib']:.0f} MiB.",
            "",
            "![vCPU per 1000 req/s](waypoint.png)",
            "",
            "Reading the numbers: at a fixed rate every request wakes the proxy on its own, "
            "so the per-request cost includes the event-loop wakeup and shrinks as the rate "
            "grows (haproxy shows the same trend); the closed-loop `max` row is the cost "
            "when requests batch. The waypoint's `max` is bounded by the single-process "
            "Python load generator, HBONE relay and terminator sharing the machine, not by "
            "the waypoint (see its vCPU). Other load on the machine moves these figures by "
            f"about 20% (load average at start: {machine.get('load', '?')}).",
        ]
        floor = results.get("floor", {"runs": []})
        fj = judged_runs(floor, rate)
        flmax = next((r for r in floor["runs"] if r["mode"] == "max"), None)
        if fj and flmax is not None and flmax["vcpu_per_1000_rps"] > 0:
            def ratio(at_rate: float, max_run: dict[str, Any]) -> float:
                m = max_run["vcpu_per_1000_rps"]
                return at_rate / m if m else float("inf")

            out += [
                "",
                f"The machine's share: a request costs the `floor` server "
                f"{ratio(median_per_1000(fj), flmax):.1f}x more CPU at {rate:.0f}/s than "
                f"under saturation, haproxy {ratio(hv, hmax):.1f}x, the waypoint "
                f"{ratio(wv, wmax):.1f}x: work done right after an idle wakeup runs with "
                "cold caches here, whatever the program, so the low-rate figures scale the "
                "warm per-request cost (the `max` rows) by about that factor.",
            ]
    return "\n".join(out) + "\n"


def plot(results: dict[str, Any], path: Path) -> None:
    """vCPU per 1000 req/s against the offered rate, waypoint and haproxy, with the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in ("waypoint", "haproxy", "floor"):
        if name not in results:
            continue
        runs = [r for r in results[name]["runs"] if r["mode"] == "rate"]
        ax.plot([r["target_rps"] for r in runs], [r["vcpu_per_1000_rps"] for r in runs],
                marker="o", label=name)
    ax.axhline(GOAL_VCPU_PER_1000, color="grey", linestyle="--",
               label=f"goal {GOAL_VCPU_PER_1000} vCPU per 1000 req/s")
    ax.set_xlabel("offered load (requests/s, 1 KB responses)")
    ax.set_ylabel("vCPU per 1000 requests/s")
    ax.set_title("Waypoint vs haproxy: CPU per request rate (mTLS both sides)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.waypoint", description="Waypoint vs haproxy: req/s, p50/p99, CPU."
    )
    sub = p.add_subparsers(dest="command")
    sub.add_parser("floor", help="(internal) the calibration server (uvloop, answers 1 KB)")
    t = sub.add_parser("terminator", help="(internal) the HBONE destination side")
    t.add_argument("--ca", type=Path, required=True)
    t.add_argument("--cert", type=Path, required=True)
    t.add_argument("--key", type=Path, required=True)
    pr = sub.add_parser(
        "profile", help="(internal) run the waypoint under cProfile (CPU time, not wall time)"
    )
    pr.add_argument("stats", type=Path)
    pr.add_argument("args", nargs=argparse.REMAINDER)
    p.add_argument("--quick", action="store_true", help="smoke run (a few seconds per load)")
    p.add_argument(
        "--rates",
        default="",
        help="fixed request rates, comma separated (default 250,500,1000,2000; quick 200)",
    )
    p.add_argument("--seconds", type=float, help="seconds per load (default 10, quick 2)")
    p.add_argument(
        "--repeats",
        type=int,
        help="more runs of each proxy at the judged rate (1000/s), interleaved "
        "(default 4, quick 0)",
    )
    p.add_argument(
        "--connections",
        type=int,
        default=16,
        help="connections of the fixed-rate runs (default 16)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="directory for RESULTS-waypoint.md and results-waypoint.json",
    )
    p.add_argument(
        "--profile",
        type=Path,
        metavar="FILE",
        help="run the waypoint under cProfile, stats to FILE",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)
    import uvloop

    if args.command == "profile":
        import cProfile

        from waypoint.cli import main as waypoint_main

        prof = cProfile.Profile(time.process_time)
        try:
            prof.runcall(waypoint_main, args.args)
        finally:
            prof.dump_stats(str(args.stats))
        return 0
    if args.command == "floor":
        uvloop.run(_floor())
        return 0
    if args.command == "terminator":
        uvloop.run(_terminator(args.ca, args.cert, args.key))
        return 0
    uvloop.install()
    rates = (
        [float(x) for x in args.rates.split(",") if x]
        if args.rates
        else ([200.0] if args.quick else [250.0, 500.0, 1000.0, 2000.0])
    )
    seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 10.0)
    machine = {
        "cpus": os.cpu_count(),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    with tempfile.TemporaryDirectory(prefix="ambit-bench-wp-") as tmp:
        results = run(
            Path(tmp),
            rates=rates,
            seconds=seconds,
            connections=args.connections,
            log=log_progress,
            profile=args.profile,
            repeats=args.repeats if args.repeats is not None else (0 if args.quick else 4),
        )
    results["machine"] = machine
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.waypoint " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "RESULTS-waypoint.md").write_text(render_markdown(results, command.strip(), machine))
    (out / "results-waypoint.json").write_text(json.dumps(results, indent=1))
    plot(results, out / "waypoint.png")
    print(f"wrote {out / 'RESULTS-waypoint.md'} and {out / 'waypoint.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
