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


def run_in_netns(netns: str, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """Call `fn` with the calling thread switched into `netns`; always switch back.

    Safe from any thread: the thread's own namespace (not the process's) is saved from
    /proc/thread-self/ns/net and restored even when `fn` raises.
    """
    path = netns_path(netns)
    try:
        target = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NetnsError(
            f"cannot open network namespace {netns!r}: {exc.strerror}: "
            "check `ip netns list` or that the process still runs"
        ) from None
    try:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            try:
                _setns(target)
            except NetnsError as exc:
                if "Invalid argument" in str(exc):
                    raise NetnsError(
                        f"{path} is not a network namespace: give a name from "
                        "`ip netns list` or a path such as /proc/PID/ns/net"
                    ) from None
                raise
            try:
                return fn(*args, **kwargs)
            finally:
                # Failing to get back would leave this thread in the wrong namespace:
                # nothing sane can continue on it.
                try:
                    _setns(own)
                except NetnsError as exc:  # pragma: no cover - kernel refused a restore
                    os.write(2, f"fatal: cannot restore network namespace: {exc}\n".encode())
                    os._exit(70)
        finally:
            os.close(own)
    finally:
        os.close(target)


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
