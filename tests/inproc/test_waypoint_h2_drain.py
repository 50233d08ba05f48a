"""Drain tells HTTP/2 clients (GOAWAY), finishes their streams, then closes their connections."""

from __future__ import annotations

import asyncio
from typing import Any

import h2.config
import h2.connection
import h2.errors
import hpack
from aiohttp import web
from hyperframe.frame import (
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
)

from tests.inproc.test_waypoint_e2e import Backend, Mesh

REQUEST = [(":method", "GET"), (":scheme", "http"), (":authority", "front"),
           (":path", "/slow")]


class Frames:
    """The client's view, frame by frame (h2's client state machine stops reading at a
    GOAWAY, so it cannot show the streams that finish after one)."""

    def __init__(self) -> None:
        self.buf = b""
        self.hpack = hpack.Decoder()

    def feed(self, data: bytes) -> list[Frame]:
        self.buf += data
        out: list[Frame] = []
        while len(self.buf) >= 9:
            frame, length = Frame.parse_frame_header(memoryview(self.buf[:9]))
            if len(self.buf) < 9 + length:
                break
            frame.parse_body(memoryview(self.buf[9:9 + length]))
            self.buf = self.buf[9 + length:]
            out.append(frame)
        return out

    def status(self, frame: HeadersFrame) -> str:
        headers = self.hpack.decode(bytes(frame.data))
        return next(str(v) for k, v in headers if k in (":status", b":status"))


def slow_backend(mesh: Mesh, delay: float) -> asyncio.Event:
    """The backend answers after `delay`; the event is set when a request reaches it."""
    arrived = asyncio.Event()

    async def handler(b: Backend, request: web.Request) -> web.StreamResponse:
        arrived.set()
        await asyncio.sleep(delay)
        return web.json_response({"backend": b.service})

    mesh.backends["front"][0].handler = handler
    return arrived


def new_client() -> h2.connection.H2Connection:
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, REQUEST, end_stream=True)
    return client


async def test_drain_sends_goaway_finishes_streams_and_closes_http2_connections() -> None:
    mesh = Mesh({"front": 1}, [], {})
    arrived = slow_backend(mesh, 0.5)
    async with mesh.running():
        wp = mesh.waypoint
        assert wp is not None
        loop = asyncio.get_running_loop()
        stream = await mesh.tunnel("front")
        client = new_client()
        stream.write(client.data_to_send())
        async with asyncio.timeout(5):
            await arrived.wait()  # the request is with the backend now

        seen: dict[str, Any] = {}
        body = b""
        frames = Frames()
        async with asyncio.TaskGroup() as tg:
            t0 = loop.time()
            drain = tg.create_task(wp.drain(10.0))
            async with asyncio.timeout(5):
                while True:
                    data = await stream.read()
                    if not data:
                        seen["eof"] = loop.time() - t0
                        stream.write_eof()  # as a client does on GOAWAY + EOF
                        break
                    for f in frames.feed(data):
                        if isinstance(f, GoAwayFrame):
                            seen["goaway"] = loop.time() - t0
                            seen["last_stream_id"] = f.last_stream_id
                            seen["error_code"] = f.error_code
                        elif isinstance(f, HeadersFrame):
                            seen["status"] = frames.status(f)
                        elif isinstance(f, DataFrame):
                            body += bytes(f.data)
                        if f.stream_id == 1 and "END_STREAM" in f.flags:
                            seen["ended"] = loop.time() - t0
            await drain
            drained = loop.time() - t0
        # told at once, while its request was still with the backend
        assert seen["goaway"] < 0.3 and seen["last_stream_id"] == 1 and seen["error_code"] == 0
        # the request in flight still gets its whole answer
        assert seen["status"] == "200" and b'"backend": "front"' in body
        assert seen["goaway"] < seen["ended"] <= seen["eof"]
        # the waypoint closed the connection itself, right after the last stream
        assert seen["eof"] - seen["ended"] < 0.5
        assert drained < 2.0  # not the 10 s drain timeout


async def test_requests_sent_after_goaway_are_refused_not_dropped() -> None:
    mesh = Mesh({"front": 1}, [], {})
    arrived = slow_backend(mesh, 0.3)
    async with mesh.running():
        wp = mesh.waypoint
        assert wp is not None
        stream = await mesh.tunnel("front")
        client = new_client()
        stream.write(client.data_to_send())
        async with asyncio.timeout(5):
            await arrived.wait()
        # a request racing the GOAWAY: sent before the client read it
        client.send_headers(3, REQUEST, end_stream=True)
        late = client.data_to_send()
        resets: dict[int, int] = {}
        statuses: dict[int, str] = {}
        frames = Frames()
        async with asyncio.TaskGroup() as tg:
            drain = tg.create_task(wp.drain(10.0))
            await asyncio.sleep(0)  # the drain has begun: GOAWAY(last_stream_id=1) is out
            stream.write(late)
            async with asyncio.timeout(5):
                while True:
                    data = await stream.read()
                    if not data:
                        stream.write_eof()
                        break
                    for f in frames.feed(data):
                        if isinstance(f, RstStreamFrame):
                            resets[f.stream_id] = f.error_code
                        elif isinstance(f, HeadersFrame):
                            statuses[f.stream_id] = frames.status(f)
            await drain
        assert statuses == {1: "200"}
        assert resets == {3: h2.errors.ErrorCodes.REFUSED_STREAM}
        assert len(mesh.backends["front"][0].requests) == 1  # stream 3 never went upstream
