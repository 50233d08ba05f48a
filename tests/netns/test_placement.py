"""Tier 3: WorkloadEntries with only an address are enrolled by the node whose netns hold it.

A real control plane in the sandbox's fabric netns and a real ztunnel per node; the
WorkloadEntries carry no `ambit.dev/node` or `ambit.dev/netns` annotation. Each ztunnel
reports the addresses it finds in its node's workload netns (scoped by name prefix:
the sandbox's nodes share one host), so the client is placed on n1 and the server on
n2, each enrolled only there, and the traffic between them is mTLS.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.meshkit import (
    ECHO_PORT,
    ECHO_SERVER,
    PY,
    ambient_namespace,
    start_control_plane,
    start_ztunnel,
    wait_for,
)
from ztunnel.discovery import HostScanner, plan_claims


def _manifests(sb: Sandbox) -> str:
    docs = [ambient_namespace("shop")]
    for name, wl in (("client", "w1-1"), ("server", "w2-1")):
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata:\n  name: {name}\n  namespace: shop\n"
            f"spec:\n  address: {sb.workload(wl).ip}\n  serviceAccount: {name}\n"
        )
    return "---\n".join(docs)


def _inode(ref: str) -> int | None:
    try:
        return os.stat(ref if "/" in ref else f"/run/netns/{ref}").st_ino
    except OSError:
        return None  # gone since the scan


def test_unannotated_workloads_are_enrolled_by_the_node_that_owns_their_address() -> None:
    require_root_and_tools("ip", "nft", "nc", "curl")
    sb = Sandbox(unique_prefix("place"), nodes=2, workloads_per_node=1)
    tmp = Path(tempfile.mkdtemp(prefix="placement-"))
    cp_log = open(tmp / "cp.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        sb.build()
        cp = start_control_plane(sb, tmp, cp_log)
        cp.ambit("apply", "-f", "-", stdin=_manifests(sb))
        client, server = sb.workload("w1-1"), sb.workload("w2-1")
        sb.popen(server.netns, [PY, "-c", ECHO_SERVER, str(ECHO_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logs: dict[str, Path] = {}
        for i, node in ((1, "n1"), (2, "n2")):
            logs[node] = tmp / f"zt-{node}.log"
            token_file = tmp / f"token-{node}"
            token_file.write_text(cp.ambit("token", "create", "--node", node))
            token_file.chmod(0o600)
            start_ztunnel(sb, tmp, node, "--token-file", str(token_file),
                          "--discovery-netns-prefix", f"{sb.prefix}-w{i}-", env=cp.env)

        def enrolled(node: str) -> set[str]:
            out = set()
            for line in logs[node].read_text(errors="replace").splitlines():
                if '"workload enrolled"' in line:
                    out.add(json.loads(line)["workload"])
            return out

        t0 = time.monotonic()
        wait_for(lambda: enrolled("n1") == {"shop/client"}, "the client enrolled on n1", 15)
        wait_for(lambda: enrolled("n2") == {"shop/server"}, "the server enrolled on n2", 15)
        took = time.monotonic() - t0
        assert took < 10, f"placement took {took:.1f}s"

        r = sb.exec(client.netns, ["nc", "-N", "-w", "5", server.ip, str(ECHO_PORT)],
                    input="placed\n", timeout=15)
        assert r.stdout.strip() == f"{client.ip} placed", r.stderr
        # meshed: the server's node saw the client's mTLS identity
        wait_for(lambda: "spiffe://cluster.local/ns/shop/sa/client"
                 in logs["n2"].read_text(errors="replace"),
                 "the client's principal in the server node's access log", 10)

        # each node holds the other's workload only as a remote one, on the right node
        for node, mine, other in (("n1", "client", "server"), ("n2", "server", "client")):
            dump = sb.exec(sb.node(node).netns,
                           ["curl", "-s", "http://127.0.0.1:15000/config_dump"])
            snap = json.loads(dump.stdout)["snapshot"]
            placed = {w["name"]: w["node"] for w in snap["workloads"]}
            assert placed[mine] == node, placed
            assert placed.get(other, "n2" if node == "n1" else "n1") != node, placed
        assert enrolled("n1") == {"shop/client"} and enrolled("n2") == {"shop/server"}
        status = cp.ambit("status")
        assert "unplaced" not in status, status
    finally:
        cp_log.close()
        sb.teardown()
        shutil.rmtree(tmp, ignore_errors=True)


def test_host_scan_finds_an_address_added_to_a_process_held_netns_after_it_appeared() -> None:
    require_root_and_tools("ip", "unshare")
    addr = f"10.253.{os.getpid() % 250}.{os.getpid() // 250 % 250 + 1}"
    script = ("ip link add pl0 type veth peer name pl1 && ip link set pl0 up && echo ready && "
              f"read go && ip addr add {addr}/32 dev pl0 && echo added && exec sleep 60")
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", script], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdin is not None and proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        scan = HostScanner()
        path = f"/proc/{proc.pid}/ns/net"
        first = plan_claims({}, scan())
        assert addr not in first.claims
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "added"
        second = plan_claims(first.claims, scan())
        assert second.claims[addr] == path and addr in second.added
        own = os.stat("/proc/self/ns/net").st_ino
        assert own not in {_inode(s.ref) for s in scan()}  # the scanner's own netns: never
    finally:
        proc.kill()
        proc.wait()
