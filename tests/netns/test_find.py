"""Finding a workload's netns by address: right one among several, clear errors otherwise."""

from __future__ import annotations

import os
import subprocess

import pytest

from netsetup.find import (
    addresses_in_netns,
    find_netns_by_address,
    iter_netns,
    resolve_workload_netns,
)
from netsetup.netns import NetnsError
from netsetup.sandbox import Sandbox
from tests.netns.fixtures import SandboxFactory, sandbox_factory

__all__ = ["sandbox_factory"]

# Documentation ranges (RFC 5737): never a real peer; the netns below are our own.
# The one we add is per process, so concurrent runs of this file do not see each other's.
UNOWNED = "198.51.100.77"
PROC_ONLY = f"203.0.113.{os.getpid() % 254 + 1}"


@pytest.fixture
def sb(sandbox_factory: SandboxFactory) -> Sandbox:
    return sandbox_factory(nodes=2, workloads_per_node=3, ipv6=True, area="find")


def test_finds_the_right_workload_among_several(sb: Sandbox) -> None:
    # Other sandboxes on this machine may use the same plan: restrict to ours first.
    for w in sb.workloads:
        assert find_netns_by_address(w.ip, name_prefix=sb.prefix) == w.netns
        assert w.ip6 is not None
        assert find_netns_by_address(w.ip6, name_prefix=sb.prefix) == w.netns
    assert find_netns_by_address(sb.node("n2").underlay_ip, name_prefix=sb.prefix) == (
        sb.node("n2").netns
    )
    # Any spelling of the address works.
    w = sb.workload("w2-3")
    assert w.ip6 is not None
    spelled = w.ip6.replace("fd00:244:2::", "fd00:0244:0002:0000::")
    assert find_netns_by_address(f"[{spelled}]", name_prefix=sb.prefix) == w.netns
    assert {a for a in addresses_in_netns(w.netns) if not a.startswith("fe80:")} == {w.ip, w.ip6}


def test_full_scan_finds_a_named_netns_by_a_unique_address(sb: Sandbox) -> None:
    w = sb.workload("w1-2")
    sb.exec(w.netns, ["ip", "addr", "add", f"{PROC_ONLY}/32", "dev", "eth0"], check=True)
    assert find_netns_by_address(PROC_ONLY) == w.netns
    assert resolve_workload_netns(None, PROC_ONLY) == w.netns


def test_full_scan_finds_a_netns_only_a_process_holds() -> None:
    script = (
        "ip link add fa0 type veth peer name fa1 && "
        f"ip addr add {PROC_ONLY}/32 dev fa0 && echo ready && exec sleep 60"
    )
    proc = subprocess.Popen(["unshare", "--net", "sh", "-c", script],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        path = f"/proc/{proc.pid}/ns/net"
        assert path in [c.ref for c in iter_netns()]
        assert find_netns_by_address(PROC_ONLY) == path
        # Restricted to named netns, it is invisible.
        with pytest.raises(NetnsError, match="no named netns"):
            find_netns_by_address(PROC_ONLY, name_prefix="findnothing")
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_address_owned_by_none_says_what_to_do() -> None:
    with pytest.raises(NetnsError) as info:
        find_netns_by_address(UNOWNED)
    assert str(info.value) == (
        f"no network namespace owns {UNOWNED}: is the workload running? "
        "pass its netns name or path explicitly"
    )


def test_loopback_addresses_do_not_count(sb: Sandbox) -> None:
    with pytest.raises(NetnsError, match="no named netns"):
        find_netns_by_address("127.0.0.1", name_prefix=sb.prefix)


def test_address_owned_by_several_is_an_error(sb: Sandbox) -> None:
    a, b = sb.workload("w1-1"), sb.workload("w2-1")
    sb.exec(b.netns, ["ip", "addr", "add", f"{a.ip}/32", "dev", "eth0"], check=True)
    with pytest.raises(NetnsError) as info:
        find_netns_by_address(a.ip, name_prefix=sb.prefix)
    msg = str(info.value)
    assert a.netns in msg and b.netns in msg and "explicitly" in msg


def test_resolve_prefers_the_explicit_netns(sb: Sandbox) -> None:
    a, b = sb.workload("w1-1"), sb.workload("w2-1")
    assert resolve_workload_netns(b.netns, a.ip) == b.netns
    assert resolve_workload_netns(None, a.ip, name_prefix=sb.prefix) == a.netns
    with pytest.raises(NetnsError, match="not found"):
        resolve_workload_netns(f"{sb.prefix}-gone", a.ip)


def test_bad_address_is_rejected() -> None:
    with pytest.raises(NetnsError, match="not an IP address"):
        find_netns_by_address("10.0.0")
