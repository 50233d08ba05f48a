"""SQLite (WAL) resource store: atomic applies, monotonic versions, change history, VIPs."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from config.resources import (
    KINDS,
    FieldError,
    Resource,
    ResourceKey,
    ServiceSpec,
    WorkloadEntrySpec,
    check_label_key,
    check_label_value,
    parse_resource,
)
from config.validate import (
    DEFAULT_NAMESPACE,
    ROOT_NAMESPACE,
    Document,
    Problem,
    ValidationFailed,
    validate_batch,
)

DB_FILE = "store.db"
DEFAULT_SERVICE_CIDR = "10.96.0.0/16"
DEFAULT_HISTORY = 100_000


class NotFound(Exception):
    """The named resource does not exist."""


class Conflict(Exception):
    """The request contradicts the stored state (e.g. deleting a namespace that is in use)."""


class HistoryCompacted(Exception):
    """The requested version is older than the kept history: relist and watch from now."""


@dataclass(frozen=True)
class StoredResource:
    key: ResourceKey
    version: int  # version of the last change to this resource
    created: int  # version at which it was created
    body: Mapping[str, Any]

    def parse(self) -> Resource:
        return parse_resource(dict(self.body))

    def to_json(self) -> dict[str, Any]:
        out = copy.deepcopy(dict(self.body))
        md = out.setdefault("metadata", {})
        md["resourceVersion"] = str(self.version)
        return out


@dataclass(frozen=True)
class Change:
    version: int
    op: str  # "put" | "delete"
    key: ResourceKey
    body: Mapping[str, Any] | None  # None for deletes

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "op": self.op,
            "kind": self.key.kind,
            "namespace": self.key.namespace,
            "name": self.key.name,
            "body": self.body,
        }


@dataclass(frozen=True)
class ApplyResult:
    key: ResourceKey
    action: str  # created | configured | unchanged | deleted | labeled
    version: int

    def __str__(self) -> str:
        k = self.key
        info = KINDS.get(k.kind)
        kind = info.kind.lower() if info else k.kind.lower()
        return f"{kind}/{k.name} {self.action}" + (
            f" (namespace {k.namespace})" if k.namespace else ""
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.key.kind,
            "namespace": self.key.namespace,
            "name": self.key.name,
            "action": self.action,
            "version": self.version,
        }


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS resources(
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL,
    version INTEGER NOT NULL, created INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY(kind, namespace, name));
CREATE TABLE IF NOT EXISTS changes(
    version INTEGER PRIMARY KEY, op TEXT NOT NULL,
    kind TEXT NOT NULL, namespace TEXT NOT NULL, name TEXT NOT NULL, body TEXT);
CREATE TABLE IF NOT EXISTS vips(
    ip TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    UNIQUE(namespace, name));
CREATE TABLE IF NOT EXISTS addresses(
    ip TEXT PRIMARY KEY, namespace TEXT NOT NULL, name TEXT NOT NULL,
    UNIQUE(namespace, name));
"""


@dataclass
class _Watcher:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event = field(default_factory=asyncio.Event)


class Store:
    """The control plane's resources in one SQLite database (WAL) under a data directory.

    Thread-safe: every operation holds one lock; writers run one transaction each.
    """

    def __init__(
        self,
        data_dir: str,
        *,
        service_cidr: str = DEFAULT_SERVICE_CIDR,
        root_namespace: str = ROOT_NAMESPACE,
        history_limit: int = DEFAULT_HISTORY,
    ) -> None:
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        self.path = os.path.join(data_dir, DB_FILE)
        try:
            self.service_net = ipaddress.ip_network(service_cidr)
        except ValueError:
            raise ValueError(
                f"bad service range {service_cidr!r}: expected a CIDR like 10.96.0.0/16"
            ) from None
        self.root_namespace = root_namespace
        self.history_limit = history_limit
        self._lock = threading.RLock()
        self._watchers: list[_Watcher] = []
        # test-only: called after each row written during apply (crash-safety tests)
        self.after_write_hook: Callable[[int], None] | None = None
        self._vip_cursor = 0
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        os.chmod(self.path, 0o600)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        # reads use their own connection: in WAL mode they never wait for a writer
        self._rlock = threading.Lock()
        self._rdb = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._backfill_addresses()
        self._ensure_builtin_namespaces()

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        with self._lock, self._rlock:
            self._rdb.close()
            self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _backfill_addresses(self) -> None:
        """Index WorkloadEntry addresses of a database written before they were indexed."""
        with self._lock:
            if self._db.execute("SELECT 1 FROM addresses LIMIT 1").fetchone() is not None:
                return
            rows = self._db.execute(
                "SELECT namespace, name, body FROM resources WHERE kind='WorkloadEntry'"
            ).fetchall()
            if not rows:
                return
            self._db.execute("BEGIN IMMEDIATE")
            for ns, name, body in rows:
                addr = json.loads(body).get("spec", {}).get("address")
                if addr:
                    self._db.execute(
                        "INSERT OR IGNORE INTO addresses(ip, namespace, name) VALUES(?,?,?)",
                        (addr, ns, name),
                    )
            self._db.execute("COMMIT")

    def _ensure_builtin_namespaces(self) -> None:
        docs = []
        for ns in (DEFAULT_NAMESPACE, self.root_namespace):
            if self.get("Namespace", "", ns) is None:
                docs.append(
                    Document(
                        "<builtin>",
                        1,
                        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}},
                    )
                )
        if docs:
            self.apply(docs)

    # -- reads ---------------------------------------------------------------------------

    @property
    def version(self) -> int:
        with self._rlock:
            return self._meta_int("version", 0, self._rdb)

    @property
    def history_floor(self) -> int:
        """The oldest version `changes_since` can resume from."""
        with self._rlock:
            return self._meta_int("floor", 0, self._rdb)

    def _meta_int(self, key: str, default: int, db: sqlite3.Connection | None = None) -> int:
        row = (db or self._db).execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else default

    def _set_meta(self, key: str, value: object) -> None:
        self._db.execute(
            "INSERT INTO meta(key, value) VALUES(?, ?) ON CONFLICT(key) DO UPDATE "
            "SET value=excluded.value",
            (key, str(value)),
        )

    def get(self, kind: str, namespace: str, name: str) -> StoredResource | None:
        with self._rlock:
            row = self._rdb.execute(
                "SELECT kind, namespace, name, version, created, body FROM resources "
                "WHERE kind=? AND namespace=? AND name=?",
                (kind, namespace, name),
            ).fetchone()
        return _row(row) if row else None

    def list_resources(
        self, kind: str | None = None, namespace: str | None = None
    ) -> list[StoredResource]:
        q = "SELECT kind, namespace, name, version, created, body FROM resources"
        cond: list[str] = []
        args: list[str] = []
        if kind is not None:
            cond.append("kind=?")
            args.append(kind)
        if namespace is not None:
            cond.append("namespace=?")
            args.append(namespace)
        if cond:
            q += " WHERE " + " AND ".join(cond)
        q += " ORDER BY kind, namespace, name"
        with self._rlock:
            rows = self._rdb.execute(q, args).fetchall()
        return [_row(r) for r in rows]

    def snapshot(self) -> tuple[int, list[StoredResource]]:
        """Every resource and the version they are consistent with (for a full compute)."""
        with self._rlock:
            self._rdb.execute("BEGIN")
            try:
                v = self._meta_int("version", 0, self._rdb)
                rows = self._rdb.execute(
                    "SELECT kind, namespace, name, version, created, body "
                    "FROM resources ORDER BY kind, namespace, name"
                ).fetchall()
            finally:
                self._rdb.execute("COMMIT")
        return v, [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        with self._rlock:
            rows = self._rdb.execute(
                "SELECT kind, count(*) FROM resources GROUP BY kind"
            ).fetchall()
        return {str(k): int(n) for k, n in rows}

    def changes_since(self, version: int, limit: int = 10_000) -> list[Change]:
        """Changes with a version above `version`, oldest first; HistoryCompacted if too old."""
        with self._rlock:
            floor = self._meta_int("floor", 0, self._rdb)
            if version < floor:
                raise HistoryCompacted(
                    f"version {version} is older than the kept history (from {floor}): "
                    "relist everything and watch from the current version"
                )
            rows = self._rdb.execute(
                "SELECT version, op, kind, namespace, name, body FROM changes WHERE version>? "
                "ORDER BY version LIMIT ?",
                (version, limit),
            ).fetchall()
        return [
            Change(int(v), str(op), ResourceKey(k, ns, n), json.loads(b) if b is not None else None)
            for v, op, k, ns, n, b in rows
        ]

    async def watch(self, since: int) -> AsyncIterator[Change]:
        """Yield every change after `since`, then wait for new ones (forever)."""
        w = _Watcher(asyncio.get_running_loop())
        with self._lock:
            self._watchers.append(w)
        try:
            pos = since
            while True:
                w.event.clear()
                batch = self.changes_since(pos)
                for ch in batch:
                    pos = ch.version
                    yield ch
                if not batch:
                    await w.event.wait()
        finally:
            with self._lock:
                self._watchers.remove(w)

    def _notify(self) -> None:
        for w in list(self._watchers):
            with contextlib.suppress(RuntimeError):  # the watcher's loop is closed
                w.loop.call_soon_threadsafe(w.event.set)

    # -- writes --------------------------------------------------------------------------

    def _exists(self, key: ResourceKey) -> bool:
        return (
            self._db.execute(
                "SELECT 1 FROM resources WHERE kind=? AND namespace=? AND name=?",
                (key.kind, key.namespace, key.name),
            ).fetchone()
            is not None
        )

    def apply(self, docs: Sequence[Document], *, dry_run: bool = False) -> list[ApplyResult]:
        """Validate and store every document in one transaction: all of them or none."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                results = self._apply_tx(docs)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            if dry_run:
                self._db.execute("ROLLBACK")
                return results
            self._db.execute("COMMIT")
            self._notify()
            return results

    def _apply_tx(self, docs: Sequence[Document]) -> list[ApplyResult]:
        parsed = validate_batch(docs, self._exists)
        version = self._meta_int("version", 0)
        problems: list[Problem] = []
        results: list[ApplyResult] = []
        used_vips: set[str] | None = None
        self._vip_cursor = 0
        writes = 0
        for doc, res in parsed:
            key = res.key
            body: dict[str, Any] = copy.deepcopy(dict(res.body))
            if isinstance(res.spec, WorkloadEntrySpec):
                err = self._assign_address(key, res.spec.address)
                if err:
                    problems.append(Problem(doc.source, doc.index, str(key), "spec.address", err))
                    continue
            if isinstance(res.spec, ServiceSpec):
                if used_vips is None:
                    used_vips = {
                        r[0]
                        for r in self._db.execute(
                            "SELECT ip FROM vips UNION SELECT ip FROM addresses"
                        )
                    }
                vip, err = self._assign_vip(key, res.spec.cluster_ip, used_vips)
                if err:
                    problems.append(Problem(doc.source, doc.index, str(key), "spec.clusterIP", err))
                    continue
                body.setdefault("spec", {})["clusterIP"] = vip
            row = self._db.execute(
                "SELECT version, created, body FROM resources WHERE kind=? AND namespace=? "
                "AND name=?",
                (key.kind, key.namespace, key.name),
            ).fetchone()
            if row is not None and json.loads(row[2]) == body:
                results.append(ApplyResult(key, "unchanged", int(row[0])))
                continue
            version += 1
            text = json.dumps(body, sort_keys=True, separators=(",", ":"))
            created = version if row is None else int(row[1])
            self._db.execute(
                "INSERT INTO resources(kind, namespace, name, version, created, body) "
                "VALUES(?,?,?,?,?,?) ON CONFLICT(kind, namespace, name) DO UPDATE SET "
                "version=excluded.version, body=excluded.body",
                (key.kind, key.namespace, key.name, version, created, text),
            )
            self._db.execute(
                "INSERT INTO changes(version, op, kind, namespace, name, body) "
                "VALUES(?, 'put', ?, ?, ?, ?)",
                (version, key.kind, key.namespace, key.name, text),
            )
            writes += 1
            if self.after_write_hook is not None:
                self.after_write_hook(writes)
            results.append(ApplyResult(key, "created" if row is None else "configured", version))
        if problems:
            raise ValidationFailed(problems)
        self._finish_tx(version)
        return results

    def _assign_address(self, key: ResourceKey, address: str) -> str:
        """Claim `address` for a WorkloadEntry; an error text when another object has it."""
        owner = self._db.execute(
            "SELECT namespace, name FROM addresses WHERE ip=?", (address,)
        ).fetchone()
        if owner is not None and (owner[0], owner[1]) != (key.namespace, key.name):
            return (
                f"{address} is already the address of WorkloadEntry {owner[0]}/{owner[1]}: "
                "every workload needs its own address"
            )
        vip = self._db.execute("SELECT namespace, name FROM vips WHERE ip=?", (address,)).fetchone()
        if vip is not None:
            return f"{address} is the VIP of Service {vip[0]}/{vip[1]}: use another address"
        self._db.execute(
            "DELETE FROM addresses WHERE namespace=? AND name=?", (key.namespace, key.name)
        )
        self._db.execute(
            "INSERT INTO addresses(ip, namespace, name) VALUES(?,?,?)",
            (address, key.namespace, key.name),
        )
        return ""

    def _assign_vip(self, key: ResourceKey, explicit: str, used: set[str]) -> tuple[str, str]:
        cur = self._db.execute(
            "SELECT ip FROM vips WHERE namespace=? AND name=?", (key.namespace, key.name)
        ).fetchone()
        current = str(cur[0]) if cur else ""
        if explicit:
            if explicit == current:
                return explicit, ""
            owner = self._db.execute(
                "SELECT namespace, name FROM vips WHERE ip=?", (explicit,)
            ).fetchone()
            if owner is not None:
                return "", (
                    f"{explicit} is already the VIP of Service {owner[0]}/{owner[1]}: "
                    "choose another address or omit clusterIP to get one allocated"
                )
            wl = self._db.execute(
                "SELECT namespace, name FROM addresses WHERE ip=?", (explicit,)
            ).fetchone()
            if wl is not None:
                return "", (
                    f"{explicit} is the address of WorkloadEntry {wl[0]}/{wl[1]}: "
                    "choose another address or omit clusterIP to get one allocated"
                )
            vip = explicit
        elif current:
            return current, ""
        else:
            vip = self._free_vip(used)
            if not vip:
                return "", (
                    f"the service range {self.service_net} is exhausted: delete "
                    "unused Services or start the control plane with a larger range"
                )
        if current:
            used.discard(current)
            self._db.execute("DELETE FROM vips WHERE ip=?", (current,))
        used.add(vip)
        self._db.execute(
            "INSERT INTO vips(ip, namespace, name) VALUES(?,?,?)", (vip, key.namespace, key.name)
        )
        return vip, ""

    def _free_vip(self, used: set[str]) -> str:
        """The lowest free address of the service range ("" when it is full).

        Scans on from the last allocation of this apply, so a batch of N services costs
        O(N + used) rather than O(N * used).
        """
        net = self.service_net
        base = int(net.network_address)
        first, last = (
            (1, net.num_addresses - 2) if net.num_addresses > 2 else (0, net.num_addresses - 1)
        )
        off = max(first, self._vip_cursor)
        while off <= last:
            text = str(ipaddress.ip_address(base + off))
            if text not in used:
                self._vip_cursor = off + 1
                return text
            off += 1
        return ""

    def _finish_tx(self, version: int) -> None:
        self._set_meta("version", version)
        floor = self._meta_int("floor", 0)
        if version - floor > self.history_limit:
            new_floor = version - self.history_limit
            self._db.execute("DELETE FROM changes WHERE version<=?", (new_floor,))
            self._set_meta("floor", new_floor)

    def delete(self, keys: Iterable[ResourceKey]) -> list[ApplyResult]:
        """Delete resources in one transaction; NotFound/Conflict leave everything in place."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                results = self._delete_tx(keys)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            self._notify()
            return results

    def _delete_tx(self, keys: list[ResourceKey]) -> list[ApplyResult]:
        missing = [str(k) for k in keys if not self._exists(k)]
        if missing:
            raise NotFound(f"not found: {', '.join(missing)}")
        deleting = set(keys)
        for k in keys:
            if k.kind != "Namespace":
                continue
            if k.name in (DEFAULT_NAMESPACE, self.root_namespace):
                raise Conflict(f"namespace {k.name!r} is built in and cannot be deleted")
            rows = self._db.execute(
                "SELECT kind, namespace, name FROM resources WHERE namespace=?", (k.name,)
            ).fetchall()
            left = [r for r in rows if ResourceKey(*r) not in deleting]
            if left:
                raise Conflict(
                    f"namespace {k.name!r} still holds {len(left)} resource(s) "
                    f"(e.g. {ResourceKey(*left[0])}): delete them first"
                )
        version = self._meta_int("version", 0)
        out = []
        for k in keys:
            version += 1
            self._db.execute(
                "DELETE FROM resources WHERE kind=? AND namespace=? AND name=?",
                (k.kind, k.namespace, k.name),
            )
            if k.kind == "Service":
                self._db.execute(
                    "DELETE FROM vips WHERE namespace=? AND name=?", (k.namespace, k.name)
                )
            if k.kind == "WorkloadEntry":
                self._db.execute(
                    "DELETE FROM addresses WHERE namespace=? AND name=?", (k.namespace, k.name)
                )
            self._db.execute(
                "INSERT INTO changes(version, op, kind, namespace, name, body) "
                "VALUES(?, 'delete', ?, ?, ?, NULL)",
                (version, k.kind, k.namespace, k.name),
            )
            out.append(ApplyResult(k, "deleted", version))
        self._finish_tx(version)
        return out

    def label(
        self, key: ResourceKey, set_labels: Mapping[str, str], remove: Sequence[str] = ()
    ) -> ApplyResult:
        """Set and remove labels of one resource (a new version, like an apply)."""
        for k, v in set_labels.items():
            try:
                check_label_key(k, f"metadata.labels.{k}")
                check_label_value(k, v, f"metadata.labels.{k}")
            except FieldError as e:
                raise ValidationFailed(
                    [Problem("<label>", 1, str(key), e.path, e.message)]
                ) from None
        with self._lock:
            cur = self.get(key.kind, key.namespace, key.name)
            if cur is None:
                raise NotFound(f"not found: {key}")
            body = copy.deepcopy(dict(cur.body))
            labels = dict(body.get("metadata", {}).get("labels", {}))
            missing = [k for k in remove if k not in labels]
            if missing:
                raise NotFound(f"{key} has no label {missing[0]!r}")
            for k in remove:
                labels.pop(k, None)
            labels.update(set_labels)
            md = body.setdefault("metadata", {})
            if labels:
                md["labels"] = labels
            else:
                md.pop("labels", None)
            res = self.apply([Document("<label>", 1, body)])
        r = res[0]
        return ApplyResult(r.key, "labeled" if r.action != "unchanged" else "unchanged", r.version)


def _row(r: Any) -> StoredResource:
    kind, ns, name, version, created, body = r
    return StoredResource(ResourceKey(kind, ns, name), int(version), int(created), json.loads(body))
