"""The admin API over a real unix socket and real mutual TLS on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from config.api import ApiClient, ApiServer, ClientError, TlsCredentials, admin_uri
from config.server import api_server_context, ensure_api_pki, issue_api_credential
from config.store import Store
from config.validate import load_text
from tests.pki import TestPKI

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
"""


@dataclass
class Running:
    store: Store
    socket: str
    tls: str
    data: Path

    def unix(self) -> ApiClient:
        return ApiClient(socket_path=self.socket, timeout=5)

    def tls_client(self, cert: Path, key: Path, ca: Path | None = None) -> ApiClient:
        creds = TlsCredentials(str(cert), str(key), str(ca or self.data / "api-ca.pem"))
        return ApiClient(server=self.tls, creds=creds, timeout=5)


@asynccontextmanager
async def api(tmp_path: Path, **kw: Any) -> AsyncIterator[Running]:
    data = tmp_path / "cp"
    store = Store(str(data))
    server = ApiServer(store, **kw)
    sock = str(tmp_path / "run" / "control.sock")
    unix = await server.start_unix(sock)
    pki = ensure_api_pki(str(data), "cluster.local")
    tls = await server.start_tls("127.0.0.1", 0, api_server_context(pki))
    host, port = tls.sockets[0].getsockname()[:2]
    try:
        yield Running(store, sock, f"{host}:{port}", data)
    finally:
        for s in (unix, tls):
            s.close()
            await s.wait_closed()
        store.close()


async def call(fn: Any, *args: Any, **kw: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kw)


async def test_apply_get_label_delete_over_the_unix_socket(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        c = cp.unix()
        res = await call(c.apply, load_text(MANIFEST, "shop.yaml"))
        assert [(r["kind"], r["action"]) for r in res["results"]] == [
            ("Namespace", "created"),
            ("Service", "created"),
        ]
        got = await call(c.get, "svc", "web", "shop")
        (item,) = got["items"]
        assert item["spec"]["clusterIP"] == "10.96.0.1"
        assert item["metadata"]["resourceVersion"] == str(res["version"])
        res = await call(c.label, "namespace", "shop", "", {"istio.io/use-waypoint": "wp"}, [])
        assert res["results"][0]["action"] == "labeled"
        listed = await call(c.get, "ns")
        assert {i["metadata"]["name"] for i in listed["items"]} == {
            "default",
            "istio-system",
            "shop",
        }
        await call(c.delete, [{"kind": "Service", "name": "web", "namespace": "shop"}])
        with pytest.raises(ClientError, match="Service 'web' not found in namespace shop") as e:
            await call(c.get, "svc", "web", "shop")
        assert e.value.status == 404
        status = await call(c.status)
        assert status["resources"] == {"Namespace": 3}


async def test_socket_is_root_only(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        mode = os.stat(cp.socket).st_mode
        assert stat.S_ISSOCK(mode) and mode & 0o777 == 0o600


async def test_validation_errors_come_back_with_every_problem(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        bad = MANIFEST.replace("port: 80", "port: 80000") + (
            "---\napiVersion: v1\nkind: Gizmo\nmetadata: {name: g}\n"
        )
        with pytest.raises(ClientError) as e:
            await call(cp.unix().apply, load_text(bad, "shop.yaml"))
        assert e.value.status == 422
        assert str(e.value).startswith(
            "2 problems, nothing applied; first: shop.yaml: "
            "document 2 (Service shop/web): spec.ports[0].port"
        )
        assert [d["path"] for d in e.value.details] == ["spec.ports[0].port", "kind"]
        assert cp.store.get("Namespace", "", "shop") is None


async def test_admin_certificate_is_accepted_over_tls(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        admin = cp.tls_client(cp.data / "admin.pem", cp.data / "admin-key.pem")
        await call(admin.apply, load_text(MANIFEST, "shop.yaml"))
        got = await call(admin.get, "services", "", None)
        assert [i["metadata"]["name"] for i in got["items"]] == ["web"]
        assert os.stat(cp.data / "admin-key.pem").st_mode & 0o777 == 0o600


async def test_non_admin_credential_of_the_api_ca_gets_403(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        cert, key = issue_api_credential(
            str(cp.data), "node-a", "spiffe://cluster.local/ambit/node/node-a"
        )
        with pytest.raises(ClientError, match="is not an admin credential") as e:
            await call(cp.tls_client(cert, key).status)
        assert e.value.status == 403
        # a second admin credential issued the same way works
        cert, key = issue_api_credential(str(cp.data), "alice", admin_uri("cluster.local"))
        assert "version" in await call(cp.tls_client(cert, key).status)


async def test_mesh_credentials_are_refused_even_with_the_admin_uri(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        mesh = TestPKI()
        for cert in (
            mesh.issue("shop", "web"),
            mesh.issue("istio-system", "x", uri=admin_uri("cluster.local")),
        ):
            c, k, _ca = mesh.write_files(cert, tmp_path / "mesh")
            with pytest.raises(ClientError, match=r"TLS with the control plane at .* failed"):
                await call(cp.tls_client(c, k).status)
        assert cp.store.get("Namespace", "", "default") is not None


async def test_token_create_without_an_issuer_says_why(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        with pytest.raises(ClientError, match="cannot issue join tokens") as e:
            await call(cp.unix().token, node="node-a")
        assert e.value.status == 501


async def test_token_create_calls_the_issuer(tmp_path: Path) -> None:
    issued: list[tuple[str, str]] = []

    def issuer(kind: str, name: str) -> dict[str, Any]:
        issued.append((kind, name))
        return {"token": f"tok-{kind}-{name}"}

    async with api(tmp_path, token_issuer=issuer) as cp:
        assert (await call(cp.unix().token, node="node-a"))["token"] == "tok-node-node-a"
        assert (await call(cp.unix().token, waypoint="shop/wp"))["token"] == (
            "tok-waypoint-shop/wp"
        )
    assert issued == [("node", "node-a"), ("waypoint", "shop/wp")]


async def test_unreachable_socket_error_says_what_to_do(tmp_path: Path) -> None:
    c = ApiClient(socket_path=str(tmp_path / "nothing.sock"), timeout=2)
    with pytest.raises(ClientError) as e:
        await call(c.status)
    assert str(e.value) == (
        f"cannot reach the control plane at {tmp_path}/nothing.sock: "
        "is `ambit control-plane` running?"
    )


async def test_unknown_endpoint_and_bad_kind(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        c = cp.unix()
        with pytest.raises(ClientError, match="no such endpoint GET /v1/nope") as e:
            await call(c.call, "GET", "/v1/nope")
        assert e.value.status == 404
        with pytest.raises(ClientError, match="unknown resource type 'gizmos'") as e:
            await call(c.get, "gizmos")
        assert e.value.status == 400


async def test_changes_endpoint_resumes_from_a_version(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        c = cp.unix()
        v0 = (await call(c.status))["version"]
        await call(c.apply, load_text(MANIFEST, "shop.yaml"))
        got = await call(c.call, "GET", "/v1/changes", None, {"since": str(v0)})
        assert [(ch["op"], ch["kind"], ch["name"]) for ch in got["changes"]] == [
            ("put", "Namespace", "shop"),
            ("put", "Service", "web"),
        ]


# -- hostile or broken clients ------------------------------------------------------------


async def raw_unix(cp: Running, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(cp.socket)
    writer.write(request)
    await writer.drain()
    async with asyncio.timeout(5):
        answer = await reader.read()
    writer.close()
    return answer


@pytest.mark.parametrize("length", ["-5", "abc", "1e3", "+10", "1 2", "١٢"])
async def test_bad_content_length_is_a_400(tmp_path: Path, length: str) -> None:
    async with api(tmp_path) as cp:
        answer = await raw_unix(
            cp, f"POST /v1/apply HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
        assert answer.startswith(b"HTTP/1.1 400 "), answer
        assert b"bad Content-Length" in answer


async def test_a_non_admin_is_refused_before_its_body_is_read(tmp_path: Path) -> None:
    async with api(tmp_path) as cp:
        cert, key = issue_api_credential(
            str(cp.data), "viewer", "spiffe://cluster.local/ambit/viewer")
        ctx = ssl.create_default_context(cafile=str(cp.data / "api-ca.pem"))
        ctx.check_hostname = False
        ctx.load_cert_chain(str(cert), str(key))
        host, port = cp.tls.rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port), ssl=ctx)
        # announces 30 MiB and sends none of it: the answer must not wait for the body
        writer.write(b"POST /v1/apply HTTP/1.1\r\nContent-Length: 31457280\r\n\r\n")
        async with asyncio.timeout(3):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"is not an admin credential" in answer


async def test_oversized_body_is_a_413_and_chunked_a_411(tmp_path: Path) -> None:
    async with api(tmp_path, max_body=1024) as cp:
        answer = await raw_unix(cp, b"POST /v1/apply HTTP/1.1\r\nContent-Length: 1025\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 413 "), answer
        answer = await raw_unix(cp, b"POST /v1/apply HTTP/1.1\r\nTransfer-Encoding: chunked"
                                b"\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 411 "), answer


async def test_idle_connections_are_closed(tmp_path: Path) -> None:
    async with api(tmp_path, request_timeout=0.3) as cp:
        started = time.monotonic()
        answer = await raw_unix(cp, b"")  # connects and says nothing
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        answer = await raw_unix(cp, b"POST /v1/apply HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
        assert answer.startswith(b"HTTP/1.1 408 "), answer  # a body that never completes
        assert time.monotonic() - started < 3
