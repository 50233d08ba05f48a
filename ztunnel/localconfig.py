"""`--local-config FILE`: load a snapshot file, reload it on change, persist the last good one."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog
import yaml

T = TypeVar("T")
_log = structlog.get_logger("ztunnel.config")

POLL_INTERVAL = 0.2
PERSIST_NAME = "last-good-snapshot.yaml"


class ConfigError(Exception):
    """The configuration file could not be read or is invalid; the message says why."""


@dataclass(frozen=True)
class FileStamp:
    inode: int
    mtime_ns: int
    size: int


def stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileStamp(st.st_ino, st.st_mtime_ns, st.st_size)


def read_document(path: str) -> tuple[bytes, Any]:
    """Read a YAML or JSON document; raise ConfigError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        doc = yaml.safe_load(raw)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return raw, doc


def persist(data_dir: str, raw: bytes) -> str:
    """Atomically store the last good config document under `data_dir` (mode 0600)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    target = os.path.join(data_dir, PERSIST_NAME)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".snapshot-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def persisted_path(data_dir: str) -> str:
    return os.path.join(data_dir, PERSIST_NAME)


class LocalConfig(Generic[T]):
    """A snapshot file on disk; `parse` turns the document into the snapshot object.

    `load()` reads it now (raising ConfigError); `watch(apply)` polls for changes and
    calls `apply` with each new valid snapshot. An invalid edit is logged and ignored:
    the last good snapshot stays in force.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[dict[str, Any], str], T],
        *,
        data_dir: str | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self._parse = parse
        self._data_dir = data_dir
        self._poll = poll_interval
        self._stamp: FileStamp | None = None
        self.current: T | None = None
        self.document: dict[str, Any] | None = None
        self.errors = 0

    def load(self) -> T:
        st = stamp(self.path)
        raw, doc = read_document(self.path)
        try:
            snap = self._parse(doc, os.path.dirname(os.path.abspath(self.path)))
        except ConfigError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"config {self.path} is invalid: {exc}") from exc
        self._stamp = st
        self.current = snap
        self.document = doc
        if self._data_dir is not None:
            try:
                persist(self._data_dir, raw)
            except OSError as exc:
                _log.warning("cannot persist last good config", error=str(exc),
                             data_dir=self._data_dir)
        return snap

    def changed(self) -> bool:
        return stamp(self.path) != self._stamp

    async def watch(self, apply: Callable[[T], Awaitable[None]]) -> None:
        """Poll the file; on each change, parse and apply. Runs until cancelled."""
        while True:
            await asyncio.sleep(self._poll)
            if not self.changed():
                continue
            st = stamp(self.path)
            try:
                snap = self.load()
            except ConfigError as exc:
                self.errors += 1
                self._stamp = st  # don't retry the same broken content every poll
                _log.error("config reload failed; keeping the last good config", error=str(exc))
                continue
            _log.info("config reloaded", path=self.path)
            await apply(snap)
