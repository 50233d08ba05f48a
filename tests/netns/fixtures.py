"""Shared tier-3 fixtures: sandboxes that are always torn down, even when a test fails.

Import the fixtures you use into your test module (or conftest):

    from tests.netns.fixtures import sandbox, sandbox_factory  # noqa: F401
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence

import pytest

from netsetup.netns import current_netns_inode, netns_inode, run_in_netns
from netsetup.sandbox import DEFAULT_WORKLOAD_CIDR, Sandbox, unique_prefix

SandboxFactory = Callable[..., Sandbox]


@pytest.fixture
def sandbox_factory() -> Iterator[SandboxFactory]:
    """Build sandboxes on demand: `sandbox_factory(nodes=2, workloads_per_node=2, ipv6=False,
    workload_names=None, area="t", workload_cidr="10.244.0.0/16")`; every one is torn
    down after the test, even when it fails."""
    made: list[Sandbox] = []

    def make(
        nodes: int = 2,
        workloads_per_node: int = 2,
        ipv6: bool = False,
        workload_names: Sequence[Sequence[str]] | None = None,
        *,
        area: str = "t",
        workload_cidr: str = DEFAULT_WORKLOAD_CIDR,
    ) -> Sandbox:
        sb = Sandbox(
            unique_prefix(area),
            nodes=nodes,
            workloads_per_node=workloads_per_node,
            ipv6=ipv6,
            workload_names=workload_names,
            workload_cidr=workload_cidr,
        )
        made.append(sb)
        return sb.build()

    try:
        yield make
    finally:
        for sb in reversed(made):
            sb.teardown()


@pytest.fixture
def sandbox(sandbox_factory: SandboxFactory) -> Sandbox:
    """Two nodes with two IPv4 workloads each (w1-1, w1-2 on n1; w2-1, w2-2 on n2)."""
    return sandbox_factory()


@pytest.fixture
def sandbox6(sandbox_factory: SandboxFactory) -> Sandbox:
    """Like `sandbox`, dual-stack (workloads also get fd00:244:i::/64 addresses)."""
    return sandbox_factory(ipv6=True)


def visit_netns_from_threads(names: Sequence[str], threads: int, rounds: int,
                             pick: Callable[[int, int], str]) -> list[str]:
    """`threads` threads, started together, each run code in `rounds` namespaces
    (`pick(thread, round)` names the next): what went wrong, empty when each saw the
    namespace it asked for and was back in its own after each visit."""
    expected = {n: netns_inode(n) for n in names}
    home = current_netns_inode()
    errors: list[str] = []
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        start.wait()
        for k in range(rounds):
            n = pick(i, k)
            seen = run_in_netns(n, current_netns_inode)
            if seen != expected[n]:
                errors.append(f"thread {i}: in {n} saw inode {seen}")
            if current_netns_inode() != home:
                errors.append(f"thread {i}: not back home after {n}")

    running = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for t in running:
        t.start()
    for t in running:
        t.join()
    return errors
