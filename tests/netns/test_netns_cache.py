"""The cached namespace fds of run_in_netns: never a stale namespace, no fd leak, thread safe."""

from __future__ import annotations

import os
import subprocess
import threading
from collections.abc import Iterator

import pytest

from netsetup.netns import (
    NetnsError,
    clear_netns_cache,
    current_netns_inode,
    forget_netns,
    netns_inode,
    run_in_netns,
    socket_in_netns,
)
from netsetup.sandbox import unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.fixtures import visit_netns_from_threads


def _ip(*args: str) -> None:
    subprocess.run(["ip", "netns", *args], check=True, capture_output=True)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Three fresh named namespaces, deleted afterwards (whatever the test did to them)."""
    require_root_and_tools("ip")
    prefix = unique_prefix("nsc")
    made = [f"{prefix}-{i}" for i in range(3)]
    for n in made:
        _ip("add", n)
    clear_netns_cache()
    try:
        yield made
    finally:
        clear_netns_cache()
        for n in made:
            subprocess.run(["ip", "netns", "del", n], check=False, capture_output=True)


def test_a_name_recreated_is_entered_anew_never_the_cached_namespace(names: list[str]) -> None:
    n = names[0]
    old = netns_inode(n)
    assert run_in_netns(n, current_netns_inode) == old  # now cached
    # Deleted and re-created with no call in between: the cache still holds the old one
    # (alive because of it, so the new one has another inode).
    _ip("del", n)
    _ip("add", n)
    new = netns_inode(n)
    assert new != old
    assert run_in_netns(n, current_netns_inode) == new
    with socket_in_netns(n) as s:  # and sockets land in the new one
        s.bind(("127.0.0.1", 0))  # its lo is down, but the address exists: no error
    # Deleted: the usual error, not the cached namespace.
    _ip("del", n)
    with pytest.raises(NetnsError, match="not found"):
        run_in_netns(n, current_netns_inode)
    _ip("add", n)
    assert run_in_netns(n, current_netns_inode) == netns_inode(n)


def test_fds_are_kept_once_per_namespace_and_closed_on_forget(names: list[str]) -> None:
    run_in_netns(names[0], current_netns_inode)  # this thread's own-namespace fd
    clear_netns_cache()
    before = _fds()
    for _ in range(50):
        for n in names:
            socket_in_netns(n).close()
    assert _fds() == before + len(names)
    forget_netns(names[0])
    forget_netns(f"/run/netns/{names[1]}")  # a path names the same cache entry
    assert _fds() == before + 1
    clear_netns_cache()
    assert _fds() == before


def test_threads_share_the_cache_and_close_their_own_fd_on_exit(names: list[str]) -> None:
    run_in_netns(names[0], current_netns_inode)
    before = _fds()
    errors = visit_netns_from_threads(names, 6, 200, lambda i, k: names[(i + k) % len(names)])
    assert errors == []
    # one fd per namespace stays cached; each thread's own-namespace fd went with it
    assert _fds() == before + len(names) - 1


def test_concurrent_use_while_the_namespace_is_replaced(names: list[str]) -> None:
    """Threads entering a name while it is deleted and re-created see, each time, a
    namespace that was at that name, or the not-found error; never anything else."""
    n = names[0]
    home = current_netns_inode()
    held: list[int] = []  # keeps every generation alive: their inodes stay distinct
    valid: set[int] = set()
    stop = threading.Event()
    errors: list[str] = []
    seen: list[int] = []

    def hold() -> None:
        fd = os.open(f"/run/netns/{n}", os.O_RDONLY)
        held.append(fd)
        valid.add(os.fstat(fd).st_ino)

    def worker() -> None:
        while not stop.is_set():
            try:
                inode = run_in_netns(n, current_netns_inode)
            except NetnsError as exc:
                if not any(m in str(exc) for m in ("not found", "cannot open", "not a network")):
                    errors.append(str(exc))
                continue
            except BaseException as exc:
                errors.append(repr(exc))
                return
            seen.append(inode)
            if current_netns_inode() != home:
                errors.append("not home")

    hold()
    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            _ip("del", n)
            subprocess.run(["ip", "netns", "add", n], check=True)
            hold()
    finally:
        stop.set()
        for t in threads:
            t.join()
        for fd in held:
            os.close(fd)
    assert errors == []
    assert seen and set(seen) <= valid, "entered a namespace that was never at the name"
    assert run_in_netns(n, current_netns_inode) == netns_inode(n)
