"""Admin endpoint on 127.0.0.1:15000: /config_dump, /certs, /logging, /quitquitquit."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from typing import Any

from ztunnel import log
from ztunnel.listeners._http import HttpListener, Request, Response, bind_tcp

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
    ) -> None:
        self._config_dump = config_dump
        self._certs = certs
        self._quit = quit
        self.level = "info"
        super().__init__(sock if sock is not None else bind_tcp(host, port), self._handle)

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
            log.set_level(level)
            self.level = level
        return Response(200, f"current log level is {self.level}\n".encode())
