"""CONNECT request building and validation for HBONE (pure functions, typed results).

Client side: `request_headers(authority, forwarded_for=..., traceparent=...)` builds the
header list (`:method CONNECT`, `:authority ip:port`, `forwarded: for="ip:port"`,
`traceparent`). Server side: `parse_connect(headers)` returns a `ConnectTarget` or a
`Refuse(400, reason)` following DESIGN section 4 (method CONNECT, authority `ip:port`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ztunnel.randomid import random_hex

if TYPE_CHECKING:
    import socket

    from ztunnel.hbone.stream import HboneStream
    from ztunnel.identity import SpiffeId

Headers = list[tuple[str, str]]


@dataclass(frozen=True)
class ConnectTarget:
    """A syntactically valid CONNECT request (what `parse_connect` accepts)."""

    authority: str
    host: str  # IP literal, IPv6 without brackets
    port: int
    forwarded_for: str | None  # the `for=` value, quotes removed, e.g. "10.0.0.1:4321"
    traceparent: str | None
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class ConnectRequest:
    """What the server's handler decides on: target, verified peer identity, origin."""

    authority: str
    host: str
    port: int
    peer_identity: SpiffeId
    forwarded_for: str | None
    traceparent: str | None
    peer_addr: tuple[str, int]
    local_addr: tuple[str, int]
    headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)


@dataclass(frozen=True)
class Refuse:
    """Answer the CONNECT with `status` (400 bad request, 401 denied, 503 unreachable)."""

    status: int
    reason: str


@dataclass(frozen=True)
class Accept:
    """Answer 200 and carry the stream's bytes.

    Exactly one of: `sock`, a connected TCP socket the server splices the stream to (and
    closes at the end); or `serve`, a coroutine function that gets the `HboneStream` and
    owns it until it returns (the waypoint parses HTTP inside the tunnel this way).
    """

    sock: socket.socket | None = None
    serve: Callable[[HboneStream], Awaitable[None]] | None = None
    headers: Sequence[tuple[str, str]] = ()


Decision = Accept | Refuse
Handler = Callable[[ConnectRequest], Awaitable[Decision]]

REASON_HEADER = "x-ambit-reason"


def parse_authority(authority: str) -> tuple[str, int] | None:
    """`ip:port` / `[v6]:port` -> (ip, port); None when it is not an IP literal and port."""
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0 or authority[end + 1 : end + 2] != ":":
            return None
        host, port_s = authority[1:end], authority[end + 2 :]
        version = 6
    else:
        host, sep, port_s = authority.rpartition(":")
        if not sep:
            return None
        version = 4
    if not port_s.isdigit() or len(port_s) > 5:
        return None
    port = int(port_s)
    if not 0 < port < 65536:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.version != version:
        return None
    return str(ip), port


def format_authority(host: str, port: int) -> str:
    """(ip, port) -> `ip:port`, IPv6 in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarded_for(ip: str, port: int | None = None) -> str:
    """RFC 7239 `for=` element, quoted (IPv6 in brackets): `for="[::1]:4000"`."""
    node = f"[{ip}]" if ":" in ip else ip
    if port is not None:
        node = f"{node}:{port}"
    return f'for="{node}"'


def new_traceparent() -> str:
    """A fresh W3C trace context: version 00, random trace and span ids, sampled."""
    ids = random_hex(24)  # 16 bytes of trace id, 8 of span id
    return f"00-{ids[:32]}-{ids[32:]}-01"


def request_headers(
    authority: str,
    *,
    forwarded: str | None = None,
    traceparent: str | None = None,
    extra: Sequence[tuple[str, str]] = (),
) -> Headers:
    """Header list of an HBONE CONNECT; `forwarded` is a full `for="..."` value."""
    headers: Headers = [(":method", "CONNECT"), (":authority", authority)]
    if forwarded:
        headers.append(("forwarded", forwarded))
    headers.append(("traceparent", traceparent or new_traceparent()))
    headers.extend(extra)
    return headers


def _forwarded_for_value(value: str) -> str | None:
    """The first `for=` node of a Forwarded header, quotes removed."""
    for element in value.split(","):
        for pair in element.split(";"):
            key, sep, val = pair.strip().partition("=")
            if sep and key.strip().lower() == "for":
                return val.strip().strip('"') or None
    return None


def parse_connect(headers: Sequence[tuple[str, str]]) -> ConnectTarget | Refuse:
    """Validate a request's headers per DESIGN section 4 (400 for wrong method/authority)."""
    method = authority = None
    fwd = tp = None
    for name, value in headers:
        if name == ":method":
            method = value
        elif name == ":authority":
            authority = value
        elif name == "forwarded" and fwd is None:
            fwd = _forwarded_for_value(value)
        elif name == "traceparent":
            tp = value
    if method != "CONNECT":
        return Refuse(400, f"method {method!r} is not CONNECT: HBONE only tunnels CONNECT")
    if authority is None:
        return Refuse(400, "CONNECT without :authority")
    target = parse_authority(authority)
    if target is None:
        return Refuse(400, f"authority {authority!r} is not ip:port")
    return ConnectTarget(authority, target[0], target[1], fwd, tp, tuple(headers))
