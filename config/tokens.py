"""Join tokens: single-use, expiring secrets that bind a node (or waypoint) to its first cert."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_TTL",
    "TOKEN_PREFIX",
    "TokenError",
    "TokenInfo",
    "TokenStore",
    "create_command",
    "validate_subject",
]

DEFAULT_TTL = 3600.0
TOKEN_PREFIX = "ambit-join."
_NODE_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash TEXT PRIMARY KEY,   -- sha256 of the whole token; the token itself is never stored
    subject    TEXT NOT NULL,      -- node name, or NS/NAME of a waypoint
    created    REAL NOT NULL,
    expires    REAL NOT NULL,
    used       REAL                -- when it was redeemed (single use)
)
"""


class TokenError(Exception):
    """A token cannot be redeemed; the message says what to do."""


def validate_subject(subject: str) -> str:
    """A node name (DNS subdomain) or a waypoint `NS/NAME`; ValueError otherwise."""
    if "/" in subject:
        ns, _, name = subject.partition("/")
        if not _NAME_RE.match(ns) or not _NAME_RE.match(name):
            raise ValueError(
                f"waypoint {subject!r} must be NAMESPACE/NAME with lowercase DNS labels"
            )
        return subject
    if not _NODE_RE.match(subject):
        raise ValueError(
            f"node name {subject!r} must be a lowercase DNS subdomain "
            "(letters, digits, '-' and '.')"
        )
    return subject


def create_command(subject: str) -> str:
    """The command an operator runs to get a new token for `subject`."""
    flag = "--waypoint" if "/" in subject else "--node"
    return f"`ambit token create {flag} {subject}`"


def _describe(subject: str) -> str:
    return f"waypoint {subject}" if "/" in subject else f"node {subject}"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class TokenInfo:
    """What `ambit token list` shows: never the token, only a short id of its hash."""

    id: str
    subject: str
    created: float
    expires: float
    used: float | None


class TokenStore:
    """Join tokens in a SQLite table (WAL) of the control plane's database file."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        if new:
            # create it private: the table holds only hashes, but the file may hold more
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.execute(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def create(self, node: str, ttl: float = DEFAULT_TTL, now: float | None = None) -> str:
        """A new single-use token for `node` (or waypoint `NS/NAME`) valid for `ttl` seconds.

        The token is returned once and only its SHA-256 is stored.
        """
        validate_subject(node)
        if ttl <= 0:
            raise ValueError(f"token ttl must be positive, got {ttl:g}s")
        now = time.time() if now is None else now
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as db:
            db.execute(
                "INSERT INTO join_tokens(token_hash, subject, created, expires) VALUES (?,?,?,?)",
                (_hash(token), node, now, now + ttl),
            )
        return token

    def redeem(self, token: str, node: str, now: float | None = None) -> None:
        """Consume `token` for `node`; TokenError when unknown, used, expired or not its node.

        A failed redemption does not consume the token.
        """
        now = time.time() if now is None else now
        digest = _hash(token.strip())
        with self._tx() as db:
            row = db.execute(
                "SELECT token_hash, subject, expires, used FROM join_tokens WHERE token_hash = ?",
                (digest,),
            ).fetchone()
            if row is None or not hmac.compare_digest(row[0], digest):
                raise TokenError(
                    f"unknown join token: create one with {create_command(node)} "
                    "and pass it with --token"
                )
            _, subject, expires, used = row
            if used is not None:
                raise TokenError(
                    f"join token was already used ({_describe(subject)} joined with it): "
                    f"tokens are single use, create a new one with {create_command(subject)}"
                )
            if subject != node:
                raise TokenError(
                    f"join token is bound to {_describe(subject)}, not {_describe(node)}: "
                    f"create one with {create_command(node)}"
                )
            if now >= expires:
                raise TokenError(f"token expired: create a new one with {create_command(node)}")
            db.execute("UPDATE join_tokens SET used = ? WHERE token_hash = ?", (now, digest))

    def list(self) -> list[TokenInfo]:
        rows = self._db.execute(
            "SELECT token_hash, subject, created, expires, used FROM join_tokens ORDER BY created"
        ).fetchall()
        return [TokenInfo(r[0][:12], r[1], r[2], r[3], r[4]) for r in rows]

    def revoke(self, token_id: str) -> bool:
        """Delete tokens whose hash id starts with `token_id` (from `list`)."""
        if len(token_id) < 8:
            raise ValueError("give at least 8 characters of the token id")
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM join_tokens WHERE substr(token_hash, 1, ?) = ?",
                (len(token_id), token_id),
            )
        return cur.rowcount > 0

    def purge(self, now: float | None = None, keep: float = 7 * 86400) -> int:
        """Drop tokens that expired (or were used) more than `keep` seconds ago."""
        now = time.time() if now is None else now
        with self._tx() as db:
            cur = db.execute(
                "DELETE FROM join_tokens WHERE expires < ? OR (used IS NOT NULL AND used < ?)",
                (now - keep, now - keep),
            )
        return cur.rowcount
