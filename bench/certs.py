"""Throwaway mesh PKI for benchmarks: a root CA and SPIFFE leaf certificates as PEM files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.ca import build_ca_certificate, build_leaf_certificate, leaf_key_usage
from ztunnel.identity import Certificate, TrustBundle, private_key_pem

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


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    path.chmod(0o600)
    return path


def write_pki(directory: Path, *, ca_name: str = "ambit-bench-root") -> BenchPKI:
    """Create a root CA and two leaves (client `bench/client`, server `bench/server`)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    not_before, not_after = now - 5 * 60, now + 86400
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca_name)])
    ca_cert = build_ca_certificate(ca_subject, ca_key, not_before=not_before, not_after=not_after)
    ca_path = _write(directory / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))

    def leaf(name: str) -> LeafFiles:
        sid = spiffe_id("bench", name)
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build_leaf_certificate(
            key.public_key(),
            issuer=ca_subject,
            signer_key=ca_key,
            not_before=not_before,
            not_after=not_after,
            san=[x509.UniformResourceIdentifier(sid)],
            key_usage=leaf_key_usage(key_encipherment=False, key_agreement=True),
        )
        cert_path = _write(directory / f"{name}.pem", cert.public_bytes(serialization.Encoding.PEM))
        key_path = _write(directory / f"{name}-key.pem", private_key_pem(key))
        return LeafFiles(spiffe_id=sid, cert=cert_path, key=key_path)

    return BenchPKI(ca=ca_path, client=leaf("client"), server=leaf("server"))


def load_identity(ca: Path, cert: Path, key: Path) -> tuple[Certificate, TrustBundle]:
    """A workload certificate and its trust bundle from PEM files (for ztunnel.tls)."""
    certificate = Certificate.from_pem([cert.read_bytes()], key.read_bytes())
    trust = TrustBundle(certificate.identity.trust_domain, ca.read_bytes())
    return certificate, trust
