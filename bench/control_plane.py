"""`python -m bench.control_plane`: snapshot compute, push fan-out and memory at mesh scale.

The real control-plane code runs: the SQLite `Store`, `MeshIndex`/`NodeViews` from
`config/snapshot.py` and the `PushServer` of `config/push.py` on real TLS 1.3 over
loopback. The 100 nodes are simulated by one client process holding one real stream
per node: each node joins with a real token (`PushClient.join`), subscribes with its
node certificate, reads every update and acknowledges it, like ztunnel does, but
without building ztunnel objects from the snapshot (that is the proxies' work, not the
control plane's). Arrival times are taken with CLOCK_MONOTONIC, which both processes
share, so a change's propagation time is measured from just before `Store.apply` to the
moment the last of the streams has read the update.

Results: `bench/RESULTS-control-plane.md`, `bench/results-control-plane.json` and
`bench/control-plane.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import ipaddress
import json
import logging
import os
import re
import resource
import shlex
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import measure
from bench.harness import stop_async

HERE = Path(__file__).resolve().parent
GOAL_MS = 100.0
TRUST_DOMAIN = "cluster.local"
MiB = 1024 * 1024


@dataclass(frozen=True)
class Scale:
    """The size of the simulated mesh and how many one-workload changes to time."""

    workloads: int = 10_000
    services: int = 2_000
    nodes: int = 100
    namespaces: int = 100
    changes: int = 30


@dataclass(frozen=True)
class ComputeTimes:
    """Seconds for each step of a from-scratch computation of every node's snapshot."""

    read_parse_s: float  # read the store and parse every manifest
    index_s: float  # MeshIndex.load + NodeViews (translate and digest every item)
    node_views_s: float  # the full snapshot dict and hash of every node
    total_s: float
    one_node_scratch_s: float  # MeshIndex.node_snapshot + sorted_dict + hash, one node
    snapshot_items: int  # workloads + services in one node's snapshot
    snapshot_json_bytes: int  # one node's full snapshot as sent on the wire


@dataclass(frozen=True)
class Memory:
    """Memory of the computed model and of the control-plane process."""

    model_mib: float  # tracemalloc: MeshIndex + NodeViews + per-node state, all nodes
    model_peak_mib: float  # tracemalloc peak while building it
    rss_after_sync_mib: float  # control-plane process with every stream synced
    rss_trimmed_mib: float  # same, after malloc_trim(0) gave freed heap back to the system
    rss_started_mib: float  # PushServer loaded, no stream yet
    rss_peak_mib: float  # ru_maxrss of the control-plane process


@dataclass(frozen=True)
class Propagation:
    """One-workload changes: time from `Store.apply` to the update read on every stream."""

    all_streams_ms: list[float]  # per change: the last stream to read it
    median_stream_ms: list[float]  # per change: the median stream
    commit_ms: list[float]  # per change: Store.apply (SQLite transaction, fsync) alone
    streams: int
    workloads_per_delta: list[int]  # workloads upserted in the deltas (expect 1)
    other_cpus: float = 0.0  # other processes' load while the changes were timed, in CPUs
    # per change: until the server had written the update to the last stream
    server_fanout_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Results:
    scale: Scale
    apply_s: float  # Store.apply of the whole mesh in one transaction
    compute: ComputeTimes
    server_start_s: float  # PushServer(store, ...): index load on start
    initial_sync_s: float  # every stream subscribed to every stream holding its snapshot
    joins_s: float
    propagation: Propagation
    memory: Memory
    machine: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# the simulated mesh
# ---------------------------------------------------------------------------


def node_name(i: int) -> str:
    return f"node-{i:03d}"


def namespace_name(i: int) -> str:
    return f"ns-{i:03d}"


def workload_manifest(
    scale: Scale, k: int, extra_labels: dict[str, str] | None = None
) -> dict[str, Any]:
    """Workload k: namespace k mod N, backing service `svc-(j mod per-namespace services)`.

    Each namespace's workloads sit on a band of about 10 nodes, so every node hosts
    workloads of a few namespaces (its local namespaces) and sees all services.
    """
    ns_idx, j = k % scale.namespaces, k // scale.namespaces
    per_ns_svc = max(1, scale.services // scale.namespaces)
    node = (ns_idx * 10 + j % 10) % scale.nodes
    labels = {"app": f"svc-{j % per_ns_svc}", **(extra_labels or {})}
    return {
        "apiVersion": "networking.istio.io/v1",
        "kind": "WorkloadEntry",
        "metadata": {
            "name": f"w-{k:05d}",
            "namespace": namespace_name(ns_idx),
            "annotations": {"ambit.dev/node": node_name(node)},
        },
        "spec": {
            "address": str(ipaddress.IPv4Address("10.128.0.0") + k + 1),
            "labels": labels,
            "serviceAccount": f"sa-{j % per_ns_svc}",
        },
    }


def mesh_manifests(scale: Scale) -> list[dict[str, Any]]:
    """Namespaces (enrolled), workloads and services of the simulated mesh."""
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": namespace_name(i),
                "labels": {"istio.io/dataplane-mode": "ambient"},
            },
        }
        for i in range(scale.namespaces)
    ]
    docs += [workload_manifest(scale, k) for k in range(scale.workloads)]
    for s in range(scale.services):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": f"svc-{s // scale.namespaces}",
                    "namespace": namespace_name(s % scale.namespaces),
                },
                "spec": {
                    "selector": {"app": f"svc-{s // scale.namespaces}"},
                    "ports": [{"port": 80, "targetPort": 8080}],
                },
            }
        )
    return docs


def check_scale(scale: Scale) -> str | None:
    """Why `scale` cannot be built, or None."""
    if min(scale.workloads, scale.services, scale.nodes, scale.namespaces, scale.changes) < 1:
        return "--workloads, --services, --nodes, --namespaces and --changes must be >= 1"
    if scale.services % scale.namespaces or scale.workloads % scale.namespaces:
        return "--workloads and --services must be multiples of --namespaces"
    if scale.workloads < scale.services:
        return "give at least one workload per service (--workloads >= --services)"
    if scale.workloads > 250_000:
        return "at most 250000 workloads (they get addresses from 10.128.0.0/14)"
    return None


# ---------------------------------------------------------------------------
# compute and memory (in this process, no server)
# ---------------------------------------------------------------------------


def _build_model(
    store: Any, trust_pem: str, nodes: Sequence[str]
) -> tuple[Any, Any, list[Any], list[float]]:
    """Everything the push server computes from scratch, with step times."""
    from config.push import _parse_stored
    from config.snapshot import MeshIndex, NodeState, NodeViews

    t0 = time.perf_counter()
    version, items = store.snapshot()
    parsed = [r for r in (_parse_stored(i.key, i.body) for i in items) if r is not None]
    t1 = time.perf_counter()
    index = MeshIndex(trust_domain=TRUST_DOMAIN)
    index.trust_bundle_pem = trust_pem
    index.load(parsed, version)
    views = NodeViews(index)
    t2 = time.perf_counter()
    states = []
    for n in nodes:
        st = NodeState(n)
        views.full(st)
        views.hash_of(st)
        states.append(st)
    t3 = time.perf_counter()
    return index, views, states, [t1 - t0, t2 - t1, t3 - t2]


def measure_compute(store: Any, trust_pem: str, scale: Scale) -> ComputeTimes:
    from config.snapshot import NodeState, content_hash, sorted_dict

    nodes = [node_name(i) for i in range(scale.nodes)]
    index, views, _states, (read_s, index_s, views_s) = _build_model(store, trust_pem, nodes)
    t0 = time.perf_counter()
    d = sorted_dict(index.node_snapshot(nodes[0]))
    content_hash(d)
    scratch = time.perf_counter() - t0
    full = views.full(NodeState(nodes[0]))
    wire = json.dumps({"type": "snapshot", "snapshot": full}, separators=(",", ":"))
    return ComputeTimes(
        read_parse_s=read_s,
        index_s=index_s,
        node_views_s=views_s,
        total_s=read_s + index_s + views_s,
        one_node_scratch_s=scratch,
        snapshot_items=len(full["workloads"]) + len(full["services"]),
        snapshot_json_bytes=len(wire),
    )


def measure_model_memory(store: Any, trust_pem: str, scale: Scale) -> tuple[float, float]:
    """tracemalloc: bytes held by index + views + every node's state (current, peak)."""
    nodes = [node_name(i) for i in range(scale.nodes)]
    gc.collect()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        model = _build_model(store, trust_pem, nodes)
        gc.collect()
        current, peak = tracemalloc.get_traced_memory()
        del model
    finally:
        tracemalloc.stop()
    return (current - base) / MiB, (peak - base) / MiB


def _time_writes() -> dict[int, list[int]]:
    """Record when the push server starts writing each delta: version -> monotonic ns.

    Wraps `config.push._send` (the one function every stream message goes through), so
    the server's side of a fan-out is seen apart from the clients reading it.
    """
    import config.push as cp

    written: dict[int, list[int]] = {}
    original = cp._send

    async def send(writer: asyncio.StreamWriter, msg: Any) -> None:
        if msg.get("type") == "delta":  # the moment the server hands it to the stream
            written.setdefault(int(msg["version"]), []).append(time.monotonic_ns())
        await original(writer, msg)

    cp._send = send
    return written


def _trimmed_rss() -> float:
    """RSS after asking glibc to return freed heap (the initial sync's buffers) to the OS."""
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc_trim(0)
    return rss_mib()


def rss_mib(pid: int | None = None) -> float:
    with open(f"/proc/{pid or os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MiB


# ---------------------------------------------------------------------------
# the simulated nodes (a child process: `python -m bench.control_plane nodes ...`)
# ---------------------------------------------------------------------------


_HEADER = re.compile(rb'^\{"type":"(\w+)","(?:from_hash":"\w*",")?version":(\d+)')


def _header(line: bytes) -> tuple[str, int, int]:
    """(type, version, workloads upserted) of one stream message.

    Small messages (deltas) are parsed; a full snapshot only has its header read (the
    server writes `type` and `version` first), so a hundred of them cost no memory.
    """
    if len(line) < 256 * 1024:
        msg = json.loads(line)
        return (
            str(msg.get("type")),
            int(msg.get("version", 0)),
            len(msg.get("upsert", {}).get("workloads", [])),
        )
    m = _HEADER.match(line)
    if m is None:
        raise ValueError(f"unexpected message start {line[:80]!r}")
    return m.group(1).decode(), int(m.group(2)), -1


async def _node_stream(
    address: str,
    node: str,
    data_dir: Path,
    token: str,
    *,
    out: Callable[[str], None],
    joined: Callable[[str], None],
    synced: Callable[[str], None],
) -> None:
    from config.push import MAX_MESSAGE, NODE_CERT, NODE_KEY, TRUST, PushClient

    client = PushClient(address, node, data_dir / node, token=token, timeout=60)
    await client.join()
    joined(node)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.load_verify_locations(str(data_dir / node / TRUST))
    ctx.load_cert_chain(str(data_dir / node / NODE_CERT), str(data_dir / node / NODE_KEY))
    host, _, port = address.rpartition(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx, limit=MAX_MESSAGE)
    try:
        writer.write(b'{"type":"subscribe","version":0,"hash":""}\n')
        await writer.drain()
        first = True
        while True:
            line = await reader.readline()
            t = time.monotonic_ns()
            if not line:
                raise ConnectionError(f"{node}: the control plane closed the stream")
            typ, version, wl = _header(line)
            size = len(line)
            del line  # a full snapshot is megabytes: hold none of it
            if typ == "error":
                raise ConnectionError(f"{node}: the control plane refused the stream")
            if typ in ("snapshot", "delta"):
                writer.write(b'{"type":"ack","version":%d}\n' % version)
                await writer.drain()
            out(f"MSG {node} {version} {typ} {t} {size} {wl}")
            if first:
                first = False
                synced(node)
    finally:
        writer.close()


async def run_nodes(address: str, tokens: dict[str, str], data_dir: Path) -> None:
    """Join every node, then hold its stream; report on stdout (one line per message)."""
    done: set[str] = set()
    members: set[str] = set()

    def out(line: str) -> None:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    def synced(node: str) -> None:
        done.add(node)
        if len(done) == len(tokens):
            out(f"SYNCED {len(done)} {time.monotonic_ns()}")

    def joined(node: str) -> None:
        members.add(node)
        if len(members) == len(tokens):
            out(f"JOINED {len(members)} {time.monotonic_ns()}")

    t0 = time.monotonic_ns()
    out(f"START {t0}")
    async with asyncio.TaskGroup() as tg:
        for node, token in tokens.items():
            tg.create_task(
                _node_stream(address, node, data_dir, token, out=out, joined=joined, synced=synced)
            )


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------


class Nodes:
    """The child process running the simulated nodes, read line by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.arrivals: dict[int, dict[str, tuple[int, int]]] = {}  # version -> node -> (t, wl)
        self.synced_at = 0
        self.started_at = 0
        self.joined_at = 0

    async def read_until(self, pred: Callable[[], bool], within: float, what: str) -> None:
        assert self.proc.stdout is not None
        async with asyncio.timeout(within):
            while not pred():
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(
                        f"the simulated nodes exited ({await self.proc.wait()}) "
                        f"while waiting for {what}: see their log"
                    )
                self._take(line.decode().split())

    def _take(self, f: list[str]) -> None:
        if f[0] == "START":
            self.started_at = int(f[1])
        elif f[0] == "JOINED":
            self.joined_at = int(f[2])
        elif f[0] == "SYNCED":
            self.synced_at = int(f[2])
        elif f[0] == "MSG":
            node, version, t, wl = f[1], int(f[2]), int(f[4]), int(f[6])
            self.arrivals.setdefault(version, {})[node] = (t, wl)


def _reached(nodes: Nodes, version: int) -> dict[str, tuple[int, int]]:
    """Per node, the first message at `version` or later."""
    out: dict[str, tuple[int, int]] = {}
    for v in sorted(nodes.arrivals):
        if v >= version:
            for node, tw in nodes.arrivals[v].items():
                out.setdefault(node, tw)
    return out


async def measure_streams(
    store: Any,
    ca: Any,
    tokens: Any,
    *,
    data: Path,
    scale: Scale,
    node_log: int,
    log: Callable[[str], None],
) -> tuple[float, float, float, Propagation, tuple[float, float, float]]:
    """Start the real PushServer on TLS, connect every node, time one-workload changes.

    Returns (server start s, joins s, initial sync s, propagation, RSS after sync MiB
    as it is and after malloc_trim).
    """
    from config.push import PushServer, push_server_context
    from config.validate import Document

    written = _time_writes()
    t0 = time.perf_counter()
    push = PushServer(store, ca, tokens)
    server_start = time.perf_counter() - t0
    gc.collect()
    rss_started = rss_mib()
    server = await push.start("127.0.0.1", 0, push_server_context(ca, data))
    host, port = server.sockets[0].getsockname()[:2]
    node_names = [node_name(i) for i in range(scale.nodes)]
    tokens_file = data / "node-tokens.json"
    tokens_file.write_text(json.dumps({n: tokens.create(n) for n in node_names}))
    async with asyncio.TaskGroup() as tg:
        follower = tg.create_task(push.follow_store())
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.control_plane",
            "nodes",
            "--address",
            f"{host}:{port}",
            "--tokens",
            str(tokens_file),
            "--data",
            str(data / "nodes"),
            stdout=asyncio.subprocess.PIPE,
            stderr=node_log,
            stdin=asyncio.subprocess.DEVNULL,
            cwd=str(HERE.parent),
            limit=1 << 20,
        )
        nodes = Nodes(proc)
        try:
            log(f"{scale.nodes} nodes joining and subscribing over TLS")
            await nodes.read_until(lambda: nodes.synced_at > 0, 600, "the initial sync")
            joins_s = (nodes.joined_at - nodes.started_at) / 1e9
            initial = (nodes.synced_at - nodes.started_at) / 1e9
            # every stream is synced: let the acks land, then settle
            await asyncio.sleep(0.5)
            gc.collect()
            rss = (rss_mib(), _trimmed_rss(), rss_started)
            all_ms: list[float] = []
            med_ms: list[float] = []
            commit_ms: list[float] = []
            fanout_ms: list[float] = []
            wl_counts: list[int] = []
            cpu0 = measure.cpu_snapshot([proc.pid])
            for i in range(scale.changes):
                k = (i * 7919) % scale.workloads
                doc = Document("bench", 1, workload_manifest(scale, k, {"rev": str(i)}))
                t_start = time.monotonic_ns()
                await asyncio.to_thread(store.apply, [doc])
                t_commit = time.monotonic_ns()
                version = store.version

                def everywhere(v: int = version) -> bool:
                    return len(_reached(nodes, v)) >= scale.nodes

                await nodes.read_until(
                    everywhere, 30, f"change {i} (version {version}) on every stream"
                )
                got = _reached(nodes, version)
                times = sorted((t - t_start) / 1e6 for t, _ in got.values())
                all_ms.append(times[-1])
                med_ms.append(statistics.median(times))
                commit_ms.append((t_commit - t_start) / 1e6)
                writes = [t for v, ts in written.items() if v >= version for t in ts]
                if len(writes) >= scale.nodes:
                    fanout_ms.append((sorted(writes)[scale.nodes - 1] - t_start) / 1e6)
                wl_counts.extend(wl for _, wl in got.values())
                await asyncio.sleep(0.05)  # acks in, sessions quiet again
            other = measure.other_load(cpu0, measure.cpu_snapshot([proc.pid]))
            log(f"{scale.changes} changes timed")
        finally:
            await stop_async(proc)
            follower.cancel()
            server.close()
            for s in list(push.sessions.values()):
                s.writer.close()
    prop = Propagation(
        all_streams_ms=all_ms,
        median_stream_ms=med_ms,
        commit_ms=commit_ms,
        streams=scale.nodes,
        workloads_per_delta=sorted(set(wl_counts)),
        other_cpus=other,
        server_fanout_ms=fanout_ms,
    )
    return server_start, joins_s, initial, prop, rss


def _history(scale: Scale) -> int:
    return max(100_000, scale.workloads * 4)


def push_phase(data: Path, scale: Scale, log: Callable[[str], None]) -> dict[str, Any]:
    """The streams, in a process of their own (`push` command) so that its RSS is the
    serving control plane's alone, not what the compute and tracemalloc phases left."""
    from config.ca import CertificateAuthority
    from config.store import Store
    from config.tokens import TokenStore

    ca = CertificateAuthority.load_or_create(data, TRUST_DOMAIN)
    store = Store(str(data), history_limit=_history(scale))
    tokens = TokenStore(data / "tokens.db")
    try:
        with open(data / "nodes.log", "wb") as node_log:
            server_start, joins, initial, prop, rss_sync = asyncio.run(
                measure_streams(
                    store, ca, tokens, data=data, scale=scale, node_log=node_log.fileno(), log=log
                )
            )
    finally:
        tokens.close()
        store.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "server_start_s": server_start,
        "joins_s": joins,
        "initial_sync_s": initial,
        "propagation": asdict(prop),
        "rss_after_sync_mib": rss_sync[0],
        "rss_trimmed_mib": rss_sync[1],
        "rss_started_mib": rss_sync[2],
        "rss_peak_mib": max(peak, rss_sync[0]),
    }


def run(scale: Scale, workdir: Path, log: Callable[[str], None]) -> Results:
    """Every measurement, in order: apply, compute, memory (here), streams (a child)."""
    from config.ca import CertificateAuthority
    from config.store import Store
    from config.validate import Document

    data = workdir / "cp"
    data.mkdir(parents=True)
    ca = CertificateAuthority.load_or_create(data, TRUST_DOMAIN)
    store = Store(str(data), history_limit=_history(scale))
    try:
        docs = [Document("bench-mesh.yaml", i + 1, m) for i, m in enumerate(mesh_manifests(scale))]
        log(f"applying {len(docs)} resources")
        t0 = time.perf_counter()
        store.apply(docs)
        apply_s = time.perf_counter() - t0
        del docs
        trust = ca.trust_bundle().roots_pem.decode()
        log("computing every node's snapshot from scratch")
        compute = measure_compute(store, trust, scale)
        log(f"  {compute.total_s:.2f} s; measuring the model's memory (tracemalloc)")
        model_mib, model_peak = measure_model_memory(store, trust, scale)
    finally:
        store.close()
    result = data / "push-result.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.control_plane",
            *_scale_args(scale),
            "push",
            "--data",
            str(data),
            "--result",
            str(result),
        ],
        cwd=str(HERE.parent),
        stdin=subprocess.DEVNULL,
        check=False,
    )
    if proc.returncode != 0:
        tail = (
            (data / "nodes.log").read_text(errors="replace")[-2000:]
            if (data / "nodes.log").exists()
            else ""
        )
        raise RuntimeError(
            f"the push phase failed ({proc.returncode}); simulated nodes' log ends with:\n{tail}"
        )
    push = json.loads(result.read_text())
    prop = Propagation(**push["propagation"])
    memory = Memory(
        model_mib=model_mib,
        model_peak_mib=model_peak,
        rss_after_sync_mib=push["rss_after_sync_mib"],
        rss_trimmed_mib=push["rss_trimmed_mib"],
        rss_started_mib=push["rss_started_mib"],
        rss_peak_mib=push["rss_peak_mib"],
    )
    return Results(
        scale=scale,
        apply_s=apply_s,
        compute=compute,
        server_start_s=push["server_start_s"],
        initial_sync_s=push["initial_sync_s"],
        joins_s=push["joins_s"],
        propagation=prop,
        memory=memory,
    )


def _scale_args(scale: Scale) -> list[str]:
    return [
        "--workloads",
        str(scale.workloads),
        "--services",
        str(scale.services),
        "--nodes",
        str(scale.nodes),
        "--namespaces",
        str(scale.namespaces),
        "--changes",
        str(scale.changes),
    ]


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))]


def summary(r: Results) -> dict[str, float]:
    """The headline figures (what the smoke test checks are all present)."""
    p = r.propagation
    return {
        "apply_s": r.apply_s,
        "compute_total_s": r.compute.total_s,
        "compute_per_node_ms": r.compute.node_views_s / r.scale.nodes * 1000,
        "one_node_scratch_ms": r.compute.one_node_scratch_s * 1000,
        "server_start_s": r.server_start_s,
        "initial_sync_s": r.initial_sync_s,
        "change_all_streams_median_ms": statistics.median(p.all_streams_ms),
        "change_all_streams_p90_ms": _pct(p.all_streams_ms, 90),
        "change_all_streams_max_ms": max(p.all_streams_ms),
        "change_median_stream_ms": statistics.median(p.median_stream_ms),
        "change_commit_median_ms": statistics.median(p.commit_ms),
        "change_server_fanout_median_ms": (
            statistics.median(p.server_fanout_ms) if p.server_fanout_ms else float("nan")
        ),
        "model_mib": r.memory.model_mib,
        "rss_after_sync_mib": r.memory.rss_after_sync_mib,
        "rss_trimmed_mib": r.memory.rss_trimmed_mib,
        "rss_started_mib": r.memory.rss_started_mib,
        "rss_peak_mib": r.memory.rss_peak_mib,
    }


def render_markdown(r: Results, command: str, plot_name: str | None) -> str:
    s = summary(r)
    p, c, m, sc = r.propagation, r.compute, r.memory, r.scale
    goal_met = s["change_all_streams_median_ms"] < GOAL_MS
    over = [x for x in p.all_streams_ms if x >= GOAL_MS]
    per_stream = (m.rss_after_sync_mib - m.rss_started_mib) / sc.nodes
    mach = r.machine
    lb, la = mach.get("load_before", [0, 0, 0]), mach.get("load_after", [0, 0, 0])
    lines = [
        "# Control-plane scale benchmark",
        "",
        f"Command: `{command}` ({mach.get('date', '')})",
        "",
        f"Machine: {mach.get('nproc')} CPUs ({mach.get('cpu')}), kernel {mach.get('kernel')}, "
        f"Python {mach.get('python')}, {mach.get('openssl')}. Load average (1/5/15 min) "
        f"before: {lb[0]:.2f} / {lb[1]:.2f} / {lb[2]:.2f}, after: "
        f"{la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f}. The machine is shared: other work ran "
        "during the measurement, so times are upper bounds of what an idle machine gives.",
        "",
        f"Mesh: {sc.workloads} workloads (WorkloadEntry), {sc.services} services, "
        f"{sc.namespaces} enrolled namespaces, {sc.nodes} nodes; each service selects "
        f"{sc.workloads // sc.services} workloads, each node hosts "
        f"{sc.workloads // sc.nodes} workloads of about 10 namespaces, and every node's "
        f"snapshot holds {c.snapshot_items} items ({c.snapshot_json_bytes / MiB:.1f} MiB of "
        "JSON on the wire).",
        "",
        "What ran: the real `Store` (SQLite, WAL, synchronous=FULL), `MeshIndex` and "
        "`NodeViews` (config/snapshot.py) and `PushServer` (config/push.py) with TLS 1.3 "
        "on loopback. Apply, compute and tracemalloc run in the driver; the streams in a "
        "fresh process holding the store and the PushServer (so its RSS is the serving "
        f"control plane's alone). The {sc.nodes} nodes are one separate client "
        "process holding one real stream per node: each joined with its own token "
        "(`PushClient.join`), subscribed with its node certificate, and reads and "
        "acknowledges every update; it does not turn snapshots into ztunnel objects "
        "(proxy work, not control-plane work). Both processes share the machine's 2 CPUs.",
        "",
        "## Results",
        "",
        "| figure | value |",
        "|---|---|",
        f"| apply the whole mesh (one transaction) | {r.apply_s:.2f} s |",
        f"| full compute, every node from scratch | **{c.total_s:.2f} s** "
        f"(read+parse {c.read_parse_s:.2f} s, index+item digests {c.index_s:.2f} s, "
        f"{sc.nodes} node snapshots {c.node_views_s:.2f} s = "
        f"{s['compute_per_node_ms']:.1f} ms per node) |",
        f"| one node's snapshot without the shared views (`MeshIndex.node_snapshot` + "
        f"sort + hash) | {s['one_node_scratch_ms']:.0f} ms |",
        f"| PushServer start (index load from the store) | {r.server_start_s:.2f} s |",
        f"| initial sync: {sc.nodes} nodes join, subscribe and hold their full snapshot | "
        f"{r.initial_sync_s:.1f} s |",
        f"| one-workload change reaching all {p.streams} streams, median of "
        f"{len(p.all_streams_ms)} changes | **{s['change_all_streams_median_ms']:.1f} ms** |",
        f"| same, p90 / worst | {s['change_all_streams_p90_ms']:.1f} / "
        f"{s['change_all_streams_max_ms']:.1f} ms |",
        f"| same, reaching the median stream | {s['change_median_stream_ms']:.1f} ms |",
        f"| of which `Store.apply` (commit with fsync) | "
        f"{s['change_commit_median_ms']:.1f} ms (median) |",
        f"| the server had started writing it to all {p.streams} streams | "
        f"{s['change_server_fanout_median_ms']:.1f} ms (median; worst "
        f"{max(p.server_fanout_ms, default=float('nan')):.1f} ms) |",
        f"| workloads in each change's delta | {', '.join(map(str, p.workloads_per_delta))} |",
        f"| model memory (tracemalloc: index, item views, {sc.nodes} node states) | "
        f"{m.model_mib:.0f} MiB (peak while building {m.model_peak_mib:.0f} MiB) |",
        f"| control-plane process RSS, PushServer started, no stream yet | "
        f"{m.rss_started_mib:.0f} MiB |",
        f"| control-plane process RSS, all streams synced | {m.rss_after_sync_mib:.0f} MiB "
        f"(+{per_stream:.1f} MiB per stream) |",
        f"| same, after `malloc_trim(0)` (freed heap returned: the rest is live or "
        f"fragmented) | {m.rss_trimmed_mib:.0f} MiB |",
        f"| control-plane process peak RSS (ru_maxrss) | {m.rss_peak_mib:.0f} MiB |",
        "",
        f"Goal: a one-workload change reaches all {p.streams} streams in under "
        f"{GOAL_MS:.0f} ms: **{'met' if goal_met else 'NOT met'}** (median of "
        f"{len(p.all_streams_ms)} changes {s['change_all_streams_median_ms']:.1f} ms; "
        f"{len(over)} of them took {GOAL_MS:.0f} ms or more, the worst "
        f"{s['change_all_streams_max_ms']:.1f} ms). Other processes kept "
        f"{p.other_cpus:.2f} of the machine's {mach.get('nproc')} CPUs busy while the "
        "changes were timed.",
        "",
    ]
    sent_mib = c.snapshot_json_bytes * sc.nodes / MiB
    lines += [
        "## Reading",
        "",
        f"- Computing one node's snapshot from the shared item views costs "
        f"{s['compute_per_node_ms']:.1f} ms; building it straight from the index "
        f"(`MeshIndex.node_snapshot`, sort, hash: the non-incremental path) costs "
        f"{s['one_node_scratch_ms']:.0f} ms: the per-item digests are what make "
        f"{sc.nodes} nodes affordable.",
        f"- The initial sync sends {sent_mib:.0f} MiB of snapshots "
        f"({c.snapshot_json_bytes / MiB:.1f} MiB per node) in {r.initial_sync_s:.1f} s, "
        f"joins included ({r.joins_s:.1f} s until every node had its certificate).",
        f"- A one-workload change is a delta with that workload only; "
        f"`Store.apply` is {s['change_commit_median_ms']:.1f} ms of the "
        f"{s['change_all_streams_median_ms']:.1f} ms median, the rest is the index update, "
        f"the per-node deltas and {p.streams} TLS writes, read by a client process that "
        "competes for the same 2 CPUs.",
        f"- Memory: the computed model is {m.model_mib:.0f} MiB of Python objects, the "
        f"started server {m.rss_started_mib:.0f} MiB RSS. Each synced stream then adds "
        f"{per_stream:.1f} MiB ({per_stream * MiB / max(c.snapshot_json_bytes, 1):.1f}x its "
        f"snapshot's size) that stays after the sync: `malloc_trim` returns only "
        f"{m.rss_after_sync_mib - m.rss_trimmed_mib:.0f} MiB, so it is held, not free "
        "heap (TLS buffers sized by the largest write are the likely holder).",
        "",
    ]
    if plot_name:
        lines += [f"![change propagation and compute]({plot_name})", ""]
    lines += [
        "Per change (ms, all streams / median stream / server wrote the last stream / "
        "commit): "
        + ", ".join(
            f"{a:.0f}/{b:.0f}/{w:.0f}/{c2:.0f}"
            for a, b, w, c2 in zip(
                p.all_streams_ms,
                p.median_stream_ms,
                p.server_fanout_ms or [float("nan")] * len(p.commit_ms),
                p.commit_ms,
                strict=True,
            )
        ),
        "",
    ]
    return "\n".join(lines)


def plot(r: Results, path: Path) -> None:
    """Left: each change's time to the last and the median stream; right: compute steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, c = r.propagation, r.compute
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    xs = list(range(1, len(p.all_streams_ms) + 1))
    ax1.plot(xs, p.all_streams_ms, "o-", label=f"all {p.streams} streams")
    ax1.plot(xs, p.median_stream_ms, "s-", label="median stream")
    ax1.plot(xs, p.commit_ms, "^-", label="Store.apply (commit)")
    if len(p.server_fanout_ms) == len(xs):
        ax1.plot(xs, p.server_fanout_ms, "v-", label="server wrote the last stream")
    ax1.axhline(GOAL_MS, color="red", linestyle="--", label=f"goal {GOAL_MS:.0f} ms")
    ax1.set_xlabel("change")
    ax1.set_ylabel("ms")
    ax1.set_title("one-workload change: time to reach the streams")
    ax1.legend()
    ax1.grid(alpha=0.3)
    steps = [
        ("read+parse", c.read_parse_s),
        ("index+digests", c.index_s),
        (f"{r.scale.nodes} node views", c.node_views_s),
        ("PushServer start", r.server_start_s),
        ("initial sync", r.initial_sync_s),
    ]
    ax2.bar([s for s, _ in steps], [v for _, v in steps])
    ax2.set_ylabel("s")
    ax2.set_title(f"full compute at {r.scale.workloads} workloads / {r.scale.services} services")
    ax2.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def results_json(r: Results) -> str:
    return json.dumps({"summary": summary(r), **asdict(r)}, indent=2) + "\n"


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.control_plane",
        description="Control plane at scale: full snapshot compute, one-workload change "
        "propagation to every node stream (real PushServer over TLS), memory.",
    )
    sub = p.add_subparsers(dest="command")
    n = sub.add_parser("nodes", help="(internal) run the simulated nodes")
    n.add_argument("--address", required=True)
    n.add_argument("--tokens", type=Path, required=True)
    n.add_argument("--data", type=Path, required=True)
    ps = sub.add_parser("push", help="(internal) serve the streams and time changes")
    ps.add_argument("--data", type=Path, required=True)
    ps.add_argument("--result", type=Path, required=True)
    d = Scale()
    p.add_argument("--workloads", type=int, default=d.workloads)
    p.add_argument("--services", type=int, default=d.services)
    p.add_argument("--nodes", type=int, default=d.nodes, help="simulated node streams")
    p.add_argument("--namespaces", type=int, default=d.namespaces)
    p.add_argument("--changes", type=int, default=d.changes, help="one-workload changes to time")
    p.add_argument(
        "--out",
        type=Path,
        default=HERE,
        help="directory for RESULTS-control-plane.md, results-control-plane.json "
        "and control-plane.png (default: bench/)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, measure.exit_on_signal)
    import structlog
    import uvloop

    if args.command == "nodes":
        uvloop.install()
        asyncio.run(run_nodes(args.address, json.loads(args.tokens.read_text()), args.data))
        return 0
    scale = Scale(
        workloads=args.workloads,
        services=args.services,
        nodes=args.nodes,
        namespaces=args.namespaces,
        changes=args.changes,
    )
    if args.command == "push":
        uvloop.install()
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
        args.result.write_text(json.dumps(push_phase(args.data, scale, measure.log_progress)))
        return 0
    problem = check_scale(scale)
    if problem:
        print(f"bench.control_plane: {problem}", file=sys.stderr)
        return 2
    uvloop.install()
    # the control plane's own per-proxy info lines would drown the progress lines
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    now = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory(prefix="ambit-bench-cp-") as tmp:
        results = run(scale, Path(tmp), measure.log_progress)
    results = Results(
        **{
            **{f: getattr(results, f) for f in results.__dataclass_fields__},
            "machine": measure.machine_facts(now, load_before),
        }
    )
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if not args.no_plot:
        plot(results, out / "control-plane.png")
        plot_name = "control-plane.png"
    command = "python -m bench.control_plane " + shlex.join(sys.argv[1:] if argv is None else argv)
    (out / "RESULTS-control-plane.md").write_text(
        render_markdown(results, command.strip(), plot_name)
    )
    (out / "results-control-plane.json").write_text(results_json(results))
    for k, v in summary(results).items():
        print(f"{k:32s} {v:10.2f}")
    print(f"wrote {out / 'RESULTS-control-plane.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
