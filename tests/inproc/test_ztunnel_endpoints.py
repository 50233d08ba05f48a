"""Admin, metrics and readiness endpoints on loopback, and `--local-config` reload."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ztunnel.accesslog import ConnectionRecord
from ztunnel.listeners._http import HttpListener
from ztunnel.listeners.admin import AdminListener
from ztunnel.listeners.metrics import MetricsListener, ZtunnelMetrics
from ztunnel.listeners.ready import Readiness, ReadyListener
from ztunnel.localconfig import ConfigError, LocalConfig, persisted_path


async def http(addr: tuple[str, int], method: str, path: str) -> tuple[int, bytes]:
    r, w = await asyncio.open_connection(*addr)
    w.write(f"{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = await r.read()
    w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


@contextlib.asynccontextmanager
async def serving(listener: HttpListener) -> AsyncIterator[HttpListener]:
    async with asyncio.TaskGroup() as tg:
        tg.create_task(listener.run())
        try:
            yield listener
        finally:
            await listener.drain(1.0)


async def test_metrics_use_istio_names_and_principals() -> None:
    m = ZtunnelMetrics()
    rec = ConnectionRecord(
        direction="inbound", src="10.0.0.1:4000", dst="10.0.0.2:80",
        src_identity="spiffe://cluster.local/ns/a/sa/client", src_workload="client",
        src_namespace="a", dst_identity="spiffe://cluster.local/ns/b/sa/server",
        dst_workload="server", dst_namespace="b", security="mutual_tls", sent=10, received=20,
    )
    m.connection_opened(rec)
    m.connection_closed(rec)
    m.connection_denied(rec)
    async with serving(MetricsListener(m, host="127.0.0.1", port=0)) as lst:
        for path in ("/metrics", "/stats/prometheus"):
            status, body = await http(lst.address, "GET", path)
            assert status == 200
            text = body.decode()
            assert "istio_tcp_connections_opened_total{" in text
            assert 'source_principal="spiffe://cluster.local/ns/a/sa/client"' in text
            assert 'destination_principal="spiffe://cluster.local/ns/b/sa/server"' in text
            assert 'response_flags="DENY"' in text
            assert 'connection_security_policy="mutual_tls"' in text
            sent = [ln for ln in text.splitlines() if ln.startswith("istio_tcp_sent_bytes_total{")]
            assert sent and sent[0].endswith(" 10.0")
        status, _ = await http(lst.address, "GET", "/nope")
        assert status == 404


async def test_readiness_reports_what_is_missing() -> None:
    readiness = Readiness("config", "certificates")
    async with serving(ReadyListener(readiness, host="127.0.0.1", port=0)) as lst:
        status, body = await http(lst.address, "GET", "/healthz/ready")
        assert status == 503 and b"certificates" in body and b"config" in body
        readiness.mark("config")
        readiness.mark("certificates")
        status, body = await http(lst.address, "GET", "/healthz/ready")
        assert (status, body) == (200, b"ready\n")


async def test_admin_redacts_keys_and_quits() -> None:
    quit_called = asyncio.Event()
    dump: dict[str, Any] = {
        "workloads": [{"name": "w", "key_pem": "-----BEGIN PRIVATE KEY-----\nabc"}],
        "ca": {"cert": "CERT", "key": "SECRET"},
        "note": "-----BEGIN EC PRIVATE KEY-----",
    }
    certs = [{"identity": "spiffe://cluster.local/ns/a/sa/b", "expires": "2030-01-01T00:00:00Z"}]
    admin = AdminListener(lambda: dump, lambda: certs, quit_called.set, host="127.0.0.1", port=0)
    async with serving(admin) as lst:
        status, body = await http(lst.address, "GET", "/config_dump")
        assert status == 200
        assert b"PRIVATE KEY" not in body and b"SECRET" not in body and b"CERT" in body
        status, body = await http(lst.address, "GET", "/certs")
        assert status == 200 and b"2030-01-01" in body
        status, body = await http(lst.address, "POST", "/logging?level=debug")
        assert status == 200 and b"debug" in body
        status, _ = await http(lst.address, "POST", "/logging?level=loud")
        assert status == 400
        status, _ = await http(lst.address, "GET", "/quitquitquit")
        assert status == 405 and not quit_called.is_set()
        status, _ = await http(lst.address, "POST", "/quitquitquit")
        assert status == 200 and quit_called.is_set()
    from ztunnel import log

    log.configure("info")


def _read(path: str) -> str:
    return Path(path).read_text()


def _parse(doc: dict[str, Any], base: str) -> dict[str, Any]:
    if "version" not in doc:
        raise ValueError("missing field 'version'")
    return doc


async def test_local_config_reloads_on_change_and_keeps_last_good(tmp_path: Path) -> None:
    path = tmp_path / "snap.yaml"
    path.write_text("version: 1\n")
    data_dir = tmp_path / "data"
    cfg = LocalConfig(str(path), _parse, data_dir=str(data_dir), poll_interval=0.02)
    assert cfg.load() == {"version": 1}
    assert _read(persisted_path(str(data_dir))) == "version: 1\n"
    assert os.stat(persisted_path(str(data_dir))).st_mode & 0o777 == 0o600
    applied: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def apply(snap: dict[str, Any]) -> None:
        await applied.put(snap)

    async with asyncio.TaskGroup() as tg:
        watcher = tg.create_task(cfg.watch(apply))
        path.write_text("version: 2\n")
        assert await asyncio.wait_for(applied.get(), 2) == {"version": 2}
        path.write_text("oops: [\n")  # broken: ignored, last good stays
        await asyncio.sleep(0.1)
        assert cfg.errors == 1 and cfg.current == {"version": 2}
        path.write_text("version: 3\n")
        assert await asyncio.wait_for(applied.get(), 2) == {"version": 3}
        watcher.cancel()
    assert _read(persisted_path(str(data_dir))) == "version: 3\n"


def test_local_config_errors_say_which_file(tmp_path: Path) -> None:
    cfg = LocalConfig(str(tmp_path / "missing.yaml"), _parse)
    try:
        cfg.load()
    except ConfigError as exc:
        assert "missing.yaml" in str(exc)
    else:
        raise AssertionError("loading a missing file must fail")
    (tmp_path / "bad.yaml").write_text("other: 1\n")
    try:
        LocalConfig(str(tmp_path / "bad.yaml"), _parse).load()
    except ConfigError as exc:
        assert "version" in str(exc) and "bad.yaml" in str(exc)
    else:
        raise AssertionError("an invalid document must fail")


def test_local_ca_generated_for_dev_signs_workload_certs(tmp_path: Path) -> None:
    import asyncio as _asyncio

    from ztunnel.identity import SpiffeId, generate_key, make_csr
    from ztunnel.localconfig import parse_local_document

    doc = {"version": 1, "node": "n1",
           "local_ca": {"cert": "dev/ca.pem", "key": "dev/ca-key.pem", "generate": True}}
    first = parse_local_document(dict(doc), str(tmp_path))
    assert first.local_ca is not None
    assert os.stat(tmp_path / "dev" / "ca-key.pem").st_mode & 0o777 == 0o600
    again = parse_local_document(dict(doc), str(tmp_path))  # reuses, never regenerates
    assert again.local_ca is not None and again.local_ca.cert_pem == first.local_ca.cert_pem
    ident = SpiffeId("cluster.local", "default", "web")
    csr = make_csr(ident, generate_key())
    pems = _asyncio.run(first.local_ca.sign(ident, csr))
    from cryptography import x509

    from ztunnel.identity import spiffe_id_of

    assert spiffe_id_of(x509.load_pem_x509_certificate(pems[0])) == ident
    try:
        parse_local_document({"version": 1, "node": "n1",
                              "local_ca": {"cert": "nope.pem", "key": "nope-key.pem"}},
                             str(tmp_path))
    except ConfigError as exc:
        assert "nope.pem" in str(exc)
    else:
        raise AssertionError("a missing CA file must be a config error")


def test_dev_example_config_loads(tmp_path: Path) -> None:
    import json

    from ztunnel.localconfig import parse_local_document

    example = Path(__file__).parents[2] / "ztunnel" / "examples" / "local-config-dev-ca.json"
    doc = json.loads(example.read_text())
    assert doc["local_ca"]["generate"] is True
    doc["local_ca"] = {"cert": "ca.pem", "key": "ca-key.pem", "generate": True}
    parsed = parse_local_document(doc, str(tmp_path))
    assert {w.name for w in parsed.snapshot.local_workloads} == {"client", "web"}


async def _curl(*args: str, uid: int | None = None) -> tuple[int, str]:
    """Run curl (as `uid` via setpriv when given); returns (HTTP status, body)."""
    cmd = ["curl", "-s", "-m", "5", "-w", "\n%{http_code}", *args]
    if uid is not None:
        cmd = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", *cmd]
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    body, _, status = out.decode().rpartition("\n")
    assert status.isdigit(), (out, err)
    return int(status), body


async def test_admin_changes_need_root_reads_do_not() -> None:
    from tests.conftest import require_root_and_tools

    require_root_and_tools("curl", "setpriv")
    quit_called = asyncio.Event()
    admin = AdminListener(lambda: {"node": "n1"}, list, quit_called.set, host="127.0.0.1",
                          port=0)
    async with serving(admin) as lst:
        base = f"http://127.0.0.1:{lst.address[1]}"
        # nobody (uid 65534) may read, but neither stop the proxy nor change the log level
        assert (await _curl(f"{base}/config_dump", uid=65534))[0] == 200
        status, body = await _curl("-X", "POST", f"{base}/quitquitquit", uid=65534)
        assert status == 403 and "uid 65534" in body and "root" in body, body
        assert not quit_called.is_set()
        status, _ = await _curl("-X", "POST", f"{base}/logging?level=debug", uid=65534)
        assert status == 403 and admin.level == "info"
        # root may
        status, _ = await _curl("-X", "POST", f"{base}/logging?level=debug")
        assert status == 200 and admin.level == "debug"
        status, _ = await _curl("-X", "POST", f"{base}/quitquitquit")
        assert status == 200 and quit_called.is_set()
    from ztunnel import log

    log.configure("info")


async def test_admin_refuses_changes_over_ipv6_loopback_for_non_root() -> None:
    from tests.conftest import require_root_and_tools

    require_root_and_tools("curl", "setpriv")
    quit_called = asyncio.Event()
    admin = AdminListener(dict, list, quit_called.set, host="::1", port=0)
    async with serving(admin) as lst:
        url = f"http://[::1]:{lst.address[1]}/quitquitquit"
        assert (await _curl("-X", "POST", url, uid=65534))[0] == 403
        assert not quit_called.is_set()
        assert (await _curl("-X", "POST", url))[0] == 200
        assert quit_called.is_set()


async def _raw(addr: tuple[str, int], data: bytes) -> bytes:
    r, w = await asyncio.open_connection(*addr)
    w.write(data)
    out = await asyncio.wait_for(r.read(), 5)
    w.close()
    return out


async def test_bad_content_length_is_a_400_and_the_server_keeps_serving() -> None:
    readiness = Readiness()
    async with serving(ReadyListener(readiness, host="127.0.0.1", port=0)) as lst:
        for bad in (b"-5", b"abc", b"1e3", b"+3", b"99999999999999999999999"):
            out = await _raw(lst.address, b"POST /healthz/ready HTTP/1.1\r\nContent-Length: "
                             + bad + b"\r\n\r\n")
            assert out.startswith(b"HTTP/1.1 400 "), (bad, out)
        status, _ = await http(lst.address, "GET", "/healthz/ready")
        assert status == 200


async def test_idle_http_connections_are_closed() -> None:
    lst = ReadyListener(Readiness(), host="127.0.0.1", port=0)
    lst.idle_timeout = 0.3
    async with serving(lst):
        loop = asyncio.get_running_loop()
        # a client that never sends a request, and one that stops mid-body
        for data in (b"", b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc"):
            start = loop.time()
            out = await _raw(lst.address, data)
            assert loop.time() - start < 3, "an idle connection was kept open"
            assert out == b"" or out.startswith(b"HTTP/1.1 408 "), out
