"""The waypoint end to end on loopback: HBONE in, routes/retries/faults/authz, HBONE out.

Each backend workload is an aiohttp server on its own loopback address (127.0.0.x)
with an HBONE terminator in front of it (a stand-in for the destination ztunnel:
mTLS, CONNECT, records the caller's identity). Clients reach the waypoint the way
a source ztunnel does: an HBONE CONNECT to `VIP:port` with the client's identity;
a local TCP port forwards real clients (aiohttp, curl, grpcio) into such tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from config.resources import parse_resource
from tests.pki import TestPKI
from waypoint.server import Waypoint, WaypointOptions, config_from_resources
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.hbone.request import Accept, ConnectRequest, Decision, Refuse
from ztunnel.hbone.server import HboneServer
from ztunnel.identity import Certificate, TrustBundle
from ztunnel.tls import server_context

GATEWAY = ("app", "wp")
Handler = Callable[["Backend", web.Request], Awaitable[web.StreamResponse]]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def bound(host: str, port: int) -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(512)
    s.setblocking(False)
    return s


@dataclass
class Backend:
    """One workload: an HTTP server answering with its name, and what it saw."""

    service: str
    name: str
    ip: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    peers: list[str] = field(default_factory=list)  # HBONE identities that reached it
    handler: Handler | None = None
    fail_first: int = 0  # answer 503 to this many requests first
    delay: float = 0.0
    down: bool = False  # its HBONE terminator refuses (the workload is gone)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.requests.append({"method": request.method, "path": request.path_qs,
                              "headers": dict(request.headers), "body": body,
                              "host": request.host})
        if self.handler is not None:
            return await self.handler(self, request)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503, text="try again")
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.json_response({"backend": self.service, "workload": self.name,
                                  "path": request.path_qs, "method": request.method,
                                  "headers": {k.lower(): v for k, v in request.headers.items()},
                                  "body": body.decode()},
                                 headers={"x-backend": self.service})


def waypoint_namespace() -> list[dict[str, Any]]:
    """The ambient namespace `app` using the waypoint `wp`, and that waypoint's Gateway."""
    return [
        {"apiVersion": "v1", "kind": "Namespace",
         "metadata": {"name": "app", "labels": {"istio.io/dataplane-mode": "ambient",
                                                "istio.io/use-waypoint": "wp"}}},
        {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
         "metadata": {"name": "wp", "namespace": "app"},
         "spec": {"gatewayClassName": "istio-waypoint",
                  "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}},
    ]


def base_manifests(services: dict[str, list[str]], ports: dict[str, int],
                   appproto: dict[str, str], *, client_enrolled: bool = False
                   ) -> list[dict[str, Any]]:
    client_labels = {"app": "client"}
    if not client_enrolled:  # outside the mesh: the waypoint cannot name it
        client_labels["istio.io/dataplane-mode"] = "none"
    docs: list[dict[str, Any]] = [
        *waypoint_namespace(),
        {"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
         "metadata": {"name": "client", "namespace": "app",
                      "annotations": {"ambit.dev/node": "node-1"}},
         "spec": {"address": "127.0.1.1", "labels": client_labels,
                  "serviceAccount": "client"}},
    ]
    for i, (svc, ips) in enumerate(services.items()):
        for j, ip in enumerate(ips):
            docs.append({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry",
                         "metadata": {"name": f"{svc}-{j}", "namespace": "app",
                                      "annotations": {"ambit.dev/node": "node-1"}},
                         "spec": {"address": ip, "labels": {"app": svc},
                                  "serviceAccount": svc}})
        port: dict[str, Any] = {"port": 80, "targetPort": ports[svc], "name": "http"}
        if appproto.get(svc) == "":  # undeclared: the waypoint sniffs
            port["name"] = "web"
        elif svc in appproto:
            port["appProtocol"] = appproto[svc]
            port["name"] = appproto[svc]
        docs.append({"apiVersion": "v1", "kind": "Service",
                     "metadata": {"name": svc, "namespace": "app"},
                     "spec": {"selector": {"app": svc}, "clusterIP": f"10.96.0.{10 + i}",
                              "ports": [port]}})
    return docs


def route(rules: list[dict[str, Any]], parent: str = "front",
          name: str = "r") -> dict[str, Any]:
    return {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
            "metadata": {"name": name, "namespace": "app"},
            "spec": {"parentRefs": [{"group": "", "kind": "Service", "name": parent,
                                     "port": 80}],
                     "rules": rules}}


def backend_ref(name: str, weight: int | None = None) -> dict[str, Any]:
    ref: dict[str, Any] = {"name": name, "port": 80}
    if weight is not None:
        ref["weight"] = weight
    return ref


class Mesh:
    """Backends, their HBONE stand-ins, a waypoint and a client identity, all on loopback.

    The client (127.0.1.1, service account `client`) is outside the mesh unless
    `client_enrolled`: then the waypoint knows it and names it in its telemetry.
    """

    def __init__(self, services: dict[str, int], extra: list[dict[str, Any]],
                 appproto: dict[str, str], *, grpc_handlers: dict[str, Any] | None = None,
                 pki: Any = None, client_enrolled: bool = False, **options: Any) -> None:
        self.grpc_handlers = grpc_handlers or {}
        self.pki = pki or TestPKI()  # anything with issue(ns, sa) and bundle
        self.wp_cert = self.pki.issue("app", "wp")
        self.client_cert = self.pki.issue("app", "client")
        self.backends: dict[str, list[Backend]] = {}
        n = 2
        ips: dict[str, list[str]] = {}
        for svc, count in services.items():
            ips[svc] = []
            for j in range(count):
                ip = f"127.0.{(n // 250) + 2}.{n % 250 + 1}"
                n += 1
                ips[svc].append(ip)
                self.backends.setdefault(svc, []).append(Backend(svc, f"{svc}-{j}", ip))
        self.ports = {svc: free_port() for svc in services}
        self.hbone_port = free_port()
        self.manifests = base_manifests(ips, self.ports, appproto,
                                        client_enrolled=client_enrolled) + extra
        self.options = options
        self.waypoint: Waypoint | None = None
        self._pool = HboneConnectionPool()
        self.vips = {svc: f"10.96.0.{10 + i}" for i, svc in enumerate(services)}

    @property
    def trust(self) -> TrustBundle:
        return self.pki.bundle

    def all_backends(self) -> list[Backend]:
        return [b for bs in self.backends.values() for b in bs]

    def apply(self, extra: list[dict[str, Any]]) -> None:
        """Replace the extra manifests (routes, policies) on the running waypoint."""
        base = [d for d in self.manifests if d["kind"] in
                ("Namespace", "Gateway", "WorkloadEntry", "Service")]
        self.manifests = base + extra
        assert self.waypoint is not None
        self.waypoint.set_config(self.config(version=int(time.time())))

    def config(self, version: int = 1) -> Any:
        res = [parse_resource(d) for d in self.manifests]
        return config_from_resources(res, GATEWAY, address="127.0.0.1", version=version,
                                     trust_bundle_pem=self.trust.roots_pem.decode())

    @contextlib.asynccontextmanager
    async def running(
        self,
        follow: Callable[[Waypoint], Coroutine[Any, Any, None]] | None = None,
        identity: Callable[[], tuple[Certificate, TrustBundle]] | None = None,
    ) -> AsyncIterator[Mesh]:
        """Backends, terminators and the waypoint; config from `follow` (a control
        plane) when given, else from the manifests."""
        runners: list[web.AppRunner] = []
        hbones: list[HboneServer] = []
        grpc_servers: list[Any] = []
        try:
            async with asyncio.TaskGroup() as tg:
                for svc, bs in self.backends.items():
                    for b in bs:
                        if svc in self.grpc_handlers:
                            import grpc

                            gs = grpc.aio.server()
                            gs.add_generic_rpc_handlers((self.grpc_handlers[svc],))
                            gs.add_insecure_port(f"{b.ip}:{self.ports[svc]}")
                            await gs.start()
                            grpc_servers.append(gs)
                        else:
                            app = web.Application(client_max_size=64 << 20)
                            app.router.add_route("*", "/{tail:.*}", b.handle)
                            runner = web.AppRunner(app, access_log=None)
                            await runner.setup()
                            site = web.TCPSite(runner, b.ip, self.ports[svc])
                            await site.start()
                            runners.append(runner)
                        cert = self.pki.issue("app", svc)
                        hs = HboneServer(bound(b.ip, self.hbone_port),
                                         server_context(cert, self.trust), self.trust,
                                         self._terminator(b))
                        hbones.append(hs)
                        tg.create_task(hs.run())
                wp = Waypoint(
                    WaypointOptions(gateway=GATEWAY, hbone_address=("127.0.0.1", 0),
                                    metrics_address=("127.0.0.1", 0),
                                    ready_address=("127.0.0.1", 0),
                                    upstream_hbone_port=self.hbone_port, **self.options),
                    identity or (lambda: (self.wp_cert, self.trust)), rng=random.Random(7),
                )
                follower: asyncio.Task[None] | None = None
                if follow is None:
                    wp.set_config(self.config())
                else:
                    follower = tg.create_task(follow(wp))
                self.waypoint = wp
                tg.create_task(wp.run())
                await wp.started()
                async with asyncio.timeout(10):
                    await wp.configured()
                for hs in hbones:
                    await hs.started()
                try:
                    yield self
                finally:
                    if follower is not None:
                        follower.cancel()
                    await self._pool.close()
                    await wp.drain(1.0)
                    for hs in hbones:
                        hs.close()
        finally:
            for r in runners:
                await r.cleanup()
            for gs in grpc_servers:
                await gs.stop(0)

    def _terminator(self, b: Backend) -> Callable[[ConnectRequest], Awaitable[Decision]]:
        async def handler(req: ConnectRequest) -> Decision:
            b.peers.append(str(req.peer_identity))
            if b.down:
                return Refuse(503, "connection refused by the workload")
            if req.host != b.ip:
                return Refuse(400, "not this workload")
            loop = asyncio.get_running_loop()
            s = socket.socket()
            s.setblocking(False)
            try:
                await loop.sock_connect(s, (req.host, req.port))
            except OSError as e:
                s.close()
                return Refuse(503, str(e))
            return Accept(sock=s)

        return handler

    async def tunnel(self, svc: str, cert: Certificate | None = None,
                     source: str = "127.0.1.1", authority: str = "") -> Any:
        """An HBONE stream to the waypoint for `svc`'s VIP:80 (as a source ztunnel opens),
        claiming `forwarded: for=` the client address `source`."""
        assert self.waypoint is not None
        return await self._pool.open_stream(
            src_identity_cert=cert or self.client_cert, trust=self.trust,
            dst_identity=self.wp_cert.identity, src_ip=None, dst=self.waypoint.address,
            authority=authority or f"{self.vips[svc]}:80",
            forwarded_for=f'for="{source}:40000"')

    @contextlib.asynccontextmanager
    async def forward(self, svc: str, cert: Certificate | None = None,
                      source: str = "127.0.1.1", authority: str = "") -> AsyncIterator[str]:
        """A local TCP port whose connections go through HBONE to `svc` (base URL)."""
        loop = asyncio.get_running_loop()
        lsock = bound("127.0.0.1", 0)
        port = lsock.getsockname()[1]

        async def conn(sock: socket.socket) -> None:
            stream = await self.tunnel(svc, cert, source, authority)
            await stream.splice_socket(sock)

        conns: list[asyncio.Task[None]] = []

        async def accept(tg: asyncio.TaskGroup) -> None:
            while True:
                sock, _ = await loop.sock_accept(lsock)
                sock.setblocking(False)
                conns.append(tg.create_task(conn(sock)))

        try:
            async with asyncio.TaskGroup() as tg:
                acceptor = tg.create_task(accept(tg))
                try:
                    yield f"http://127.0.0.1:{port}"
                finally:
                    acceptor.cancel()
                    for t in conns:  # clients that keep idle connections open (grpc)
                        t.cancel()
        finally:
            lsock.close()

async def get(session: aiohttp.ClientSession, url: str, **kw: Any) -> tuple[int, str, Any]:
    method = kw.pop("method", "GET")
    async with session.request(method, url, **kw) as r:
        text = await r.text()
        return r.status, text, r.headers


def which(text: str) -> str:
    try:
        return str(json.loads(text)["backend"])
    except (ValueError, KeyError):
        return text


# ----------------------------------------------------------------------------- tests


async def test_routes_by_path_and_header_through_hbone_both_ways() -> None:
    mesh = Mesh({"front": 1, "a": 1, "b": 1}, [route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/b"}}],
         "backendRefs": [backend_ref("b")]},
        {"matches": [{"headers": [{"name": "x-to", "value": "b"}]}],
         "backendRefs": [backend_ref("b")]},
        {"backendRefs": [backend_ref("a")]},
    ])], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        assert which((await get(s, url + "/x"))[1]) == "a"
        assert which((await get(s, url + "/b/1"))[1]) == "b"
        assert which((await get(s, url + "/x", headers={"x-to": "b"}))[1]) == "b"
        status, text, _ = await get(s, url + "/post", method="POST", data=b"hello")
        assert status == 200 and json.loads(text)["body"] == "hello", text
    # the destination's HBONE terminator saw the waypoint's identity, never the client's
    peers = {p for b in mesh.all_backends() for p in b.peers}
    assert peers == {"spiffe://cluster.local/ns/app/sa/wp"}


async def test_keep_alive_pipelining_and_chunked_on_one_tunnel() -> None:
    mesh = Mesh({"front": 1}, [], {})
    async with mesh.running():
        stream = await mesh.tunnel("front")
        # three pipelined requests, one with a chunked body, in a single write
        stream.write(b"GET /one HTTP/1.1\r\nHost: front\r\n\r\n"
                     b"POST /two HTTP/1.1\r\nHost: front\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
                     b"GET /three HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
        await stream.drain()
        data = b""
        while chunk := await stream.read():
            data += chunk
    text = data.decode()
    assert text.count("HTTP/1.1 200 OK") == 3
    assert text.index('"/one"') < text.index('"/two"') < text.index('"/three"')
    assert '"body": "hello world"' in text


async def test_retry_turns_first_503_into_200() -> None:
    mesh = Mesh({"front": 1, "a": 1}, [route([
        {"backendRefs": [backend_ref("a")],
         "retry": {"attempts": 2, "codes": [503], "backoff": "10ms"}},
    ])], {})
    mesh.backends["a"][0].fail_first = 1
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        status, text, _ = await get(s, url + "/")
        assert status == 200 and which(text) == "a"
    assert len(mesh.backends["a"][0].requests) == 2


async def test_timeout_returns_504_close_to_the_bound() -> None:
    mesh = Mesh({"front": 1, "a": 1}, [route([
        {"backendRefs": [backend_ref("a")], "timeouts": {"request": "300ms"}},
    ])], {})
    mesh.backends["a"][0].delay = 1.0
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        t0 = time.monotonic()
        status, text, _ = await get(s, url + "/slow")
        took = time.monotonic() - t0
    assert status == 504 and "timeout" in text
    assert 0.28 <= took < 0.8, took


def fault(spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "ambit.dev/v1alpha1", "kind": "HTTPFault",
            "metadata": {"name": "f", "namespace": "app"},
            "spec": {**spec, "targetRefs": [{"group": "", "kind": "Service", "name": "front"}]}}


async def test_abort_half_gives_about_half_503() -> None:
    mesh = Mesh({"front": 1}, [fault({"abort": {"httpStatus": 503, "percentage": 50}})], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        got: Counter[int] = Counter()
        for _ in range(400):
            got[(await get(s, url + "/"))[0]] += 1
    assert set(got) == {200, 503}
    assert abs(got[503] / 4 - 50) <= 10, got


async def test_mirror_gets_copies_without_changing_the_response() -> None:
    mesh = Mesh({"front": 1, "a": 1, "shadow": 1}, [route([
        {"backendRefs": [backend_ref("a")],
         "filters": [{"type": "RequestMirror",
                      "requestMirror": {"backendRef": backend_ref("shadow")}}]},
    ])], {})

    async def broken(b: Backend, r: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="shadow is broken")

    mesh.backends["shadow"][0].handler = broken
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        for i in range(5):
            status, text, _ = await get(s, url + f"/m{i}", method="POST", data=b"copy me")
            assert status == 200 and which(text) == "a"
        for _ in range(100):
            if len(mesh.backends["shadow"][0].requests) == 5:
                break
            await asyncio.sleep(0.02)
    shadow = mesh.backends["shadow"][0].requests
    assert len(shadow) == 5, shadow
    assert sorted(r["path"] for r in shadow) == [f"/m{i}" for i in range(5)]
    assert all(r["body"] == b"copy me" and "-shadow" in r["host"] for r in shadow)


async def test_l7_deny_403_for_the_denied_path_only() -> None:
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-admin", "namespace": "app"},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "front"}],
                     "action": "DENY",
                     "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}}
    mesh = Mesh({"front": 1}, [deny], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        status, text, _ = await get(s, url + "/admin/users")
        assert status == 403 and "denied" in text.lower()
        # dot segments and escapes are normalized before the check
        status, _, _ = await get(s, url + "/public/../%61dmin", skip_auto_headers=())
        assert (await get(s, url + "/public"))[0] == 200


async def test_weights_90_10_within_5_points_over_2000_requests() -> None:
    mesh = Mesh({"front": 1, "a": 1, "b": 1}, [route([
        {"backendRefs": [backend_ref("a", 90), backend_ref("b", 10)]},
    ])], {}, access_log=False)
    got = await count_backends(mesh)
    assert sum(got.values()) == 2000
    assert abs(got["a"] / 20 - 90) <= 5, got


async def count_backends(mesh: Mesh) -> Counter[str]:
    """2000 requests to "front" from 16 workers; which backend (x-backend) answered each."""
    async with mesh.running(), mesh.forward("front") as url:
        conn = aiohttp.TCPConnector(limit=16)
        async with aiohttp.ClientSession(connector=conn) as s:
            got: Counter[str] = Counter()

            async def worker(n: int) -> None:
                for _ in range(n):
                    got[(await get(s, url + "/w"))[2].get("x-backend", "?")] += 1

            async with asyncio.TaskGroup() as tg:
                for _ in range(16):
                    tg.create_task(worker(125))
    return got


async def test_metrics_access_log_and_trace_headers() -> None:
    mesh = Mesh({"front": 1}, [], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        status, text, _ = await get(s, url + "/t", headers={"traceparent": tp})
        assert status == 200
        seen = json.loads(text)["headers"]
        out_tp = seen["traceparent"].split("-")
        assert out_tp[1] == "0af7651916cd43dd8448eb211c80319c" and out_tp[2] != "b7ad6b7169203331"
        assert seen["x-b3-traceid"] == "0af7651916cd43dd8448eb211c80319c"
        assert seen["x-b3-parentspanid"] == "b7ad6b7169203331"
        # B3 only: the same trace continues in W3C form
        status, text, _ = await get(s, url + "/t", headers={
            "x-b3-traceid": "463ac35c9f6413ad48485a3953bb6124",
            "x-b3-spanid": "0020000000000001", "x-b3-sampled": "1"})
        seen = json.loads(text)["headers"]
        assert seen["traceparent"].split("-")[1] == "463ac35c9f6413ad48485a3953bb6124"
        assert mesh.waypoint is not None and mesh.waypoint.metrics_listener is not None
        host, port = mesh.waypoint.metrics_listener.address
        async with s.get(f"http://{host}:{port}/metrics") as r:
            metrics = await r.text()
    line = next(x for x in metrics.splitlines()
                if x.startswith("istio_requests_total{") and 'response_code="200"' in x)
    for label in ('reporter="waypoint"', 'source_principal="cluster.local/ns/app/sa/client"',
                  'destination_service="front.app.svc.cluster.local"',
                  'destination_principal="cluster.local/ns/app/sa/front"',
                  'source_workload_namespace="app"', 'response_flags="-"'):
        assert label in line, (label, line)
    assert line.endswith(" 2.0")
    assert "istio_request_duration_milliseconds_bucket{" in metrics


async def test_head_http10_and_bodiless_statuses_keep_the_connection_in_sync() -> None:
    mesh = Mesh({"front": 1}, [], {})

    async def varied(b: Backend, r: web.Request) -> web.StreamResponse:
        if r.path == "/empty":
            return web.Response(status=204)
        return web.Response(text="x" * 100)

    mesh.backends["front"][0].handler = varied
    async with mesh.running():
        stream = await mesh.tunnel("front")
        # HEAD keeps content-length but sends no body; then a 204; then a GET: the
        # three answers must line up on one connection
        stream.write(b"HEAD /h HTTP/1.1\r\nHost: front\r\n\r\n"
                     b"GET /empty HTTP/1.1\r\nHost: front\r\n\r\n"
                     b"GET /g HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := await stream.read():
            data += chunk
        parts = data.split(b"HTTP/1.1 ")[1:]
        assert [p[:3] for p in parts] == [b"200", b"204", b"200"], data
        assert b"content-length: 100" in parts[0].lower() and parts[0].endswith(b"\r\n\r\n")
        assert parts[2].endswith(b"x" * 100)
        # an HTTP/1.0 client: answered, then the connection closes
        stream = await mesh.tunnel("front")
        stream.write(b"GET /old HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := await stream.read():
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"x" * 100)
