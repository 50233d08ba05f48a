"""Tier 3: a dual-stack workload pair; IPv6 is captured and tunnelled like IPv4."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.meshkit import ECHO_PORT, PY
from tests.netns.test_ztunnel_mesh import Mesh, _wait_port
from tests.pki import TestPKI

ECHO_SERVER_DUAL = r"""
import socket, sys, threading
s = socket.socket(socket.AF_INET6); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(("::", int(sys.argv[1]))); s.listen(128)
def serve(c, a):
    with c:
        f = c.makefile("rwb")
        for line in f:
            f.write(a[0].removeprefix("::ffff:").encode() + b" " + line); f.flush()
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


def test_ipv6_and_ipv4_are_both_carried_over_hbone() -> None:
    require_root_and_tools("ip", "nft", "nc", "curl")
    sb = Sandbox(unique_prefix("zt6"), nodes=2, workload_names=[["a"], ["b"]], ipv6=True)
    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-v6-"))
    try:
        sb.build()
        pki = TestPKI("cluster.local")
        (tmp / "ca.pem").write_bytes(pki.root_pem)
        (tmp / "ca-key.pem").write_bytes(pki.root_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        doc = {
            "version": 1, "node": "n1",
            "local_ca": {"cert": str(tmp / "ca.pem"), "key": str(tmp / "ca-key.pem")},
            "workloads": [
                {"uid": f"default/{w.name}", "name": w.name, "namespace": "default",
                 "ip": w.ip, "ip6": w.ip6, "node": w.node, "netns": w.netns,
                 "service_account": w.name}
                for w in sb.workloads
            ],
        }
        mesh = Mesh(sb, tmp, doc)
        mesh.write_config(doc)
        sb.popen(sb.workload("b").netns, [PY, "-c", ECHO_SERVER_DUAL, str(ECHO_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for node in ("n1", "n2"):
            mesh.start_ztunnel(node)
        for node in ("n1", "n2"):
            mesh.wait_ready(node)
        b, a = sb.workload("b"), sb.workload("a")
        assert b.ip6 is not None and a.ip6 is not None
        _wait_port(sb, sb.node("n2").netns, b.ip, ECHO_PORT)
        assert mesh.echo("a", b.ip6, line="six") == f"{a.ip6} six"
        assert mesh.echo("a", b.ip, line="four") == f"{a.ip} four"
        e = mesh.wait_log("n2", direction="inbound", src_identity=
                          "spiffe://cluster.local/ns/default/sa/a",
                          dst_addr=f"[{b.ip6}]:{ECHO_PORT}")
        assert e["connection_security_policy"] == "mutual_tls"
        dump = json.loads(sb.exec(sb.node("n2").netns, ["curl", "-s",
                                                        "http://127.0.0.1:15000/config_dump"]
                                  ).stdout)
        assert any("::" in listener for w in dump["workloads"] for listener in w["listeners"])
    finally:
        sb.teardown()
        shutil.rmtree(tmp, ignore_errors=True)
