"""HBONE relay pair for benchmarks, built only on the public `ztunnel.hbone` API.

    python -m bench.hbone server --ca CA --cert CERT --key KEY [--listen 127.0.0.1:0]
    python -m bench.hbone client --connect HOST:PORT --target HOST:PORT \
        --server-identity spiffe://... --ca CA --cert CERT --key KEY [--listen 127.0.0.1:0]

The client side accepts plain TCP and carries each connection as one HBONE CONNECT
stream (`:authority` = `--target`) to the server side through the ztunnel connection
pool: streams share pooled mTLS HTTP/2 connections as ztunnel shares them for one
(source, destination) pair. The server
side is an `HboneServer` whose handler connects to the requested address (loopback
only) and hands the socket back to be spliced. Each prints `READY <port>` once it
accepts connections.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

from bench.certs import load_identity
from bench.relays import announce, parse_hostport
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.hbone.request import (
    Accept,
    ConnectRequest,
    Decision,
    Refuse,
    format_authority,
    forwarded_for,
)
from ztunnel.hbone.server import HboneServer
from ztunnel.identity import Certificate, SpiffeId, TrustBundle
from ztunnel.tls import server_context

ALLOWED_TARGET_HOSTS = frozenset({"127.0.0.1", "::1"})


def listen_socket(listen: tuple[str, int]) -> socket.socket:
    sock = socket.create_server(listen, backlog=1024)
    sock.setblocking(False)
    return sock


async def _connect_upstream(host: str, port: int) -> socket.socket:
    """Non-blocking connect to an IP literal. (uvloop's `sock_connect` resolves even IP
    literals with getaddrinfo on its thread pool: about 60 us more per connection.)"""
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex((host, port))
        if err == errno.EINPROGRESS:
            writable: asyncio.Future[None] = loop.create_future()
            loop.add_writer(sock.fileno(), writable.set_result, None)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise OSError(err, os.strerror(err))
    except BaseException:
        sock.close()
        raise
    return sock


async def handle_connect(req: ConnectRequest) -> Decision:
    """Server-side handler: connect to the requested loopback address, or refuse."""
    if req.host not in ALLOWED_TARGET_HOSTS:
        return Refuse(401, f"benchmark server only relays to loopback, not {req.host}")
    try:
        sock = await _connect_upstream(req.host, req.port)
    except OSError as exc:
        return Refuse(503, f"connect to {req.authority} failed: {exc.strerror or exc}")
    return Accept(sock=sock)


async def serve_server(
    listen: tuple[str, int],
    certificate: Certificate,
    trust: TrustBundle,
    *,
    on_ready: Callable[[int], None] = announce,
) -> None:
    """Run the server side until cancelled."""
    sock = listen_socket(listen)
    server = HboneServer(sock, server_context(certificate, trust), trust, handle_connect)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.run())
        await server.started()
        on_ready(server.address[1])


@dataclass(frozen=True)
class ClientSide:
    """What every stream of the client side shares."""

    pool: HboneConnectionPool
    certificate: Certificate
    trust: TrustBundle
    server_identity: SpiffeId
    server: tuple[str, int]
    authority: str


async def _relay_one(sock: socket.socket, side: ClientSide) -> None:
    try:
        src = sock.getpeername()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        stream = await side.pool.open_stream(
            src_identity_cert=side.certificate,
            trust=side.trust,
            dst_identity=side.server_identity,
            src_ip=None,
            dst=side.server,
            authority=side.authority,
            forwarded_for=forwarded_for(str(src[0]), int(src[1])),
        )
    except (HboneError, OSError) as exc:
        print(f"bench.hbone client: {exc}", file=sys.stderr)
        sock.close()
        return
    try:
        await stream.splice_socket(sock)
    except HboneError as exc:
        print(f"bench.hbone client: stream ended: {exc}", file=sys.stderr)


async def serve_client(
    listen: tuple[str, int],
    server: tuple[str, int],
    target: tuple[str, int],
    *,
    certificate: Certificate,
    trust: TrustBundle,
    server_identity: SpiffeId,
    on_ready: Callable[[int], None] = announce,
) -> None:
    """Run the client side until cancelled: every accepted connection becomes a stream."""
    loop = asyncio.get_running_loop()
    lsock = listen_socket(listen)
    side = ClientSide(
        pool=HboneConnectionPool(),
        certificate=certificate,
        trust=trust,
        server_identity=server_identity,
        server=server,
        authority=format_authority(*target),
    )
    try:
        async with asyncio.TaskGroup() as tg:
            on_ready(lsock.getsockname()[1])
            while True:
                sock, _ = await loop.sock_accept(lsock)
                tg.create_task(_relay_one(sock, side))
    finally:
        await side.pool.close()
        lsock.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.hbone", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="mode", required=True)
    for mode in ("client", "server"):
        s = sub.add_parser(mode, help=f"{mode} side of the HBONE relay pair")
        s.add_argument("--listen", type=parse_hostport, default=("127.0.0.1", 0))
        s.add_argument("--ca", type=Path, required=True, help="trust bundle (PEM)")
        s.add_argument("--cert", type=Path, required=True, help="workload certificate (PEM)")
        s.add_argument("--key", type=Path, required=True, help="its private key (PEM)")
        if mode == "client":
            s.add_argument("--connect", type=parse_hostport, required=True, help="HBONE server")
            s.add_argument("--target", type=parse_hostport, required=True, help=":authority")
            s.add_argument("--server-identity", required=True, help="expected SPIFFE ID")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        certificate, trust = load_identity(args.ca, args.cert, args.key)
        peer = SpiffeId.parse(args.server_identity) if args.mode == "client" else None
    except (OSError, ValueError) as exc:
        print(f"bench.hbone: cannot load identity: {exc}", file=sys.stderr)
        return 2
    if peer is not None:
        uvloop.run(
            serve_client(
                args.listen,
                args.connect,
                args.target,
                certificate=certificate,
                trust=trust,
                server_identity=peer,
            )
        )
    else:
        uvloop.run(serve_server(args.listen, certificate, trust))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
