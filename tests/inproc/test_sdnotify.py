"""sd_notify helper: datagrams reach a real NOTIFY_SOCKET (path and abstract), errors say why."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from ztunnel import sdnotify


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(2)
    try:
        yield s, path
    finally:
        s.close()


def test_ready_sends_ready_mainpid_and_status(receiver: tuple[socket.socket, str]) -> None:
    s, path = receiver
    assert sdnotify.ready("listening on 15008", env={"NOTIFY_SOCKET": path})
    msg = s.recv(4096).decode().split("\n")
    assert msg == ["READY=1", f"MAINPID={os.getpid()}", "STATUS=listening on 15008"]


def test_stopping_status_watchdog_reloading(receiver: tuple[socket.socket, str]) -> None:
    s, path = receiver
    env = {"NOTIFY_SOCKET": path}
    assert sdnotify.stopping("draining 3 connections", env=env)
    assert s.recv(4096) == b"STOPPING=1\nSTATUS=draining 3 connections"
    assert sdnotify.status("snapshot v7", env=env)
    assert s.recv(4096) == b"STATUS=snapshot v7"
    assert sdnotify.watchdog(env=env)
    assert s.recv(4096) == b"WATCHDOG=1"
    assert sdnotify.reloading(env=env)
    assert s.recv(4096) == b"RELOADING=1"


def test_abstract_socket() -> None:
    name = f"ambit-sdnotify-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(2)
        assert sdnotify.ready(env={"NOTIFY_SOCKET": "@" + name})
        assert s.recv(4096).startswith(b"READY=1\n")


def test_not_under_systemd_is_a_no_op() -> None:
    assert sdnotify.ready(env={}) is False
    assert sdnotify.ready(env={"NOTIFY_SOCKET": "relative/path"}) is False
    assert sdnotify.ready(env={"NOTIFY_SOCKET": "@"}) is False


def test_unreachable_socket_says_what_to_check(tmp_path: Path) -> None:
    with pytest.raises(sdnotify.NotifyError, match=r"cannot notify systemd at .*NotifyAccess"):
        sdnotify.ready(env={"NOTIFY_SOCKET": str(tmp_path / "absent.sock")})


def test_multiline_status_is_refused() -> None:
    with pytest.raises(ValueError, match="one line"):
        sdnotify.format_message(status="a\nb")


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": pid}) == 5.0
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({}) is None
