"""The ztunnel process runtime in-process: config file, readiness, systemd notify, admin quit."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from pathlib import Path

from tests.inproc.test_ztunnel_endpoints import http
from ztunnel.proxy import LocalFileSource, ProcessPorts, Ztunnel, ZtunnelOptions


def _write(path: Path, version: int, node: str = "n1") -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"version": version, "node": node, "workloads": [
        {"uid": "other/w", "name": "w", "namespace": "other", "ip": "10.9.9.9", "node": "n2"}
    ]}))
    os.replace(tmp, path)


async def test_ready_notify_reload_and_quit(tmp_path: Path) -> None:
    cfg = tmp_path / "snap.json"
    _write(cfg, 1)
    notify_path = str(tmp_path / "notify.sock")
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notify.setblocking(False)
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
