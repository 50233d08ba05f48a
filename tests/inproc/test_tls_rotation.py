"""Certificates from the mesh CA over real handshakes: intermediates and root rotation."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from config.ca import CertificateAuthority, fingerprint
from tests.pki import Outcome, TestPKI, handshake
from ztunnel.identity import Certificate, SpiffeId, TrustBundle, generate_key, make_csr
from ztunnel.identity import private_key_pem as key_pem
from ztunnel.tls import client_context, describe_handshake_error, peer_identity, server_context

FRONTEND = SpiffeId("cluster.local", "shop", "frontend")
CART = SpiffeId("cluster.local", "shop", "cart")


def _issue(ca: CertificateAuthority, identity: SpiffeId) -> Certificate:
    key = generate_key()
    return Certificate.from_pem(ca.sign_csr(make_csr(identity, key), identity), key_pem(key))


def _connect(
    client: Certificate, server: Certificate, client_trust: TrustBundle, server_trust: TrustBundle
) -> Outcome:
    return handshake(
        server_context(server, server_trust),
        client_context(client, client_trust),
        check_server=lambda tls: peer_identity(tls, server_trust),
        check_client=lambda tls: peer_identity(tls, client_trust, server.identity),
    )


def _ok(out: Outcome, client: SpiffeId, server: SpiffeId) -> None:
    assert out.server.error is None, out.server.error
    assert out.client.error is None, out.client.error
    assert out.server.result == client and out.client.result == server


def test_ca_issued_certificates_handshake(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    bundle = ca.trust_bundle()
    _ok(_connect(_issue(ca, FRONTEND), _issue(ca, CART), bundle, bundle), FRONTEND, CART)


def test_operator_intermediate_chain_handshakes(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    assert pki.intermediate is not None and pki.intermediate_key is not None
    (tmp_path / "int.pem").write_bytes(pki.intermediate.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "int-key.pem").write_bytes(key_pem(pki.intermediate_key))
    (tmp_path / "root.pem").write_bytes(pki.root_pem)
    ca = CertificateAuthority.from_files(
        tmp_path / "int.pem", tmp_path / "int-key.pem", [tmp_path / "root.pem"]
    )
    bundle = ca.trust_bundle()
    _ok(_connect(_issue(ca, FRONTEND), _issue(ca, CART), bundle, bundle), FRONTEND, CART)


def test_old_and_new_leaves_are_both_accepted_during_root_rotation(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    old_bundle = ca.trust_bundle()
    old_leaf = _issue(ca, FRONTEND)

    ca.begin_rotation()
    overlap = ca.trust_bundle()
    assert len(overlap.roots()) == 2
    ca.complete_rotation()
    new_leaf = _issue(ca, CART)
    assert {fingerprint(r) for r in ca.trust_bundle().roots()} == {
        fingerprint(r) for r in overlap.roots()
    }

    # peers with the overlap bundle accept both generations, in both directions
    _ok(_connect(old_leaf, new_leaf, overlap, overlap), FRONTEND, CART)
    _ok(_connect(new_leaf, old_leaf, overlap, overlap), CART, FRONTEND)

    # a peer still on the old bundle refuses the new leaf: why the overlap is needed
    out = _connect(old_leaf, new_leaf, old_bundle, overlap)
    assert isinstance(out.client.error, ssl.SSLCertVerificationError)
    assert "does not chain to a trusted root" in describe_handshake_error(out.client.error)

    # once the old root is retired, leaves it signed are refused
    ca.retire_root(fingerprint(old_bundle.roots()[0]), force=True)
    final = ca.trust_bundle()
    assert len(final.roots()) == 1
    out = _connect(old_leaf, new_leaf, final, final)
    assert isinstance(out.server.error, ssl.SSLCertVerificationError)
    assert "does not chain to a trusted root" in describe_handshake_error(out.server.error)
