"""Address claims over the real config stream: placement, certificates, conflicts, disconnects."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from config.push import PushClient, PushError
from tests.inproc.test_api_push import Plane, Recorder, apply, plane, wait_state
from ztunnel import snapshot as zs
from ztunnel.identity import SpiffeId, generate_key, make_csr

MESH = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: db, namespace: shop}
spec: {address: 10.2.0.31, labels: {app: db}, serviceAccount: db}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web, namespace: shop, annotations: {ambit.dev/node: node-b}}
spec: {address: 10.2.0.32, labels: {app: web}, serviceAccount: web}
"""

DB = SpiffeId("cluster.local", "shop", "db")


def runs_db(node: str) -> object:
    def pred(s: zs.Snapshot) -> bool:
        return any(w.name == "db" for w in s.local_workloads) and s.node == node

    return pred


def not_db(s: zs.Snapshot) -> bool:
    return all(w.name != "db" for w in s.local_workloads)


async def sign_db(client: PushClient) -> list[bytes]:
    return await client.fetch_certificate(DB, make_csr(DB, generate_key()))


async def wait_unplaced(p: Plane, want: list[dict[str, object]]) -> None:
    async with asyncio.timeout(5):
        while True:
            if p.push.status()["unplaced"] == want:
                return
            await asyncio.sleep(0.01)


async def test_the_claiming_node_runs_the_entry_and_only_it_gets_its_certificate(
    tmp_path: Path,
) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        a, b = p.client("node-a"), p.client("node-b")
        ra, rb = Recorder(), Recorder()
        async with asyncio.TaskGroup() as tg:
            ta = tg.create_task(a.follow(ra))
            tb = tg.create_task(b.follow(rb))
            await ra.wait_for(lambda s: True)
            # unclaimed: no node runs db, no node may sign for it
            with pytest.raises(PushError, match="node-impersonation"):
                await sign_db(a)
            a.set_claims({"10.2.0.31": "/proc/4242/ns/net", "10.2.0.99": "other"})
            snap = await ra.wait_for(runs_db("node-a"))
            [db] = [w for w in snap.local_workloads if w.name == "db"]
            assert db.netns == "/proc/4242/ns/net" and db.node == "node-a"
            assert (await sign_db(a))[0].startswith(b"-----BEGIN CERTIFICATE-----")
            with pytest.raises(PushError, match=re.escape(
                    "identity spiffe://cluster.local/ns/shop/sa/db is not scheduled on "
                    "node node-b")):
                await sign_db(b)
            assert not_db(await rb.wait_for(lambda s: True))

            # node-b claims it too: placed nowhere, named in the status with both nodes
            b.set_claims({"10.2.0.31": "ns-b"})
            await ra.wait_for(not_db)
            await wait_unplaced(
                p, [{"workload": "shop/db", "address": "10.2.0.31", "nodes": ["node-a", "node-b"]}]
            )
            row = next(r for r in p.push.status()["proxies"] if r["name"] == "shop/db")
            assert row["state"] == "unplaced: 10.2.0.31 claimed by node-a, node-b"
            with pytest.raises(PushError, match="node-impersonation"):
                await sign_db(a)

            # node-a disconnects: its claims go, node-b runs db
            ta.cancel()
            await rb.wait_for(runs_db("node-b"))
            await wait_unplaced(p, [])
            await wait_state(p, "node-b", "synced")
            tb.cancel()


async def test_a_malformed_claims_message_closes_the_stream_with_the_reason(
    tmp_path: Path,
) -> None:
    async with plane(tmp_path) as p:
        await apply(p, MESH)
        a = p.client("node-a")
        await a.ensure_joined()
        ctx = a._context(with_cert=True)
        host, _, port = p.address.rpartition(":")
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        try:
            writer.write(b'{"type":"subscribe","version":0,"hash":""}\n')
            writer.write(b'{"type":"claims","addresses":{"10.2.0.300":"x"}}\n')
            await writer.drain()
            async with asyncio.timeout(5):
                while True:
                    line = await reader.readline()
                    assert line, "closed without an error message"
                    msg = json.loads(line)
                    if msg["type"] == "error":
                        break
            assert msg["rule"] == "protocol"
            assert "'10.2.0.300' is not an IP address (node node-a)" in msg["message"]
        finally:
            writer.close()
        assert p.push.index.claims == {}
