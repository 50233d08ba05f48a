"""Transparent capture end to end: stock clients in a two-node sandbox, listeners the test opens
inside workload netns, and what reaches them (outbound, inbound, HBONE port, marks, DNS)."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from netsetup.capture import Workload, enroll, inspect, is_enrolled, unenroll
from netsetup.netns import run_in_netns, socket_in_netns
from netsetup.rules import CaptureSpec
from netsetup.sandbox import Sandbox, SandboxWorkload, unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.fixtures import sandbox, sandbox6, sandbox_factory  # noqa: F401

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = 20
IPV6_RECVORIGDSTADDR = 74
TIMEOUT = 5.0
# The mark the capture rules let through uncaptured (the proxy's own sockets): enroll()
# installs the rules of `Workload.spec()`, which keeps CaptureSpec's default.
PROXY_MARK = CaptureSpec.proxy_mark


@pytest.fixture(autouse=True)
def _clients() -> None:
    require_root_and_tools("nc")


# -- helpers shared by the tier-3 capture tests ----------------------------------------------------


def workload(w: SandboxWorkload, ipv6: bool = False) -> Workload:
    return Workload(w.name, w.netns, w.ip, w.ip6 if ipv6 else None, w.iface)


@contextlib.contextmanager
def bare_netns(area: str) -> Iterator[str]:
    """A throwaway netns with lo up; deleting it takes its tables, rules and routes along."""
    name = unique_prefix(area)
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def listener(
    netns: str,
    addr: str,
    port: int,
    transparent: bool = True,
    kind: int = socket.SOCK_STREAM,
) -> socket.socket:
    """A socket bound inside `netns` (IP_TRANSPARENT: a TPROXY target), listening if TCP."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    s = socket_in_netns(netns, family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if transparent:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
    s.bind((addr, port))
    if kind == socket.SOCK_STREAM:
        s.listen(16)
    s.setblocking(False)
    return s


def accept_one(
    *listeners: socket.socket, timeout: float = TIMEOUT
) -> tuple[socket.socket, socket.socket] | None:
    """Wait for a connection on any of `listeners`: (listener, accepted socket) or None."""
    ready, _, _ = select.select(list(listeners), [], [], timeout)
    if not ready:
        return None
    lst = ready[0]
    conn, _ = lst.accept()
    conn.setblocking(True)
    conn.settimeout(TIMEOUT)
    return lst, conn


def nothing_pending(*listeners: socket.socket) -> bool:
    ready, _, _ = select.select(list(listeners), [], [], 0)
    return not ready


def nc(sb: Sandbox, netns: str, ip: str, port: int, data: bytes = b"hello\n") -> Any:
    """Start a stock `nc` in `netns` that sends `data` to ip:port."""
    argv = ["nc", "-N", "-w", "3"] + (["-6"] if ":" in ip else []) + [ip, str(port)]
    p = sb.popen(netns, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)  # fmt: skip
    assert p.stdin is not None
    p.stdin.write(data)
    p.stdin.close()
    return p


def connect_from(netns: str, ip: str, port: int, mark: int | None = None) -> socket.socket:
    """A TCP connection from inside `netns` made by the test (optionally with SO_MARK)."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    s = socket_in_netns(netns, family)
    if mark is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, mark)
    s.settimeout(TIMEOUT)
    s.connect((ip, port))
    return s


def nft_tables(netns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "exec", netns, "nft", "-j", "list", "tables"],
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return [i["table"]["name"] for i in json.loads(out)["nftables"] if "table" in i]


def ip_rules(netns: str, v6: bool = False) -> list[dict[str, Any]]:
    argv = ["ip", "-j"] + (["-6"] if v6 else []) + ["-n", netns, "rule", "show"]
    rules: list[dict[str, Any]] = json.loads(subprocess.check_output(argv))
    return rules


def table_routes(netns: str, table: int = 100, v6: bool = False) -> list[dict[str, Any]]:
    argv = ["ip", "-j"] + (["-6"] if v6 else []) + ["-n", netns, "route", "show", "table",
                                                    str(table)]  # fmt: skip
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    if r.returncode != 0 and "table does not exist" in r.stderr:
        return []  # never had a route
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    routes: list[dict[str, Any]] = json.loads(out) if out else []
    return routes


def default_rule_prefs(netns: str, v6: bool = False) -> list[int]:
    return sorted(r["priority"] for r in ip_rules(netns, v6))


# -- tests ----------------------------------------------------------------------------------------


def test_stock_client_outbound_lands_on_15001_with_original_destination(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    a, b = sandbox.workload("w1-1"), sandbox.workload("w2-1")
    node1 = sandbox.node(a.node).netns
    enroll(workload(a))
    assert is_enrolled(workload(a))
    with contextlib.ExitStack() as stack:
        # like ztunnel: code running in node 1's netns creates the listener inside A's netns
        proxy = stack.enter_context(run_in_netns(node1, listener, a.netns, "127.0.0.1", 15001))
        app_b = stack.enter_context(listener(b.netns, b.ip, 80, transparent=False))
        p = nc(sandbox, a.netns, b.ip, 80)
        got = accept_one(proxy, app_b)
        assert got is not None, "nc's connection reached no listener"
        lst, conn = got
        with conn:
            assert lst is proxy, "the connection went to B directly instead of to 15001"
            assert conn.getsockname() == (b.ip, 80)
            assert conn.getpeername()[0] == a.ip
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)
        assert nothing_pending(app_b)


def test_inbound_to_app_port_lands_on_15006_and_replies_reach_the_client(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    c, b = sandbox.workload("w1-2"), sandbox.workload("w2-1")  # c is not enrolled
    enroll(workload(b))
    with contextlib.ExitStack() as stack:
        inbound = stack.enter_context(listener(b.netns, "0.0.0.0", 15006))
        app_b = stack.enter_context(listener(b.netns, b.ip, 8080, transparent=False))
        p = nc(sandbox, c.netns, b.ip, 8080, b"ping\n")
        got = accept_one(inbound, app_b)
        assert got is not None
        lst, conn = got
        with conn:
            assert lst is inbound, "inbound connection was not captured to 15006"
            assert conn.getsockname() == (b.ip, 8080)
            assert conn.getpeername()[0] == c.ip
            assert conn.recv(100) == b"ping\n"
            conn.sendall(b"pong\n")  # the reply must make it back through the capture rules
            conn.shutdown(socket.SHUT_WR)
            assert p.stdout is not None
            out = p.stdout.read()
        p.wait(timeout=TIMEOUT)
        assert out == b"pong\n"


def test_hbone_port_15008_is_not_captured(sandbox: Sandbox) -> None:  # noqa: F811
    c, b = sandbox.workload("w1-2"), sandbox.workload("w2-1")
    enroll(workload(b))
    with contextlib.ExitStack() as stack:
        inbound = stack.enter_context(listener(b.netns, "0.0.0.0", 15006))
        hbone = stack.enter_context(listener(b.netns, b.ip, 15008, transparent=False))
        p = nc(sandbox, c.netns, b.ip, 15008)
        got = accept_one(inbound, hbone)
        assert got is not None
        lst, conn = got
        with conn:
            assert lst is hbone, "a connection to 15008 was captured"
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)


def test_proxy_marked_socket_is_not_captured(sandbox: Sandbox) -> None:  # noqa: F811
    a, d = sandbox.workload("w1-1"), sandbox.workload("w2-2")
    enroll(workload(a))
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        app_d = stack.enter_context(listener(d.netns, d.ip, 80, transparent=False))
        with connect_from(a.netns, d.ip, 80, mark=PROXY_MARK):
            got = accept_one(proxy, app_d)
            assert got is not None
            assert got[0] is app_d, f"a socket with SO_MARK {PROXY_MARK:#x} was captured"
            got[1].close()
        # and an unmarked one from the same netns is captured
        with connect_from(a.netns, d.ip, 80):
            got = accept_one(proxy, app_d)
            assert got is not None and got[0] is proxy
            got[1].close()


def test_workload_that_is_not_enrolled_is_untouched(sandbox: Sandbox) -> None:  # noqa: F811
    a, c, d = sandbox.workload("w1-1"), sandbox.workload("w1-2"), sandbox.workload("w2-2")
    enroll(workload(a))  # a neighbour on the same node is enrolled
    assert inspect(c.netns).empty
    assert nft_tables(c.netns) == []
    with contextlib.ExitStack() as stack:
        c_proxy = stack.enter_context(listener(c.netns, "127.0.0.1", 15001))
        app_d = stack.enter_context(listener(d.netns, d.ip, 80, transparent=False))
        p = nc(sandbox, c.netns, d.ip, 80)
        got = accept_one(c_proxy, app_d)
        assert got is not None and got[0] is app_d
        with got[1] as conn:
            assert conn.getpeername()[0] == c.ip
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)


def test_after_unenroll_the_workload_reaches_its_peer_directly(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    a, b = sandbox.workload("w1-1"), sandbox.workload("w2-1")
    w = workload(a)
    enroll(w)
    unenroll(w)
    assert not is_enrolled(w)
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        app_b = stack.enter_context(listener(b.netns, b.ip, 80, transparent=False))
        p = nc(sandbox, a.netns, b.ip, 80)
        got = accept_one(proxy, app_b)
        assert got is not None and got[0] is app_b, "still captured after unenroll"
        with got[1] as conn:
            assert conn.getpeername()[0] == a.ip
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)


def test_dns_to_an_outside_resolver_is_captured_on_15053(sandbox: Sandbox) -> None:  # noqa: F811
    a = sandbox.workload("w1-1")
    resolver = "10.244.2.53"  # inside the sandbox's workload range; nobody owns it
    enroll(workload(a))
    with contextlib.ExitStack() as stack:
        udp = stack.enter_context(listener(a.netns, "127.0.0.1", 15053, kind=socket.SOCK_DGRAM))
        udp.setsockopt(socket.SOL_IP, IP_RECVORIGDSTADDR, 1)
        tcp = stack.enter_context(listener(a.netns, "127.0.0.1", 15053))
        # a DNS query for example.com A
        query = (
            bytes.fromhex("123401000001000000000000") + b"\x07example\x03com\x00\x00\x01\x00\x01"
        )
        sandbox.exec(a.netns, ["nc", "-u", "-q", "0", resolver, "53"], input=query.decode("ascii"))
        ready, _, _ = select.select([udp], [], [], TIMEOUT)
        assert ready, "the UDP DNS query was not captured to 127.0.0.1:15053"
        data, anc, _flags, src = udp.recvmsg(512, socket.CMSG_SPACE(16))
        assert data == query
        assert src[0] == a.ip
        orig = [d for lvl, typ, d in anc if lvl == socket.SOL_IP and typ == IP_RECVORIGDSTADDR]
        assert orig, "no original destination on the captured datagram"
        port = int.from_bytes(orig[0][2:4], "big")
        assert (socket.inet_ntoa(orig[0][4:8]), port) == (resolver, 53)
        # the proxy answers as the resolver (transparent socket bound to its address); the
        # answer reaches the client, whose socket sees it come from the resolver
        client = stack.enter_context(socket_in_netns(a.netns, socket.AF_INET, socket.SOCK_DGRAM))
        client.settimeout(TIMEOUT)
        client.sendto(b"q2", (resolver, 53))
        ready, _, _ = select.select([udp], [], [], TIMEOUT)
        assert ready
        data, _anc, _flags, src = udp.recvmsg(512, socket.CMSG_SPACE(16))
        assert data == b"q2"
        answer = stack.enter_context(listener(a.netns, resolver, 53, kind=socket.SOCK_DGRAM))
        answer.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        answer.sendto(b"a2", src)
        assert client.recvfrom(100) == (b"a2", (resolver, 53))
        # DNS over TCP goes to the same port
        with connect_from(a.netns, resolver, 53):
            got = accept_one(tcp)
            assert got is not None
            with got[1] as conn:
                assert conn.getsockname() == (resolver, 53)


def test_dual_stack_capture_outbound_and_inbound_over_ipv6(
    sandbox6: Sandbox,  # noqa: F811
) -> None:
    a, b, c = sandbox6.workload("w1-1"), sandbox6.workload("w2-1"), sandbox6.workload("w1-2")
    assert a.ip6 and b.ip6
    enroll(workload(a, ipv6=True))
    enroll(workload(b, ipv6=True))
    assert is_enrolled(workload(a, ipv6=True)) and is_enrolled(workload(b, ipv6=True))
    with contextlib.ExitStack() as stack:
        proxy6 = stack.enter_context(listener(a.netns, "::1", 15001))
        app_b6 = stack.enter_context(listener(b.netns, b.ip6, 80, transparent=False))
        p = nc(sandbox6, a.netns, b.ip6, 80)
        got = accept_one(proxy6, app_b6)
        assert got is not None and got[0] is proxy6, "IPv6 outbound was not captured"
        with got[1] as conn:
            assert conn.getsockname()[:2] == (b.ip6, 80)
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)

        inbound6 = stack.enter_context(listener(b.netns, "::", 15006))
        p = nc(sandbox6, c.netns, b.ip6, 8080)  # c is not enrolled
        got = accept_one(inbound6)
        assert got is not None, "IPv6 inbound was not captured to 15006"
        with got[1] as conn:
            assert conn.getsockname()[:2] == (b.ip6, 8080)
            assert conn.recv(100) == b"hello\n"
        p.wait(timeout=TIMEOUT)
        # DNS over IPv6 to an outside resolver lands on [::1]:15053
        udp6 = stack.enter_context(listener(a.netns, "::1", 15053, kind=socket.SOCK_DGRAM))
        udp6.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        resolver6 = "fd00:244:2::53"
        sender = stack.enter_context(socket_in_netns(a.netns, socket.AF_INET6, socket.SOCK_DGRAM))
        sender.sendto(b"query", (resolver6, 53))
        ready, _, _ = select.select([udp6], [], [], TIMEOUT)
        assert ready, "the IPv6 DNS query was not captured to [::1]:15053"
        data, anc, _flags, _src = udp6.recvmsg(512, socket.CMSG_SPACE(28))
        assert data == b"query"
        orig = [d for lvl, typ, d in anc if typ == IPV6_RECVORIGDSTADDR]
        assert orig and socket.inet_ntop(socket.AF_INET6, orig[0][8:24]) == resolver6
    # IPv4 keeps working next to it
    with contextlib.ExitStack() as stack:
        proxy4 = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        with connect_from(a.netns, b.ip, 80):
            got = accept_one(proxy4)
            assert got is not None
            with got[1] as conn:
                assert conn.getsockname() == (b.ip, 80)


@pytest.mark.parametrize("ipv6", [False, True])
def test_proxy_onward_connection_with_client_source_gets_replies(
    sandbox_factory: Any,  # noqa: F811
    ipv6: bool,
) -> None:
    """What ztunnel does on the server side: from inside B, connect to B's app with the
    client's address as source (IP_TRANSPARENT + mark); the app's replies, addressed to a
    non-local client, must come back to that socket instead of leaving through eth0."""
    sb = sandbox_factory(ipv6=ipv6, area="capt")
    b, c = sb.workload("w2-1"), sb.workload("w1-2")
    enroll(workload(b, ipv6=ipv6))
    bip, cip = (b.ip6, c.ip6) if ipv6 else (b.ip, c.ip)
    assert bip and cip
    family = socket.AF_INET6 if ipv6 else socket.AF_INET
    with contextlib.ExitStack() as stack:
        app = stack.enter_context(listener(b.netns, bip, 9090, transparent=False))
        onward = stack.enter_context(socket_in_netns(b.netns, family))
        if ipv6:
            onward.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        else:
            onward.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        onward.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, PROXY_MARK)
        onward.bind((cip, 0))
        onward.settimeout(TIMEOUT)
        onward.connect((bip, 9090))
        got = accept_one(app)
        assert got is not None
        with got[1] as conn:
            assert conn.getpeername()[0] == cip
            conn.sendall(b"reply")
            assert onward.recv(10) == b"reply"


def test_connections_open_before_enroll_keep_flowing_new_ones_are_captured(
    sandbox: Sandbox,  # noqa: F811
) -> None:
    a, b = sandbox.workload("w1-1"), sandbox.workload("w2-1")
    with contextlib.ExitStack() as stack:
        proxy = stack.enter_context(listener(a.netns, "127.0.0.1", 15001))
        app_b = stack.enter_context(listener(b.netns, b.ip, 80, transparent=False))
        old = stack.enter_context(connect_from(a.netns, b.ip, 80))
        got = accept_one(proxy, app_b)
        assert got is not None and got[0] is app_b
        server_side = stack.enter_context(got[1])
        enroll(workload(a))
        # the connection from before keeps working, both ways, without the proxy
        old.sendall(b"still here")
        assert server_side.recv(100) == b"still here"
        server_side.sendall(b"me too")
        assert old.recv(100) == b"me too"
        assert nothing_pending(proxy)
        # a new one is captured
        with connect_from(a.netns, b.ip, 80):
            got = accept_one(proxy, app_b)
            assert got is not None and got[0] is proxy
            got[1].close()
