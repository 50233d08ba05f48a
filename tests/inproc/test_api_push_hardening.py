"""Hardening of the proxy config stream (15012): credential files, certificate renewal,
limits on unauthenticated connections."""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from cryptography import x509

from config.ca import CertificateAuthority
from config.push import (
    NODE_CERT,
    NODE_KEY,
    PushClient,
    PushServer,
    ServerCertificate,
    recover_credential_pair,
    store_credential_pair,
    write_private,
    write_secret,
)
from config.store import Store
from config.tokens import TokenStore
from ztunnel.identity import generate_key, make_csr, node_identity, private_key_pem


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_private_files_replace_wider_ones_atomically(tmp_path: Path) -> None:
    path = tmp_path / "node-key.pem"
    path.write_bytes(b"old")
    os.chmod(path, 0o644)
    inode = os.stat(path).st_ino
    write_private(path, b"new key")
    assert path.read_bytes() == b"new key"
    assert _mode(path) == 0o600, "an existing wider file must not keep its mode"
    assert os.stat(path).st_ino != inode, "replaced by rename, never truncated in place"
    assert [p.name for p in tmp_path.iterdir()] == ["node-key.pem"], "no temporary left"


def test_secrets_for_token_files_are_owner_only(tmp_path: Path) -> None:
    given = write_secret(tmp_path / "node-1.token", "abc.def#sha256:00")
    assert given == str(tmp_path / "node-1.token")
    assert _mode(Path(given)) == 0o600
    assert Path(given).read_text().strip() == "abc.def#sha256:00"


@contextlib.asynccontextmanager
async def push_server(tmp_path: Path, cert: ServerCertificate | None = None,
                      **options: Any) -> AsyncIterator[tuple[PushServer, str, int]]:
    """A push server on a loopback port over a fresh store; `options` go to `PushServer`."""
    data = tmp_path / "cp"
    data.mkdir(exist_ok=True)
    ca = CertificateAuthority.load_or_create(data, "cluster.local")
    with Store(str(data)) as store:
        tokens = TokenStore(data / "tokens.db")
        try:
            push = PushServer(store, ca, tokens, **options)
            cert = cert or ServerCertificate(ca, data)
            server = await push.start("127.0.0.1", 0, cert.ctx)
            host, port = server.sockets[0].getsockname()[:2]
            try:
                yield push, host, port
            finally:
                server.close()
        finally:
            tokens.close()


def _client_ctx() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


async def _served_certificate(host: str, port: int
                              ) -> tuple[x509.Certificate, asyncio.StreamWriter]:
    _, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
    der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der), writer


async def test_push_server_certificate_is_renewed_at_half_life_in_the_live_context(
        tmp_path: Path) -> None:
    data = tmp_path / "cp"
    data.mkdir()
    ca = CertificateAuthority.load_or_create(data, "cluster.local")
    now = [time.time()]
    cert = ServerCertificate(ca, data, ttl=3600.0, clock=lambda: now[0])
    assert abs(cert.renew_at - (now[0] + 1800)) < 1
    async with push_server(tmp_path, cert) as (_, host, port):
        first, old_conn = await _served_certificate(host, port)
        now[0] += 1700
        assert not cert.renew_if_due(), "renewed before half-life"
        again, w = await _served_certificate(host, port)
        w.close()
        assert again.serial_number == first.serial_number
        now[0] += 200  # past half-life
        assert cert.renew_if_due()
        renewed, w = await _served_certificate(host, port)
        w.close()
        assert renewed.serial_number != first.serial_number
        assert renewed.not_valid_after_utc > first.not_valid_after_utc
        assert abs(cert.renew_at - (now[0] + 1800)) < 1
        # the files on disk follow, and the open connection is untouched
        on_disk = x509.load_pem_x509_certificate((data / "push-server.pem").read_bytes())
        assert on_disk.serial_number == renewed.serial_number
        assert not old_conn.is_closing()
        old_conn.close()


async def test_renewal_loop_replaces_a_short_lived_certificate(tmp_path: Path) -> None:
    data = tmp_path / "cp"
    data.mkdir()
    ca = CertificateAuthority.load_or_create(data, "cluster.local")
    cert = ServerCertificate(ca, data, ttl=0.4)
    async with push_server(tmp_path, cert) as (_, host, port), asyncio.TaskGroup() as tg:
        first, w = await _served_certificate(host, port)
        w.close()
        task = tg.create_task(cert.run())
        await asyncio.sleep(0.9)  # half-life 0.2 s: renewed at least once meanwhile
        assert cert.renewals >= 2
        later, w = await _served_certificate(host, port)
        w.close()
        task.cancel()
        assert later.serial_number != first.serial_number


async def _reply(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(5):
        return await reader.read()


async def test_an_idle_unauthenticated_connection_is_closed(tmp_path: Path) -> None:
    async with push_server(tmp_path, first_message_timeout=0.3) as (push, host, port):
        reader, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
        started = time.monotonic()
        reply = await _reply(reader)  # says why, then EOF
        assert 0.25 < time.monotonic() - started < 3
        assert b'"rule":"timeout"' in reply and b"no message within 0.3s" in reply
        writer.close()
        assert push.unauthenticated == 0


async def test_an_oversized_first_message_is_refused(tmp_path: Path) -> None:
    async with push_server(tmp_path, message_limit=64 * 1024) as (_, host, port):
        reader, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
        writer.write(b'{"type": "join", "token": "' + b"x" * (100 * 1024) + b'"}\n')
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        reply = await _reply(reader)
        assert b'"rule":"protocol"' in reply and b"longer than 65536 bytes" in reply
        writer.close()
        # a small request still works on a new connection
        reader, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
        writer.write(b'{"type": "bundle"}\n')
        assert b"BEGIN CERTIFICATE" in await _reply(reader)
        writer.close()


async def test_unauthenticated_connections_are_capped(tmp_path: Path) -> None:
    async with push_server(tmp_path, max_unauthenticated=2) as (push, host, port):
        idle = [await asyncio.open_connection(host, port, ssl=_client_ctx()) for _ in range(2)]
        async with asyncio.timeout(5):
            while push.unauthenticated < 2:  # noqa: ASYNC110 - the server's own counter
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
        writer.write(b'{"type": "bundle"}\n')
        with contextlib.suppress(ConnectionError):
            assert await _reply(reader) == b"", "a third unauthenticated connection is served"
        writer.close()
        assert push.refused_busy == 1
        for _, w in idle:
            w.close()
        async with asyncio.timeout(5):
            while push.unauthenticated:  # noqa: ASYNC110 - the server's own counter
                await asyncio.sleep(0.01)
        reader, writer = await asyncio.open_connection(host, port, ssl=_client_ctx())
        writer.write(b'{"type": "bundle"}\n')
        assert b"BEGIN CERTIFICATE" in await _reply(reader)
        writer.close()


def _node_pair(ca: CertificateAuthority) -> tuple[bytes, bytes]:
    key = generate_key()
    identity = node_identity(ca.trust_domain)
    chain = ca.sign_csr(make_csr(identity, key), identity)
    return b"".join(chain), private_key_pem(key)


def test_credential_pair_survives_a_crash_between_its_renames(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "cp", "cluster.local")
    d = tmp_path / "proxy"
    d.mkdir()
    cert, key = d / NODE_CERT, d / NODE_KEY
    old_chain, old_key = _node_pair(ca)
    cert.write_bytes(old_chain)  # a pair written by an older version, world-readable
    key.write_bytes(old_key)
    cert.chmod(0o644)
    key.chmod(0o644)
    new_chain, new_key = _node_pair(ca)
    store_credential_pair(cert, key, new_chain, new_key)
    assert (cert.read_bytes(), key.read_bytes()) == (new_chain, new_key)
    assert _mode(cert) == _mode(key) == 0o600
    assert sorted(p.name for p in d.iterdir()) == [NODE_CERT, NODE_KEY]

    # killed after the key was renamed into place, before the certificate was
    newer_chain, newer_key = _node_pair(ca)
    write_private(d / (NODE_CERT + ".next"), newer_chain)
    write_private(key, newer_key)
    client = PushClient("127.0.0.1:1", "node-a", d)
    got = client.node_certificate()
    assert got is not None and got.key_pem == newer_key, "rolled forward to the new pair"
    assert cert.read_bytes() == newer_chain
    assert not (d / (NODE_CERT + ".next")).exists()

    # killed while writing the next pair: the installed pair stays, leftovers go
    write_private(d / (NODE_KEY + ".next"), b"half a key")
    got = client.node_certificate()
    assert got is not None and got.key_pem == newer_key
    assert sorted(p.name for p in d.iterdir()) == [NODE_CERT, NODE_KEY]


def test_a_mismatched_pair_is_not_used(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "cp", "cluster.local")
    d = tmp_path / "proxy"
    d.mkdir()
    chain, _ = _node_pair(ca)
    _, other_key = _node_pair(ca)
    write_private(d / NODE_CERT, chain)
    write_private(d / NODE_KEY, other_key)
    assert recover_credential_pair(d / NODE_CERT, d / NODE_KEY) is None
    assert PushClient("127.0.0.1:1", "node-a", d).node_certificate() is None  # joins again


async def test_a_failed_renewal_keeps_the_certificate_and_is_retried(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", "cluster.local")
    data = tmp_path / "cp"
    data.mkdir()
    now = [time.time()]
    cert = ServerCertificate(ca, data, ttl=3600.0, clock=lambda: now[0])
    for p in data.iterdir():
        p.unlink()
    data.rmdir()  # renewal cannot write its files now
    now[0] += 1801
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(cert.run(retry=0.1))
        await asyncio.sleep(0.3)
        assert cert.renewals == 1, "nothing renewed while the directory is gone"
        data.mkdir()
        await asyncio.sleep(1.5)  # failed renewals are retried at least a second apart
        task.cancel()
    assert cert.renewals == 2
    assert (data / "push-server.pem").exists()


def test_a_token_set_after_construction_keeps_its_root_pin(tmp_path: Path) -> None:
    """Proxies read --token-file after building the client: the pin must still be split off
    (else the whole `<token>#sha256:<hex>` is sent and refused as unknown)."""
    client = PushClient("127.0.0.1:15012", "shop/waypoint", tmp_path)
    assert (client.token, client.ca_pin) == ("", "")
    client.token = "ambit-join.abc#sha256:ABCD\n"
    assert (client.token, client.ca_pin) == ("ambit-join.abc", "abcd")
    client.token = "eyJhbGciOiJSUzI1NiJ9.e30.sig"  # a ServiceAccount token: no pin
    assert (client.token, client.ca_pin) == ("eyJhbGciOiJSUzI1NiJ9.e30.sig", "")
