"""Inbound HBONE and plaintext listeners on loopback: authz, STRICT, policy change, local CA."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from config.ca import CertificateAuthority
from tests.pki import TestPKI
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool
from ztunnel.identity import (
    Certificate,
    IdentityManager,
    SpiffeId,
    generate_key,
    make_csr,
    private_key_pem,
)
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


async def test_root_rotation_reaches_listening_and_outbound_contexts(tmp_path: Path) -> None:
    """A root added to the bundle (rotation) is trusted by running listeners and by the
    outbound pool at once; certificates from the new root work both ways, no restart."""
    ca = CertificateAuthority.load_or_create(tmp_path / "cp", "cluster.local")

    async def sign(identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        return ca.sign_csr(csr_pem, identity)

    def issue(identity: SpiffeId) -> Certificate:
        key = generate_key()
        return Certificate.from_pem(ca.sign_csr(make_csr(identity, key), identity),
                                    private_key_pem(key))

    server, port, peers = await echo_server()
    snap = snapshot()
    wl = snap.workloads[0]
    skew = [0.0]  # the identity manager's clock, moved to the renewal time below
    identities = IdentityManager(sign, clock=lambda: time.time() + skew[0])
    ctx = ProxyContext(node="n1", snapshot=snap, metrics=ZtunnelMetrics(),
                       identities=identities, pool=HboneConnectionPool(),
                       trust=ca.trust_bundle(), limits=Limits())
    old_client = issue(CLIENT_ID)

    async def connect(client: Certificate) -> None:
        # a pool of its own: a fresh TLS handshake each time (pooled connections stay up)
        pool = HboneConnectionPool()
        try:
            stream = await pool.open_stream(
                src_identity_cert=client, trust=ctx.require_trust(),
                dst_identity=SpiffeId.parse(wl.identity), src_ip=None, dst=hbone.address,
                authority=f"{SERVER_IP}:{port}", forwarded_for=f'for="{SERVER_IP}:4000"')
            stream.write(b"rotated")
            assert await stream.readexactly(7) == b"rotated"
            stream.write_eof()
        finally:
            await pool.close()

    async with asyncio.TaskGroup() as tg:
        id_task = tg.create_task(identities.run())
        cert = await identities.get(SpiffeId.parse(wl.identity))
        hbone = InboundHboneListener(ctx, wl, None, cert, host=SERVER_IP, port=0)
        tg.create_task(hbone.run())
        try:
            await connect(old_client)
            old_root = ca.signing_root
            # rotation: the next root joins the bundle (pushed with the next snapshot),
            # then signs; the listener still serves its certificate from the old root
            ca.begin_rotation()
            ctx.trust = ca.trust_bundle()
            assert len(ctx.trust.roots()) == 2
            ca.complete_rotation()
            new_client = issue(CLIENT_ID)
            await connect(new_client)  # refused with "unknown ca" when the bundle is stale
            await connect(old_client)  # the old root is still trusted
            # the server renews (half-life) from the new root; clients verify it with the
            # bundle, and the listener serves it from the next handshake on
            skew[0] = (cert.not_after - cert.not_before) * 0.8
            identities.wakeup()
            for _ in range(250):
                renewed = identities.cached(cert.identity)
                if renewed is not None and renewed != cert:
                    break
                await asyncio.sleep(0.02)
            skew[0] = 0.0  # back to now: the renewed certificate stays
            await asyncio.sleep(0.1)
            renewed = identities.cached(cert.identity)
            assert renewed is not None and renewed != cert
            await connect(new_client)
            assert hbone.cert == renewed
            new_root = ca.signing_root
            renewed.x509().verify_directly_issued_by(new_root)
            cert.x509().verify_directly_issued_by(old_root)
        finally:
            await hbone.drain(0.5)
            await ctx.pool.close()
            id_task.cancel()
    server.close()
    assert len(peers) == 4
    assert len(ctx.tracker) == 0
