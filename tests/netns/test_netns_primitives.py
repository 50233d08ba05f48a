"""Netns primitives: per-thread switching, restore on error, sockets stay in their netns."""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import subprocess
from pathlib import Path

import pytest

from netsetup.netns import (
    NetnsError,
    arun_in_netns,
    current_netns_inode,
    iproute_in_netns,
    netns_inode,
    netns_path,
    run_in_fresh_thread,
    run_in_netns,
    socket_in_netns,
)
from netsetup.sandbox import Sandbox
from tests.netns.fixtures import SandboxFactory, sandbox_factory, visit_netns_from_threads

__all__ = ["sandbox_factory"]


@pytest.fixture
def one_node(sandbox_factory: SandboxFactory) -> Sandbox:
    return sandbox_factory(nodes=1, workloads_per_node=4, area="prim")


def test_threads_switch_concurrently_and_each_returns_home(one_node: Sandbox) -> None:
    names = [w.netns for w in one_node.workloads]
    home = current_netns_inode()
    assert home not in {netns_inode(n) for n in names}
    rngs = [random.Random(seed) for seed in range(8)]
    errors = visit_netns_from_threads(names, 8, 100, lambda i, _: rngs[i].choice(names))
    assert errors == []
    assert current_netns_inode() == home


def test_thread_returns_to_its_own_netns_when_fn_raises(one_node: Sandbox) -> None:
    a, b = one_node.workloads[0].netns, one_node.workloads[1].netns
    home = current_netns_inode()

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        run_in_netns(a, boom)
    assert current_netns_inode() == home

    # Nested: a thread already switched into A comes back to A (its own), not the process's.
    def in_a() -> tuple[int, int]:
        with pytest.raises(ValueError):
            run_in_netns(b, boom)
        after_raise = current_netns_inode()
        inner = run_in_netns(b, current_netns_inode)
        assert inner == netns_inode(b)
        return after_raise, current_netns_inode()

    after_raise, after_ok = run_in_netns(a, in_a)
    assert after_raise == after_ok == netns_inode(a)
    assert current_netns_inode() == home


def test_socket_created_in_netns_lives_there(one_node: Sandbox) -> None:
    w1, w2 = one_node.workloads[0], one_node.workloads[1]
    # The workload's address exists only inside its netns: binding works there only.
    with socket_in_netns(w1.netns) as s:
        s.bind((w1.ip, 0))
        s.listen()
        port = s.getsockname()[1]
        with socket.socket() as here, pytest.raises(OSError) as info:
            here.bind((w1.ip, 0))
        assert info.value.errno == errno.EADDRNOTAVAIL
        # The socket keeps its netns after the switch back: a peer workload reaches it.
        with socket_in_netns(w2.netns) as c:
            c.settimeout(5)
            c.connect((w1.ip, port))
            conn, peer = s.accept()
            conn.close()
            assert peer[0] == w2.ip
    assert current_netns_inode() != netns_inode(w1.netns)


def test_netns_by_proc_path(one_node: Sandbox) -> None:
    w = one_node.workloads[2]
    proc = one_node.popen(w.netns, ["sh", "-c", "echo ready && exec sleep 60"],
                          stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"  # past `ip netns exec`'s setns
    path = f"/proc/{proc.pid}/ns/net"
    assert netns_path(path) == path
    assert run_in_netns(path, current_netns_inode) == netns_inode(w.netns)
    proc.kill()
    proc.wait()


def test_unknown_netns_gives_one_line_actionable_error() -> None:
    with pytest.raises(NetnsError) as info:
        run_in_netns("no-such-netns-ambit-test", current_netns_inode)
    msg = str(info.value)
    assert "\n" not in msg
    assert "'no-such-netns-ambit-test' not found" in msg and "ip netns list" in msg
    with pytest.raises(NetnsError, match="does not exist: check the path"):
        socket_in_netns("/proc/999999999/ns/net")
    with pytest.raises(NetnsError, match="empty network namespace name"):
        netns_path("")


def test_path_that_is_not_a_network_namespace(tmp_path: Path) -> None:
    plain = tmp_path / "not-a-netns"
    plain.write_text("")
    home = current_netns_inode()
    for path in (str(plain), "/proc/self/ns/mnt"):
        with pytest.raises(NetnsError) as info:
            run_in_netns(path, current_netns_inode)
        assert str(info.value) == (
            f"{path} is not a network namespace: give a name from `ip netns list` "
            "or a path such as /proc/PID/ns/net"
        )
    assert current_netns_inode() == home


def test_iproute_in_netns_sees_that_netns(one_node: Sandbox) -> None:
    w = one_node.workloads[3]

    def addrs() -> list[str]:
        with iproute_in_netns(w.netns) as ipr:
            return [a.get("address") for a in ipr.get_addr(family=socket.AF_INET)]

    assert sorted(run_in_fresh_thread(addrs)) == sorted(["127.0.0.1", w.ip])
    with pytest.raises(NetnsError):
        run_in_fresh_thread(lambda: iproute_in_netns("no-such-netns-ambit-test"))


async def test_arun_in_netns_keeps_the_loop_thread_home(one_node: Sandbox) -> None:
    names = [w.netns for w in one_node.workloads]
    home = current_netns_inode()
    seen = await asyncio.gather(*(arun_in_netns(n, current_netns_inode) for n in names * 5))
    assert seen == [netns_inode(n) for n in names * 5]
    assert current_netns_inode() == home
    # And a socket made on a worker thread is usable by the loop.
    w1, w2 = one_node.workloads[0], one_node.workloads[1]
    lsock = await arun_in_netns(w1.netns, socket.socket)
    lsock.bind((w1.ip, 0))
    lsock.listen()
    lsock.setblocking(False)

    async def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(await r.readexactly(5))
        await w.drain()
        w.close()

    server = await asyncio.start_server(on_conn, sock=lsock)
    async with server:
        csock = await arun_in_netns(w2.netns, socket.socket)
        csock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(csock, lsock.getsockname())
        reader, writer = await asyncio.open_connection(sock=csock)
        writer.write(b"hello")
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
        writer.close()
        await writer.wait_closed()


def test_run_in_fresh_thread_reraises() -> None:
    def fail() -> None:
        raise subprocess.SubprocessError("x")

    with pytest.raises(subprocess.SubprocessError):
        run_in_fresh_thread(fail)
    assert run_in_fresh_thread(lambda: 42) == 42
