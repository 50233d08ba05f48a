"""Root CA rotation driven by `ambit ca ...` against the real control plane process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from config.ca import fingerprint
from config.push import PushClient, PushError
from tests.inproc.test_cli import NS, ambit, control_plane, error_of
from tests.pki import handshake
from ztunnel import snapshot as zs
from ztunnel.identity import Certificate, SpiffeId, TrustBundle, generate_key, make_csr
from ztunnel.identity import private_key_pem as key_pem
from ztunnel.tls import client_context, peer_identity, server_context

WORKLOADS = """apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: shop, annotations: {ambit.dev/node: node-a}}
spec: {address: 10.1.0.5, labels: {app: web}, serviceAccount: web}
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: cart-1, namespace: shop, annotations: {ambit.dev/node: node-a}}
spec: {address: 10.1.0.6, labels: {app: cart}, serviceAccount: cart}
"""
WEB = SpiffeId("cluster.local", "shop", "web")
CART = SpiffeId("cluster.local", "shop", "cart")
# a rotation step reaches a connected proxy within about a second (slack for a busy host)
PUSH_DEADLINE = 3.0


class Follower:
    """The `apply` callback of a proxy following the config stream."""

    def __init__(self) -> None:
        self.snapshots: list[zs.Snapshot] = []
        self.changed = asyncio.Event()

    async def __call__(self, snap: zs.Snapshot) -> None:
        self.snapshots.append(snap)
        self.changed.set()

    async def wait_for(self, pred: Callable[[zs.Snapshot], bool]) -> zs.Snapshot:
        async with asyncio.timeout(10):
            while True:
                if self.snapshots and pred(self.snapshots[-1]):
                    return self.snapshots[-1]
                self.changed.clear()
                await self.changed.wait()


def bundle_fps(snap: zs.Snapshot) -> set[str]:
    return {
        fingerprint(c) for c in x509.load_pem_x509_certificates(snap.trust_bundle_pem.encode())
    }


async def run(*args: str, env: dict[str, str]) -> str:
    p = await asyncio.to_thread(ambit, *args, env=env)
    assert p.returncode == 0, p.stderr
    return p.stdout


async def fails(*args: str, env: dict[str, str]) -> str:
    p = await asyncio.to_thread(ambit, *args, env=env)
    assert p.returncode == 1, p.stdout + p.stderr
    return error_of(p)


def roots_of(status: str) -> dict[str, list[str]]:
    """`ambit ca status` table rows by fingerprint: [state, signs, not-after, stopped]."""
    rows = [ln.split() for ln in status.splitlines()[2:]]
    return {r[0]: r[1:] for r in rows}


async def issue(client: PushClient, identity: SpiffeId) -> Certificate:
    key = generate_key()
    chain = await client.fetch_certificate(identity, make_csr(identity, key))
    return Certificate.from_pem(chain, key_pem(key))


def issuer_root(cert: Certificate, roots: list[x509.Certificate]) -> str:
    leaf = x509.load_pem_x509_certificate(cert.cert_pem)
    for r in roots:
        try:
            leaf.verify_directly_issued_by(r)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return fingerprint(r)
    raise AssertionError("the leaf chains to no root of the bundle")


def assert_handshake(client: Certificate, server: Certificate, trust: TrustBundle) -> None:
    out = handshake(
        server_context(server, trust),
        client_context(client, trust),
        check_server=lambda tls: peer_identity(tls, trust),
        check_client=lambda tls: peer_identity(tls, trust, server.identity),
    )
    assert out.server.error is None, out.server.error
    assert out.client.error is None, out.client.error
    assert out.server.result == client.identity and out.client.result == server.identity


async def test_rotate_begin_complete_retire_reaches_a_following_proxy(tmp_path: Path) -> None:
    with control_plane(tmp_path) as cp:
        env = cp.env()
        p = await asyncio.to_thread(
            ambit, "apply", "-f", "-", env=env, stdin=NS + "---\n" + WORKLOADS
        )
        assert p.returncode == 0, p.stderr
        token = (await run("token", "create", "--node", "node-a", env=env)).strip()

        before = roots_of(await run("ca", "status", env=env))
        assert len(before) == 1
        (old_fp, (state, signs, not_after, _)), = before.items()
        assert (state, signs) == ("signing", "yes") and not_after.endswith("Z")

        client = PushClient(cp.proxies, "node-a", tmp_path / "node-a", token=token, timeout=5)
        follower = Follower()
        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.follow(follower))
            first = await follower.wait_for(lambda s: True)
            assert bundle_fps(first) == {old_fp}
            old_leaf = await issue(client, WEB)

            # begin: the new root joins the bundle, the old one still signs
            out = await run("ca", "rotate", "begin", env=env)
            t0 = time.monotonic()
            roots = roots_of(out.split("\n", 1)[1])
            (new_fp,) = [fp for fp, r in roots.items() if r[0] == "next"]
            assert roots[old_fp][:2] == ["signing", "yes"] and roots[new_fp][1] == "no"
            overlap = await follower.wait_for(lambda s: bundle_fps(s) == {old_fp, new_fp})
            assert time.monotonic() - t0 < PUSH_DEADLINE
            assert overlap.version > first.version  # an ordinary, versioned update
            assert issuer_root(await issue(client, CART), [*x509.load_pem_x509_certificates(
                overlap.trust_bundle_pem.encode())]) == old_fp

            # complete: new certificates chain to the new root; both generations talk
            early = (await run("token", "create", "--node", "node-b", env=env)).strip()
            status = await run("ca", "rotate", "complete", env=env)
            assert "the new root signs from now on" in status
            roots = roots_of(status.split("\n", 1)[1])
            assert roots[new_fp][:2] == ["signing", "yes"]
            assert roots[old_fp][:2] == ["previous", "no"] and roots[old_fp][3].endswith("Z")
            new_leaf = await issue(client, CART)  # over a fresh TLS connection to the CP
            trust = TrustBundle("cluster.local", overlap.trust_bundle_pem.encode())
            assert issuer_root(new_leaf, trust.roots()) == new_fp
            assert issuer_root(old_leaf, trust.roots()) == old_fp
            assert_handshake(old_leaf, new_leaf, trust)
            assert_handshake(new_leaf, old_leaf, trust)

            # a join token names the root that signed the control plane's certificate
            with pytest.raises(PushError, match="root was rotated since the token was created"):
                await PushClient(cp.proxies, "node-b", tmp_path / "b1", token=early).join()
            late = (await run("token", "create", "--node", "node-b", env=env)).strip()
            assert late.endswith(f"#sha256:{new_fp}")
            node_b = await PushClient(cp.proxies, "node-b", tmp_path / "b2", token=late).join()
            assert issuer_root(node_b, trust.roots()) == new_fp

            # retire: refused for the signing root and (without --force) too early
            err = await fails("ca", "rotate", "retire", new_fp, env=env)
            assert "currently signs cannot be retired" in err
            assert "`ambit ca rotate begin`" in err
            err = await fails("ca", "rotate", "retire", old_fp, env=env)
            assert f"root {old_fp[:16]} stopped signing" in err and "--force" in err
            err = await fails("ca", "rotate", "retire", env=env)
            assert "needs the root's fingerprint" in err and "ambit ca status" in err
            assert set(roots_of(await run("ca", "status", env=env))) == {old_fp, new_fp}

            out = await run("ca", "rotate", "retire", old_fp, "--force", env=env)
            t0 = time.monotonic()
            assert set(roots_of(out.split("\n", 1)[1])) == {new_fp}
            final = await follower.wait_for(lambda s: bundle_fps(s) == {new_fp})
            assert time.monotonic() - t0 < PUSH_DEADLINE
            assert final.version > overlap.version
            # the proxy's stored trust bundle followed too; it still reaches the CP
            assert bundle_fps(final) == {
                fingerprint(c) for c in x509.load_pem_x509_certificates(
                    (tmp_path / "node-a" / "trust-bundle.pem").read_bytes())
            }
            again = await issue(client, WEB)
            final_trust = TrustBundle("cluster.local", final.trust_bundle_pem.encode())
            assert issuer_root(again, final_trust.roots()) == new_fp
            task.cancel()

        err = await fails("ca", "rotate", "complete", env=env)
        assert err == "no rotation in progress: run `ambit ca rotate begin` first"
        status = await run("status", env=env)
        assert "CA: trust domain cluster.local, root sha256:" + new_fp[:16] in status


async def test_rotation_survives_a_control_plane_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with control_plane(tmp_path, data) as cp:
        await run("ca", "rotate", "begin", env=cp.env())
        pending = roots_of(await run("ca", "status", env=cp.env()))
    with control_plane(tmp_path, data) as cp:
        assert roots_of(await run("ca", "status", env=cp.env())) == pending
        err = await fails("ca", "rotate", "retire", "00" * 32, env=cp.env())
        assert err == f"no trusted root has fingerprint {'00' * 32}"
        await run("ca", "rotate", "complete", env=cp.env())
        after = roots_of(await run("ca", "status", env=cp.env()))
    assert sorted(r[0] for r in after.values()) == ["previous", "signing"]
    assert {fp for fp, r in pending.items() if r[0] == "next"} == {
        fp for fp, r in after.items() if r[0] == "signing"
    }


async def test_bundle_change_reaches_nodes_and_waypoints_as_its_own_version(
    tmp_path: Path,
) -> None:
    from tests.inproc.test_api_push import MESH, Recorder, apply, plane

    gw = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: wp, namespace: shop}\nspec:\n  gatewayClassName: istio-waypoint\n"
        "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
    )
    async with plane(tmp_path) as p:
        await apply(p, MESH + "---\n" + gw)
        node, wp = Recorder(), Recorder()
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(p.client("node-a").follow(node))
            t2 = tg.create_task(p.client("shop/wp", waypoint_address="10.2.0.99").follow(wp))
            n0, w0 = await node.wait_for(lambda s: True), await wp.wait_for(lambda s: True)
            assert not p.push.refresh_trust_bundle()  # nothing changed: nothing sent

            old_fp = fingerprint(p.ca.signing_root)
            new_fp = fingerprint(p.ca.begin_rotation())
            assert p.push.refresh_trust_bundle()
            n1 = await node.wait_for(lambda s: bundle_fps(s) == {old_fp, new_fp})
            w1 = await wp.wait_for(lambda s: bundle_fps(s) == {old_fp, new_fp})
            assert n1.version == w1.version == p.store.version + 1 > n0.version == w0.version
            assert n1.workloads == n0.workloads and w1.services == w0.services

            # a store change after it: a newer version still (never the bundle's again)
            await apply(p, MESH.replace("10.2.0.11", "10.2.0.13"))
            n2 = await node.wait_for(lambda s: s.version > n1.version)
            assert n2.version == p.store.version + 1 and bundle_fps(n2) == {old_fp, new_fp}
            status = p.push.status()
            assert status["config_version"] == n2.version and status["ca"]["roots"] == 2
            t1.cancel()
            t2.cancel()
