"""The mesh CA: persisted root, operator files, CSR checks, signing and root rotation."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from config.ca import BACKDATE, DEFAULT_TTL, CaError, CertificateAuthority, CsrRejected, fingerprint
from tests.pki import TestPKI
from ztunnel.identity import (
    Certificate,
    SpiffeId,
    generate_key,
    make_csr,
    private_key_pem,
    uri_sans,
)

NOW = float(int(time.time()))
FRONTEND = SpiffeId("cluster.local", "shop", "frontend")


def _issue(
    ca: CertificateAuthority,
    identity: SpiffeId = FRONTEND,
    *,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> Certificate:
    key = generate_key()
    pems = ca.sign_csr(make_csr(identity, key), identity, ttl, now)
    return Certificate.from_pem(pems, private_key_pem(key))


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


def test_first_start_generates_a_p256_root_with_a_private_key_file(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    root = ca.signing_root
    pub = root.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1"
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert _mode(tmp_path / "ca" / "root-key.pem") == 0o600
    assert _mode(tmp_path / "ca") == 0o700
    assert ca.trust_bundle().roots_pem == root.public_bytes(serialization.Encoding.PEM)


def test_restart_reuses_the_persisted_root(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    again = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert fingerprint(again.signing_root) == fingerprint(first.signing_root)
    assert again.trust_bundle() == first.trust_bundle()


def test_restart_with_another_trust_domain_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    with pytest.raises(CaError, match=r"holds the CA of trust domain 'cluster\.local', not 'x\.y'"):
        CertificateAuthority.load_or_create(tmp_path, "x.y")


def test_a_root_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    key = tmp_path / "ca" / "root-key.pem"
    key.chmod(0o644)
    with pytest.raises(CaError, match=r"readable by others \(mode 644\): run `chmod 600"):
        CertificateAuthority.load_or_create(tmp_path, "cluster.local")


def test_signed_leaf_has_only_the_uri_san_and_a_backdated_not_before(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    cert = _issue(ca, now=NOW)
    leaf = cert.x509()
    assert cert.identity == FRONTEND
    assert uri_sans(leaf) == [str(FRONTEND)]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and len(san.value) == 1
    assert leaf.subject == x509.Name([])
    assert cert.not_before == NOW - BACKDATE
    assert cert.not_after == NOW + DEFAULT_TTL
    assert leaf.issuer == ca.signing_root.subject
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert cert.chain_pem == b""  # signed by the root itself: nothing to serve


def test_serials_are_random_and_ttl_is_configurable(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    a, b = _issue(ca, now=NOW, ttl=600), _issue(ca, now=NOW, ttl=600)
    assert a.x509().serial_number != b.x509().serial_number
    assert a.x509().serial_number.bit_length() > 64
    assert a.not_after == NOW + 600


def _tampered_csr(identity: SpiffeId) -> bytes:
    """A CSR signed by one key but carrying another key: its signature cannot verify."""
    signer, other = generate_key(), generate_key()
    der = x509.load_pem_x509_csr(make_csr(identity, signer)).public_bytes(
        serialization.Encoding.DER
    )

    def spki(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    assert spki(signer) in der
    tampered = der.replace(spki(signer), spki(other))
    return x509.load_der_x509_csr(tampered).public_bytes(serialization.Encoding.PEM)


def test_csr_whose_key_does_not_match_its_signature_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    with pytest.raises(CsrRejected) as err:
        ca.sign_csr(_tampered_csr(FRONTEND), FRONTEND)
    assert err.value.reason == (
        "CSR signature does not verify with the CSR's public key: the request was altered "
        "or signed with another key"
    )


def test_csr_with_an_rsa_key_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    key = rsa.generate_private_key(65537, 2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrRejected, match="the mesh issues only ECDSA P-256 keys"):
        ca.sign_csr(csr, FRONTEND)


def test_csr_with_a_p384_key_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    key = ec.generate_private_key(ec.SECP384R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrRejected) as err:
        ca.sign_csr(csr, FRONTEND)
    assert err.value.reason == "CSR key is ECDSA secp384r1; the mesh issues only ECDSA P-256 keys"


def test_csr_uri_san_different_from_the_identity_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    other = SpiffeId("cluster.local", "shop", "payments")
    with pytest.raises(CsrRejected) as err:
        ca.sign_csr(make_csr(other, generate_key()), FRONTEND)
    assert err.value.reason == (
        "CSR asks for URI SAN spiffe://cluster.local/ns/shop/sa/payments, "
        "but the identity is spiffe://cluster.local/ns/shop/sa/frontend"
    )


def test_csr_asking_for_dns_names_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False)
        .sign(generate_key(), hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(CsrRejected, match=r"non-URI names \['bank.example'\]"):
        ca.sign_csr(csr, FRONTEND)


def test_csr_for_another_trust_domain_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    foreign = SpiffeId("other.example", "shop", "frontend")
    with pytest.raises(CsrRejected, match=r"not in this CA's trust domain 'cluster\.local'"):
        ca.sign_csr(make_csr(foreign, generate_key()), foreign)


def test_garbage_csr_is_rejected(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    with pytest.raises(CsrRejected, match="CSR is not a PEM certificate request"):
        ca.sign_csr(b"hello", FRONTEND)


def _write_operator_files(tmp_path: Path, pki: TestPKI) -> tuple[Path, Path, Path]:
    assert pki.intermediate is not None and pki.intermediate_key is not None
    cert = tmp_path / "intermediate.pem"
    key = tmp_path / "intermediate-key.pem"
    root = tmp_path / "root.pem"
    cert.write_bytes(pki.intermediate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(private_key_pem(pki.intermediate_key))
    key.chmod(0o600)
    root.write_bytes(pki.root_pem)
    return cert, key, root


def test_operator_intermediate_serves_its_chain_with_every_certificate(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert_path, key_path, root_path = _write_operator_files(tmp_path, pki)
    ca = CertificateAuthority.from_files(cert_path, key_path, [root_path])
    assert ca.trust_bundle().roots_pem == pki.root_pem
    cert = _issue(ca)
    assert pki.intermediate is not None
    assert cert.chain_pem == pki.intermediate.public_bytes(serialization.Encoding.PEM)
    cert.x509().verify_directly_issued_by(pki.intermediate)


def test_operator_files_with_a_mismatched_key_are_refused(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert_path, key_path, root_path = _write_operator_files(tmp_path, pki)
    key_path.write_bytes(private_key_pem(generate_key()))
    with pytest.raises(CaError, match="the CA key does not match the CA certificate"):
        CertificateAuthority.from_files(cert_path, key_path, [root_path])


def test_operator_intermediate_without_its_root_is_refused(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert_path, key_path, _ = _write_operator_files(tmp_path, pki)
    with pytest.raises(CaError, match="not a self-signed root: add the root certificate"):
        CertificateAuthority.from_files(cert_path, key_path)


def test_operator_chain_from_another_root_is_refused(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert_path, key_path, _ = _write_operator_files(tmp_path, pki)
    stranger = tmp_path / "stranger.pem"
    stranger.write_bytes(TestPKI().root_pem)
    with pytest.raises(CaError, match="chain is broken"):
        CertificateAuthority.from_files(cert_path, key_path, [stranger])


def test_a_leaf_certificate_cannot_be_the_ca(tmp_path: Path) -> None:
    pki = TestPKI()
    leaf = pki.issue("shop", "frontend")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_bytes(leaf.cert_pem)
    key.write_bytes(leaf.key_pem)
    with pytest.raises(CaError, match="is not a CA certificate"):
        CertificateAuthority.from_files(cert, key)


def test_rotation_trusts_the_new_root_before_it_signs(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    old = ca.signing_root
    new = ca.begin_rotation()
    assert [fingerprint(r) for r in ca.roots()] == [fingerprint(old), fingerprint(new)]
    assert _issue(ca).x509().issuer == old.subject  # still the old root signing
    assert _mode(tmp_path / "ca" / "next-root-key.pem") == 0o600
    # a restart in the middle of a rotation keeps both roots
    again = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert again.trust_bundle() == ca.trust_bundle()

    again.complete_rotation()
    assert fingerprint(again.signing_root) == fingerprint(new)
    assert _issue(again).x509().issuer == new.subject
    assert {fingerprint(r) for r in again.roots()} == {fingerprint(old), fingerprint(new)}
    assert _mode(tmp_path / "ca" / "root-key.pem") == 0o600

    restarted = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert {fingerprint(r) for r in restarted.roots()} == {fingerprint(old), fingerprint(new)}
    # leaves of the old root may live another DEFAULT_TTL: retiring it now is refused
    with pytest.raises(CaError, match="leaves it signed may be in use until"):
        restarted.retire_root(fingerprint(old))
    restarted.retire_root(fingerprint(old), now=time.time() + DEFAULT_TTL + 1)
    assert [fingerprint(r) for r in restarted.roots()] == [fingerprint(new)]
    final = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert [fingerprint(r) for r in final.roots()] == [fingerprint(new)]


def test_the_signing_root_cannot_be_retired(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    with pytest.raises(CaError, match="cannot be retired: rotate first"):
        ca.retire_root(fingerprint(ca.signing_root))


def test_add_root_trusts_an_operator_root_without_signing_with_it(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    extra = TestPKI()
    ca.add_root(extra.root_pem)
    assert len(ca.trust_bundle().roots()) == 2
    assert _issue(ca).x509().issuer == ca.signing_root.subject
    with pytest.raises(CaError, match="is not a self-signed root"):
        ca.add_root(TestPKI(intermediate=True).issue("a", "b").cert_pem)


def test_no_private_key_in_repr_or_bundle(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    ca.begin_rotation()
    cert = _issue(ca)
    assert b"PRIVATE" not in ca.trust_bundle().roots_pem
    assert "PRIVATE" not in repr(ca)
    assert "PRIVATE" not in repr(cert)
    for p in (tmp_path / "ca").iterdir():
        if b"PRIVATE KEY" in p.read_bytes():
            assert _mode(p) == 0o600, p


def test_concurrent_first_starts_agree_on_one_root(tmp_path: Path) -> None:
    results: list[str] = []

    def start() -> None:
        ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
        results.append(fingerprint(ca.signing_root))

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1


def test_a_crash_in_the_middle_of_completing_a_rotation_is_finished_on_load(
    tmp_path: Path,
) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    old = ca.signing_root
    new = ca.begin_rotation()
    ca_dir = tmp_path / "ca"
    # simulate complete_rotation dying after writing the new key, before the new cert
    (ca_dir / "trusted-roots.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
    (ca_dir / "root-key.pem").write_bytes((ca_dir / "next-root-key.pem").read_bytes())
    recovered = CertificateAuthority.load_or_create(tmp_path, "cluster.local")
    assert fingerprint(recovered.signing_root) == fingerprint(new)
    assert {fingerprint(r) for r in recovered.roots()} == {fingerprint(old), fingerprint(new)}
    assert not (ca_dir / "next-root-key.pem").exists()
    assert _issue(recovered).x509().issuer == new.subject


def test_leaf_lifetime_never_exceeds_the_signer(tmp_path: Path) -> None:
    pki = TestPKI(intermediate=True)
    cert_path, key_path, root_path = _write_operator_files(tmp_path, pki)
    ca = CertificateAuthority.from_files(cert_path, key_path, [root_path])
    assert pki.intermediate is not None
    signer_end = pki.intermediate.not_valid_after_utc.timestamp()
    leaf = _issue(ca, ttl=80 * 86400.0)
    assert leaf.not_after == signer_end
