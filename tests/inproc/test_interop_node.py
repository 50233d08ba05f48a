"""Interop: our HBONE server against Node.js's built-in http2 module as a CONNECT client.

Node (nghttp2 inside) connects with mutual TLS, sends CONNECT, pushes bytes through the
tunnel to a local echo server and half-closes; it must get every byte back and then
END_STREAM. Without a valid client certificate it must be refused. A missing `node`
fails these tests (`make test` installs it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.interop.peers import EchoServer, NodeResult, echo_server, node_connect, require_tools
from tests.pki import TestPKI
from ztunnel.hbone.request import Accept, ConnectRequest, Decision, Refuse
from ztunnel.hbone.server import HboneServer
from ztunnel.identity import Certificate
from ztunnel.tls import server_context


@pytest.fixture(autouse=True)
def _node_installed() -> None:
    require_tools("node")


@dataclass
class Setup:
    pki: TestPKI
    server_cert: Certificate
    port: int
    echo: EchoServer
    files: Path
    seen: list[ConnectRequest] = field(default_factory=list)

    def client_files(self, cert: Certificate, pki: TestPKI | None = None) -> tuple[Path, Path]:
        cert_path, key_path, _ = (pki or self.pki).write_files(cert, self.files / "client")
        return cert_path, key_path

    @property
    def ca(self) -> Path:
        return self.files / "ca.pem"


@contextlib.asynccontextmanager
async def hbone_server(tmp_path: Path) -> AsyncIterator[Setup]:
    """Our HBONE server on 127.0.0.1:0; its handler splices to a local echo server and
    refuses (401) any other port."""
    pki = TestPKI()
    server_cert = pki.issue("default", "echo")
    pki.write_files(server_cert, tmp_path)  # writes ca.pem (the client trusts it)
    loop = asyncio.get_running_loop()
    async with echo_server() as echo:
        setup = Setup(pki, server_cert, 0, echo, tmp_path)

        async def handler(req: ConnectRequest) -> Decision:
            setup.seen.append(req)
            if (req.host, req.port) != ("127.0.0.1", echo.port):
                return Refuse(401, f"{req.authority} is not allowed by the test policy")
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, (req.host, req.port))
            return Accept(sock=sock)

        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        server = HboneServer(lsock, server_context(server_cert, pki.bundle), pki.bundle, handler)
        setup.port = server.address[1]
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.run())
            await server.started()
            try:
                yield setup
            finally:
                server.close()


async def run_node(
    s: Setup,
    payload: bytes,
    *,
    client: tuple[Path, Path] | None,
    authority: str | None = None,
    extra_streams: int = 0,
) -> NodeResult:
    cert, key = client if client is not None else (None, None)
    return await node_connect(
        s.files / "node",
        port=s.port,
        authority=authority or f"127.0.0.1:{s.echo.port}",
        ca=s.ca,
        server_identity=str(s.server_cert.identity),
        payload=payload,
        cert=cert,
        key=key,
        headers={"forwarded": 'for="127.0.0.1:34567"'},
        extra_streams=extra_streams,
    )


async def test_node_tunnels_bytes_through_our_server_and_half_close_ends_it(
    tmp_path: Path,
) -> None:
    async with hbone_server(tmp_path) as s:
        client = s.pki.issue("default", "node-client")
        payload = bytes(range(256)) * 16 + os.urandom(2 * 1024 * 1024)
        result = await run_node(s, payload, client=s.client_files(client))
        assert result.error is None and result.ok, result
        assert result.status == 200
        # byte-exact, and the stream ended: Node's END_STREAM became a FIN to the echo
        # server, whose FIN came back as END_STREAM (otherwise Node would time out)
        assert len(result.received) == len(payload)
        assert result.received == payload
        assert len(s.seen) == 1
        assert s.seen[0].peer_identity == client.identity  # from the certificate
        assert s.seen[0].forwarded_for == "127.0.0.1:34567"


async def test_node_multiplexes_concurrent_streams_through_our_server(tmp_path: Path) -> None:
    async with hbone_server(tmp_path) as s:
        client = s.pki.issue("default", "node-client")
        payload = os.urandom(1024 * 1024)  # 6 x 1 MiB in flight: the windows matter
        result = await run_node(s, payload, client=s.client_files(client), extra_streams=5)
        assert result.ok, result
        assert result.received == payload
        assert result.extra_ok == 5
        assert len(s.seen) == 6 and s.echo.accepted == 6
        peers = {req.peer_addr for req in s.seen}
        assert len(peers) == 1, "all streams must share Node's one HTTP/2 session"


async def test_node_without_client_certificate_is_refused(tmp_path: Path) -> None:
    async with hbone_server(tmp_path) as s:
        result = await run_node(s, b"must not arrive", client=None)
        assert not result.ok
        assert result.status is None  # never got a CONNECT response
        assert result.received == b""
        assert s.seen == [] and s.echo.accepted == 0


async def test_node_with_certificate_from_untrusted_ca_is_refused(tmp_path: Path) -> None:
    async with hbone_server(tmp_path) as s:
        rogue = TestPKI()  # same trust domain, another root
        bad = rogue.issue("default", "node-client")
        result = await run_node(s, b"must not arrive", client=s.client_files(bad, rogue))
        assert not result.ok
        assert result.status is None
        assert s.seen == [] and s.echo.accepted == 0


async def test_node_sees_our_refusal_status(tmp_path: Path) -> None:
    async with hbone_server(tmp_path) as s:
        client = s.pki.issue("default", "node-client")
        result = await run_node(
            s, b"x", client=s.client_files(client), authority=f"127.0.0.1:{s.echo.port ^ 1}"
        )
        assert not result.ok
        assert result.status == 401
        assert s.echo.accepted == 0


async def test_node_sees_400_for_an_authority_that_is_not_ip_port(tmp_path: Path) -> None:
    async with hbone_server(tmp_path) as s:
        client = s.pki.issue("default", "node-client")
        result = await run_node(
            s, b"x", client=s.client_files(client), authority="echo.default.svc:80"
        )
        assert not result.ok
        assert result.status == 400
        assert s.seen == []
