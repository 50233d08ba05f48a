"""A minimal HTTP/1.1 server for ztunnel's local endpoints (admin, metrics, readiness)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

MAX_HEADER = 16 * 1024
MAX_BODY = 1 << 20
# A client that sends nothing for this long (mid-request or between keep-alive requests)
# is disconnected: an idle local connection must not hold a task and a socket forever.
IDLE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    # (host, port) of the client and of our end, as the accepted socket saw them
    peer: tuple[str, int] | None = None
    local: tuple[str, int] | None = None


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Awaitable[Response]]

_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 500: "Internal Server Error",
            503: "Service Unavailable"}


def content_length(value: str | None) -> int | None:
    """The body length a Content-Length header announces; None when it is not a plain
    non-negative decimal (a malformed request: answer 400)."""
    if value is None or value == "":
        return 0
    text = value.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 18:
        return None
    return int(text)


def _proc_net_address(host: str, port: int) -> tuple[str, str]:
    """`host:port` as /proc/net/tcp (IPv4) or /proc/net/tcp6 spells it: (file, 'HEX:PORT').

    The kernel prints each 32-bit word of the address in host byte order.
    """
    ip = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # a v4 client of a dual-stack listener has an AF_INET socket
    packed = ip.packed
    words = struct.unpack(f"={len(packed) // 4}I", packed)
    name = "tcp" if len(packed) == 4 else "tcp6"
    return name, "".join(f"{w:08X}" for w in words) + f":{port:04X}"


def tcp_peer_uid(local: tuple[str, int], peer: tuple[str, int],
                 proc_net: str = "/proc/self/net") -> int | None:
    """The uid owning the client end of a loopback TCP connection, or None if not found.

    TCP has no SO_PEERCRED; for a client on this host (same network namespace) its
    socket is listed in /proc/net/tcp[6] with local address = our peer and remote
    address = our local address, and with the owner's uid.
    """
    name, want_local = _proc_net_address(*peer)
    _, want_remote = _proc_net_address(*local)
    try:
        with open(f"{proc_net}/{name}") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if len(fields) > 7 and fields[1] == want_local and fields[2] == want_remote:
                    return int(fields[7])
    except (OSError, ValueError):
        return None
    return None


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

    def __init__(
        self, sock: socket.socket, handler: Handler, *, idle_timeout: float = IDLE_TIMEOUT
    ) -> None:
        self._sock = sock
        self._handler = handler
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._stopped = asyncio.Event()
        host, port = sock.getsockname()[:2]
        self.address: tuple[str, int] = (host, port)

    def close(self) -> None:
        """Release the socket of a listener that never ran (or stop one that does)."""
        self._stopped.set()
        if self._server is not None:
            self._server.close()
        self._sock.close()

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
        peername = writer.get_extra_info("peername")
        sockname = writer.get_extra_info("sockname")
        peer = (str(peername[0]), int(peername[1])) if peername else None
        local = (str(sockname[0]), int(sockname[1])) if sockname else None
        try:
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        head = await reader.readuntil(b"\r\n\r\n")
                except TimeoutError:
                    return
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                req = self._parse(head)
                if req is None:
                    await self._write(writer, Response(400, b"malformed request\n"), False)
                    return
                method, target, headers = req
                length = content_length(headers.get("content-length"))
                if length is None:
                    await self._write(writer, Response(
                        400, b"bad Content-Length: send a non-negative decimal length\n"), False)
                    return
                if length > MAX_BODY:
                    await self._write(writer, Response(400, b"body too large\n"), False)
                    return
                try:
                    async with asyncio.timeout(self.idle_timeout):
                        body = await reader.readexactly(length) if length else b""
                except TimeoutError:
                    await self._write(writer, Response(
                        408, b"request body not received in time\n"), False)
                    return
                parts = urlsplit(target)
                request = Request(method, parts.path, parse_qs(parts.query), headers, body,
                                  peer, local)
                try:
                    resp = await self._handler(request)
                except Exception as exc:
                    resp = Response(500, f"internal error: {exc}\n".encode())
                keep = headers.get("connection", "").lower() != "close"
                await self._write(writer, resp, keep)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
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
        async with asyncio.timeout(IDLE_TIMEOUT):  # a client that does not read
            await writer.drain()
