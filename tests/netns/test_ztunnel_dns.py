"""Tier 3: ztunnel's DNS proxy with the node's upstream resolver, seen by a stock resolver.

One sandbox node runs ztunnel (`--local-config`, `--dns-upstream` = a tiny
authoritative server in the fabric netns, which is on no node). A workload's glibc
resolver (`getent`, resolv.conf bind-mounted by `ip netns exec` from
/etc/netns/<netns>/) asks its usual resolver: mesh service names are answered by
ztunnel, `outside.example` comes from the upstream over UDP, and over TCP when the
client uses TCP (`options use-vc`); an unknown name is NXDOMAIN.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools
from tests.pki import TestPKI

PY = sys.executable
ROOT = str(Path(__file__).parents[2])
VIP = "10.96.0.10"
OUTSIDE = "10.250.0.254"  # what the upstream says outside.example is (the fabric's address)

# Authoritative for outside.example (A only), NXDOMAIN for everything else; logs
# "<transport> <name>" per query so the test sees which way each one came.
UPSTREAM = r"""
import socket, struct, sys, threading
from ztunnel.dns import (CLASS_IN, RCODE_NXDOMAIN, TYPE_A, ResourceRecord, TcpFramer,
                         frame_tcp, make_response, parse_message)
ip, answer_ip = sys.argv[1], sys.argv[2]
lock = threading.Lock()
def respond(data, transport):
    m = parse_message(data)
    q = m.questions[0]
    name = b".".join(q.name).decode().lower()
    with lock:
        print(transport, name, flush=True)
    if name != "outside.example":
        return make_response(m, rcode=RCODE_NXDOMAIN)
    rrs = [ResourceRecord(q.name, TYPE_A, CLASS_IN, 0, socket.inet_aton(answer_ip))]
    return make_response(m, answers=rrs if q.qtype == TYPE_A else [], authoritative=True)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((ip, 53))
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((ip, 53)); t.listen(16)
def conn(c):
    with c:
        framer = TcpFramer()
        while data := c.recv(4096):
            for msg in framer.feed(data):
                c.sendall(frame_tcp(respond(msg, "tcp")))
def tcp():
    while True:
        c, _ = t.accept()
        threading.Thread(target=conn, args=(c,), daemon=True).start()
threading.Thread(target=tcp, daemon=True).start()
print("up", flush=True)
while True:
    d, a = u.recvfrom(4096); u.sendto(respond(d, "udp"), a)
"""

# Asks RESOLVER:53 one A query over udp|tcp; prints "<rcode> <addresses...>".
CLIENT = r"""
import socket, struct, sys
from ztunnel.dns import encode_query, parse_message
resolver, name, proto = sys.argv[1], sys.argv[2], sys.argv[3]
q = encode_query(name, 1, msg_id=77)
if proto == "udp":
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(5)
    s.sendto(q, (resolver, 53)); data = s.recvfrom(4096)[0]
else:
    s = socket.create_connection((resolver, 53), timeout=5)
    s.sendall(struct.pack("!H", len(q)) + q)
    n = struct.unpack("!H", s.recv(2))[0]; data = b""
    while len(data) < n: data += s.recv(n - len(data))
m = parse_message(data)
assert m.id == 77, m
print(m.rcode, *(socket.inet_ntoa(a.rdata) for a in m.answers if a.rtype == 1))
"""


@dataclass
class Env:
    sb: Sandbox
    tmp: Path
    upstream_log: Path
    client_netns: str
    resolv_dir: Path

    def getent(self, name: str, *, tcp: bool = False) -> subprocess.CompletedProcess[str]:
        """`getent ahostsv4 NAME` in the client workload, its resolver over UDP or TCP."""
        conf = f"nameserver {self.sb.node('n1').bridge_ip}\noptions timeout:3 attempts:1\n"
        if tcp:
            conf += "options use-vc\n"
        (self.resolv_dir / "resolv.conf").write_text(conf)
        return self.sb.exec(self.client_netns, ["getent", "ahostsv4", name], timeout=15)

    def ask(self, name: str, proto: str) -> list[str]:
        """One query from the client workload to its resolver: [rcode, addresses...]."""
        r = self.sb.exec(self.client_netns, [PY, "-c", CLIENT, self.sb.node("n1").bridge_ip,
                                             name, proto], cwd=ROOT, timeout=15)
        assert r.returncode == 0, r.stderr[-1500:]
        return r.stdout.split()

    def upstream_saw(self) -> list[str]:
        return [line for line in self.upstream_log.read_text().splitlines() if line != "up"]


def _wait_ready(sb: Sandbox, netns: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"ztunnel exited: {log.read_text()[-2000:]}")
        r = sb.exec(netns, ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w", "%{http_code}",
                            "http://127.0.0.1:15021/healthz/ready"])
        if r.stdout.strip() == "200":
            return
        time.sleep(0.1)
    raise AssertionError(f"ztunnel not ready: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    require_root_and_tools("ip", "nft", "curl", "getent")
    sb = Sandbox(unique_prefix("ztdns"), nodes=1, workload_names=[["client", "web"]])
    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-dns-"))
    resolv_dir: Path | None = None
    try:
        sb.build()
        client = sb.workload("client")
        resolv_dir = Path("/etc/netns") / client.netns
        resolv_dir.mkdir(parents=True)
        pki = TestPKI("cluster.local")
        (tmp / "ca.pem").write_bytes(pki.root_pem)
        (tmp / "ca-key.pem").write_bytes(pki.root_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()))
        os.chmod(tmp / "ca-key.pem", 0o600)
        workloads = [
            {"uid": f"default/{w.name}", "name": w.name, "namespace": "default", "ip": w.ip,
             "node": "n1", "netns": w.netns, "service_account": w.name, "enrolled": True,
             "labels": {"app": w.name}}
            for w in (client, sb.workload("web"))
        ]
        (tmp / "n1.json").write_text(json.dumps({
            "version": 1, "node": "n1", "trust_domain": "cluster.local",
            "workloads": workloads, "authorization_policies": [], "peer_authentications": [],
            "services": [{"name": "web", "namespace": "default", "vips": [VIP],
                          "ports": [{"port": 80, "target_port": 8080}],
                          "endpoints": [{"workload_uid": "default/web"}]}],
            "local_ca": {"cert": str(tmp / "ca.pem"), "key": str(tmp / "ca-key.pem")},
        }))
        upstream_log = tmp / "upstream.log"
        with open(upstream_log, "wb") as out:
            sb.popen(sb.fabric_netns, [PY, "-c", UPSTREAM, sb.fabric_ip, OUTSIDE],
                     stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        zlog = tmp / "ztunnel.log"
        with open(zlog, "wb") as out:
            zt = sb.popen(sb.node("n1").netns,
                          [PY, "-m", "ztunnel", "--node", "n1", "--local-config",
                           str(tmp / "n1.json"), "--data-dir", str(tmp / "data"),
                           "--dns-upstream", sb.fabric_ip, "--drain-timeout", "1"],
                          stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)
        _wait_ready(sb, sb.node("n1").netns, zt, zlog)
        deadline = time.monotonic() + 10
        while "up" not in upstream_log.read_text():
            assert time.monotonic() < deadline, upstream_log.read_text()
            time.sleep(0.05)
        yield Env(sb, tmp, upstream_log, client.netns, resolv_dir)
        os.killpg(zt.pid, signal.SIGTERM)
        zt.wait(timeout=10)
    finally:
        sb.teardown()
        if resolv_dir is not None:
            shutil.rmtree(resolv_dir, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)


def test_mesh_service_names_are_answered_by_ztunnel(env: Env) -> None:
    before = len(env.upstream_saw())
    for tcp in (False, True):
        r = env.getent("web.default.svc.cluster.local", tcp=tcp)
        assert r.returncode == 0 and r.stdout.split()[0] == VIP, (tcp, r.stdout, r.stderr)
    assert env.upstream_saw()[before:] == [], "a mesh name was asked upstream"


def test_other_names_come_from_the_node_upstream_over_udp_and_tcp(env: Env) -> None:
    before = len(env.upstream_saw())
    r = env.getent("outside.example")
    assert r.returncode == 0 and r.stdout.split()[0] == OUTSIDE, (r.stdout, r.stderr)
    assert "udp outside.example" in env.upstream_saw()[before:]
    before = len(env.upstream_saw())
    r = env.getent("outside.example", tcp=True)
    assert r.returncode == 0 and r.stdout.split()[0] == OUTSIDE, (r.stdout, r.stderr)
    seen = env.upstream_saw()[before:]
    assert "tcp outside.example" in seen and "udp outside.example" not in seen, seen


def test_unknown_names_are_nxdomain(env: Env) -> None:
    for proto in ("udp", "tcp"):
        assert env.ask("unknown.example", proto) == ["3"], proto  # NXDOMAIN, no answer
        assert f"{proto} unknown.example" in env.upstream_saw()
        assert env.getent("unknown.example", tcp=proto == "tcp").returncode == 2
    # and the same client sees the upstream's and the mesh's answers
    for proto in ("udp", "tcp"):
        assert env.ask("outside.example", proto) == ["0", OUTSIDE]
        assert env.ask("web.default.svc.cluster.local", proto) == ["0", VIP]
