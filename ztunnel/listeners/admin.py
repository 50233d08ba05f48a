"""Admin endpoint on 127.0.0.1:15000: /config_dump, /certs, /logging, /quitquitquit.

Reading is open to local clients; changing anything (POST /quitquitquit, POST
/logging?level=) is for root only: with ztunnel in the host network namespace any
local user can reach 127.0.0.1, and must not be able to stop the node's proxy. TCP has
no SO_PEERCRED, so the caller's uid is the owner of its socket in /proc/net/tcp[6].
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from typing import Any

import structlog

from ztunnel import log
from ztunnel.listeners._http import HttpListener, Request, Response, bind_tcp, tcp_peer_uid

LEVELS = ("debug", "info", "warning", "error")
_SECRET_KEYS = {"key", "private_key", "privatekey", "key_pem", "ca_key", "cakey", "token"}


def redact(value: Any) -> Any:
    """Drop private keys and tokens from a JSON-like structure (for /config_dump)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            lk = str(k).lower().replace("-", "_")
            if lk in _SECRET_KEYS or lk.endswith("_key_pem") or lk.endswith("private_key"):
                out[k] = "<redacted>"
            else:
                out[k] = redact(v)
        return out
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str) and "PRIVATE KEY-----" in value:
        return "<redacted>"
    return value


def _json(obj: Any) -> Response:
    return Response(
        200, (json.dumps(obj, indent=2, default=str) + "\n").encode(), "application/json"
    )


class AdminListener(HttpListener):
    """Operator endpoints; bound to loopback only."""

    def __init__(
        self,
        config_dump: Callable[[], Any],
        certs: Callable[[], Any],
        quit: Callable[[], None],
        *,
        host: str = "127.0.0.1",
        port: int = 15000,
        sock: socket.socket | None = None,
        admin_uids: frozenset[int] | None = None,
        peer_uid: Callable[[tuple[str, int], tuple[str, int]], int | None] = tcp_peer_uid,
    ) -> None:
        # Who may change things: root and the uid ztunnel runs as (a non-root ztunnel
        # with capabilities can still be stopped by its own user).
        self.admin_uids = admin_uids if admin_uids is not None else frozenset({0, os.geteuid()})
        self._peer_uid = peer_uid
        self._config_dump = config_dump
        self._certs = certs
        self._quit = quit
        self.level = "info"
        super().__init__(sock if sock is not None else bind_tcp(host, port), self._handle)

    def _forbidden(self, req: Request) -> Response | None:
        """403 unless the caller's socket belongs to an admin uid (root)."""
        uid = None
        if req.peer is not None and req.local is not None:
            uid = self._peer_uid(req.local, req.peer)
        if uid is not None and uid in self.admin_uids:
            return None
        who = "an unknown user" if uid is None else f"uid {uid}"
        structlog.get_logger("ztunnel.admin").warning(
            "admin change refused", path=req.path, caller=who,
            peer=f"{req.peer[0]}:{req.peer[1]}" if req.peer else None)
        return Response(403, (
            f"{req.method} {req.path} is refused for {who}: changing ztunnel needs root "
            "(run the request as root on the node)\n").encode())

    async def _handle(self, req: Request) -> Response:
        if req.path == "/config_dump":
            return _json(redact(self._config_dump()))
        if req.path == "/certs":
            return _json(self._certs())
        if req.path == "/logging":
            return self._logging(req)
        if req.path == "/quitquitquit":
            if req.method != "POST":
                return Response(405, b"use POST /quitquitquit\n")
            if (refused := self._forbidden(req)) is not None:
                return refused
            self._quit()
            return Response(200, b"OK\n")
        if req.path == "/":
            return Response(200, b"/config_dump\n/certs\n/logging[?level=LEVEL]\n/quitquitquit\n")
        return Response(404, b"unknown path: try / for the list\n")

    def _logging(self, req: Request) -> Response:
        wanted = req.query.get("level")
        if wanted:
            level = wanted[0].lower()
            if level not in LEVELS:
                return Response(400, f"unknown level {level!r}: use one of {LEVELS}\n".encode())
            if req.method != "POST":
                return Response(405, b"use POST /logging?level=LEVEL to change the level\n")
            if (refused := self._forbidden(req)) is not None:
                return refused
            log.set_level(level)
            self.level = level
        return Response(200, f"current log level is {self.level}\n".encode())
