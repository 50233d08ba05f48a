"""Network-namespace sandbox: N nodes (bridge + routed underlay) and M workloads per node."""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from netsetup.netns import (
    NETNS_RUN_DIR,
    NetnsError,
    iproute_in_netns,
    netns_path,
    run_in_fresh_thread,
    run_in_netns,
)

_counter = itertools.count(1)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# Tests and demos only ever put traffic here; nothing leaves the namespaces.
DEFAULT_WORKLOAD_CIDR = "10.244.0.0/16"
DEFAULT_UNDERLAY_CIDR = "10.250.0.0/24"
DEFAULT_UNDERLAY_CIDR6 = "fd00:250::/64"
IFA_F_NODAD = 0x02
_FABRIC_IFINDEX_BASE = 1000


class SandboxError(Exception):
    """The sandbox could not be built or used; the message says what to do."""


@dataclass(frozen=True)
class SandboxNode:
    """A node: a netns with bridge `br0` holding `bridge_ip`, forwarding between workloads."""

    name: str
    netns: str
    underlay_ip: str
    bridge_ip: str
    subnet: str
    underlay_ip6: str | None = None
    bridge_ip6: str | None = None
    subnet6: str | None = None


@dataclass(frozen=True)
class SandboxWorkload:
    """A workload: a netns whose `iface` is a veth to its node's bridge."""

    name: str
    node: str
    netns: str
    ip: str
    ip6: str | None
    iface: str


def unique_prefix(area: str) -> str:
    """A netns name prefix unique to this process and call, e.g. "capture41234x3"."""
    clean = re.sub(r"[^a-z0-9]", "", area.lower())[:8] or "sbx"
    return f"{clean}{os.getpid() % 100000}x{next(_counter)}"


def _check_prefix(prefix: str) -> None:
    if len(prefix) < 3 or not _NAME_RE.match(prefix):
        raise SandboxError(
            f"bad sandbox prefix {prefix!r}: use 3+ characters [A-Za-z0-9_.-], "
            "e.g. netsetup.sandbox.unique_prefix('myarea')"
        )


def _sysctl(netns: str, key: str, value: str) -> None:
    def write() -> None:
        with open(f"/proc/sys/{key}", "w") as f:
            f.write(value)

    run_in_netns(netns, write)


def _ip_batch(lines: Sequence[str]) -> None:
    if not lines:
        return
    proc = subprocess.run(
        ["ip", "-batch", "-"],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise SandboxError(f"`ip` failed: {msg}")


def _named_netns() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def _delete_netns(names: Sequence[str]) -> list[str]:
    """Delete these named netns (those that exist); return the deleted ones."""
    present = set(_named_netns())
    todo = [n for n in names if n in present]
    if not todo:
        return []
    # -force: keep going past a name another process deleted meanwhile.
    subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"netns del {n}\n" for n in todo),
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    left = set(_named_netns())
    return [n for n in todo if n not in left]


def cleanup_leftovers(prefix: str) -> list[str]:
    """Remove every netns whose name starts with `prefix` (left by a crashed run).

    Returns the names removed. Processes still inside keep their netns alive until they
    exit, but its name is gone. `prefix` may be a sandbox's prefix or a shorter common
    part (e.g. the area and pid part of `unique_prefix`, to sweep a whole crashed run).
    """
    _check_prefix(prefix)
    return _delete_netns([n for n in _named_netns() if n.startswith(prefix)])


class Sandbox:
    """Nodes and workloads as network namespaces, joined like a small cluster.

    Node i (1-based) is netns `{prefix}-n{i}` with bridge `br0` at `.1` of its workload
    subnet (10.244.i.0/24 by default) and `ip_forward=1`; its veth `ul0` (underlay_ip,
    10.250.0.i/24) plugs into bridge `br0` of netns `{prefix}-fabric`, and it routes the
    other nodes' workload subnets via their underlay ips. Workload j of node i is netns
    `{prefix}-w{i}-{j}` (or `{prefix}-{given name}`) with `eth0` at `.{j+1}` of the
    subnet, `lo` up and a default route via the bridge ip. With `ipv6=True` the same
    plan is repeated in fd00:244:i::/64 (underlay fd00:250::i/64).

    The fabric netns itself holds `fabric_ip` (10.250.0.254, fd00:250::fe) on its bridge
    and routes to every workload subnet: a place for things that are on no node (a
    control plane, an external client), reachable from every node and workload.
    """

    def __init__(
        self,
        prefix: str,
        nodes: int = 2,
        workloads_per_node: int = 2,
        ipv6: bool = False,
        workload_names: Sequence[Sequence[str]] | None = None,
        *,
        workload_cidr: str = DEFAULT_WORKLOAD_CIDR,
    ) -> None:
        _check_prefix(prefix)
        if nodes < 1 or nodes > 200:
            raise SandboxError(f"nodes={nodes}: a sandbox holds 1 to 200 nodes")
        if workload_names is not None:
            if len(workload_names) != nodes:
                raise SandboxError(
                    f"workload_names has {len(workload_names)} lists for {nodes} nodes: "
                    "give one list of names per node"
                )
            per_node = [list(names) for names in workload_names]
        else:
            if workloads_per_node < 0:
                raise SandboxError("workloads_per_node must be 0 or more")
            per_node = [[f"w{i}-{j}" for j in range(1, workloads_per_node + 1)]
                        for i in range(1, nodes + 1)]
        flat = [n for names in per_node for n in names]
        for n in flat:
            if not _NAME_RE.match(n) or n == "fabric" or re.fullmatch(r"n\d+", n):
                raise SandboxError(
                    f"bad workload name {n!r}: use [A-Za-z0-9_.-], not 'fabric' or 'n<digits>'"
                )
        if len(set(flat)) != len(flat):
            raise SandboxError(f"duplicate workload names in {flat}: names must be unique")
        if any(len(names) > 250 for names in per_node):
            raise SandboxError("at most 250 workloads per node")
        try:
            net = ipaddress.ip_network(workload_cidr)
        except ValueError:
            net = None
        if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 24 - nodes.bit_length():
            raise SandboxError(
                f"workload_cidr {workload_cidr}: give an IPv4 network with room for "
                f"{nodes} /24 subnets, e.g. 10.244.0.0/16"
            )

        self.prefix = prefix
        self.ipv6 = ipv6
        self.fabric_netns = f"{prefix}-fabric"
        self.nodes: list[SandboxNode] = []
        self.workloads: list[SandboxWorkload] = []
        subnets = list(itertools.islice(net.subnets(new_prefix=24), 1, nodes + 1))
        ul = ipaddress.IPv4Network(DEFAULT_UNDERLAY_CIDR)
        ul6 = ipaddress.IPv6Network(DEFAULT_UNDERLAY_CIDR6)
        self.fabric_ip = str(ul.broadcast_address - 1)
        self.fabric_ip6: str | None = str(ul6.network_address + 0xFE) if ipv6 else None
        subnets6 = [ipaddress.IPv6Network(f"fd00:244:{i:x}::/64") for i in range(1, nodes + 1)]
        for i in range(1, nodes + 1):
            sub = subnets[i - 1]
            sub6 = subnets6[i - 1]
            node = SandboxNode(
                name=f"n{i}",
                netns=f"{prefix}-n{i}",
                underlay_ip=str(ul.network_address + i),
                bridge_ip=str(sub.network_address + 1),
                subnet=str(sub),
                underlay_ip6=str(ul6.network_address + i) if ipv6 else None,
                bridge_ip6=str(sub6.network_address + 1) if ipv6 else None,
                subnet6=str(sub6) if ipv6 else None,
            )
            self.nodes.append(node)
            for j, wname in enumerate(per_node[i - 1], start=1):
                self.workloads.append(
                    SandboxWorkload(
                        name=wname,
                        node=node.name,
                        netns=f"{prefix}-{wname}",
                        ip=str(sub.network_address + 1 + j),
                        ip6=str(sub6.network_address + 1 + j) if ipv6 else None,
                        iface="eth0",
                    )
                )
        self._built = False
        self._created: list[str] = []
        self._procs: list[tuple[subprocess.Popen[bytes], bool]] = []
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ lookup

    @property
    def netns_names(self) -> list[str]:
        """Every netns this sandbox owns: fabric, nodes, workloads."""
        return [self.fabric_netns] + [n.netns for n in self.nodes] + [
            w.netns for w in self.workloads
        ]

    def node(self, name: str) -> SandboxNode:
        for n in self.nodes:
            if n.name == name:
                return n
        raise SandboxError(f"no node {name!r} in this sandbox: have {[n.name for n in self.nodes]}")

    def workload(self, name: str) -> SandboxWorkload:
        for w in self.workloads:
            if w.name == name:
                return w
        raise SandboxError(
            f"no workload {name!r} in this sandbox: have {[w.name for w in self.workloads]}"
        )

    def node_of(self, workload: str) -> SandboxNode:
        """The node that workload `workload` (by name) is attached to."""
        return self.node(self.workload(workload).node)

    def workloads_on(self, node: str) -> list[SandboxWorkload]:
        """The workloads attached to node `node` (by node name)."""
        self.node(node)
        return [w for w in self.workloads if w.node == node]

    # ------------------------------------------------------------------ build

    def build(self) -> Sandbox:
        """Create every netns, link, address and route; on failure undo all and raise."""
        with self._lock:
            if self._built:
                return self
            try:
                self._create_netns()
                run_in_fresh_thread(self._plumb)
            except BaseException as exc:
                self._teardown_locked()
                if isinstance(exc, SandboxError):
                    raise
                if isinstance(exc, Exception):
                    raise SandboxError(
                        f"building sandbox {self.prefix!r} failed ({type(exc).__name__}: "
                        f"{exc}); everything it made was removed"
                    ) from exc
                raise
            self._built = True
            return self

    def _create_netns(self) -> None:
        names = self.netns_names
        existing = set(_named_netns())
        clash = [n for n in names if n in existing]
        if clash:
            raise SandboxError(
                f"network namespace {clash[0]} already exists: another run owns it or crashed; "
                f"use a fresh prefix (unique_prefix()) or remove it with "
                f"cleanup_leftovers({self.prefix!r})"
            )
        try:
            _ip_batch([f"netns add {n}" for n in names])
        finally:
            now = set(_named_netns())
            self._created = [n for n in names if n in now]

    def _plumb(self) -> None:
        for ns in self.netns_names:
            if self.ipv6:
                for scope in ("all", "default"):
                    _sysctl(ns, f"net/ipv6/conf/{scope}/accept_dad", "0")
            with iproute_in_netns(ns) as ipr:
                ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

        with iproute_in_netns(self.fabric_netns) as fab:
            fab.link("add", ifname="br0", kind="bridge")
            fab_br = fab.link_lookup(ifname="br0")[0]
            fab.addr("add", index=fab_br, address=self.fabric_ip, prefixlen=24)
            if self.fabric_ip6:
                fab.addr("add", index=fab_br, address=self.fabric_ip6, prefixlen=64,
                         flags=IFA_F_NODAD)
            fab.link("set", index=fab_br, state="up")

            for idx, node in enumerate(self.nodes, start=1):
                _sysctl(node.netns, "net/ipv4/ip_forward", "1")
                if self.ipv6:
                    _sysctl(node.netns, "net/ipv6/conf/all/forwarding", "1")
                self._plumb_node(node, idx, fab)
                fab.route("add", dst=node.subnet, gateway=node.underlay_ip)
                if node.subnet6 and node.underlay_ip6:
                    fab.route("add", dst=node.subnet6, gateway=node.underlay_ip6)
        self._wait_links_up()

    def _wait_links_up(self, timeout: float = 10.0) -> None:
        """Wait until every link is operationally up: until then the kernel drops packets."""
        deadline = time.monotonic() + timeout
        pending = list(self.netns_names)
        while True:
            down: list[str] = []
            for ns in pending:
                with iproute_in_netns(ns) as ipr:
                    down += [f"{ns}/{link.get('ifname')}" for link in ipr.get_links()
                             if link.get("operstate") not in ("UP", "UNKNOWN")]
            if not down:
                return
            pending = sorted({d.split("/", 1)[0] for d in down})
            if time.monotonic() > deadline:
                raise SandboxError(
                    f"links still down after {timeout:.0f}s: {', '.join(down)}; "
                    "check `ip -n NETNS link` and dmesg"
                )
            time.sleep(0.02)

    def _plumb_node(self, node: SandboxNode, idx: int, fab: Any) -> None:
        with iproute_in_netns(node.netns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge")
            br = ipr.link_lookup(ifname="br0")[0]
            ipr.addr("add", index=br, address=node.bridge_ip, prefixlen=24)
            if node.bridge_ip6:
                ipr.addr("add", index=br, address=node.bridge_ip6, prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=br, state="up")

            # Underlay: node side "ul0", fabric side "n{i}" on the fabric bridge.
            # The fabric end gets a high ifindex: a veth whose peer has its own ifindex (in
            # the other netns) is not "urgent" for the kernel's linkwatch, which then
            # delays carrier/qdisc activation by up to a second and drops packets meanwhile.
            fab_name = f"n{idx}"
            fd = os.open(netns_path(node.netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                fab.link("add", ifname=fab_name, index=_FABRIC_IFINDEX_BASE + idx, kind="veth",
                         peer={"ifname": "ul0", "net_ns_fd": fd})
            finally:
                os.close(fd)
            ul0 = ipr.link_lookup(ifname="ul0")[0]
            ipr.addr("add", index=ul0, address=node.underlay_ip, prefixlen=24)
            if node.underlay_ip6:
                ipr.addr("add", index=ul0, address=node.underlay_ip6, prefixlen=64,
                         flags=IFA_F_NODAD)
            ipr.link("set", index=ul0, state="up")
            fab_if = fab.link_lookup(ifname=fab_name)[0]
            fab.link("set", index=fab_if, master=fab.link_lookup(ifname="br0")[0], state="up")

            for other in self.nodes:
                if other.name == node.name:
                    continue
                ipr.route("add", dst=other.subnet, gateway=other.underlay_ip)
                if other.subnet6 and other.underlay_ip6:
                    ipr.route("add", dst=other.subnet6, gateway=other.underlay_ip6)

            for j, w in enumerate(self.workloads_on(node.name), start=1):
                host_if = f"veth{j}"
                fd = os.open(netns_path(w.netns), os.O_RDONLY | os.O_CLOEXEC)
                try:
                    ipr.link("add", ifname=host_if, kind="veth",
                             peer={"ifname": w.iface, "net_ns_fd": fd})
                finally:
                    os.close(fd)
                hidx = ipr.link_lookup(ifname=host_if)[0]
                ipr.link("set", index=hidx, master=br, state="up")
                self._plumb_workload(node, w)

    def _plumb_workload(self, node: SandboxNode, w: SandboxWorkload) -> None:
        with iproute_in_netns(w.netns) as ipr:
            eth = ipr.link_lookup(ifname=w.iface)[0]
            ipr.addr("add", index=eth, address=w.ip, prefixlen=24)
            if w.ip6:
                ipr.addr("add", index=eth, address=w.ip6, prefixlen=64, flags=IFA_F_NODAD)
            ipr.link("set", index=eth, state="up")
            ipr.route("add", dst="0.0.0.0/0", gateway=node.bridge_ip)
            if w.ip6 and node.bridge_ip6:
                ipr.route("add", dst="::/0", gateway=node.bridge_ip6)

    # ------------------------------------------------------------------ processes

    def _check_netns(self, netns: str) -> None:
        if "/" in netns:
            raise SandboxError(
                f"exec/popen take a netns name, not a path ({netns!r}): use a name such as "
                f"{self.workloads[0].netns if self.workloads else self.nodes[0].netns!r}"
            )
        try:
            netns_path(netns)
        except NetnsError as exc:
            raise SandboxError(str(exc)) from None

    def exec(
        self, netns: str, argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside `netns` via `ip netns exec` and wait.

        Defaults: capture_output=True, text=True, check=False, timeout=60 (override any).
        """
        self._check_netns(netns)
        kwargs: dict[str, Any] = {
            "capture_output": True, "text": True, "check": False, "timeout": 60
        }
        kwargs.update(popen_kwargs)
        result: subprocess.CompletedProcess[str] = subprocess.run(  # noqa: PLW1510 - in kwargs
            ["ip", "netns", "exec", netns, *argv], **kwargs
        )
        return result

    def popen(
        self, netns: str, argv: Sequence[str], **popen_kwargs: Any
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `netns` (its own process group); teardown kills it by pid.

        The child enters the netns just after this returns (`ip netns exec` switches,
        then execs argv): wait for a readiness signal of argv before relying on it.
        """
        self._check_netns(netns)
        kwargs: dict[str, Any] = {"start_new_session": True}
        kwargs.update(popen_kwargs)
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            ["ip", "netns", "exec", netns, *argv], **kwargs
        )
        with self._lock:
            self._procs.append((proc, bool(kwargs.get("start_new_session"))))
        return proc

    def _kill_procs(self) -> None:
        procs, self._procs = self._procs, []
        for p, group in procs:
            if p.poll() is None:
                _signal(p, signal.SIGTERM, group)
        for p, group in procs:
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                _signal(p, signal.SIGKILL, group)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(timeout=3)
            for stream in (p.stdin, p.stdout, p.stderr):
                if stream is not None:
                    stream.close()

    # ------------------------------------------------------------------ teardown

    def teardown(self) -> None:
        """Kill tracked processes and delete every netns this sandbox created; idempotent."""
        with self._lock:
            self._teardown_locked()

    def _teardown_locked(self) -> None:
        self._kill_procs()
        created, self._created = self._created, []
        # Workloads first, fabric last: the veths die with their namespaces.
        _delete_netns(list(reversed(created)))
        self._built = False

    def __repr__(self) -> str:
        return (
            f"Sandbox(prefix={self.prefix!r}, nodes={[n.name for n in self.nodes]}, "
            f"workloads={[w.name for w in self.workloads]}, built={self._built})"
        )

    def __enter__(self) -> Sandbox:
        return self.build()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.teardown()


def _signal(p: subprocess.Popen[bytes], sig: int, group: bool) -> None:
    """Signal a process popen() started, and its group when it leads one (pgid == its pid)."""
    if group:
        try:
            os.killpg(p.pid, sig)
            return
        except (ProcessLookupError, PermissionError):
            pass
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)
