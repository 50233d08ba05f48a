"""Network-namespace primitives: run code or create sockets inside a netns, from any thread."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import functools
import os
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = "/run/netns"

P = ParamSpec("P")
T = TypeVar("T")


class NetnsError(Exception):
    """A network namespace could not be found or entered; the message says what to do."""


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int


def _setns(fd: int, nstype: int = CLONE_NEWNET) -> None:
    if _libc.setns(fd, nstype) != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise NetnsError(
                "setns() not permitted: run as root or grant CAP_SYS_ADMIN and CAP_NET_ADMIN"
            )
        raise NetnsError(f"setns() failed: {os.strerror(err)}")


def netns_path(netns: str) -> str:
    """Turn a netns name (as in `ip netns`) or a path into a path, checking that it exists."""
    if not netns:
        raise NetnsError("empty network namespace name: give a name from `ip netns list` or a path")
    path = netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)
    if not os.path.exists(path):
        if "/" in netns:
            raise NetnsError(f"network namespace {netns!r} does not exist: check the path")
        raise NetnsError(
            f"network namespace {netns!r} not found in {NETNS_RUN_DIR}: "
            "check `ip netns list` or pass a path such as /proc/PID/ns/net"
        )
    return path


def netns_inode(netns: str) -> int:
    """The inode that identifies a namespace (equal inodes: the same namespace)."""
    return os.stat(netns_path(netns)).st_ino


def current_netns_inode() -> int:
    """The inode of the calling thread's network namespace."""
    return os.stat("/proc/thread-self/ns/net").st_ino


class _NsFd:
    """An open fd of one namespace; `users` pins it while threads are inside it."""

    __slots__ = ("dropped", "fd", "key", "users")

    def __init__(self, fd: int, key: tuple[int, int]) -> None:
        self.fd = fd
        self.key = key  # (st_dev, st_ino) of the namespace the fd holds
        self.users = 1
        self.dropped = False


# path -> the fd of the namespace found there. Shared by all threads (setns accepts an
# fd opened by any thread); an fd is closed once it is out of the cache and no thread
# is inside it, so a thread never setns()es into an fd number closed and reused.
_NS_CACHE_MAX = 256
_ns_cache: dict[str, _NsFd] = {}
_ns_lock = threading.Lock()


def _new_lock_in_child() -> None:
    # a fork while another thread held the lock must not leave the child stuck on it
    global _ns_lock
    _ns_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def _release(entry: _NsFd) -> None:
    """Drop one user (lock held); a dropped entry's fd closes with its last user."""
    entry.users -= 1
    if entry.dropped and entry.users == 0:
        os.close(entry.fd)


def _drop(path: str, entry: _NsFd) -> None:
    """Take `entry` out of the cache (lock held): closed now, or by its last user."""
    if _ns_cache.get(path) is entry:
        del _ns_cache[path]
    if not entry.dropped:
        entry.dropped = True
        if entry.users == 0:
            os.close(entry.fd)


def _cache_path(netns: str) -> str:
    return netns if "/" in netns else os.path.join(NETNS_RUN_DIR, netns)


def forget_netns(netns: str) -> None:
    """Close the cached fd of `netns` (a name or a path), e.g. once its workload left.

    Not needed for correctness: a namespace deleted, or replaced at the same path, is
    noticed on the next use. This keeps the cache from holding a gone namespace alive.
    """
    path = _cache_path(netns)
    with _ns_lock:
        entry = _ns_cache.get(path)
        if entry is not None:
            _drop(path, entry)


def clear_netns_cache() -> None:
    """Close every cached namespace fd (one in use: when its last thread leaves it)."""
    with _ns_lock:
        for path, entry in list(_ns_cache.items()):
            _drop(path, entry)


def _enter(netns: str) -> tuple[str, _NsFd, bool]:
    """(path, pinned fd of the namespace at the path now, whether it was just opened).

    The path is stat'ed on every call (the stat that checking that it exists cost
    anyway) and the cached fd is used only if it holds the namespace found there:
    equal (st_dev, st_ino). Namespace inode numbers are reused once a namespace is
    freed, but the cached fd keeps its namespace alive, so no other namespace can have
    that number while it is cached: a name deleted and re-created, or a /proc/PID path
    whose PID now is another process, shows another inode and is opened afresh (and a
    deleted one fails the stat: the cached fd is dropped, the usual error raised).
    Re-opening only on a failing setns would not do: setns into a deleted-but-held
    namespace succeeds.
    """
    if not netns:
        netns_path(netns)  # raises: empty name
    path = _cache_path(netns)
    try:
        st = os.stat(path)
    except OSError:
        forget_netns(netns)
        netns_path(netns)  # raises the error that says what to check
        try:
            st = os.stat(path)  # created in between
        except OSError:
            netns_path(netns)  # and gone again
            raise
    key = (st.st_dev, st.st_ino)
    with _ns_lock:
        entry = _ns_cache.get(path)
        if entry is not None:
            if entry.key == key:
                entry.users += 1
                return path, entry, False
            _drop(path, entry)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(
            f"cannot open network namespace {netns!r}: {exc.strerror}: "
            "check `ip netns list` or that the process still runs"
        ) from None
    try:
        fst = os.fstat(fd)
    except BaseException:
        os.close(fd)
        raise
    return path, _NsFd(fd, (fst.st_dev, fst.st_ino)), True


def _keep(path: str, entry: _NsFd) -> None:
    """Cache a just-opened `entry` that setns accepted (lock held)."""
    if path in _ns_cache:
        entry.dropped = True  # another thread cached this path meanwhile: keep theirs
        return
    if len(_ns_cache) >= _NS_CACHE_MAX:  # oldest quarter out (reopened when used again)
        for old_path, old in list(_ns_cache.items())[: _NS_CACHE_MAX // 4]:
            _drop(old_path, old)
    _ns_cache[path] = entry


class _Home:
    """A thread's own namespace fd; closed when the thread's local data goes."""

    __slots__ = ("fd",)

    def __init__(self) -> None:
        self.fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def __del__(self) -> None:
        os.close(self.fd)


class _ThreadNs(threading.local):
    home: _Home | None = None
    inside: list[_NsFd]  # the namespaces run_in_netns entered on this thread, in order

    def __init__(self) -> None:
        self.inside = []


_thread_ns = _ThreadNs()


def run_in_netns(netns: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` with the calling thread switched into `netns`; always switch back.

    Safe from any thread: setns changes the calling thread only, and the thread goes
    back to the namespace it was in (its own, or the one an enclosing `run_in_netns`
    entered), even when `fn` raises.

    Per call: one stat and two setns. The namespace's fd is cached per path and checked
    against the path on every call (see `_enter`); the thread's own namespace fd is
    opened from /proc/thread-self/ns/net on the thread's first call and closed with the
    thread. A thread's namespace must therefore change only through this module: one
    moved by a direct setns()/unshare() elsewhere would be brought back to where it
    was before that, not to where that left it (nothing in this code base does so).
    """
    tls = _thread_ns
    home = tls.home
    if home is None:
        home = tls.home = _Home()
    inside = tls.inside
    back = inside[-1].fd if inside else home.fd
    path, entry, fresh = _enter(netns)
    try:
        _setns(entry.fd)
    except BaseException as exc:
        with _ns_lock:
            _drop(path, entry)
            _release(entry)
        if isinstance(exc, NetnsError) and "Invalid argument" in str(exc):
            raise NetnsError(
                f"{path} is not a network namespace: give a name from "
                "`ip netns list` or a path such as /proc/PID/ns/net"
            ) from None
        raise
    if fresh:
        with _ns_lock:
            _keep(path, entry)
    inside.append(entry)
    try:
        return fn(*args, **kwargs)
    finally:
        inside.pop()
        # Failing to get back would leave this thread in the wrong namespace:
        # nothing sane can continue on it.
        try:
            _setns(back)
        except NetnsError as exc:  # pragma: no cover - kernel refused a restore
            os.write(2, f"fatal: cannot restore network namespace: {exc}\n".encode())
            os._exit(70)
        with _ns_lock:
            _release(entry)


def socket_in_netns(
    netns: str | None,
    family: int = socket.AF_INET,
    type: int = socket.SOCK_STREAM,
    proto: int = 0,
) -> socket.socket:
    """Create a socket that lives in `netns` (None: the current one). Sockets keep their netns."""
    if netns is None:
        return socket.socket(family, type, proto)
    return run_in_netns(netns, socket.socket, family, type, proto)


_executor: ThreadPoolExecutor | None = None


def _get_executor() -> ThreadPoolExecutor:
    global _executor
    if _executor is None:
        _executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="netns")
    return _executor


async def arun_in_netns(netns: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Like `run_in_netns`, on a worker thread so the event loop never blocks or switches."""
    loop = asyncio.get_running_loop()
    call = functools.partial(run_in_netns, netns, fn, *args, **kwargs)
    return await loop.run_in_executor(_get_executor(), call)


def run_in_fresh_thread(fn: Callable[[], T]) -> T:
    """Call `fn` on a new thread and wait; its exception, if any, is re-raised here.

    pyroute2's synchronous API runs its own event loop, which fails on a thread that
    already runs one (an asyncio/uvloop program): give it a fresh thread.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(fn())
        except BaseException as exc:
            error.append(exc)

    th = threading.Thread(target=target, name="netsetup-fresh")
    th.start()
    th.join()
    if error:
        raise error[0]
    return result[0]


def iproute_in_netns(netns: str | None) -> Any:
    """A pyroute2 `IPRoute` whose netlink socket lives in `netns` (None: the current one).

    Created with setns on the calling thread (no helper process). Use it on that thread
    only, and only on a thread with no running event loop (see `run_in_fresh_thread`);
    close it when done (it is a context manager).
    """
    from pyroute2 import IPRoute

    if netns is None:
        return IPRoute()
    return run_in_netns(netns, IPRoute)
