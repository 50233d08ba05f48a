"""Received-byte accounting of HBONE streams: the same count on every delivery path.

A server `HboneConnection` is driven with hand-made frames (the HTTP/2 core is sans-IO)
over a transport that only records writes; spliced streams relay into real TCP sockets.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

import pytest

from tests.inproc.test_hbone_tunnel import tcp_pair
from ztunnel.hbone.h2core import (
    DATA,
    FLAG_END_STREAM,
    FLAG_PADDED,
    WINDOW_UPDATE,
    H2Connection,
)
from ztunnel.hbone.request import request_headers
from ztunnel.hbone.stream import HboneConnection, HboneStream

# (payload, padding or None for an unpadded frame)
FRAMES: list[tuple[bytes, int | None]] = [
    (b"plain", None),
    (b"padded", 7),
    (b"", 255),  # padding alone
    (b"x" * 3000, None),
    (b"y" * 1000, 0),  # PADDED flag, no padding: only the pad length byte
    (b"z" * 20000, 200),
]
PAYLOAD = b"".join(p for p, _ in FRAMES)


def data_frame(sid: int, payload: bytes, pad: int | None, end: bool = False) -> bytes:
    flags = FLAG_END_STREAM if end else 0
    if pad is not None:
        flags |= FLAG_PADDED
        payload = bytes([pad]) + payload + b"\0" * pad
    return struct.pack(">IBI", len(payload) << 8 | DATA, flags, sid) + payload


class RecordingTransport(asyncio.Transport):
    """Stands in for the TLS transport: keeps what the connection writes."""

    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: Any) -> None:
        self.out += data

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.out += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def stream_credit(out: bytes | bytearray, sid: int) -> int:
    """Sum of the WINDOW_UPDATE increments the connection gave stream `sid`."""
    total = pos = 0
    while pos < len(out):
        first, _, fsid = struct.unpack_from(">IBI", out, pos)
        if first & 0xFF == WINDOW_UPDATE and fsid == sid:
            total += struct.unpack_from(">I", out, pos + 9)[0]
        pos += 9 + (first >> 8)
    return total


async def read_until_eof(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    got = bytearray()
    while data := await asyncio.wait_for(loop.sock_recv(sock, 65536), 5):
        got += data
    return bytes(got)


async def test_received_bytes_are_counted_alike_on_every_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Padded and unpadded DATA count their payload only, whether a spliced stream gets
    them one frame per read (the latency path), several per read (the batched path), or
    the application reads them; flow control still re-opens payload plus padding."""
    loop = asyncio.get_running_loop()
    general: list[int] = []
    on_data = HboneStream._on_data

    def counting_on_data(self: HboneStream, data: Any, end: bool) -> None:
        general.append(self.stream_id)
        on_data(self, data, end)

    monkeypatch.setattr(HboneStream, "_on_data", counting_on_data)

    streams: list[HboneStream] = []

    def on_request(conn: HboneConnection, stream: HboneStream) -> None:
        conn.respond(stream, 200)
        streams.append(stream)

    conn = HboneConnection(client=False, on_request=on_request, keepalive_interval=0)
    transport = RecordingTransport()
    conn.connection_made(transport)
    client = H2Connection(client=True)
    client.initiate()
    latency, batched, read = (client.open_stream(request_headers("10.0.0.5:80")) for _ in "abc")
    conn.data_received(client.data_to_send())
    assert [s.stream_id for s in streams] == [latency, batched, read]

    splices = []
    far_ends = []
    for st in streams[:2]:
        near, far = tcp_pair()
        far_ends.append(far)
        splices.append(loop.create_task(st.splice_socket(near)))
    for _ in range(100):  # the splices start
        if all(st._sink is not None for st in streams[:2]):
            break
        await asyncio.sleep(0.01)
    assert all(st._sink is not None for st in streams[:2])
    general.clear()

    for payload, pad in FRAMES:  # one frame per read: delivered straight to the socket
        conn.data_received(data_frame(latency, payload, pad))
    assert general == []
    conn.data_received(b"".join(data_frame(batched, p, pad) for p, pad in FRAMES))
    assert general == [batched] * len(FRAMES)
    conn.data_received(b"".join(data_frame(read, p, pad) for p, pad in FRAMES))
    assert await streams[2].readexactly(len(PAYLOAD)) == PAYLOAD

    assert [st.bytes_received for st in streams] == [len(PAYLOAD)] * 3

    # Every byte of window the frames used (payload, padding, pad length bytes) is
    # credited once: either re-opened already or counted towards the next update.
    used = sum(len(data_frame(1, p, pad)) - 9 for p, pad in FRAMES)
    for st in streams:
        pending = conn.core._streams[st.stream_id].recv_unacked
        assert stream_credit(transport.out, st.stream_id) + pending == used

    # End both spliced streams: the splices report the same counts.
    for st, far in zip(streams[:2], far_ends, strict=True):
        conn.data_received(data_frame(st.stream_id, b"", None, end=True))
        assert await read_until_eof(loop, far) == PAYLOAD
        far.shutdown(socket.SHUT_WR)
    results = await asyncio.wait_for(asyncio.gather(*splices), 5)
    assert results == [(0, len(PAYLOAD))] * 2
    for far in far_ends:
        far.close()
    conn.connection_lost(None)
