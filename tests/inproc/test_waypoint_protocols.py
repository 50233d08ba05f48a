"""Protocols through the waypoint: gRPC (grpcio), HTTP/2 to HTTP/1.1 (curl), WebSocket, TCP."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from tempfile import mkdtemp
from typing import Any

import aiohttp
import grpc
from aiohttp import web

from tests.inproc.test_waypoint_e2e import Backend, Mesh, backend_ref, get, route


def _grpc_handler() -> Any:
    async def unary(request: bytes, context: Any) -> bytes:
        md = dict(context.invocation_metadata())
        via = str(md.get("x-via", "?"))
        return b"hello " + request + b" via " + via.encode()

    async def stream(request: bytes, context: Any) -> AsyncIterator[bytes]:
        for i in range(int(request)):
            yield f"item {i}".encode()

    async def fail(request: bytes, context: Any) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        return b""

    async def total(requests: AsyncIterator[bytes], context: Any) -> bytes:
        return str(sum([int(r) async for r in requests])).encode()

    async def chat(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for r in requests:
            yield b"re: " + r

    return grpc.method_handlers_generic_handler("test.Echo", {
        "Hello": grpc.unary_unary_rpc_method_handler(unary),
        "Count": grpc.unary_stream_rpc_method_handler(stream),
        "Fail": grpc.unary_unary_rpc_method_handler(fail),
        "Total": grpc.stream_unary_rpc_method_handler(total),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


async def test_grpc_unary_and_server_streaming_pass_through() -> None:
    mesh = Mesh({"echo": 2}, [], {"echo": "grpc"}, grpc_handlers={"echo": _grpc_handler()})
    async with mesh.running(), mesh.forward("echo") as url:
        target = url.removeprefix("http://")
        async with grpc.aio.insecure_channel(target) as ch:
            hello = ch.unary_unary("/test.Echo/Hello")
            got = await hello(b"mesh", metadata=(("x-via", "waypoint"),), timeout=10)
            assert got == b"hello mesh via waypoint"
            count = ch.unary_stream("/test.Echo/Count")
            items = [m async for m in count(b"50", timeout=10)]
            assert items == [f"item {i}".encode() for i in range(50)]
            fail = ch.unary_unary("/test.Echo/Fail")
            try:
                await fail(b"x", timeout=10)
                raise AssertionError("expected NOT_FOUND")
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.NOT_FOUND
                assert e.details() == "no such thing"
            for i in range(20):  # many calls share the client's connection
                assert await hello(str(i).encode(), timeout=10) == f"hello {i} via ?".encode()
            # ... and the waypoint's: one h2c connection (one HBONE stream) per endpoint
            calls = await asyncio.gather(*(hello(b"c", timeout=10) for _ in range(30)))
            assert set(calls) == {b"hello c via ?"}
        assert mesh.waypoint is not None
        assert mesh.waypoint.h2_pool.connections_opened <= 2
        assert mesh.waypoint.upstreams.connections_opened <= 2
        metrics = mesh.waypoint.registry
        total = metrics.get_sample_value("istio_requests_total", {
            "reporter": "waypoint", "source_workload": "unknown",
            "source_workload_namespace": "app",
            "source_principal": "cluster.local/ns/app/sa/client", "source_app": "unknown",
            "destination_workload": "echo", "destination_workload_namespace": "app",
            "destination_principal": "cluster.local/ns/app/sa/echo", "destination_app": "echo",
            "destination_service": "echo.app.svc.cluster.local",
            "destination_service_name": "echo", "destination_service_namespace": "app",
            "request_protocol": "grpc", "response_code": "200", "grpc_response_status": "5",
            "response_flags": "-", "connection_security_policy": "mutual_tls"})
        assert total == 1.0
    # both endpoints served calls, each reached with the waypoint's identity
    assert all(b.peers and set(b.peers) == {"spiffe://cluster.local/ns/app/sa/wp"}
               for b in mesh.backends["echo"])


async def test_grpc_client_streaming_and_interactive_bidi() -> None:
    mesh = Mesh({"echo": 1}, [], {"echo": "grpc"}, grpc_handlers={"echo": _grpc_handler()})
    async with (mesh.running(), mesh.forward("echo") as url,
                grpc.aio.insecure_channel(url.removeprefix("http://")) as ch):

        async def numbers() -> AsyncIterator[bytes]:
            for i in range(100):
                yield str(i).encode()

        assert await ch.stream_unary("/test.Echo/Total")(numbers(), timeout=10) == b"4950"
        # ping-pong: each message is sent only after the previous answer came back,
        # so the waypoint must carry both directions at once
        call = ch.stream_stream("/test.Echo/Chat")(timeout=10)
        for i in range(5):
            await call.write(f"m{i}".encode())
            assert await call.read() == f"re: m{i}".encode()
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK


async def test_grpc_deny_is_a_grpc_permission_denied() -> None:
    deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-fail", "namespace": "app"},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "echo"}],
                     "action": "DENY",
                     "rules": [{"to": [{"operation": {"paths": ["/test.Echo/Fail"]}}]}]}}
    mesh = Mesh({"echo": 1}, [deny], {"echo": "grpc"}, grpc_handlers={"echo": _grpc_handler()})
    async with (mesh.running(), mesh.forward("echo") as url,
                grpc.aio.insecure_channel(url.removeprefix("http://")) as ch):
        try:
            await ch.unary_unary("/test.Echo/Fail")(b"x", timeout=10)
            raise AssertionError("expected PERMISSION_DENIED")
        except grpc.aio.AioRpcError as e:
            assert e.code() == grpc.StatusCode.PERMISSION_DENIED
        assert await ch.unary_unary("/test.Echo/Hello")(b"ok", timeout=10) == \
            b"hello ok via ?"


async def _curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_http2_client_reaches_http1_server() -> None:
    assert shutil.which("curl"), "curl is required (apt-get install curl)"
    mesh = Mesh({"front": 1, "a": 1}, [route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/a"}}],
         "backendRefs": [backend_ref("a")]},
        {"backendRefs": [backend_ref("front")]},
    ])], {})
    async with mesh.running(), mesh.forward("front") as url:
        rc, out, err = await _curl("--http2-prior-knowledge", "-w", "\\n%{http_version}",
                                   "-H", "x-test: 1", "--data-binary", "h2 body",
                                   url + "/a/post")
        assert rc == 0, err
        body, version = out.rsplit("\n", 1)
        assert version == "2"
        seen = json.loads(body)
        assert seen["backend"] == "a" and seen["body"] == "h2 body"
        assert seen["headers"]["x-test"] == "1"
        rc, out, err = await _curl("--http2-prior-knowledge", url + "/other")
        assert rc == 0, err
        assert '"backend": "front"' in out
    # the backend got HTTP/1.1 requests
    assert mesh.backends["a"][0].requests[0]["method"] == "POST"


async def test_websocket_echo_through_the_waypoint() -> None:
    mesh = Mesh({"front": 1}, [], {})

    async def ws(b: Backend, request: web.Request) -> web.StreamResponse:
        if request.headers.get("upgrade", "").lower() != "websocket":
            return web.Response(text="plain")
        sock = web.WebSocketResponse()
        await sock.prepare(request)
        async for msg in sock:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await sock.send_str("echo: " + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await sock.send_bytes(msg.data[::-1])
        return sock

    mesh.backends["front"][0].handler = ws
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        async with s.ws_connect(url.replace("http", "ws") + "/chat") as conn:
            for i in range(5):
                await conn.send_str(f"hi {i}")
                assert (await conn.receive_str()) == f"echo: hi {i}"
            await conn.send_bytes(b"\x00\x01\x02" * 1000)
            assert (await conn.receive_bytes()) == (b"\x00\x01\x02" * 1000)[::-1]
        # the connection stays usable for plain requests too
        async with s.get(url + "/after") as r:
            assert r.status == 200


async def test_tcp_port_is_proxied_as_is() -> None:
    mesh = Mesh({"db": 1}, [], {"db": "tcp"})

    async def unused(b: Backend, request: web.Request) -> web.StreamResponse:
        return web.Response(text="raw")

    mesh.backends["db"][0].handler = unused
    async with mesh.running():
        stream = await mesh.tunnel("db")
        # not HTTP from the waypoint's point of view: bytes go through untouched
        stream.write(b"GET /raw HTTP/1.1\r\nHost: db\r\nConnection: close\r\n\r\n")
        await stream.drain()
        data = b""
        while chunk := await stream.read():
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and data.endswith(b"raw")
        stream.write_eof()  # our FIN: the connection is over both ways
        assert mesh.waypoint is not None
        reg = mesh.waypoint.registry

        def tcp_samples() -> dict[str, Any]:
            return {s.name: s for m in reg.collect() for s in m.samples
                    if s.name.startswith("istio_tcp_")
                    and s.labels.get("destination_service") == "db.app.svc.cluster.local"}

        async with asyncio.timeout(5):  # recorded once both directions have ended
            while not tcp_samples():  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        tcp = tcp_samples()
        assert tcp["istio_tcp_connections_opened_total"].value == 1.0
        assert tcp["istio_tcp_received_bytes_total"].value == 50.0
        assert tcp["istio_tcp_sent_bytes_total"].value == len(data)
        assert not any(s.value for m in reg.collect() if m.name == "istio_requests"
                       for s in m.samples)


async def test_large_bodies_stream_both_ways_and_expect_continue() -> None:
    assert shutil.which("curl"), "curl is required (apt-get install curl)"
    mesh = Mesh({"front": 1}, [], {})

    async def sized(b: Backend, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "0"))
        if n:
            resp = web.StreamResponse()
            await resp.prepare(request)
            chunk = b"z" * 65536
            for _ in range(n // len(chunk)):
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        body = b.requests[-1]["body"]
        return web.json_response({"received": len(body), "sum": sum(body[::4096])})

    mesh.backends["front"][0].handler = sized
    payload = bytes(range(256)) * (3 * 4096)  # 3 MiB: more than the waypoint buffers
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        async with s.post(url + "/up", data=payload) as r:
            assert r.status == 200
            assert await r.json() == {"received": len(payload), "sum": sum(payload[::4096])}
        async with s.get(url + "/down?n=8388608") as r:
            got = 0
            async for chunk in r.content.iter_chunked(1 << 16):
                got += len(chunk)
            assert r.status == 200 and got == 8388608
        # curl sends `Expect: 100-continue` for bodies over 1 KB and waits up to 1 s for it
        (tmp := Path(mkdtemp())).joinpath("body").write_bytes(b"q" * 5000)
        t0 = time.monotonic()
        rc, out, err = await _curl("--data-binary", f"@{tmp / 'body'}", url + "/up")
        assert rc == 0, err
        assert json.loads(out)["received"] == 5000
        assert time.monotonic() - t0 < 0.9
        seen = mesh.backends["front"][0].requests[-1]["headers"]
        assert "Expect" not in seen and "expect" not in seen


async def test_undeclared_port_is_sniffed_http_or_tcp() -> None:
    mesh = Mesh({"web": 1}, [], {"web": ""})
    async with mesh.running():
        async with mesh.forward("web") as url, aiohttp.ClientSession() as s:
            status, text, _ = await get(s, url + "/sniffed")
            assert status == 200 and json.loads(text)["path"] == "/sniffed"
        assert mesh.waypoint is not None
        assert mesh.waypoint.registry.get_sample_value(
            "istio_requests_total", {**_metric_labels("web"), "response_code": "200"}) == 1.0
        # not HTTP: the bytes reach the backend untouched (its own HTTP parser answers)
        stream = await mesh.tunnel("web")
        stream.write(b"\x16\x03\x01 not http at all\r\n\r\n")
        data = b""
        while chunk := await stream.read():
            data += chunk
        assert data.startswith(b"HTTP/1.") and b" 400 " in data.split(b"\r\n")[0], data[:300]
        assert b"bad request\n" not in data  # not the waypoint's own 400


def _metric_labels(svc: str) -> dict[str, str]:
    return {"reporter": "waypoint", "source_workload": "unknown",
            "source_workload_namespace": "app",
            "source_principal": "cluster.local/ns/app/sa/client", "source_app": "unknown",
            "destination_workload": svc, "destination_workload_namespace": "app",
            "destination_principal": f"cluster.local/ns/app/sa/{svc}", "destination_app": svc,
            "destination_service": f"{svc}.app.svc.cluster.local",
            "destination_service_name": svc, "destination_service_namespace": "app",
            "request_protocol": "http", "grpc_response_status": "-", "response_flags": "-",
            "connection_security_policy": "mutual_tls"}
