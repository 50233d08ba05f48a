"""A forged `forwarded: for=` does not change the waypoint's ipBlocks decisions."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.inproc.test_waypoint_e2e import Mesh, get, which

#: makes the client workload (127.0.1.1, service account `client`) known to the waypoint
CLIENT_SERVICE = {"apiVersion": "v1", "kind": "Service",
                  "metadata": {"name": "client", "namespace": "app"},
                  "spec": {"selector": {"app": "client"}, "clusterIP": "10.96.0.99",
                           "ports": [{"port": 80, "name": "http"}]}}


def policy(action: str, blocks: list[str]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": f"by-ip-{action.lower()}", "namespace": "app"},
            "spec": {"targetRefs": [{"group": "", "kind": "Service", "name": "front"}],
                     "action": action,
                     "rules": [{"from": [{"source": {"ipBlocks": blocks}}]}]}}


def ignored(mesh: Mesh) -> dict[str, float]:
    assert mesh.waypoint is not None
    return {smp.labels["reason"]: smp.value for m in mesh.waypoint.registry.collect()
            if m.name == "ambit_waypoint_forwarded_ignored"
            for smp in m.samples if smp.name.endswith("_total")}


async def test_forged_forwarded_is_not_used_for_ip_blocks_allow_or_deny() -> None:
    # every tunnel of the test claims `forwarded: for="127.0.1.1:40000"`, the client's
    # address; the peer (a source ztunnel) connects from 127.0.0.1
    mesh = Mesh({"front": 1}, [CLIENT_SERVICE, policy("ALLOW", ["127.0.1.1/32"])], {})
    attacker = mesh.pki.issue("app", "attacker")
    async with mesh.running(), aiohttp.ClientSession() as s:
        async with mesh.forward("front") as url:
            status, text, _ = await get(s, url + "/")
            assert status == 200 and which(text) == "front"
        assert ignored(mesh) == {}
        async with mesh.forward("front", cert=attacker) as url:
            status, _, _ = await get(s, url + "/")
            assert status == 403  # judged by 127.0.0.1, not the claimed 127.0.1.1
        assert ignored(mesh) == {"identity_mismatch": 1.0}

        # DENY by the peer address: the claim cannot take the attacker out of the block
        mesh.apply([CLIENT_SERVICE, policy("DENY", ["127.0.0.1/32"])])
        async with mesh.forward("front", cert=attacker) as url:
            assert (await get(s, url + "/"))[0] == 403
        async with mesh.forward("front") as url:
            assert (await get(s, url + "/"))[0] == 200
        assert ignored(mesh) == {"identity_mismatch": 2.0}
