"""Workload identity: SPIFFE IDs, certificates, trust bundles and the identity manager."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_TRUST_DOMAIN = "cluster.local"

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_SPIFFE_ID_LEN = 2048


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise ValueError."""
    if not trust_domain:
        raise ValueError("trust domain is empty: use a name such as 'cluster.local'")
    if len(trust_domain) > 255:
        raise ValueError(f"trust domain is {len(trust_domain)} characters long (at most 255)")
    if not _TRUST_DOMAIN_RE.match(trust_domain):
        raise ValueError(
            f"trust domain {trust_domain!r} may only contain lowercase letters, digits, "
            "'.', '-' and '_'"
        )
    return trust_domain


def _validate_segment(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"{what} is empty")
    if value in (".", ".."):
        raise ValueError(f"{what} may not be {value!r}")
    if not _SEGMENT_RE.match(value):
        raise ValueError(f"{what} {value!r} may only contain letters, digits, '.', '-' and '_'")


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_segment("namespace", self.namespace)
        _validate_segment("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://td/ns/NS/sa/SA`; raise ValueError saying what is wrong."""
        if not isinstance(uri, str):
            raise ValueError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if len(uri) > _MAX_SPIFFE_ID_LEN:
            raise ValueError(f"SPIFFE ID is {len(uri)} characters long (at most 2048)")
        if not uri.startswith("spiffe://"):
            raise ValueError(f"{uri!r} is not a SPIFFE ID: it must start with 'spiffe://'")
        if any(c in uri for c in "?#%@ \t\r\n"):
            raise ValueError(
                f"{uri!r} is not a SPIFFE ID: query, fragment, user info, percent-encoding "
                "and whitespace are not allowed"
            )
        parts = urlsplit(uri)
        netloc = parts.netloc
        if ":" in netloc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: the trust domain may not have a port")
        try:
            validate_trust_domain(netloc)
        except ValueError as exc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: {exc}") from None
        segments = parts.path.split("/")
        # path is "/ns/NS/sa/SA" -> ["", "ns", NS, "sa", SA]
        if len(segments) != 5 or segments[0] != "" or segments[1] != "ns" or segments[3] != "sa":
            raise ValueError(
                f"{uri!r} is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/"
                "<service-account>"
            )
        try:
            return cls(netloc, segments[2], segments[4])
        except ValueError as exc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: {exc}") from None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def _cert_times(cert: x509.Certificate) -> tuple[float, float]:
    return (
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI subject alternative names of `cert` (empty when it has none)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in `cert`'s single spiffe:// URI SAN; ValueError saying why not."""
    uris = [u for u in uri_sans(cert) if u.lower().startswith("spiffe://")]
    if not uris:
        raise ValueError("certificate has no spiffe:// URI SAN")
    if len(uris) > 1:
        raise ValueError(f"certificate has {len(uris)} spiffe:// URI SANs (exactly one allowed)")
    return SpiffeId.parse(uris[0])


def split_pem(pem: bytes) -> list[bytes]:
    """Split concatenated PEM certificates into one PEM block each."""
    return [
        c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(pem)
    ]


@dataclass(frozen=True)
class Certificate:
    """A workload certificate with its chain and private key (the key never shows in repr)."""

    identity: SpiffeId
    cert_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    not_before: float
    not_after: float

    @classmethod
    def from_pem(cls, certs: Sequence[bytes], key_pem: bytes) -> Certificate:
        """Build from `[leaf, *intermediates]` PEM blocks and the PEM private key.

        Checks that the leaf has exactly one SPIFFE URI SAN and that the key matches it.
        """
        if not certs:
            raise ValueError("no certificates given: expected the leaf followed by its chain")
        blocks: list[bytes] = []
        for pem in certs:
            blocks.extend(split_pem(pem))
        leaf = x509.load_pem_x509_certificate(blocks[0])
        identity = spiffe_id_of(leaf)
        key = serialization.load_pem_private_key(key_pem, password=None)
        pub = key.public_key()
        if pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError(f"private key does not match the certificate for {identity}")
        not_before, not_after = _cert_times(leaf)
        return cls(
            identity=identity,
            cert_pem=blocks[0],
            chain_pem=b"".join(blocks[1:]),
            key_pem=key_pem,
            not_before=not_before,
            not_after=not_after,
        )

    @property
    def full_chain_pem(self) -> bytes:
        """Leaf followed by its intermediates: what a TLS peer presents."""
        return self.cert_pem + self.chain_pem

    def x509(self) -> x509.Certificate:
        """The parsed leaf certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def renewal_time(self) -> float:
        """Half-life of the certificate: when renewal should start."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def describe(self) -> dict[str, object]:
        """Public facts for admin dumps (`/certs`): never the key."""
        leaf = self.x509()
        return {
            "identity": str(self.identity),
            "serial": format(leaf.serial_number, "x"),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "chain_length": len(split_pem(self.chain_pem)) if self.chain_pem else 0,
        }


@dataclass(frozen=True)
class TrustBundle:
    """The roots a mesh member trusts; several during a root rotation (old + new)."""

    trust_domain: str
    roots_pem: bytes

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if not x509.load_pem_x509_certificates(self.roots_pem):
            raise ValueError("trust bundle holds no PEM certificates")

    def roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.roots_pem)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key (the only key type the mesh issues)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for `identity` (URI SAN only, empty subject) signed with `key`."""
    from cryptography.hazmat.primitives import hashes

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)
