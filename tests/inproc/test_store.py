"""The SQLite store: atomic applies, versions, history, watch, VIPs (real SQLite files)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from config.resources import ResourceKey
from config.store import Conflict, HistoryCompacted, NotFound, Store
from config.validate import Document, ValidationFailed, load_text

NS = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n"


def svc(name: str, cluster_ip: str = "", ns: str = "shop", port: int = 80) -> str:
    ip = f"clusterIP: {cluster_ip}, " if cluster_ip else ""
    return (
        f"apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\n"
        f"spec: {{{ip}selector: {{app: {name}}}, ports: [{{port: {port}}}]}}\n"
    )


def docs(*texts: str, source: str = "m.yaml") -> list[Document]:
    return load_text("---\n".join(texts), source)


def test_apply_creates_then_reports_unchanged_and_configured(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        base = s.version
        r = s.apply(docs(NS, svc("web")))
        assert [(x.action, x.version) for x in r] == [("created", base + 1), ("created", base + 2)]
        assert s.version == base + 2
        r = s.apply(docs(NS, svc("web")))
        assert [x.action for x in r] == ["unchanged", "unchanged"]
        assert s.version == base + 2
        r = s.apply(docs(svc("web", port=8080)))
        assert [(x.action, x.version) for x in r] == [("configured", base + 3)]
        got = s.get("Service", "shop", "web")
        assert got is not None and got.version == base + 3 and got.created == base + 2
        assert got.body["spec"]["ports"] == [{"port": 8080}]


def test_one_bad_document_applies_nothing(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        before = s.version
        bad = svc("db").replace("port: 80", "port: 0")
        with pytest.raises(ValidationFailed, match=r"document 3 .*spec\.ports\[0\]\.port"):
            s.apply(docs(NS, svc("web"), bad))
        assert s.version == before
        assert s.get("Namespace", "", "shop") is None
        assert s.get("Service", "shop", "web") is None
        assert s.changes_since(before) == []


def test_resources_need_their_namespace(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        with pytest.raises(ValidationFailed, match="namespace 'shop' does not exist"):
            s.apply(docs(svc("web")))
        s.apply(docs(NS))
        s.apply(docs(svc("web")))  # namespace from an earlier apply counts
        assert s.get("Namespace", "", "default") is not None  # built in


def test_vips_allocated_stable_across_restart_and_conflicts_rejected(tmp_path: Path) -> None:
    with Store(str(tmp_path), service_cidr="10.50.0.0/24") as s:
        s.apply(docs(NS, svc("a"), svc("b"), svc("c", cluster_ip="10.50.0.9")))
        vips = {
            n: s.get("Service", "shop", n).body["spec"]["clusterIP"]  # type: ignore[union-attr]
            for n in "abc"
        }
        assert vips == {"a": "10.50.0.1", "b": "10.50.0.2", "c": "10.50.0.9"}
        with pytest.raises(ValidationFailed) as info:
            s.apply(docs(svc("d", cluster_ip="10.50.0.2")))
        assert str(info.value) == (
            "m.yaml: document 1 (Service shop/d): spec.clusterIP: 10.50.0.2 is already the VIP "
            "of Service shop/b: choose another address or omit clusterIP to get one allocated"
        )
        assert s.get("Service", "shop", "d") is None
    with Store(str(tmp_path), service_cidr="10.50.0.0/24") as s:
        # re-applying without clusterIP keeps the allocated VIP; new services skip used ones
        s.apply(docs(svc("a", port=81), svc("e")))
        a = s.get("Service", "shop", "a")
        e = s.get("Service", "shop", "e")
        assert a is not None and a.body["spec"]["clusterIP"] == "10.50.0.1"
        assert e is not None and e.body["spec"]["clusterIP"] == "10.50.0.3"
        # a deleted service's VIP becomes free again
        s.delete([ResourceKey("Service", "shop", "b")])
        s.apply(docs(svc("f")))
        f = s.get("Service", "shop", "f")
        assert f is not None and f.body["spec"]["clusterIP"] == "10.50.0.2"


def test_vip_range_exhausted_says_what_to_do(tmp_path: Path) -> None:
    with Store(str(tmp_path), service_cidr="10.60.0.0/30") as s:
        s.apply(docs(NS, svc("a"), svc("b")))
        with pytest.raises(ValidationFailed, match=r"service range 10\.60\.0\.0/30 is exhausted"):
            s.apply(docs(svc("c")))


def test_delete_is_atomic_and_namespaces_must_be_empty(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        s.apply(docs(NS, svc("web")))
        v = s.version
        with pytest.raises(NotFound, match="Service shop/nope"):
            s.delete(
                [ResourceKey("Service", "shop", "web"), ResourceKey("Service", "shop", "nope")]
            )
        assert s.get("Service", "shop", "web") is not None and s.version == v
        with pytest.raises(Conflict, match="still holds 1 resource"):
            s.delete([ResourceKey("Namespace", "", "shop")])
        with pytest.raises(Conflict, match="built in"):
            s.delete([ResourceKey("Namespace", "", "default")])
        r = s.delete([ResourceKey("Service", "shop", "web"), ResourceKey("Namespace", "", "shop")])
        assert [x.action for x in r] == ["deleted", "deleted"]
        assert s.version == v + 2
        assert [c.op for c in s.changes_since(v)] == ["delete", "delete"]


def test_label_set_and_remove_bumps_version(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        s.apply(docs(NS))
        key = ResourceKey("Namespace", "", "shop")
        r = s.label(key, {"istio.io/dataplane-mode": "ambient"})
        assert r.action == "labeled"
        got = s.get("Namespace", "", "shop")
        assert got is not None and got.body["metadata"]["labels"] == {
            "istio.io/dataplane-mode": "ambient"
        }
        assert s.label(key, {"istio.io/dataplane-mode": "ambient"}).action == "unchanged"
        with pytest.raises(ValidationFailed, match="expected 'ambient' or 'none'"):
            s.label(key, {"istio.io/dataplane-mode": "sidecar"})
        with pytest.raises(ValidationFailed, match="invalid label key"):
            s.label(key, {"bad key": "x"})
        s.label(key, {}, ["istio.io/dataplane-mode"])
        got = s.get("Namespace", "", "shop")
        assert got is not None and "labels" not in got.body["metadata"]
        with pytest.raises(NotFound, match="has no label"):
            s.label(key, {}, ["istio.io/dataplane-mode"])
        with pytest.raises(NotFound):
            s.label(ResourceKey("Namespace", "", "nope"), {"a": "b"})


def test_changes_since_and_history_compaction(tmp_path: Path) -> None:
    with Store(str(tmp_path), history_limit=5) as s:
        start = s.version
        s.apply(docs(NS))
        for i in range(8):
            s.apply(docs(svc("web", port=80 + i)))
        assert s.version == start + 9
        assert s.history_floor == s.version - 5
        changes = s.changes_since(s.version - 3)
        assert [c.version for c in changes] == [s.version - 2, s.version - 1, s.version]
        assert changes[-1].body is not None and changes[-1].body["spec"]["ports"] == [{"port": 87}]
        with pytest.raises(HistoryCompacted, match="relist"):
            s.changes_since(start)


async def test_watch_yields_backlog_then_live_changes(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        s.apply(docs(NS))
        since = s.version
        s.apply(docs(svc("a")))
        seen: list[str] = []

        async def consume() -> None:
            async for ch in s.watch(since):
                seen.append(f"{ch.op} {ch.key}")
                if len(seen) == 3:
                    return

        async with asyncio.timeout(5):
            async with asyncio.TaskGroup() as tg:
                tg.create_task(consume())
                await asyncio.sleep(0)
                # applies from another thread wake the watcher
                await asyncio.to_thread(s.apply, docs(svc("b")))
                await asyncio.to_thread(s.delete, [ResourceKey("Service", "shop", "a")])
        assert seen == ["put Service shop/a", "put Service shop/b", "delete Service shop/a"]


def test_dry_run_validates_and_stores_nothing(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        v = s.version
        r = s.apply(docs(NS, svc("web")), dry_run=True)
        assert [x.action for x in r] == ["created", "created"]
        assert s.version == v and s.get("Namespace", "", "shop") is None


def test_database_is_private_and_in_wal_mode(tmp_path: Path) -> None:
    with Store(str(tmp_path)) as s:
        assert os.stat(s.path).st_mode & 0o777 == 0o600
    import sqlite3

    db = sqlite3.connect(str(tmp_path / "store.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


_CHILD = textwrap.dedent("""
    import sys, time
    from config.store import Store
    from config.validate import load_text
    s = Store(sys.argv[1])
    ns = "apiVersion: v1\\nkind: Namespace\\nmetadata: {name: big}\\n"
    svcs = [f"apiVersion: v1\\nkind: Service\\nmetadata: {{name: s{i}, namespace: big}}\\n"
            f"spec: {{ports: [{{port: 80}}]}}\\n" for i in range(400)]
    docs = load_text("---\\n".join([ns, *svcs]), "big.yaml")
    def hook(n):
        print(n, flush=True)
        time.sleep(0.002)
    if sys.argv[2] == "slow":
        s.after_write_hook = hook
    s.apply(docs)
    print("committed", flush=True)
""")


def _run_child(data_dir: Path, kill_after: int | None) -> str:
    speed = "slow" if kill_after is not None else "fast"
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(data_dir), speed],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
    )
    assert proc.stdout is not None
    last = ""
    try:
        for line in proc.stdout:
            last = line.strip()
            if kill_after is not None and last == str(kill_after):
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=30)
        proc.stdout.close()
    return last


def test_sigkill_in_the_middle_of_an_apply_leaves_nothing(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    with Store(str(data)) as s:
        before = s.version
    last = _run_child(data, kill_after=150)
    assert last == "150"  # killed with 150 of 401 rows written inside the transaction
    with Store(str(data)) as s:
        assert s.version == before
        assert s.get("Namespace", "", "big") is None
        assert s.list_resources("Service") == []
        assert s.changes_since(before) == []
    # and the same apply completes when left alone: all of it
    assert _run_child(data, kill_after=None) == "committed"
    with Store(str(data)) as s:
        assert len(s.list_resources("Service", "big")) == 400
        assert s.version == before + 401
        vips = {r.body["spec"]["clusterIP"] for r in s.list_resources("Service", "big")}
        assert len(vips) == 400


def we(name: str, address: str, ns: str = "shop") -> str:
    return (
        f"apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
        f"metadata: {{name: {name}, namespace: {ns}}}\nspec: {{address: {address}}}\n"
    )


def test_workload_addresses_are_unique_and_never_a_vip(tmp_path: Path) -> None:
    with Store(str(tmp_path), service_cidr="10.70.0.0/24") as s:
        s.apply(docs(NS, we("a", "10.70.0.1"), we("b", "10.1.0.2")))
        with pytest.raises(ValidationFailed) as info:
            s.apply(docs(we("c", "10.1.0.2")))
        assert str(info.value) == (
            "m.yaml: document 1 (WorkloadEntry shop/c): spec.address: 10.1.0.2 is already the "
            "address of WorkloadEntry shop/b: every workload needs its own address"
        )
        # an allocated VIP skips workload addresses; an explicit one may not take them
        s.apply(docs(svc("web")))
        web = s.get("Service", "shop", "web")
        assert web is not None and web.body["spec"]["clusterIP"] == "10.70.0.2"
        with pytest.raises(ValidationFailed, match=r"10\.1\.0\.2 is the address of WorkloadEntry"):
            s.apply(docs(svc("db", cluster_ip="10.1.0.2")))
        with pytest.raises(ValidationFailed, match=r"10\.70\.0\.2 is the VIP of Service shop/web"):
            s.apply(docs(we("d", "10.70.0.2")))
        # moving a workload frees its old address; deleting frees it too
        s.apply(docs(we("b", "10.1.0.3")))
        s.apply(docs(we("c", "10.1.0.2")))
        s.delete([ResourceKey("WorkloadEntry", "shop", "c")])
        s.apply(docs(we("e", "10.1.0.2")))
