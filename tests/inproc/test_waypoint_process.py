"""The waypoint as a process and a mesh member: control plane config, CLI, OTLP export, drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bench.harness import stop_async
from config.ca import CertificateAuthority
from config.push import NODE_CERT, NODE_KEY, TRUST
from config.validate import load_text
from tests.inproc.test_api_push import plane
from tests.inproc.test_waypoint_e2e import GATEWAY, Mesh, backend_ref, get, route, which
from waypoint.cli import FileIdentity
from waypoint.server import follow_control_plane
from ztunnel.identity import (
    Certificate,
    SpiffeId,
    TrustBundle,
    generate_key,
    make_csr,
    private_key_pem,
)


class CaIssuer:
    """Workload certificates from the control plane's CA (the `TestPKI` interface)."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.trust_domain = ca.trust_domain

    @property
    def bundle(self) -> TrustBundle:
        return self.ca.trust_bundle()

    def issue(self, namespace: str, service_account: str) -> Certificate:
        ident = SpiffeId(self.trust_domain, namespace, service_account)
        key = generate_key()
        chain = self.ca.sign_csr(make_csr(ident, key), ident)
        return Certificate.from_pem(chain, private_key_pem(key))


def to_yaml(docs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(docs)


async def wait_ready(s: aiohttp.ClientSession, ready: int) -> None:
    """Poll the process's readiness port until it answers 200."""
    while True:
        try:
            async with s.get(f"http://127.0.0.1:{ready}/healthz/ready") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.1)


async def fetch(mesh: Mesh, hbone: int, path: str) -> bytes:
    """GET `path` from "front" through the waypoint process on `hbone`, as the mesh client."""
    stream = await mesh._pool.open_stream(
        src_identity_cert=mesh.client_cert, trust=mesh.trust,
        dst_identity=mesh.wp_cert.identity, src_ip=None,
        dst=("127.0.0.1", hbone), authority=f"{mesh.vips['front']}:80",
        forwarded_for=None)
    stream.write(f"GET {path} HTTP/1.1\r\nHost: front\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := await stream.read():
        data += chunk
    return data


async def test_config_from_the_control_plane_and_live_route_changes(tmp_path: Path) -> None:
    async with plane(tmp_path) as p:
        mesh = Mesh({"front": 1, "a": 1, "b": 1},
                    [route([{"backendRefs": [backend_ref("a")]}])], {}, pki=CaIssuer(p.ca))
        await asyncio.to_thread(p.store.apply, load_text(to_yaml(mesh.manifests), "m.yaml"))
        client = p.client("app/wp", waypoint_address="127.0.0.1")
        await client.ensure_joined()  # the join token buys the waypoint its certificate
        d = client.data_dir
        identity = FileIdentity(d / NODE_CERT, d / NODE_KEY, d / TRUST, "cluster.local")
        assert str(identity()[0].identity) == "spiffe://cluster.local/ns/app/sa/wp"

        async def follow(wp: Any) -> None:
            await follow_control_plane(client, wp)

        async with (mesh.running(follow=follow, identity=identity),
                    mesh.forward("front") as url, aiohttp.ClientSession() as s):
            assert which((await get(s, url + "/"))[1]) == "a"
            new_route = route([{"backendRefs": [backend_ref("b")]}])
            await asyncio.to_thread(p.store.apply, load_text(to_yaml([new_route]), "r.yaml"))
            async with asyncio.timeout(5):
                while which((await get(s, url + "/"))[1]) != "b":  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        # the destination saw the identity the control plane issued to the waypoint
        assert {p for b in mesh.backends["b"] for p in b.peers} == {
            "spiffe://cluster.local/ns/app/sa/wp"}


async def test_spans_exported_to_an_otlp_collector() -> None:
    received: list[dict[str, Any]] = []
    got_one = asyncio.Event()

    async def collector(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length"))
        received.append(json.loads(await r.readexactly(length)))
        got_one.set()
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await w.drain()
        w.close()

    server = await asyncio.start_server(collector, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    mesh = Mesh({"front": 1}, [], {}, otlp_endpoint=f"http://127.0.0.1:{port}/v1/traces")
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        assert (await get(s, url + "/traced", headers={"traceparent": tp}))[0] == 200
        async with asyncio.timeout(5):
            await got_one.wait()
    server.close()
    rs = received[0]["resourceSpans"][0]
    attrs = {a["key"]: a["value"]["stringValue"] for a in rs["resource"]["attributes"]}
    assert attrs["service.name"] == "waypoint" and attrs["istio.waypoint"] == "wp"
    span = rs["scopeSpans"][0]["spans"][0]
    assert span["traceId"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span["parentSpanId"] == "00f067aa0ba902b7"
    sattrs = {a["key"]: a["value"] for a in span["attributes"]}
    assert sattrs["url.path"] == {"stringValue": "/traced"}
    assert sattrs["http.response.status_code"] == {"intValue": "200"}
    # the backend's request carries the waypoint's span as parent
    sent = mesh.backends["front"][0].requests[0]["headers"]
    assert sent["traceparent"] == f"00-{span['traceId']}-{span['spanId']}-01"


async def test_cli_local_config_serves_reports_ready_and_drains_on_sigterm(
        tmp_path: Path) -> None:
    mesh = Mesh({"front": 1}, [], {})
    cert_p, key_p, ca_p = mesh.pki.write_files(mesh.wp_cert, tmp_path)
    (tmp_path / "mesh.yaml").write_text(to_yaml(mesh.manifests))
    from tests.inproc.test_waypoint_e2e import free_port

    hbone, metrics, ready = free_port(), free_port(), free_port()
    async with mesh.running():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "waypoint", "--gateway", "/".join(GATEWAY),
            "--local-config", str(tmp_path / "mesh.yaml"), "--cert", str(cert_p),
            "--key", str(key_p), "--ca", str(ca_p), "--listen", f"127.0.0.1:{hbone}",
            "--metrics", f"127.0.0.1:{metrics}", "--ready", f"127.0.0.1:{ready}",
            "--upstream-hbone-port", str(mesh.hbone_port), "--drain-timeout", "2",
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
        try:
            async with aiohttp.ClientSession() as s:
                async with asyncio.timeout(15):
                    await wait_ready(s, ready)
                # a request through the process (HBONE in with the client's identity)
                data = await fetch(mesh, hbone, "/cli")
                assert data.startswith(b"HTTP/1.1 200") and b'"/cli"' in data, data
                async with s.get(f"http://127.0.0.1:{metrics}/metrics") as r:
                    assert 'response_code="200"' in await r.text()

                # the file changes: the process picks it up (a DENY on /cli now)
                deny = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                        "metadata": {"name": "no-cli", "namespace": "app"},
                        "spec": {"targetRefs": [{"group": "", "kind": "Service",
                                                 "name": "front"}],
                                 "action": "DENY",
                                 "rules": [{"to": [{"operation": {"paths": ["/cli"]}}]}]}}
                (tmp_path / "mesh.yaml").write_text(to_yaml([*mesh.manifests, deny]))
                async with asyncio.timeout(10):
                    while not (await fetch(mesh, hbone, "/cli")).startswith(b"HTTP/1.1 403"):  # noqa: ASYNC110
                        await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(10):
                rc = await proc.wait()
            assert rc == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert '"event": "request"' in log and '"path": "/cli"' in log
        assert "draining" in log


def test_cli_rejects_bad_arguments() -> None:
    from waypoint.cli import main

    assert main(["--gateway", "app/wp"]) == 2
    assert main(["--gateway", "app/wp", "--local-config", "x.yaml"]) == 2


async def test_cli_control_plane_mode_joins_with_a_token_file_and_serves(
        tmp_path: Path) -> None:
    from tests.inproc.test_waypoint_e2e import free_port

    async with plane(tmp_path) as p:
        mesh = Mesh({"front": 1}, [], {}, pki=CaIssuer(p.ca))
        await asyncio.to_thread(p.store.apply, load_text(to_yaml(mesh.manifests), "m.yaml"))
        token_file = tmp_path / "token"
        token_file.write_text(p.tokens.create("app/wp") + "\n")
        hbone, metrics, ready = free_port(), free_port(), free_port()
        async with mesh.running():
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "waypoint", "--gateway", "app/wp",
                "--control-plane", p.address, "--token-file", str(token_file),
                "--data-dir", str(tmp_path / "wp-data"), "--address", "127.0.0.1",
                "--listen", f"127.0.0.1:{hbone}", "--metrics", f"127.0.0.1:{metrics}",
                "--ready", f"127.0.0.1:{ready}", "--upstream-hbone-port", str(mesh.hbone_port),
                stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd()})
            try:
                async with aiohttp.ClientSession() as s, asyncio.timeout(20):
                    await wait_ready(s, ready)
                data = await fetch(mesh, hbone, "/cp")
                assert data.startswith(b"HTTP/1.1 200"), data[:200]
                # the control plane knows where this waypoint listens
                st = next(s for s in p.push.status()["proxies"] if s["name"] == "app/wp")
                assert st["kind"] == "waypoint"
            finally:
                await stop_async(proc)
        assert (tmp_path / "wp-data" / NODE_CERT).exists()
