"""Baseline relays for benchmarks: a uvloop mTLS relay pair, a TCP echo server, stunnel configs.

Run as `python -m bench.relays MODE ...`; every mode binds its listener (port 0 allowed)
and prints `READY <port>` on stdout once it accepts connections, so a harness can start
it, learn its port and kill it by pid.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import uvloop

from bench.certs import load_identity
from ztunnel.identity import SpiffeId, TrustBundle
from ztunnel.tls import PeerIdentityError, client_context, peer_identity, server_context

HIGH_WATER = 4 * 1024 * 1024


def parse_hostport(value: str) -> tuple[str, int]:
    """`"127.0.0.1:8080"` -> `("127.0.0.1", 8080)`; exits with a usable message otherwise."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:15008)")
    return host, int(port)


def announce(port: int) -> None:
    """Tell the parent process which port we listen on."""
    sys.stdout.write(f"READY {port}\n")
    sys.stdout.flush()


def tls_server_context(ca: Path, cert: Path, key: Path) -> tuple[ssl.SSLContext, TrustBundle]:
    """The mesh's server mTLS context (ztunnel.tls: TLS 1.3, AES-GCM), without ALPN."""
    certificate, trust = load_identity(ca, cert, key)
    return server_context(certificate, trust, alpn=()), trust


def tls_client_context(ca: Path, cert: Path, key: Path) -> tuple[ssl.SSLContext, TrustBundle]:
    """The mesh's client mTLS context, without ALPN; the server identity is checked later."""
    certificate, trust = load_identity(ca, cert, key)
    return client_context(certificate, trust, alpn=()), trust


READ_BUFFER = 256 * 1024


class Pipe(asyncio.BufferedProtocol):
    """One side of a relay: forwards what it reads to its partner, with backpressure both ways.

    A buffered protocol: the transport reads (and, for TLS, decrypts) straight into this
    side's buffer, which is handed to the partner's `write` without a copy and reused
    for the next read unless the partner had to queue it.
    """

    def __init__(
        self, *, can_half_close: bool, on_made: Callable[[Pipe], None] | None = None
    ) -> None:
        self.on_made = on_made
        self.transport: asyncio.Transport | None = None
        self.partner: Pipe | None = None
        self.can_half_close = can_half_close
        self.pending: list[bytes] = []
        self.eof_pending = False
        self.buffer = memoryview(bytearray(READ_BUFFER))
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's do not subclass asyncio's
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport.set_write_buffer_limits(high=HIGH_WATER)
        if self.on_made is not None:
            self.on_made(self)

    def link(self, partner: Pipe) -> None:
        """Join two sides; anything read before the partner existed is flushed now."""
        self.partner = partner
        partner.partner = self
        for side in (self, partner):
            if side.pending:
                assert side.partner is not None and side.partner.transport is not None
                side.partner.transport.writelines(side.pending)
                side.pending.clear()
            if side.eof_pending:
                side.eof_received()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self.buffer[:nbytes]
        partner = self.partner
        if partner is None or partner.transport is None:
            self.pending.append(bytes(data))
            return
        out = partner.transport
        out.write(data)
        if out.get_write_buffer_size():
            # the partner may still hold a view of this buffer: read into a new one
            self.buffer = memoryview(bytearray(READ_BUFFER))

    def eof_received(self) -> bool:
        partner = self.partner
        if partner is None or partner.transport is None:
            self.eof_pending = True
            return self.can_half_close
        if partner.transport.is_closing():
            return False
        if partner.can_half_close and partner.transport.can_write_eof():
            partner.transport.write_eof()
            return self.can_half_close  # keep our write side open for the reply (not TLS)
        partner.transport.close()
        return False

    def pause_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.partner is not None and self.partner.transport is not None:
            self.partner.transport.close()
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass(frozen=True)
class Upstream:
    """Where and how the relay connects onward (TLS: verify the server is `expected`)."""

    address: tuple[str, int]
    ssl_ctx: ssl.SSLContext | None = None
    trust: TrustBundle | None = None
    expected: SpiffeId | None = None


async def _connect_onward(downstream: Pipe, upstream: Upstream) -> None:
    loop = asyncio.get_running_loop()
    host, port = upstream.address
    try:
        _, up = await loop.create_connection(
            lambda: Pipe(can_half_close=upstream.ssl_ctx is None),
            host,
            port,
            ssl=upstream.ssl_ctx,
            server_hostname="" if upstream.ssl_ctx is not None else None,
        )
    except OSError as exc:
        print(
            f"relay: connect to {host}:{port} failed ({exc}): is the upstream listening?",
            file=sys.stderr,
        )
        if downstream.transport is not None:
            downstream.transport.abort()
        return
    if upstream.trust is not None:
        assert up.transport is not None
        try:
            peer_identity(
                up.transport.get_extra_info("ssl_object"), upstream.trust, upstream.expected
            )
        except PeerIdentityError as exc:
            print(f"relay: upstream {host}:{port} refused: {exc.reason}", file=sys.stderr)
            up.transport.abort()
            if downstream.transport is not None:
                downstream.transport.abort()
            return
    downstream.link(up)
    if downstream.transport is not None and not downstream.transport.is_closing():
        downstream.transport.resume_reading()


async def serve_relay(
    listen: tuple[str, int],
    upstream: Upstream,
    *,
    server_ssl: ssl.SSLContext | None,
    on_ready: Callable[[int], None] = announce,
) -> None:
    """Accept on `listen` (TLS when `server_ssl`), relay every connection to `upstream`."""
    loop = asyncio.get_running_loop()
    async with asyncio.TaskGroup() as tg:

        def accepted(pipe: Pipe) -> None:
            assert pipe.transport is not None
            pipe.transport.pause_reading()  # nothing to forward to until connected onward
            tg.create_task(_connect_onward(pipe, upstream))

        def factory() -> Pipe:
            return Pipe(can_half_close=server_ssl is None, on_made=accepted)

        server = await loop.create_server(
            factory, listen[0], listen[1], ssl=server_ssl, backlog=1024, reuse_address=True
        )
        on_ready(server.sockets[0].getsockname()[1])
        async with server:
            await server.serve_forever()


def echo_server(listen: tuple[str, int], on_ready: Callable[[int], None] = announce) -> None:
    """A blocking, thread-per-connection TCP echo server (TCP_NODELAY), run until killed."""
    lsock = socket.create_server(listen, backlog=128, reuse_port=False)
    on_ready(lsock.getsockname()[1])

    def handle(conn: socket.socket) -> None:
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(262144):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    while True:
        conn, _ = lsock.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def stunnel_config(
    *,
    client: bool,
    accept: tuple[str, int],
    connect: tuple[str, int],
    ca: Path,
    cert: Path,
    key: Path,
) -> str:
    """An stunnel configuration for one side of an mTLS pair (TLS 1.3, AES-256-GCM)."""
    return "\n".join(
        [
            "foreground = yes",
            "pid =",
            "debug = 3",
            "socket = l:TCP_NODELAY=1",
            "socket = r:TCP_NODELAY=1",
            "[bench]",
            f"client = {'yes' if client else 'no'}",
            f"accept = {accept[0]}:{accept[1]}",
            f"connect = {connect[0]}:{connect[1]}",
            f"cert = {cert}",
            f"key = {key}",
            f"CAfile = {ca}",
            "verifyChain = yes",
            "requireCert = yes",
            "sslVersionMin = TLSv1.3",
            "ciphersuites = TLS_AES_256_GCM_SHA384",
            "",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.relays", description=__doc__)
    sub = p.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("echo", help="TCP echo server")
    e.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0))
    for mode in ("tls-client", "tls-server"):
        s = sub.add_parser(mode, help=f"{mode.split('-')[1]} side of the mTLS relay pair")
        s.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0))
        s.add_argument("--connect", type=parse_hostport, required=True)
        s.add_argument("--ca", type=Path, required=True)
        s.add_argument("--cert", type=Path, required=True)
        s.add_argument("--key", type=Path, required=True)
        if mode == "tls-client":
            s.add_argument("--server-identity", required=True, help="expected URI SAN")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mode == "echo":
        echo_server(args.listen)
        return 0
    try:
        if args.mode == "tls-client":
            ctx, trust = tls_client_context(args.ca, args.cert, args.key)
            upstream = Upstream(args.connect, ctx, trust, SpiffeId.parse(args.server_identity))
            server_ssl = None
        else:
            upstream = Upstream(args.connect)
            server_ssl, _ = tls_server_context(args.ca, args.cert, args.key)
    except (OSError, ValueError) as exc:
        print(f"bench.relays: cannot load identity: {exc}", file=sys.stderr)
        return 2
    uvloop.run(serve_relay(args.listen, upstream, server_ssl=server_ssl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
