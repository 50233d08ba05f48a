"""HBONE error type: one exception with an actionable message and retry hints."""

from __future__ import annotations


class HboneError(Exception):
    """An HBONE tunnel could not be opened or broke; the message says what to check.

    `status` is the CONNECT response status when the server refused (401, 503, ...);
    `refused` is True when the stream was refused before any byte was sent (safe to
    retry on another connection).
    """

    def __init__(self, message: str, *, status: int | None = None, refused: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.refused = refused
