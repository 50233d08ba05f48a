"""HBONE server: accepts mTLS HTTP/2 CONNECT, validates, asks a handler, splices.

    server = HboneServer(sock, server_context(cert, trust), trust, handler)
    async with asyncio.TaskGroup() as tg:
        tg.create_task(server.run())
        ...
        await server.drain(timeout=5)     # GOAWAY: in-flight streams finish; run() returns

The source identity comes only from the client certificate (`ztunnel.tls.peer_identity`).
Per DESIGN section 4: 400 for a wrong method or an authority that is not `ip:port` (or,
with `local_ip_check`, not this workload's IP); everything else is the handler's call:
`Refuse(401, ...)` (authz), `Refuse(503, ...)` (port not allowed / upstream
unreachable) or `Accept(sock=upstream)` / `Accept(serve=coroutine)` (200, then the
server splices or hands the stream over). `run()` owns every per-stream task in its
TaskGroup; a failing handler answers 503 and never takes the server down.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable

import structlog

from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.h2core import ErrorCode
from ztunnel.hbone.request import Accept, ConnectRequest, Handler, Refuse, parse_connect
from ztunnel.hbone.stream import HboneConnection, HboneStream
from ztunnel.identity import SpiffeId, TrustBundle
from ztunnel.tls import PeerIdentityError, peer_identity

log = structlog.get_logger("ztunnel.hbone")


class HboneServer:
    """One HBONE listener on an already bound (and possibly listening) socket.

    The server owns the socket once `run()` starts: it is closed when the server stops.
    """

    def __init__(
        self,
        sock: socket.socket,
        ssl_ctx: ssl.SSLContext,
        trust: TrustBundle,
        handler: Handler,
        *,
        local_ip_check: Callable[[str], bool] | None = None,
        max_concurrent_streams: int = 100,
        keepalive_interval: float = 30.0,
        keepalive_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        backlog: int = 1024,
    ) -> None:
        self._sock = sock
        self._ssl = ssl_ctx
        self._trust = trust
        self._handler = handler
        self._local_ip_check = local_ip_check
        self._max_streams = max_concurrent_streams
        self._keepalive = (keepalive_interval, keepalive_timeout)
        self._handshake_timeout = handshake_timeout
        self._backlog = backlog
        self.connections: set[HboneConnection] = set()
        self._tg: asyncio.TaskGroup | None = None
        self._server: asyncio.Server | None = None
        self._stop: asyncio.Future[None] | None = None
        self._started = asyncio.Event()

    @property
    def address(self) -> tuple[str, int]:
        """The listening address (host, port)."""
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    async def started(self) -> None:
        """Wait until `run()` accepts connections."""
        await self._started.wait()

    async def run(self) -> None:
        """Serve until `drain()`/`close()` or cancellation; owns all stream tasks."""
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            self._server = await loop.create_server(
                self._make_protocol,
                sock=self._sock,
                ssl=self._ssl,
                backlog=self._backlog,
                ssl_handshake_timeout=self._handshake_timeout,
            )
            self._started.set()
            try:
                await self._stop
            finally:
                self._server.close()
                for conn in list(self.connections):
                    conn.abort()
                self._tg = None

    def close(self) -> None:
        """Stop now: connections are aborted, stream tasks cancelled by `run()`."""
        if self._stop is not None and not self._stop.done():
            self._stop.set_result(None)

    async def drain(self, timeout: float = 30.0) -> None:  # noqa: ASYNC109
        """Graceful stop: no new connections, GOAWAY to all, wait for streams to end."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.goaway()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while self.connections:
                    await asyncio.wait([c.closed for c in self.connections])
        self.close()

    # ------------------------------------------------------------------ internals

    def _make_protocol(self) -> HboneConnection:
        return HboneConnection(
            client=False,
            verify=self._verify,
            on_request=self._on_request,
            on_made=self.connections.add,
            on_close=self.connections.discard,
            max_concurrent_streams=self._max_streams,
            keepalive_interval=self._keepalive[0],
            keepalive_timeout=self._keepalive[1],
        )

    def _verify(self, ssl_object: ssl.SSLObject | None) -> SpiffeId:
        if ssl_object is None:
            raise HboneError("HBONE requires TLS")
        try:
            return peer_identity(ssl_object, self._trust)
        except PeerIdentityError as e:
            log.warning("hbone_client_rejected", reason=e.reason)
            raise HboneError(f"client rejected: {e.reason}") from e

    def _on_request(self, conn: HboneConnection, stream: HboneStream) -> None:
        target = parse_connect(stream.request_headers)
        if isinstance(target, Refuse):
            conn.respond(stream, target.status, target.reason)
            log.info(
                "hbone_refused", peer=conn.peer_addr, status=target.status, reason=target.reason
            )
            return
        if self._local_ip_check is not None and not self._local_ip_check(target.host):
            reason = f"authority {target.authority} is not an address served here"
            conn.respond(stream, 400, reason)
            log.info("hbone_refused", peer=conn.peer_addr, status=400, reason=reason)
            return
        identity = conn.peer_identity
        if identity is None:  # cannot happen: _verify runs before any request
            conn.respond(stream, 401, "no verified client identity")
            return
        req = ConnectRequest(
            authority=target.authority,
            host=target.host,
            port=target.port,
            peer_identity=identity,
            forwarded_for=target.forwarded_for,
            traceparent=target.traceparent,
            peer_addr=conn.peer_addr,
            local_addr=conn.local_addr,
            headers=target.headers,
        )
        tg = self._tg
        if tg is None:
            conn.respond(stream, 503, "server is shutting down")
            return
        tg.create_task(self._serve(conn, stream, req))

    async def _serve(self, conn: HboneConnection, stream: HboneStream, req: ConnectRequest) -> None:
        try:
            decision = await self._handler(req)
        except Exception as e:
            log.exception("hbone_handler_failed", authority=req.authority)
            decision = Refuse(503, f"handler failed: {e}")
        if stream.reset_code is not None:
            if isinstance(decision, Accept) and decision.sock is not None:
                decision.sock.close()
            return
        if isinstance(decision, Refuse):
            conn.respond(stream, decision.status, decision.reason)
            return
        conn.respond(stream, 200, headers=list(decision.headers))
        try:
            if decision.sock is not None:
                await stream.splice_socket(decision.sock)
            elif decision.serve is not None:
                await decision.serve(stream)
                if stream.reset_code is None:
                    stream.write_eof()
            else:
                stream.reset(ErrorCode.INTERNAL_ERROR)
        except HboneError as e:
            log.info("hbone_stream_ended", authority=req.authority, error=str(e))
        except Exception:
            log.exception("hbone_stream_failed", authority=req.authority)
            stream.reset(ErrorCode.INTERNAL_ERROR)
