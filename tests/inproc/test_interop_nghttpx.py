"""Interop: our HBONE client against nghttpx (nghttp2) as an mTLS HTTP/2 CONNECT proxy.

nghttpx runs in HTTP/2 proxy mode with client-certificate verification and forwards each
CONNECT to a tinyproxy backend, which connects to a local echo server. Missing nghttpx or
tinyproxy fails these tests (`make test` installs them).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.interop.peers import (
    EchoServer,
    NghttpxProxy,
    echo_server,
    nghttpx_proxy,
    require_tools,
)
from tests.pki import TestPKI
from ztunnel.hbone.client import connect
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import forwarded_for, request_headers
from ztunnel.hbone.stream import HboneConnection, HboneStream
from ztunnel.identity import Certificate
from ztunnel.tls import client_context


@dataclass(frozen=True)
class Setup:
    pki: TestPKI
    proxy: NghttpxProxy
    echo: EchoServer
    client: Certificate
    server: Certificate


@pytest.fixture(autouse=True)
def _peers_installed() -> None:
    require_tools("nghttpx", "tinyproxy")


@contextlib.asynccontextmanager
async def nghttpx_setup(tmp_path: Path) -> AsyncIterator[Setup]:
    pki = TestPKI()
    server = pki.issue("proxy", "nghttpx")
    client = pki.issue("default", "client")
    cert, key, ca = pki.write_files(server, tmp_path / "pki")
    async with echo_server() as echo:
        with nghttpx_proxy(
            tmp_path / "nghttpx", cert=cert, key=key, client_ca=ca, connect_ports=[echo.port]
        ) as proxy:
            yield Setup(pki, proxy, echo, client, server)


async def open_connection(s: Setup, client: Certificate | None = None) -> HboneConnection:
    cert = client or s.client
    return await connect(
        ("127.0.0.1", s.proxy.port),
        client_context(cert, s.pki.bundle),
        s.pki.bundle,
        s.server.identity,
        connect_timeout=10,
    )


async def open_echo_stream(conn: HboneConnection, s: Setup) -> HboneStream:
    return await conn.open_stream(
        request_headers(f"127.0.0.1:{s.echo.port}", forwarded=forwarded_for("127.0.0.1", 40000))
    )


async def round_trip(stream: HboneStream, payload: bytes) -> bytes:
    """Write `payload` while reading the echo; return exactly len(payload) bytes."""

    async def send() -> None:
        view = memoryview(payload)
        for i in range(0, len(view), 100_000):
            stream.write(view[i : i + 100_000])
            await stream.drain()

    async with asyncio.timeout(30), asyncio.TaskGroup() as tg:
        tg.create_task(send())
        received = await stream.readexactly(len(payload))
    return received


async def test_bytes_round_trip_byte_exact_through_nghttpx(tmp_path: Path) -> None:
    async with nghttpx_setup(tmp_path) as s:
        conn = await open_connection(s)
        try:
            stream = await open_echo_stream(conn, s)
            # every byte value, then 3 MiB of random data: more than one stream window
            payload = bytes(range(256)) * 64 + os.urandom(3 * 1024 * 1024)
            received = await round_trip(stream, payload)
            assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
            assert received == payload
            stream.reset()
        finally:
            conn.close()


async def test_concurrent_streams_on_one_connection_through_nghttpx(tmp_path: Path) -> None:
    async with nghttpx_setup(tmp_path) as s:
        conn = await open_connection(s)
        try:
            streams = [await open_echo_stream(conn, s) for _ in range(4)]
            payloads = [os.urandom(256 * 1024) + bytes([i]) * 1000 for i in range(4)]
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(round_trip(st, p))
                    for st, p in zip(streams, payloads, strict=True)
                ]
            assert [t.result() for t in tasks] == payloads
            assert len({st.stream_id for st in streams}) == 4
            assert s.echo.accepted == 4
            for st in streams:
                st.reset()
        finally:
            conn.close()


async def test_client_certificate_from_untrusted_ca_is_refused(tmp_path: Path) -> None:
    async with nghttpx_setup(tmp_path) as s:
        rogue = TestPKI()  # same trust domain, different root: nghttpx must refuse it
        bad = rogue.issue("default", "client")
        # In TLS 1.3 the server's verdict on our certificate arrives after our side of the
        # handshake completes: the refusal may surface at connect or at the first stream.
        with pytest.raises(HboneError) as info:
            conn = await open_connection(s, client=bad)
            try:
                await open_echo_stream(conn, s)
            finally:
                conn.close()
        # usually "... alert unknown ca"; when our write races the alert, "broken pipe"
        assert "127.0.0.1" in str(info.value) or "certificate" in str(info.value), info.value
        assert s.echo.accepted == 0, "a refused client must not reach the target"


async def test_server_identity_mismatch_is_refused_by_our_client(tmp_path: Path) -> None:
    async with nghttpx_setup(tmp_path) as s:
        with pytest.raises(HboneError, match="expected"):
            await connect(
                ("127.0.0.1", s.proxy.port),
                client_context(s.client, s.pki.bundle),
                s.pki.bundle,
                s.pki.identity("proxy", "someone-else"),
            )


async def test_connect_refused_by_proxy_surfaces_as_status(tmp_path: Path) -> None:
    async with nghttpx_setup(tmp_path) as s:
        conn = await open_connection(s)
        try:
            # tinyproxy only allows the echo port (ConnectPort): any other port is refused
            with pytest.raises(HboneError) as info:
                await conn.open_stream(request_headers(f"127.0.0.1:{s.echo.port ^ 1}"))
            assert info.value.status is not None and info.value.status >= 400
        finally:
            conn.close()
