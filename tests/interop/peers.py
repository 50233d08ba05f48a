"""Third-party HTTP/2 CONNECT peers for interop tests: nghttpx+tinyproxy, Node's http2, echo.

Every process is started on loopback with ephemeral ports and its own config files (never
the packaged ones), and is stopped by pid when its context manager exits, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
NODE_CONNECT_CLIENT = HERE / "node_connect_client.js"
LOOPBACK = "127.0.0.1"


def require_tools(*tools: str) -> dict[str, str]:
    """Absolute paths of `tools`; FAILS the test (never skips) when one is missing."""
    found = {t: shutil.which(t) for t in tools}
    missing = [t for t, path in found.items() if path is None]
    if missing:
        pytest.fail(
            f"interop peers {missing} are not installed: `make test` installs them "
            "(Debian packages nghttp2-proxy, tinyproxy, nodejs)"
        )
    return {t: p for t, p in found.items() if p is not None}


def free_port() -> int:
    """A loopback port that was free a moment ago (for tools that cannot bind port 0)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        port: int = s.getsockname()[1]
        return port


def _log_tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-limit:]
    except OSError:
        return "(no log)"


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 10.0
) -> None:
    """Poll until 127.0.0.1:`port` accepts; fail with the process's log if it died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited with {proc.returncode} before listening on {port}:\n"
                f"{_log_tail(log)}"
            )
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), timeout=1):
            return
        time.sleep(0.02)
    raise RuntimeError(f"{name} not listening on {port} after {timeout:.0f}s:\n{_log_tail(log)}")


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`: by pid, only what we started."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def started(cmd: Sequence[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run `cmd` with stdout+stderr to `log`; stop it on exit."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
    try:
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class NghttpxProxy:
    """A running nghttpx HTTP/2 proxy (mTLS front) with a tinyproxy CONNECT backend."""

    port: int
    nghttpx_pid: int
    tinyproxy_pid: int
    nghttpx_log: Path
    tinyproxy_log: Path


def tinyproxy_config(port: int, connect_ports: Sequence[int], log: Path) -> str:
    """A minimal foreground tinyproxy config: loopback only, CONNECT to `connect_ports`."""
    lines = [
        f"Port {port}",
        f"Listen {LOOPBACK}",
        "Timeout 60",
        "MaxClients 50",
        f"Allow {LOOPBACK}",
        f'LogFile "{log}"',
        "LogLevel Info",
        "DisableViaHeader Yes",
    ]
    lines += [f"ConnectPort {p}" for p in connect_ports]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def nghttpx_proxy(
    workdir: Path, *, cert: Path, key: Path, client_ca: Path, connect_ports: Sequence[int]
) -> Iterator[NghttpxProxy]:
    """nghttpx in HTTP/2 proxy mode requiring client certificates from `client_ca`,
    forwarding each CONNECT to its own tinyproxy, which may reach `connect_ports`."""
    tools = require_tools("nghttpx", "tinyproxy")
    workdir.mkdir(parents=True, exist_ok=True)
    tp_port, ng_port = free_port(), free_port()
    tp_conf = workdir / "tinyproxy.conf"
    tp_log = workdir / "tinyproxy.log"
    tp_out = workdir / "tinyproxy.out"
    tp_conf.write_text(tinyproxy_config(tp_port, connect_ports, tp_log))
    ng_log = workdir / "nghttpx.log"
    with started([tools["tinyproxy"], "-d", "-c", str(tp_conf)], tp_out) as tp:
        wait_listening(tp_port, tp, "tinyproxy", tp_out)
        cmd = [
            tools["nghttpx"],
            "--conf=/dev/null",  # never the packaged /etc/nghttpx/nghttpx.conf
            "--http2-proxy",
            f"--frontend={LOOPBACK},{ng_port}",
            f"--backend={LOOPBACK},{tp_port}",
            "--workers=1",
            "--verify-client",
            f"--verify-client-cacert={client_ca}",
            "--no-ocsp",
            "--tls-min-proto-version=TLSv1.3",
            "--log-level=INFO",
            f"--errorlog-file={ng_log}",
            "--accesslog-file=" + str(workdir / "nghttpx-access.log"),
            str(key),
            str(cert),
        ]
        with started(cmd, workdir / "nghttpx.out") as ng:
            wait_listening(ng_port, ng, "nghttpx", ng_log)
            yield NghttpxProxy(ng_port, ng.pid, tp.pid, ng_log, tp_log)


@dataclass
class EchoServer:
    """A running echo server: its port and how many connections it accepted."""

    port: int = 0
    accepted: int = 0


@contextlib.asynccontextmanager
async def echo_server() -> AsyncIterator[EchoServer]:
    """A TCP echo server on 127.0.0.1:0 in this event loop; half-close is echoed too.

    On exit every connection still open is closed and its handler awaited.
    """
    handlers: set[asyncio.Task[None]] = set()
    echo = EchoServer()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        echo.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()
            handlers.discard(task)

    server = await asyncio.start_server(handle, LOOPBACK, 0)
    echo.port = server.sockets[0].getsockname()[1]
    try:
        yield echo
    finally:
        server.close()
        for task in list(handlers):
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await server.wait_closed()


@dataclass(frozen=True)
class NodeResult:
    """What the Node.js CONNECT client saw."""

    ok: bool
    status: int | None
    error: str | None
    received: bytes
    extra_ok: int = 0  # extra concurrent streams whose echo matched the payload


NODE_TIMEOUT = 30.0


def _node_files(
    workdir: Path,
    *,
    port: int,
    authority: str,
    ca: Path,
    server_identity: str,
    payload: bytes,
    cert: Path | None,
    key: Path | None,
    headers: dict[str, str] | None,
    extra_streams: int,
) -> tuple[Path, Path]:
    """Write the Node client's config and payload; return (config, output) paths."""
    workdir.mkdir(parents=True, exist_ok=True)
    payload_path = workdir / "node-payload.bin"
    output_path = workdir / "node-output.bin"
    payload_path.write_bytes(payload)
    output_path.unlink(missing_ok=True)
    cfg = {
        "url": f"https://{LOOPBACK}:{port}",
        "authority": authority,
        "ca": str(ca),
        "serverIdentity": server_identity,
        "payload": str(payload_path),
        "output": str(output_path),
        "headers": headers or {},
        "extraStreams": extra_streams,
    }
    if cert is not None and key is not None:
        cfg["cert"], cfg["key"] = str(cert), str(key)
    cfg_path = workdir / "node-config.json"
    cfg_path.write_text(json.dumps(cfg))
    return cfg_path, output_path


def _read_output(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


async def node_connect(
    workdir: Path,
    *,
    port: int,
    authority: str,
    ca: Path,
    server_identity: str,
    payload: bytes,
    cert: Path | None = None,
    key: Path | None = None,
    headers: dict[str, str] | None = None,
    extra_streams: int = 0,
) -> NodeResult:
    """Run Node's http2 as a CONNECT client against 127.0.0.1:`port`, without blocking the
    event loop (our server under test runs in it). Sends `payload`, half-closes, and
    returns everything received until the server's END_STREAM."""
    node = require_tools("node")["node"]
    cfg_path, output_path = _node_files(
        workdir,
        port=port,
        authority=authority,
        ca=ca,
        server_identity=server_identity,
        payload=payload,
        cert=cert,
        key=key,
        headers=headers,
        extra_streams=extra_streams,
    )
    proc = await asyncio.create_subprocess_exec(
        node,
        str(NODE_CONNECT_CLIENT),
        str(cfg_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
    )
    try:
        async with asyncio.timeout(NODE_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"node CONNECT client did not finish in {NODE_TIMEOUT:.0f}s") from None
    line = out.decode().strip().splitlines()
    if proc.returncode != 0 or not line:
        raise AssertionError(
            f"node CONNECT client failed (exit {proc.returncode}): {err.decode()[-2000:]}"
        )
    doc = json.loads(line[-1])
    received = _read_output(output_path)
    return NodeResult(
        ok=bool(doc["ok"]),
        status=doc.get("status"),
        error=doc.get("error"),
        received=received,
        extra_ok=int(doc.get("extraOk", 0)),
    )
