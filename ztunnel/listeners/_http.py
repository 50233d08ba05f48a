"""A minimal HTTP/1.1 server for ztunnel's local endpoints (admin, metrics, readiness)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

MAX_HEADER = 16 * 1024
MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            500: "Internal Server Error", 503: "Service Unavailable"}


def bind_tcp(host: str, port: int, *, reuse_port: bool = True) -> socket.socket:
    """A listening TCP socket; SO_REUSEPORT lets a new process take over during restarts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot bind {host}:{port}: {exc.strerror}: is another process "
                "(not a ztunnel) using the port?"
            ) from exc
        sock.listen(128)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class HttpListener:
    """Serves `handler` on a bound listening socket until drained."""

    def __init__(self, sock: socket.socket, handler: Handler) -> None:
        self._sock = sock
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        host, port = sock.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)

    async def run(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=self._sock)
        try:
            await self._stopped.wait()
        finally:
            self._server.close()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        self._stopped.set()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                req = self._parse(head)
                if req is None:
                    await self._write(writer, Response(400, b"malformed request\n"), False)
                    return
                method, target, headers = req
                length = int(headers.get("content-length", "0") or 0)
                if length > MAX_BODY:
                    await self._write(writer, Response(400, b"body too large\n"), False)
                    return
                body = await reader.readexactly(length) if length else b""
                parts = urlsplit(target)
                request = Request(method, parts.path, parse_qs(parts.query), headers, body)
                try:
                    resp = await self._handler(request)
                except Exception as exc:
                    resp = Response(500, f"internal error: {exc}\n".encode())
                keep = headers.get("connection", "").lower() != "close"
                await self._write(writer, resp, keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _parse(head: bytes) -> tuple[str, str, dict[str, str]] | None:
        try:
            lines = head.decode("latin-1").split("\r\n")
            method, target, _version = lines[0].split(" ", 2)
        except ValueError:
            return None
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                return None
            headers[name.strip().lower()] = value.strip()
        return method.upper(), target, headers

    @staticmethod
    async def _write(writer: asyncio.StreamWriter, resp: Response, keep: bool) -> None:
        reason = _REASONS.get(resp.status, "Unknown")
        hdrs = {
            "Content-Type": resp.content_type,
            "Content-Length": str(len(resp.body)),
            "Connection": "keep-alive" if keep else "close",
            **resp.headers,
        }
        head = f"HTTP/1.1 {resp.status} {reason}\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in hdrs.items()
        )
        writer.write(head.encode("latin-1") + b"\r\n" + resp.body)
        await writer.drain()
