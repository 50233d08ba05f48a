"""Readiness on 15021: /healthz/ready is 200 once config, certificates and listeners are up."""

from __future__ import annotations

import socket

from ztunnel.listeners._http import HttpListener, Request, Response, bind_tcp


class Readiness:
    """Named conditions that must all hold before the proxy reports ready."""

    def __init__(self, *required: str) -> None:
        self._pending: set[str] = set(required)

    def require(self, name: str) -> None:
        self._pending.add(name)

    def mark(self, name: str, ok: bool = True) -> None:
        if ok:
            self._pending.discard(name)
        else:
            self._pending.add(name)

    @property
    def ready(self) -> bool:
        return not self._pending

    @property
    def pending(self) -> list[str]:
        return sorted(self._pending)


class ReadyListener(HttpListener):
    """GET /healthz/ready: 200 "ready" or 503 listing what is not ready yet."""

    def __init__(
        self,
        readiness: Readiness,
        *,
        host: str = "0.0.0.0",
        port: int = 15021,
        sock: socket.socket | None = None,
    ) -> None:
        self.readiness = readiness
        self.draining = False
        super().__init__(sock if sock is not None else bind_tcp(host, port), self._handle)

    async def _handle(self, req: Request) -> Response:
        if req.path != "/healthz/ready":
            return Response(404, b"try /healthz/ready\n")
        if self.draining:
            return Response(503, b"not ready: draining\n")
        if self.readiness.ready:
            return Response(200, b"ready\n")
        return Response(503, ("not ready: " + ", ".join(self.readiness.pending) + "\n").encode())
