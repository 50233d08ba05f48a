"""Inbound HBONE and plaintext listeners on loopback: authz, STRICT, policy change, local CA."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.pki import TestPKI
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.identity import IdentityManager, SpiffeId
from ztunnel.listeners._base import Limits, ProxyContext
from ztunnel.listeners.inbound_hbone import InboundHboneListener
from ztunnel.listeners.inbound_plain import InboundPlainListener
from ztunnel.listeners.metrics import ZtunnelMetrics
from ztunnel.localconfig import LocalCA
from ztunnel.snapshot import Snapshot

SERVER_IP = "127.0.0.1"
CLIENT_ID = SpiffeId("cluster.local", "default", "client")


def snapshot(policies: list[dict[str, Any]] | None = None, mode: str = "PERMISSIVE") -> Snapshot:
    return Snapshot.from_dict({
        "version": 1, "node": "n1",
        "workloads": [{"uid": "default/server", "name": "server", "namespace": "default",
                       "ip": SERVER_IP, "node": "n1", "service_account": "server",
                       "labels": {"app": "server"}}],
        "authorization_policies": policies or [],
        "peer_authentications": [{"name": "default", "namespace": "istio-system",
                                  "mode": mode}],
    })


DENY_CLIENT = [{"name": "deny", "namespace": "default", "action": "DENY",
                "rules": [{"from": [{"principals": ["cluster.local/ns/default/sa/client"]}]}]}]


async def echo_server() -> tuple[asyncio.Server, int, list[str]]:
    peers: list[str] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        peers.append(w.get_extra_info("peername")[0])
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
        w.close()

    server = await asyncio.start_server(handle, SERVER_IP, 0)
    return server, server.sockets[0].getsockname()[1], peers


@contextlib.asynccontextmanager
async def running(pki: TestPKI, snap: Snapshot, limits: Limits | None = None
                  ) -> AsyncIterator[tuple[ProxyContext, Any, Any]]:
    key_pem = pki.root_key.private_bytes(serialization.Encoding.PEM,
                                         serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    ca = LocalCA(pki.root_pem, key_pem)
    identities = IdentityManager(ca.sign)
    ctx = ProxyContext(node="n1", snapshot=snap, metrics=ZtunnelMetrics(),
                       identities=identities, pool=HboneConnectionPool(), trust=pki.bundle,
                       limits=limits or Limits())
    wl = snap.workloads[0]
    async with asyncio.TaskGroup() as tg:
        id_task = tg.create_task(identities.run())
        cert = await identities.get(SpiffeId.parse(wl.identity))
        hbone = InboundHboneListener(ctx, wl, None, cert, host=SERVER_IP, port=0)
        plain = InboundPlainListener(ctx, wl, None, host=SERVER_IP, port=0)
        tg.create_task(hbone.run())
        tg.create_task(plain.run())
        try:
            yield ctx, hbone, plain
        finally:
            await hbone.drain(0.5)
            await plain.drain(0.5)
            await ctx.pool.close()
            id_task.cancel()


async def open_hbone(pki: TestPKI, ctx: ProxyContext, hbone: Any, port: int) -> Any:
    return await ctx.pool.open_stream(
        src_identity_cert=pki.issue("default", "client"), trust=pki.bundle,
        dst_identity=SpiffeId.parse(ctx.snapshot.workloads[0].identity), src_ip=None,
        dst=hbone.address, authority=f"{SERVER_IP}:{port}",
        forwarded_for=f'for="{SERVER_IP}:4000"',
    )


async def test_hbone_inbound_delivers_checks_policy_and_closes_on_policy_change() -> None:
    pki = TestPKI()
    server, port, peers = await echo_server()
    async with running(pki, snapshot()) as (ctx, hbone, _plain):
        stream = await open_hbone(pki, ctx, hbone, port)
        stream.write(b"ping")
        assert await stream.readexactly(4) == b"ping"
        assert peers == [SERVER_IP]
        # a DENY policy arrives: the open stream is reset, new ones get 401
        ctx.snapshot = snapshot(DENY_CLIENT)
        assert len(ctx.tracker.enforce(ctx.snapshot)) == 1
        try:
            await asyncio.wait_for(stream.read(), 5)
        except HboneError:
            pass
        else:
            raise AssertionError("the denied stream was not reset")
        try:
            await open_hbone(pki, ctx, hbone, port)
        except HboneError as exc:
            assert "401" in str(exc)
        else:
            raise AssertionError("a DENY policy must refuse the CONNECT")
        text = ctx.metrics.render().decode()
        assert 'response_flags="DENY"' in text
        assert 'source_principal="spiffe://cluster.local/ns/default/sa/client"' in text
        # the policy goes away: allowed again without restarting anything
        ctx.snapshot = snapshot()
        stream = await open_hbone(pki, ctx, hbone, port)
        stream.write(b"again")
        assert await stream.readexactly(5) == b"again"
        stream.write_eof()
        # a renewed certificate is loaded into the listening context in place
        hbone.cert = pki.issue("default", "server")
        assert hbone.refresh_certificate()
        assert not hbone.refresh_certificate()
        stream = await open_hbone(pki, ctx, hbone, port)
        stream.write(b"renewed")
        assert await stream.readexactly(7) == b"renewed"
        stream.write_eof()
    server.close()


async def test_plaintext_inbound_is_refused_under_strict() -> None:
    # Without TPROXY the original destination is the listener itself, so only the
    # refusal path runs here; delivery is covered by the tier-3 tests.
    pki = TestPKI()
    async with running(pki, snapshot(mode="STRICT")) as (ctx, _hbone, plain):
        r, w = await asyncio.open_connection(*plain.address)
        try:
            data = await asyncio.wait_for(r.read(), 5)
        except ConnectionResetError:
            data = b""
        assert data == b""
        w.close()
        text = ctx.metrics.render().decode()
        assert 'response_flags="DENY"' in text
        assert 'connection_security_policy="none"' in text


async def test_idle_hbone_stream_is_reset() -> None:
    pki = TestPKI()
    server, port, _peers = await echo_server()
    async with running(pki, snapshot(), Limits(idle_timeout=0.3)) as (ctx, hbone, _plain):
        stream = await open_hbone(pki, ctx, hbone, port)
        stream.write(b"ping")
        assert await stream.readexactly(4) == b"ping"
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            await asyncio.wait_for(stream.read(), 5)
        except HboneError:
            pass
        else:
            raise AssertionError("an idle stream must be reset")
        assert 0.25 < loop.time() - start < 2.0
        for _ in range(50):
            if len(ctx.tracker) == 0:
                break
            await asyncio.sleep(0.02)
        assert len(ctx.tracker) == 0
    server.close()
