"""Throwaway mesh PKI for benchmarks: a root CA and SPIFFE leaf certificates as PEM files."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.identity import Certificate, TrustBundle

TRUST_DOMAIN = "cluster.local"


@dataclass(frozen=True)
class LeafFiles:
    """Where one identity's certificate and key were written."""

    spiffe_id: str
    cert: Path
    key: Path


@dataclass(frozen=True)
class BenchPKI:
    """The files of a throwaway PKI: the root bundle and a client and a server identity."""

    ca: Path
    client: LeafFiles
    server: LeafFiles


def spiffe_id(ns: str, sa: str) -> str:
    """The SPIFFE ID of service account `sa` in namespace `ns`."""
    return f"spiffe://{TRUST_DOMAIN}/ns/{ns}/sa/{sa}"


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def write_pki(directory: Path, *, ca_name: str = "ambit-bench-root") -> BenchPKI:
    """Create a root CA and two leaves (client `bench/client`, server `bench/server`)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca_name)])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_subject)
        .issuer_name(ca_subject)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path = _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str) -> LeafFiles:
        sid = spiffe_id("bench", name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(ca_subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]),
                critical=True,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        cert_path = _write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        key_path = _write(directory / f"{name}-key.pem", _key_pem(key))
        return LeafFiles(spiffe_id=sid, cert=cert_path, key=key_path)

    return BenchPKI(ca=ca_path, client=leaf("client"), server=leaf("server"))


def load_identity(ca: Path, cert: Path, key: Path) -> tuple[Certificate, TrustBundle]:
    """A workload certificate and its trust bundle from PEM files (for ztunnel.tls)."""
    certificate = Certificate.from_pem([cert.read_bytes()], key.read_bytes())
    trust = TrustBundle(certificate.identity.trust_domain, ca.read_bytes())
    return certificate, trust
