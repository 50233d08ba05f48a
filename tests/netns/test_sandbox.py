"""Sandbox: nodes and workloads as netns; traffic flows within and across nodes; no leftovers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from netsetup.netns import socket_in_netns
from netsetup.sandbox import Sandbox, SandboxError, cleanup_leftovers, unique_prefix
from tests.netns.fixtures import SandboxFactory, sandbox, sandbox6, sandbox_factory

__all__ = ["sandbox", "sandbox6", "sandbox_factory"]


def _netns_with_prefix(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    names = [line.split()[0] for line in out.stdout.splitlines() if line.strip()]
    return [n for n in names if n == prefix or n.startswith(prefix + "-")]


def _serve_http(sb: Sandbox, netns: str, port: int) -> subprocess.Popen[bytes]:
    proc = sb.popen(
        netns,
        [sys.executable, "-u", "-m", "http.server", "--bind", "0.0.0.0", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # "Serving HTTP on 0.0.0.0 port N ..." once listening
    assert b"Serving HTTP" in line, line
    return proc


def test_workload_reaches_workloads_on_same_and_other_node(sandbox: Sandbox) -> None:
    w11, w12, w21 = sandbox.workload("w1-1"), sandbox.workload("w1-2"), sandbox.workload("w2-1")
    _serve_http(sandbox, w21.netns, 8080)
    _serve_http(sandbox, w12.netns, 8081)

    cross = sandbox.exec(w11.netns, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                     "--max-time", "5", f"http://{w21.ip}:8080/"])
    assert (cross.returncode, cross.stdout) == (0, "200"), cross.stderr
    same = sandbox.exec(w11.netns, ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
                                    "--max-time", "5", f"http://{w12.ip}:8081/"])
    assert (same.returncode, same.stdout) == (0, "200"), same.stderr


def test_cross_node_source_address_is_preserved(sandbox: Sandbox) -> None:
    """Routed underlay, no NAT: the server sees the client workload's own address."""
    w11, w22 = sandbox.workload("w1-1"), sandbox.workload("w2-2")
    with socket_in_netns(w22.netns) as srv, socket_in_netns(w11.netns) as cli:
        srv.bind((w22.ip, 0))
        srv.listen()
        srv.settimeout(5)
        cli.settimeout(5)
        cli.connect((w22.ip, srv.getsockname()[1]))
        conn, peer = srv.accept()
        with conn:
            assert peer[0] == w11.ip
            cli.sendall(b"ping")
            assert conn.recv(4) == b"ping"


def test_addresses_follow_the_plan(sandbox: Sandbox) -> None:
    assert [n.name for n in sandbox.nodes] == ["n1", "n2"]
    n1, n2 = sandbox.nodes
    assert (n1.subnet, n1.bridge_ip, n1.underlay_ip) == ("10.244.1.0/24", "10.244.1.1",
                                                         "10.250.0.1")
    assert (n2.subnet, n2.bridge_ip, n2.underlay_ip) == ("10.244.2.0/24", "10.244.2.1",
                                                         "10.250.0.2")
    assert [(w.name, w.node, w.ip, w.iface) for w in sandbox.workloads] == [
        ("w1-1", "n1", "10.244.1.2", "eth0"),
        ("w1-2", "n1", "10.244.1.3", "eth0"),
        ("w2-1", "n2", "10.244.2.2", "eth0"),
        ("w2-2", "n2", "10.244.2.3", "eth0"),
    ]
    w = sandbox.workload("w2-1")
    assert w.netns == f"{sandbox.prefix}-w2-1"
    addr = sandbox.exec(w.netns, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"])
    assert "10.244.2.2/24" in addr.stdout
    route = sandbox.exec(w.netns, ["ip", "route", "show", "default"])
    assert "via 10.244.2.1 dev eth0" in route.stdout
    lo = sandbox.exec(w.netns, ["ip", "-o", "link", "show", "lo"])
    assert "UP" in lo.stdout
    fwd = sandbox.exec(n1.netns, ["cat", "/proc/sys/net/ipv4/ip_forward"])
    assert fwd.stdout.strip() == "1"
    wfwd = sandbox.exec(w.netns, ["cat", "/proc/sys/net/ipv4/ip_forward"])
    assert wfwd.stdout.strip() == "0"
    # Lookups by name; unknown names say what exists.
    assert sandbox.node("n2").netns == f"{sandbox.prefix}-n2"
    assert [x.name for x in sandbox.workloads_on("n1")] == ["w1-1", "w1-2"]
    with pytest.raises(SandboxError, match=r"no workload 'nope'.*w1-1"):
        sandbox.workload("nope")


def test_dual_stack_cross_node(sandbox6: Sandbox) -> None:
    w12, w21 = sandbox6.workload("w1-2"), sandbox6.workload("w2-1")
    assert (w12.ip6, w21.ip6) == ("fd00:244:1::3", "fd00:244:2::2")
    with socket_in_netns(w21.netns, socket.AF_INET6) as srv, socket_in_netns(
        w12.netns, socket.AF_INET6
    ) as cli:
        srv.bind((w21.ip6, 0))
        srv.listen()
        srv.settimeout(5)
        cli.settimeout(5)
        cli.connect((w21.ip6, srv.getsockname()[1]))
        conn, peer = srv.accept()
        conn.close()
        assert peer[0] == w12.ip6


def test_named_workloads_and_more_nodes(sandbox_factory: SandboxFactory) -> None:
    sb = sandbox_factory(nodes=3, workload_names=[["client"], [], ["server", "db"]])
    assert [(w.name, w.node, w.ip) for w in sb.workloads] == [
        ("client", "n1", "10.244.1.2"),
        ("server", "n3", "10.244.3.2"),
        ("db", "n3", "10.244.3.3"),
    ]
    assert sb.workload("client").netns == f"{sb.prefix}-client"
    _serve_http(sb, sb.workload("db").netns, 5432)
    r = sb.exec(sb.workload("client").netns,
                ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
                 "http://10.244.3.3:5432/"])
    assert r.stdout == "200", r.stderr


def test_teardown_removes_everything_and_kills_processes() -> None:
    prefix = unique_prefix("sbt")
    sb = Sandbox(prefix, nodes=2, workloads_per_node=1)
    try:
        with sb:
            assert sorted(_netns_with_prefix(prefix)) == sorted(sb.netns_names)
            assert len(sb.netns_names) == 5  # fabric, 2 nodes, 2 workloads
            proc = sb.popen(sb.workload("w1-1").netns, ["sleep", "300"])
            assert sb.build() is sb  # building again is a no-op
        assert proc.poll() is not None, "teardown must kill the processes popen() started"
        assert _netns_with_prefix(prefix) == []
        sb.teardown()  # twice is fine
    finally:
        cleanup_leftovers(prefix)


def test_cleanup_leftovers_after_a_crashed_run() -> None:
    base = unique_prefix("crash")
    bystander = unique_prefix("bystand")
    script = textwrap.dedent(f"""
        import os
        from netsetup.sandbox import Sandbox
        Sandbox({base + "a"!r}, nodes=2, workloads_per_node=1).build()
        Sandbox({base + "b"!r}, nodes=1, workloads_per_node=1).build()
        os._exit(3)  # crash: no teardown
    """)
    subprocess.run(["ip", "netns", "add", f"{bystander}-n1"], check=True)
    try:
        crashed = subprocess.run([sys.executable, "-c", script], cwd=os.getcwd(), check=False,
                                 capture_output=True, text=True, timeout=60)
        assert crashed.returncode == 3, crashed.stderr
        left = _netns_with_prefix(base + "a") + _netns_with_prefix(base + "b")
        assert len(left) == 5 + 3
        removed = cleanup_leftovers(base)  # the common part sweeps both sandboxes
        assert sorted(removed) == sorted(left)
        assert _netns_with_prefix(base + "a") == _netns_with_prefix(base + "b") == []
        assert _netns_with_prefix(bystander) == [f"{bystander}-n1"], "others' netns stay"
        assert cleanup_leftovers(base) == []
    finally:
        cleanup_leftovers(base)
        cleanup_leftovers(bystander)


def test_name_clash_is_an_error_and_touches_nothing() -> None:
    prefix = unique_prefix("clash")
    subprocess.run(["ip", "netns", "add", f"{prefix}-n1"], check=True)
    try:
        sb = Sandbox(prefix, nodes=2, workloads_per_node=1)
        with pytest.raises(SandboxError, match=rf"{prefix}-n1 already exists.*cleanup_leftovers"):
            sb.build()
        assert _netns_with_prefix(prefix) == [f"{prefix}-n1"], "someone else's netns must stay"
    finally:
        cleanup_leftovers(prefix)


class _FailingSandbox(Sandbox):
    """Fault injection: the kernel refuses the second workload's plumbing."""

    def _plumb_workload(self, node, w):  # type: ignore[no-untyped-def]
        if w.name == "w2-1":
            raise OSError(28, "No space left on device")
        super()._plumb_workload(node, w)


def test_failed_build_removes_what_it_made() -> None:
    prefix = unique_prefix("fail")
    sb = _FailingSandbox(prefix, nodes=2, workloads_per_node=1)
    try:
        with pytest.raises(SandboxError) as info:
            sb.build()
        msg = str(info.value)
        assert "\n" not in msg
        assert "No space left on device" in msg and "removed" in msg
        assert _netns_with_prefix(prefix) == []
    finally:
        cleanup_leftovers(prefix)


def test_bad_input_is_rejected_before_touching_the_system() -> None:
    with pytest.raises(SandboxError, match="prefix"):
        Sandbox("")
    with pytest.raises(SandboxError, match="one list of names per node"):
        Sandbox(unique_prefix("bad"), nodes=2, workload_names=[["a"]])
    with pytest.raises(SandboxError, match="duplicate"):
        Sandbox(unique_prefix("bad"), nodes=2, workload_names=[["a"], ["a"]])
    with pytest.raises(SandboxError, match="bad sandbox prefix"):
        cleanup_leftovers("")
    for cidr in ("10.244.0.0", "10.244.0.0/23", "fd00::/48", "nonsense"):
        with pytest.raises(SandboxError, match="give an IPv4 network with room for 2 /24"):
            Sandbox(unique_prefix("bad"), nodes=2, workload_cidr=cidr)
    assert Sandbox(unique_prefix("ok"), nodes=2, workload_cidr="10.96.0.0/22").workloads[0].ip == (
        "10.96.1.2"
    )


def test_exec_rejects_unknown_netns(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match="not found"):
        sandbox.exec(f"{sandbox.prefix}-nope", ["true"])


def _connect_ok(sb: Sandbox, src_netns: str, dst_netns: str, dst_ip: str,
                family: int = socket.AF_INET) -> str:
    """Connect from src_netns to a listener in dst_netns on dst_ip; return the peer address."""
    with socket_in_netns(dst_netns, family) as srv, socket_in_netns(src_netns, family) as cli:
        srv.bind((dst_ip, 0))
        srv.listen()
        srv.settimeout(5)
        cli.settimeout(5)
        cli.connect((dst_ip, srv.getsockname()[1]))
        conn, peer = srv.accept()
        conn.close()
        return str(peer[0])


def test_fabric_host_reaches_and_is_reached_by_nodes_and_workloads(sandbox6: Sandbox) -> None:
    sb = sandbox6
    assert (sb.fabric_ip, sb.fabric_ip6) == ("10.250.0.254", "fd00:250::fe")
    w = sb.workload("w2-2")
    assert sb.node_of("w2-2").name == "n2"
    # A control plane in the fabric netns is reachable from node and workload netns...
    assert _connect_ok(sb, sb.node("n1").netns, sb.fabric_netns, sb.fabric_ip) == "10.250.0.1"
    assert _connect_ok(sb, w.netns, sb.fabric_netns, sb.fabric_ip) == w.ip
    assert sb.fabric_ip6 is not None and w.ip6 is not None
    assert _connect_ok(sb, w.netns, sb.fabric_netns, sb.fabric_ip6, socket.AF_INET6) == w.ip6
    # ...and an external client there reaches workloads.
    assert _connect_ok(sb, sb.fabric_netns, w.netns, w.ip) == sb.fabric_ip


async def test_build_find_and_teardown_from_async_code() -> None:
    """pyroute2's sync API needs a loop-free thread: the sandbox must work under uvloop too."""
    from netsetup.find import find_netns_by_address

    prefix = unique_prefix("async")
    try:
        with Sandbox(prefix, nodes=2, workloads_per_node=1) as sb:
            w = sb.workload("w2-1")
            assert find_netns_by_address(w.ip, name_prefix=prefix) == w.netns
            assert _connect_ok(sb, sb.workload("w1-1").netns, w.netns, w.ip) == "10.244.1.2"
        assert _netns_with_prefix(prefix) == []
    finally:
        cleanup_leftovers(prefix)
