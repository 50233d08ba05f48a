"""The proxy config stream on real TLS over loopback: join, scoping, CSRs, ack/nack, resume."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.ca import CertificateAuthority
from config.push import PushClient, PushError, PushServer, push_server_context
from config.resources import Resource
from config.store import Store
from config.tokens import TokenStore
from config.validate import load_text
from ztunnel import snapshot as zs
from ztunnel.identity import SpiffeId, generate_key, make_csr

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: shop, annotations: {ambit.dev/node: node-a}}
spec: {address: 10.2.0.11, labels: {app: web}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: api-1, namespace: shop, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.2.0.12, labels: {app: api}, serviceAccount: api}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: backup-1, namespace: ops, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.2.0.21, labels: {app: backup}, serviceAccount: backup}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.1.1, selector: {app: api}, ports: [{port: 80, targetPort: 8080}]}
"""

WE = (
    "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
    "metadata: {{name: {name}, namespace: shop, annotations: {{ambit.dev/node: node-b}}}}\n"
    "spec: {{address: {ip}, labels: {{app: extra}}}}\n"
)

ROUTE = """---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: api-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: api, port: 80}]
  rules: [{backendRefs: [{name: api, port: 80}]}]
"""


@dataclass
class Plane:
    data: Path
    store: Store
    ca: CertificateAuthority
    tokens: TokenStore
    push: PushServer
    address: str

    def client(self, subject: str, name: str = "", **kw: Any) -> PushClient:
        token = self.tokens.create(subject)
        return PushClient(
            self.address,
            subject,
            self.data.parent / (name or subject.replace("/", "_")),
            token=token,
            timeout=5,
            **kw,
        )


@asynccontextmanager
async def plane(
    tmp_path: Path, data: Path | None = None, history_limit: int = 100_000
) -> AsyncIterator[Plane]:
    data = data or tmp_path / "cp"
    data.mkdir(exist_ok=True)
    ca = CertificateAuthority.load_or_create(data, "cluster.local")
    store = Store(str(data), history_limit=history_limit)
    tokens = TokenStore(data / "tokens.db")
    push = PushServer(store, ca, tokens)
    server = await push.start("127.0.0.1", 0, push_server_context(ca, data))
    host, port = server.sockets[0].getsockname()[:2]
    try:
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(push.follow_store())
            try:
                yield Plane(data, store, ca, tokens, push, f"{host}:{port}")
            finally:
                follower.cancel()
                server.close()
                for s in list(push.sessions.values()):
                    s.writer.close()
    finally:
        tokens.close()
        store.close()


class Recorder:
    """The `apply` callback of a proxy: records snapshots, can be told to reject."""

    def __init__(self) -> None:
        self.snapshots: list[zs.Snapshot] = []
        self.reject = ""
        self.changed = asyncio.Event()

    async def __call__(self, snap: zs.Snapshot) -> None:
        if self.reject:
            raise ValueError(self.reject)
        self.snapshots.append(snap)
        self.changed.set()

    async def wait_for(self, pred: object) -> zs.Snapshot:
        assert callable(pred)
        async with asyncio.timeout(5):
            while True:
                if self.snapshots and pred(self.snapshots[-1]):
                    return self.snapshots[-1]
                self.changed.clear()
                await self.changed.wait()


async def apply(p: Plane, text: str) -> None:
    await asyncio.to_thread(p.store.apply, load_text(text, "m.yaml"))


async def wait_state(p: Plane, name: str, state: str) -> dict[str, object]:
    async with asyncio.timeout(5):
        while True:
            for s in p.push.status()["proxies"]:
                if s["name"] == name and s["state"] == state:
                    return dict(s)
            await asyncio.sleep(0.01)


async def test_node_joins_follows_changes_within_a_second_and_acks(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        client = p.client("node-a")
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.follow(rec))
            first = await rec.wait_for(lambda s: True)
            assert {w.name for w in first.local_workloads} == {"web-1"}
            assert first.trust_bundle_pem.startswith("-----BEGIN CERTIFICATE-----")
            st = await wait_state(p, "node-a", "synced")
            assert st["version"] == first.version == p.store.version
            assert st["kind"] == "node"
            # a change reaches the node quickly, as a delta
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await apply(
                p,
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
                "metadata: {name: api-2, namespace: shop, annotations: "
                "{ambit.dev/node: node-b}}\n"
                "spec: {address: 10.2.0.13, labels: {app: api}, serviceAccount: api}\n",
            )
            snap = await rec.wait_for(lambda s: s.workload_by_ip("10.2.0.13") is not None)
            assert loop.time() - t0 < 1.0
            api = snap.service_by_vip("10.96.1.1")
            assert api is not None and len(api.endpoints) == 2
            await wait_state(p, "node-a", "synced")
            task.cancel()
        # the last good snapshot was persisted for restarts without a control plane
        saved = client.last_snapshot()
        assert saved is not None and saved == rec.snapshots[-1]


async def test_node_scoping_and_certificates_only_for_own_workloads(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        a = p.client("node-a")
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(a.follow(rec))
            snap = await rec.wait_for(lambda s: True)
            task.cancel()
        names = {w.name for w in snap.workloads}
        assert names == {"web-1", "api-1"}  # backup-1 (node-b, ops, no service) never sent
        assert snap.node == "node-a"
        # node-a may get web's certificate, not api's (api-1 runs on node-b)
        web = SpiffeId("cluster.local", "shop", "web")
        chain = await a.fetch_certificate(web, make_csr(web, generate_key()))
        assert chain and chain[0].startswith(b"-----BEGIN CERTIFICATE-----")
        api = SpiffeId("cluster.local", "shop", "api")
        with pytest.raises(
            PushError,
            match=re.escape(
                "node-impersonation: identity spiffe://cluster.local/ns/shop/sa/api is not "
                "scheduled on node node-a"
            ),
        ):
            await a.fetch_certificate(api, make_csr(api, generate_key()))


async def test_join_with_a_bad_token_is_refused(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        client = PushClient(
            p.address, "node-x", tmp_path / "x", token="ambit-join.bogus", timeout=5
        )
        with pytest.raises(PushError, match="join-token: unknown join token"):
            await client.join()
        with pytest.raises(PushError, match=r"no node certificate .* and no --token"):
            await PushClient(p.address, "node-y", tmp_path / "y", timeout=5).join()


async def test_nack_keeps_the_proxy_state_and_next_update_is_full(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(p.client("node-a").follow(rec))
            await rec.wait_for(lambda s: True)
            await wait_state(p, "node-a", "synced")
            rec.reject = "listener for 10.2.0.11 failed"
            await apply(p, WE.format(name="extra-1", ip="10.2.0.31"))
            st = await wait_state(p, "node-a", "nacked")
            assert st["error"] == "ValueError: listener for 10.2.0.11 failed"
            rec.reject = ""
            await apply(p, WE.format(name="extra-2", ip="10.2.0.32"))
            st = await wait_state(p, "node-a", "synced")
            assert st["version"] == p.store.version
            task.cancel()


async def test_resume_after_control_plane_restart_resends_nothing(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    node_dir = tmp_path / "node-a"
    async with plane(tmp_path, data) as p:
        await apply(p, MESH)
        client = p.client("node-a")
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.follow(rec))
            await rec.wait_for(lambda s: True)
            await wait_state(p, "node-a", "synced")
            task.cancel()
    assert (node_dir / "snapshot.json").exists()
    async with plane(tmp_path, data) as p:  # a new control plane process on the same data
        restarted = PushClient(p.address, "node-a", node_dir, timeout=5)
        rec2 = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(restarted.follow(rec2))
            st = await wait_state(p, "node-a", "synced")
            assert st["sent_version"] == st["version"] == p.store.version
            # only the saved snapshot was applied: nothing came over the stream
            assert len(rec2.snapshots) == 1
            # and later changes still flow
            await apply(
                p,
                "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: "
                "shop}\nspec: {selector: {app: web}, ports: [{port: 80}]}\n",
            )
            snap = await rec2.wait_for(
                lambda s: s.service_by_hostname("web.shop.svc.cluster.local") is not None
            )
            assert snap.version == p.store.version
            task.cancel()


async def test_waypoint_registers_its_address_and_services_bind_to_it(tmp_path: Path) -> None:
    gw = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: wp, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n"
        "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
    )
    async with plane(tmp_path) as p:
        await apply(
            p,
            MESH.replace(
                "metadata: {name: api, namespace: shop}",
                "metadata: {name: api, namespace: shop, labels: {istio.io/use-waypoint: wp}}",
            )
            + "---\n"
            + gw
            + ROUTE,
        )
        node_rec, wp_rec = Recorder(), Recorder()
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(p.client("node-a").follow(node_rec))
            first = await node_rec.wait_for(lambda s: True)
            api = first.service_by_vip("10.96.1.1")
            assert api is not None and api.waypoint is None  # waypoint not running yet
            manifests: list[list[str]] = []

            async def on_resources(items: list[Resource]) -> None:
                manifests.append([f"{r.kind}/{r.meta.name}" for r in items])

            t2 = tg.create_task(
                p.client("shop/wp", waypoint_address="10.2.0.99").follow(
                    wp_rec, on_resources=on_resources
                )
            )
            snap = await node_rec.wait_for(lambda s: s.waypoints != ())
            api = snap.service_by_vip("10.96.1.1")
            assert api is not None and api.waypoint == zs.WaypointRef(
                address="10.2.0.99", identity="spiffe://cluster.local/ns/shop/sa/wp"
            )
            wsnap = await wp_rec.wait_for(lambda s: s.services != ())
            assert [s.name for s in wsnap.services] == ["api"]
            # the workloads it serves, plus the mesh's clients (web-1) for telemetry
            assert {w.name for w in wsnap.workloads} == {"api-1", "web-1"}
            st = await wait_state(p, "shop/wp", "synced")
            assert st["kind"] == "waypoint"
            assert manifests[-1] == ["Gateway/wp", "HTTPRoute/api-split", "Service/api"]
            t1.cancel()
            t2.cancel()


async def test_unrelated_changes_send_nothing_but_advance_the_version(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(p.client("node-a").follow(rec))
            await rec.wait_for(lambda s: True)
            await wait_state(p, "node-a", "synced")
            # a namespace and a workload in it on another node: nothing node-a can see
            await apply(
                p,
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: far}\n---\n"
                + WE.format(name="far-1", ip="10.2.9.1").replace("shop", "far"),
            )
            async with asyncio.timeout(5):
                while True:
                    if p.push.status()["proxies"][0]["version"] == p.store.version:
                        break
                    await asyncio.sleep(0.01)
            assert len(rec.snapshots) == 1
            task.cancel()


async def test_node_renews_its_certificate_with_the_current_one(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        client = p.client("node-a")
        first = await client.join()
        renewed = await client.renew()
        assert renewed.identity == first.identity
        assert renewed.cert_pem != first.cert_pem
        current = client.node_certificate()
        assert current is not None and current.cert_pem == renewed.cert_pem
        # the renewed certificate works on the stream; the join token stays spent
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.follow(rec))
            snap = await rec.wait_for(lambda s: True)
            task.cancel()
        assert snap.node == "node-a"
        with pytest.raises(PushError, match="join token was already used"):
            await client.join()


async def test_status_lists_nodes_with_workloads_that_are_not_connected(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        p.push.changed()
        assert [(x["name"], x["state"]) for x in p.push.status()["proxies"]] == [
            ("node-a", "disconnected"),
            ("node-b", "disconnected"),
        ]
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(p.client("node-b").follow(rec))
            await wait_state(p, "node-b", "synced")
            task.cancel()
        assert [x["name"] for x in p.push.status()["proxies"]] == ["node-a", "node-b"]


async def test_a_pinned_token_joins_only_the_control_plane_it_names(tmp_path: Path) -> None:
    from config.ca import fingerprint

    async with plane(tmp_path) as p:
        good = fingerprint(p.ca.signing_root)
        ok = PushClient(
            p.address,
            "node-a",
            tmp_path / "a",
            timeout=5,
            token=p.tokens.create("node-a") + f"#sha256:{good}",
        )
        cert = await ok.join()
        assert cert.identity.service_account == "ztunnel"
        other = "0" * 64
        token = p.tokens.create("node-b")
        bad = PushClient(
            p.address, "node-b", tmp_path / "b", timeout=5, token=f"{token}#sha256:{other}"
        )
        with pytest.raises(PushError, match="does not hold the CA the token names"):
            await bad.join()
        # the secret was never sent: the same token still joins
        again = PushClient(p.address, "node-b", tmp_path / "b2", timeout=5, token=token)
        await again.join()


async def test_follower_relists_when_history_moved_past_it(tmp_path: Path) -> None:
    async with plane(tmp_path, history_limit=3) as p:
        await apply(p, MESH)
        rec = Recorder()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(p.client("node-a").follow(rec))
            await rec.wait_for(lambda s: True)
            # one apply of more changes than the history keeps
            batch = "---\n".join(
                WE.format(name=f"bulk-{i}", ip=f"10.2.5.{i + 1}") for i in range(8)
            )
            await apply(p, batch)
            snap = await rec.wait_for(lambda s: s.workload_by_ip("10.2.5.8") is not None)
            assert {w.name for w in snap.workloads if w.name.startswith("bulk-")} == {
                f"bulk-{i}" for i in range(8)
            }
            st = await wait_state(p, "node-a", "synced")
            assert st["version"] == p.store.version
            task.cancel()


async def test_join_rereads_the_token_file_so_rotated_credentials_work(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        token_file = tmp_path / "token"
        token_file.write_text("ambit-join.expired-long-ago\n")
        client = PushClient(p.address, "node-t", tmp_path / "t", token_file=token_file, timeout=5)
        with pytest.raises(PushError, match="join-token: unknown join token"):
            await client.join()
        # the credential is rotated on disk while the proxy runs: the next join reads it
        token_file.write_text(p.tokens.create("node-t") + "\n")
        cert = await client.join()
        assert cert.identity.service_account == "ztunnel"
        token_file.unlink()
        with pytest.raises(PushError, match=r"cannot read the token file .*: is the credential"):
            await client.join()
