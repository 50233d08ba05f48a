"""Mesh mTLS over real loopback sockets: what is accepted, and each rejection's reason."""

from __future__ import annotations

import asyncio
import ssl
import time
from pathlib import Path

import pytest

from tests.pki import Outcome, TestPKI, handshake
from ztunnel.identity import Certificate, SpiffeId, TrustBundle
from ztunnel.tls import (
    ALLOWED_CIPHERS,
    PeerIdentityError,
    cached_client_context,
    cached_server_context,
    client_context,
    describe_handshake_error,
    peer_identity,
    server_context,
)

HOUR = 3600.0


def _mesh_handshake(
    client: Certificate,
    server: Certificate,
    client_trust: TrustBundle,
    server_trust: TrustBundle,
    *,
    expect_server: SpiffeId | None = None,
) -> Outcome:
    return handshake(
        server_context(server, server_trust),
        client_context(client, client_trust),
        check_server=lambda tls: peer_identity(tls, server_trust),
        check_client=lambda tls: peer_identity(tls, client_trust, expect_server),
    )


def test_valid_chain_is_accepted_and_both_sides_learn_the_peer_identity() -> None:
    pki = TestPKI()
    client = pki.issue("shop", "frontend")
    server = pki.issue("shop", "cart")
    out = _mesh_handshake(client, server, pki.bundle, pki.bundle, expect_server=server.identity)
    assert out.server.error is None and out.client.error is None
    assert out.server.result == SpiffeId("cluster.local", "shop", "frontend")
    assert out.client.result == SpiffeId("cluster.local", "shop", "cart")
    assert out.echoed == b"x"
    for side in (out.server, out.client):
        assert side.version == "TLSv1.3"
        assert side.cipher in ALLOWED_CIPHERS
        assert side.alpn == "h2"


def test_intermediate_signed_chain_is_accepted() -> None:
    pki = TestPKI(intermediate=True)
    client = pki.issue("shop", "frontend")
    server = pki.issue("shop", "cart")
    assert client.chain_pem, "an intermediate-signed cert carries its chain"
    out = _mesh_handshake(client, server, pki.bundle, pki.bundle, expect_server=server.identity)
    assert out.server.error is None and out.client.error is None
    assert out.server.result == client.identity
    assert out.client.result == server.identity


def test_wrong_trust_domain_is_rejected() -> None:
    pki = TestPKI()
    foreign = pki.issue("shop", "frontend", uri="spiffe://other.example/ns/shop/sa/frontend")
    out = _mesh_handshake(foreign, pki.issue("shop", "cart"), pki.bundle, pki.bundle)
    assert out.server.error is None  # the chain is fine; the identity is not
    assert isinstance(out.server.check_error, PeerIdentityError)
    assert out.server.check_error.reason == (
        "peer identity spiffe://other.example/ns/shop/sa/frontend is in trust domain "
        "'other.example', this mesh's trust domain is 'cluster.local'"
    )


def test_expired_client_certificate_is_rejected_by_the_server() -> None:
    pki = TestPKI()
    expired = pki.issue("shop", "frontend", not_before=time.time() - 2 * HOUR, ttl=HOUR)
    out = _mesh_handshake(expired, pki.issue("shop", "cart"), pki.bundle, pki.bundle)
    assert isinstance(out.server.error, ssl.SSLCertVerificationError)
    assert describe_handshake_error(out.server.error).startswith("peer certificate has expired")
    assert out.client.error is not None
    assert describe_handshake_error(out.client.error).startswith(
        "the peer refused our certificate as expired"
    )


def test_expired_server_certificate_is_rejected_by_the_client() -> None:
    pki = TestPKI()
    expired = pki.issue("shop", "cart", not_before=time.time() - 2 * HOUR, ttl=HOUR)
    out = _mesh_handshake(pki.issue("shop", "frontend"), expired, pki.bundle, pki.bundle)
    assert isinstance(out.client.error, ssl.SSLCertVerificationError)
    assert out.client.error.verify_message == "certificate has expired"
    assert describe_handshake_error(out.client.error).startswith("peer certificate has expired")


def test_not_yet_valid_certificate_is_rejected() -> None:
    pki = TestPKI()
    future = pki.issue("shop", "frontend", not_before=time.time() + HOUR)
    out = _mesh_handshake(future, pki.issue("shop", "cart"), pki.bundle, pki.bundle)
    assert isinstance(out.server.error, ssl.SSLCertVerificationError)
    assert out.server.error.verify_message == "certificate is not yet valid"
    assert describe_handshake_error(out.server.error).startswith(
        "peer certificate is not yet valid: a clock is behind"
    )
    assert out.client.error is not None  # the client is told the handshake failed


def test_certificate_from_an_untrusted_root_is_rejected() -> None:
    mesh, stranger = TestPKI(), TestPKI()
    out = _mesh_handshake(
        stranger.issue("shop", "frontend"), mesh.issue("shop", "cart"), mesh.bundle, mesh.bundle
    )
    assert isinstance(out.server.error, ssl.SSLCertVerificationError)
    assert describe_handshake_error(out.server.error).startswith(
        "peer certificate does not chain to a trusted root"
    )
    assert out.client.error is not None
    assert describe_handshake_error(out.client.error).startswith(
        "the peer does not trust our certificate's root"
    )


def test_server_from_an_untrusted_root_is_rejected_by_the_client() -> None:
    mesh, stranger = TestPKI(), TestPKI()
    out = _mesh_handshake(
        mesh.issue("shop", "frontend"), stranger.issue("shop", "cart"), mesh.bundle, mesh.bundle
    )
    assert isinstance(out.client.error, ssl.SSLCertVerificationError)
    assert describe_handshake_error(out.client.error).startswith(
        "peer certificate does not chain to a trusted root"
    )


def test_certificate_without_uri_san_is_rejected() -> None:
    pki = TestPKI()
    no_uri = pki.issue("shop", "frontend", no_uri=True)
    out = _mesh_handshake(no_uri, pki.issue("shop", "cart"), pki.bundle, pki.bundle)
    assert out.server.error is None
    assert isinstance(out.server.check_error, PeerIdentityError)
    assert out.server.check_error.reason.startswith(
        "peer certificate has no URI SAN with a SPIFFE ID"
    )


def test_uri_san_different_from_the_expected_identity_is_rejected() -> None:
    pki = TestPKI()
    impostor = pki.issue("shop", "payments")
    expected = pki.identity("shop", "cart")
    out = _mesh_handshake(
        pki.issue("shop", "frontend"), impostor, pki.bundle, pki.bundle, expect_server=expected
    )
    assert out.client.error is None
    assert isinstance(out.client.check_error, PeerIdentityError)
    assert out.client.check_error.reason.startswith(
        "peer identity is spiffe://cluster.local/ns/shop/sa/payments, "
        "expected spiffe://cluster.local/ns/shop/sa/cart"
    )


def test_client_without_a_certificate_is_rejected() -> None:
    pki = TestPKI()
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname = False
    anonymous.load_verify_locations(cadata=pki.bundle.roots_pem.decode())
    out = handshake(server_context(pki.issue("shop", "cart"), pki.bundle), anonymous)
    assert isinstance(out.server.error, ssl.SSLError)
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in str(out.server.error.reason)
    assert out.client.error is not None
    assert describe_handshake_error(out.client.error).startswith(
        "the peer requires a client certificate"
    )


def test_tls12_client_is_refused() -> None:
    pki = TestPKI()
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_verify_locations(cadata=pki.bundle.roots_pem.decode())
    out = handshake(server_context(pki.issue("shop", "cart"), pki.bundle), old)
    assert out.server.error is not None and out.client.error is not None
    assert "the peer does not speak TLS 1.3" in describe_handshake_error(out.client.error)


def _tls13_suites(ctx: ssl.SSLContext, suites: str) -> None:
    from ztunnel.tls import _libssl, _ssl_ctx_pointer

    ptr, lib = _ssl_ctx_pointer(ctx), _libssl()
    assert ptr is not None and lib is not None, "cannot reach OpenSSL to set TLS 1.3 suites"
    assert lib.SSL_CTX_set_ciphersuites(ptr, suites.encode()) == 1


def test_chacha20_only_client_is_refused() -> None:
    pki = TestPKI()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=pki.bundle.roots_pem.decode())
    _tls13_suites(ctx, "TLS_CHACHA20_POLY1305_SHA256")
    out = handshake(server_context(pki.issue("shop", "cart"), pki.bundle), ctx)
    assert out.server.error is not None
    assert "NO_SHARED_CIPHER" in str(out.server.error)


def test_contexts_offer_only_tls13_aes_gcm() -> None:
    pki = TestPKI()
    ctx = client_context(pki.issue("shop", "frontend"), pki.bundle)
    tls13 = [c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.3"]
    assert tls13 == list(ALLOWED_CIPHERS)
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert server_context(pki.issue("shop", "cart"), pki.bundle).verify_mode == ssl.CERT_REQUIRED


def test_context_refuses_a_certificate_from_another_trust_domain_bundle() -> None:
    pki, other = TestPKI(), TestPKI("other.example")
    with pytest.raises(ValueError, match=r"not in trust domain 'other\.example'"):
        client_context(pki.issue("shop", "frontend"), other.bundle)


async def test_asyncio_streams_under_uvloop_expose_the_peer_identity() -> None:
    pki = TestPKI(intermediate=True)
    client, server = pki.issue("shop", "frontend"), pki.issue("shop", "cart")
    seen: list[SpiffeId] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(peer_identity(writer.get_extra_info("ssl_object"), pki.bundle))
        writer.write(await reader.readexactly(5))
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_context(server, pki.bundle))
    async with srv:
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(client, pki.bundle), server_hostname=""
        )
        tls = writer.get_extra_info("ssl_object")
        assert peer_identity(tls, pki.bundle, server.identity) == server.identity
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        writer.close()
        await writer.wait_closed()
    assert seen == [client.identity]


def test_write_files_keeps_the_key_private(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert = pki.issue("shop", "cart")
    cert_path, key_path, ca_path = pki.write_files(cert, tmp_path)
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert cert_path.read_bytes() == cert.cert_pem + cert.chain_pem
    assert ca_path.read_bytes() == pki.bundle.roots_pem
    assert b"PRIVATE KEY" not in cert_path.read_bytes()
    assert "PRIVATE" not in repr(cert) and "key_pem" not in repr(cert)


def test_cached_contexts_are_reused_until_the_certificate_changes() -> None:
    pki = TestPKI()
    cert = pki.issue("shop", "cart")
    a = cached_server_context(cert, pki.bundle)
    assert cached_server_context(cert, pki.bundle) is a
    assert cached_client_context(cert, pki.bundle) is not a
    renewed = pki.issue("shop", "cart")
    assert cached_server_context(renewed, pki.bundle) is not a
    out = handshake(a, cached_client_context(pki.issue("shop", "frontend"), pki.bundle))
    assert out.server.error is None and out.client.error is None
