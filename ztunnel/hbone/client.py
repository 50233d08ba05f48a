"""HBONE client: TCP + TLS 1.3 (ALPN h2) connect with server identity check.

    conn = await connect(("10.0.0.5", 15008), ssl_ctx, trust, expected=dst_identity)
    stream = await conn.open_stream(request_headers("10.0.0.5:8080", forwarded=...))

`connect` raises `HboneError` with an actionable message (timeout, refused, TLS
failure, wrong server identity). `ssl_ctx` comes from `ztunnel.tls.client_context`.

`sock_connect(sock, (ip, port))` is the TCP connect every onward and HBONE socket uses:
`loop.sock_connect` of uvloop resolves even a literal IP with getaddrinfo on a worker
thread (a thread hop and ~100 us per connection); an IP literal does not need that.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable

from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.request import format_authority
from ztunnel.hbone.stream import HboneConnection
from ztunnel.identity import SpiffeId, TrustBundle
from ztunnel.tls import PeerIdentityError, describe_handshake_error, peer_identity


def _is_ip_literal(family: int, host: str) -> bool:
    try:
        socket.inet_pton(family, host)
    except (OSError, TypeError, ValueError):
        return False
    return True


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def sock_connect(sock: socket.socket, address: tuple[str, int]) -> None:
    """Connect the non-blocking `sock` to `address` without a name lookup.

    An IP literal (IPv4 or IPv6, the only form ztunnel dials) is connected directly:
    a non-blocking connect(), then one wait for the socket to become writable, and its
    SO_ERROR. Anything else goes through `loop.sock_connect` (which resolves it).
    Raises OSError (ConnectionRefusedError and the like) as `loop.sock_connect` does.
    """
    loop = asyncio.get_running_loop()
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not _is_ip_literal(
        sock.family, address[0]
    ):
        await loop.sock_connect(sock, address)
        return
    try:
        sock.connect(address)
    except (BlockingIOError, InterruptedError):
        pass
    else:
        return  # connected at once (loopback can)
    fut: asyncio.Future[None] = loop.create_future()
    fd = sock.fileno()
    loop.add_writer(fd, _wake, fut)
    try:
        await fut
    finally:
        loop.remove_writer(fd)
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        # OSError(errno, ...) is ConnectionRefusedError, TimeoutError... as the errno says
        raise OSError(err, os.strerror(err))


async def connect(
    target: tuple[str, int] | socket.socket,
    ssl_ctx: ssl.SSLContext,
    trust: TrustBundle,
    expected: SpiffeId | None,
    *,
    connect_timeout: float = 10.0,
    max_concurrent_streams: int = 100,
    keepalive_interval: float = 30.0,
    keepalive_timeout: float = 10.0,
    on_close: Callable[[HboneConnection], None] | None = None,
) -> HboneConnection:
    """Open an HBONE connection to `target` (address, or an already connected socket)."""
    loop = asyncio.get_running_loop()
    if isinstance(target, socket.socket):
        try:
            peer = target.getpeername()
            where = format_authority(str(peer[0]), int(peer[1]))
            port = int(peer[1])
        except OSError:
            where, port = "the peer", 15008
    else:
        where, port = format_authority(*target), target[1]

    def verify(ssl_object: ssl.SSLObject | None) -> SpiffeId:
        if ssl_object is None:
            raise HboneError(f"connection to {where} is not TLS: HBONE requires mTLS")
        try:
            return peer_identity(ssl_object, trust, expected)
        except PeerIdentityError as e:
            raise HboneError(f"server {where} refused: {e.reason}") from e

    def factory() -> HboneConnection:
        return HboneConnection(
            client=True,
            verify=verify,
            on_close=on_close,
            max_concurrent_streams=max_concurrent_streams,
            keepalive_interval=keepalive_interval,
            keepalive_timeout=keepalive_timeout,
            description=where,
        )

    try:
        async with asyncio.timeout(connect_timeout):
            if isinstance(target, socket.socket):
                _, proto = await loop.create_connection(
                    factory, sock=target, ssl=ssl_ctx, server_hostname=""
                )
            else:
                _, proto = await loop.create_connection(
                    factory, target[0], target[1], ssl=ssl_ctx, server_hostname=""
                )
            await proto.ready
    except TimeoutError:
        raise HboneError(
            f"connection to {where} timed out after {connect_timeout:g}s: "
            f"is HBONE port {port} blocked or the node down?"
        ) from None
    except HboneError:
        raise
    except ConnectionRefusedError:
        raise HboneError(
            f"connection to {where} refused: is ztunnel listening on HBONE port {port} there?"
        ) from None
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as e:
        raise HboneError(f"TLS handshake with {where} failed: {describe_handshake_error(e)}") from e
    except OSError as e:
        raise HboneError(f"connection to {where} failed: {e.strerror or e}") from e
    return proto
