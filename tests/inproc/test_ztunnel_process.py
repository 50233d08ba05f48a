"""The ztunnel process runtime in-process: config file, readiness, systemd notify, admin quit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.inproc.test_ztunnel_endpoints import http
from tests.pki import TestPKI
from ztunnel.hbone.request import Accept
from ztunnel.hbone.server import HboneServer
from ztunnel.localconfig import ConfigError
from ztunnel.proxy import LocalFileSource, ProcessPorts, Ztunnel, ZtunnelOptions
from ztunnel.tls import server_context


def _write(path: Path, version: int, node: str = "n1") -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "node": node, "workloads": [
        {"uid": "other/w", "name": "w", "namespace": "other", "ip": "10.9.9.9", "node": "n2"}
    ]}))
    os.replace(tmp, path)


def _notify_socket(tmp_path: Path) -> tuple[socket.socket, str]:
    """A non-blocking datagram socket standing in for systemd's NOTIFY_SOCKET, and its path."""
    path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(path)
    notify.setblocking(False)
    return notify, path


async def test_ready_notify_reload_and_quit(tmp_path: Path) -> None:
    cfg = tmp_path / "snap.json"
    _write(cfg, 1)
    notify, notify_path = _notify_socket(tmp_path)
    os.environ["NOTIFY_SOCKET"] = notify_path
    try:
        zt = Ztunnel(
            ZtunnelOptions(
                node="n1", data_dir=str(tmp_path / "data"), manage_capture=False,
                ports=ProcessPorts(admin=("127.0.0.1", 0), metrics=("127.0.0.1", 0),
                                   ready=("127.0.0.1", 0)),
            ),
            LocalFileSource(str(cfg), str(tmp_path / "data"), poll_interval=0.05, node="n1"),
        )
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(zt.run())
            await asyncio.wait_for(zt.started.wait(), 5)
            assert zt.ready_listener and zt.admin and zt.metrics_listener
            loop = asyncio.get_running_loop()
            msg = await asyncio.wait_for(loop.sock_recv(notify, 4096), 5)
            assert b"READY=1" in msg
            status, _ = await http(zt.ready_listener.address, "GET", "/healthz/ready")
            assert status == 200
            # a new file version is applied without restart; another node's is refused
            _write(cfg, 2)
            for _ in range(100):
                if zt.ctx and zt.ctx.snapshot.version == 2:
                    break
                await asyncio.sleep(0.02)
            assert zt.ctx is not None and zt.ctx.snapshot.version == 2
            _write(cfg, 3, node="elsewhere")
            await asyncio.sleep(0.3)
            assert zt.ctx.snapshot.version == 2
            status, body = await http(zt.admin.address, "GET", "/config_dump")
            assert status == 200 and json.loads(body)["snapshot"]["version"] == 2
            status, body = await http(zt.metrics_listener.address, "GET", "/metrics")
            assert b'ambit_ztunnel_config_reloads_total{result="applied"}' in body
            # /quitquitquit drains and returns
            status, _ = await http(zt.admin.address, "POST", "/quitquitquit")
            assert status == 200
            await asyncio.wait_for(run, 10)
            msg = await asyncio.wait_for(loop.sock_recv(notify, 4096), 5)
            assert b"STOPPING=1" in msg
        saved = (tmp_path / "data" / "last-good-snapshot.yaml").read_text()
        assert json.loads(saved)["version"] == 2, "a rejected document became the last good one"
    finally:
        os.environ.pop("NOTIFY_SOCKET", None)
        notify.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _FailingSource(LocalFileSource):
    async def initial(self) -> Any:
        raise ConfigError("no snapshot for this test: the control plane is away")


async def test_failed_start_releases_the_bound_ports(tmp_path: Path) -> None:
    ports = ProcessPorts(admin=("127.0.0.1", _free_port()), metrics=("127.0.0.1", _free_port()),
                         ready=("127.0.0.1", _free_port()))
    zt = Ztunnel(ZtunnelOptions(node="n1", manage_capture=False, ports=ports),
                 _FailingSource(str(tmp_path / "none.json"), None))
    with pytest.raises(ConfigError):
        await zt.run()
    for host, port in (ports.admin, ports.metrics, ports.ready):
        # without SO_REUSEPORT: fails with EADDRINUSE while a leaked listener holds it
        with socket.socket() as s:
            s.bind((host, port))
            s.listen(1)


async def test_watchdog_is_pinged_through_a_long_drain(tmp_path: Path) -> None:
    """WatchdogSec= (30 s in the unit) may be shorter than the drain: keep pinging."""
    pki = TestPKI()
    cfg = tmp_path / "snap.json"
    _write(cfg, 1)
    notify, notify_path = _notify_socket(tmp_path)
    env = {"NOTIFY_SOCKET": notify_path, "WATCHDOG_USEC": "200000",
           "WATCHDOG_PID": str(os.getpid())}
    os.environ.update(env)

    async def hold(req: Any) -> Any:
        async def serve(stream: Any) -> None:
            await stream.read()  # until the client ends it: the drain has to wait

        return Accept(serve=serve)

    hb_sock = socket.socket()
    hb_sock.bind(("127.0.0.1", 0))
    hb_sock.listen(16)
    server_cert = pki.issue("default", "server")
    server = HboneServer(hb_sock, server_context(server_cert, pki.bundle), pki.bundle, hold)
    try:
        zt = Ztunnel(
            ZtunnelOptions(
                node="n1", manage_capture=False,
                ports=ProcessPorts(admin=("127.0.0.1", 0), metrics=("127.0.0.1", 0),
                                   ready=("127.0.0.1", 0)),
            ),
            LocalFileSource(str(cfg), None, poll_interval=0.05, node="n1"),
        )
        async with asyncio.TaskGroup() as tg:
            tg.create_task(server.run())
            run = tg.create_task(zt.run())
            await asyncio.wait_for(zt.started.wait(), 5)
            assert zt.ctx is not None
            # an open HBONE stream from this node: the drain waits (1 s) for it to end
            zt.ctx.netns_by_ip["127.0.0.1"] = None
            stream = await zt.ctx.pool.open_stream(
                src_identity_cert=pki.issue("default", "client"), trust=pki.bundle,
                dst_identity=server_cert.identity, src_ip="127.0.0.1",
                dst=server.address, authority="127.0.0.1:9", forwarded_for=None)
            zt.shutdown()
            loop = asyncio.get_running_loop()
            messages: list[tuple[float, bytes]] = []
            while not run.done():
                with contextlib.suppress(TimeoutError):
                    msg = await asyncio.wait_for(loop.sock_recv(notify, 4096), 0.05)
                    messages.append((loop.time(), msg))
            await run
            stream.reset()
            server.close()
        stopping = [t for t, m in messages if b"STOPPING=1" in m]
        assert stopping, messages
        pings = [t for t, m in messages if m == b"WATCHDOG=1" and t > stopping[0]]
        # the drain lasted about a second; the watchdog wants a ping every 0.1 s
        assert len(pings) >= 5, f"{len(pings)} watchdog pings during the drain: {messages}"
        gaps = [b - a for a, b in zip([stopping[0], *pings], pings, strict=False)]
        assert max(gaps) < 0.5, gaps
    finally:
        for key in env:
            os.environ.pop(key, None)
        notify.close()
