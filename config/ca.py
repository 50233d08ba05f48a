"""Mesh certificate authority: persisted or operator-provided root, CSR signing, rotation."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ztunnel.identity import SpiffeId, TrustBundle, private_key_pem, validate_trust_domain

__all__ = [
    "BACKDATE",
    "DEFAULT_TTL",
    "CaError",
    "CertificateAuthority",
    "CsrRejected",
    "build_ca_certificate",
    "build_leaf_certificate",
    "ca_key_usage",
    "fingerprint",
    "leaf_key_usage",
]

DEFAULT_TTL = 24 * 3600.0
BACKDATE = 300.0  # not-before is this many seconds in the past, for clock skew
ROOT_TTL = 10 * 365 * 86400.0
MAX_TTL = 90 * 86400.0

_PEM = serialization.Encoding.PEM
_CA_DIR = "ca"
_ROOT_CERT = "root-cert.pem"
_ROOT_KEY = "root-key.pem"
_NEXT_CERT = "next-root-cert.pem"
_NEXT_KEY = "next-root-key.pem"
_TRUSTED = "trusted-roots.pem"
_ROTATIONS = "rotations.json"

SigningKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


class CaError(Exception):
    """The CA cannot start or act (bad files, wrong trust domain...): the message says why."""


class CsrRejected(ValueError):
    """A CSR was refused; `reason` says why in terms the requester can act on."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint, lowercase hex: how roots are named in logs and commands."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _ts(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, tz=dt.UTC)


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(_PEM)


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _write_private(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Atomically write `data` to `path` with `mode` (the file is never wider than that)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """An exclusive advisory lock on `directory`/.lock (other control planes wait)."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read certificate file {path}: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CaError(f"{path} does not hold PEM certificates: {exc}") from None
    return certs


def _load_key(path: Path) -> SigningKey:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CaError(f"cannot read CA key file {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise CaError(
            f"{path} is not an unencrypted PEM private key ({exc}): decrypt it first"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CaError(f"{path} holds a {type(key).__name__}; the CA needs an ECDSA or RSA key")
    return key


def _spki(key: object) -> bytes:
    assert isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def ca_key_usage() -> x509.KeyUsage:
    """Key usage of a CA certificate: signs certificates and CRLs (and digital signatures)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def leaf_key_usage(*, key_encipherment: bool = True, key_agreement: bool = False) -> x509.KeyUsage:
    """Key usage of a workload certificate: digital signature (plus the two flags given)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=key_agreement,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca_certificate(
    subject: x509.Name,
    key: ec.EllipticCurvePrivateKey,
    *,
    not_before: float,
    not_after: float,
    issuer: x509.Certificate | None = None,
    issuer_key: SigningKey | None = None,
    path_length: int | None = None,
    trust_domain: str | None = None,
) -> x509.Certificate:
    """A CA certificate for `key`, valid from `not_before` to `not_after` (Unix seconds).

    Self-signed unless `issuer` and `issuer_key` are given (then it also carries an
    authority key identifier). With `trust_domain` it carries the URI SAN
    spiffe://<trust_domain>, which is how a root names its trust domain.
    """
    signer_key: SigningKey = key if issuer_key is None else issuer_key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer is not None else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ts(not_before))
        .not_valid_after(_ts(not_after))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if trust_domain is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
    return builder.sign(signer_key, hashes.SHA256())


def build_leaf_certificate(
    public_key: ec.EllipticCurvePublicKey,
    *,
    issuer: x509.Name,
    signer_key: SigningKey,
    not_before: float,
    not_after: float,
    san: Sequence[x509.GeneralName],
    subject: x509.Name | None = None,
    san_critical: bool = True,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """A workload (end-entity) certificate for `public_key`, signed by `signer_key`.

    Server and client auth, an authority key identifier, the subject alternative names
    `san` (critical by default: the subject is empty unless `subject` is given) and
    `key_usage` (default `leaf_key_usage()`).
    """
    return (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else x509.Name([]))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ts(not_before))
        .not_valid_after(_ts(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage or leaf_key_usage(), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key.public_key()),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=san_critical)
        .sign(signer_key, hashes.SHA256())
    )


def _new_root(trust_domain: str, now: float) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    stamp = _ts(now).strftime("%Y-%m-%dT%H:%M:%SZ")
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ambit"),
            # distinct subjects keep old and new roots apart during a rotation
            x509.NameAttribute(NameOID.COMMON_NAME, f"Ambit root CA {trust_domain} {stamp}"),
        ]
    )
    cert = build_ca_certificate(
        name,
        key,
        not_before=now - BACKDATE,
        not_after=now + ROOT_TTL,
        trust_domain=trust_domain,
    )
    return cert, key


def _trust_domain_of_root(cert: x509.Certificate) -> str | None:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("spiffe://"):
            return uri[len("spiffe://") :].rstrip("/")
    return None


class CertificateAuthority:
    """Signs workload CSRs for one trust domain and owns the trust bundle.

    The signer is either a root generated on first start (persisted in
    `<data_dir>/ca/`, key 0600) or an operator-provided root/intermediate. The bundle
    holds the signer's root plus any roots added for a rotation: a new root is
    trusted everywhere before it signs, and the old one stays trusted until retired.
    """

    def __init__(
        self,
        trust_domain: str,
        signer: x509.Certificate,
        signer_key: SigningKey,
        chain: Sequence[x509.Certificate] = (),
        *,
        extra_roots: Sequence[x509.Certificate] = (),
        data_dir: Path | None = None,
        now: float | None = None,
    ) -> None:
        self.trust_domain = validate_trust_domain(trust_domain)
        now = time.time() if now is None else now
        if _spki(signer_key.public_key()) != _spki(signer.public_key()):
            raise CaError(
                f"the CA key does not match the CA certificate ({signer.subject.rfc4514_string()})"
            )
        _check_ca_cert(signer, now)
        path = [signer, *chain]
        for child, parent in itertools.pairwise(path):
            try:
                child.verify_directly_issued_by(parent)
            except (ValueError, TypeError, InvalidSignature):
                raise CaError(
                    f"chain is broken: {child.subject.rfc4514_string()} is not issued by "
                    f"{parent.subject.rfc4514_string()} (list the chain from the signer up)"
                ) from None
        extra = list(extra_roots)
        root = path[-1]
        if not _self_signed(root):
            issuers = [r for r in extra if r.subject == root.issuer and _issued_by(root, r)]
            if not issuers:
                raise CaError(
                    f"chain ends at {root.subject.rfc4514_string()}, which is not a self-signed "
                    "root: add the root certificate to the chain files"
                )
            root = issuers[0]
        self._signer = signer
        self._key = signer_key
        # served with every leaf: the signer and intermediates, never the root itself
        self._served_chain = [c for c in path if not _self_signed(c)]
        self._root = root
        self._next: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        self._extra: list[x509.Certificate] = [
            r for r in extra if fingerprint(r) != fingerprint(root)
        ]
        self._data_dir = data_dir
        # fingerprint of a root that stopped signing -> when (guards early retirement)
        self._rotations: dict[str, float] = {}

    # -- construction ---------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, data_dir: Path, trust_domain: str, *, now: float | None = None
    ) -> CertificateAuthority:
        """The CA persisted in `<data_dir>/ca/`, generating an ECDSA P-256 root on first start.

        Safe against concurrent first starts (a lock file) and against a crash in the
        middle of `complete_rotation` (the half-written state is finished on load).
        """
        validate_trust_domain(trust_domain)
        now = time.time() if now is None else now
        ca_dir = Path(data_dir) / _CA_DIR
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(ca_dir, 0o700)
        with _locked(ca_dir):
            return cls._load_locked(Path(data_dir), ca_dir, trust_domain, now)

    @classmethod
    def _load_locked(
        cls, data_dir: Path, ca_dir: Path, trust_domain: str, now: float
    ) -> CertificateAuthority:
        cert_path, key_path = ca_dir / _ROOT_CERT, ca_dir / _ROOT_KEY
        next_cert_path, next_key_path = ca_dir / _NEXT_CERT, ca_dir / _NEXT_KEY
        if not cert_path.exists() and not key_path.exists():
            new_cert, new_key = _new_root(trust_domain, now)
            _write_private(key_path, private_key_pem(new_key))
            _write_private(cert_path, _pem(new_cert), 0o644)
        elif not key_path.exists() or not cert_path.exists():
            missing = key_path if not key_path.exists() else cert_path
            raise CaError(
                f"{missing} is missing but its pair exists: restore it from backup, or remove "
                f"{ca_dir} to start a new root (every workload certificate then changes)"
            )
        _check_private(key_path)
        signer, signer_key = _load_certs(cert_path)[0], _load_key(key_path)
        pending: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None
        if next_cert_path.exists() and next_key_path.exists():
            _check_private(next_key_path)
            nkey = _load_key(next_key_path)
            if not isinstance(nkey, ec.EllipticCurvePrivateKey):
                raise CaError(f"{next_key_path} is not an ECDSA key")
            pending = (_load_certs(next_cert_path)[0], nkey)
        key_spki = _spki(signer_key.public_key())
        if (
            pending is not None
            and key_spki != _spki(signer.public_key())
            and key_spki == _spki(pending[0].public_key())
        ):
            # crashed in complete_rotation after the new key was written, before its cert
            signer = pending[0]
            _write_private(cert_path, _pem(signer), 0o644)
        if pending is not None and fingerprint(pending[0]) == fingerprint(signer):
            # crashed in complete_rotation after both root files were written
            next_key_path.unlink()
            next_cert_path.unlink()
            pending = None
        stored = _trust_domain_of_root(signer)
        if stored is not None and stored != trust_domain:
            raise CaError(
                f"{ca_dir} holds the CA of trust domain {stored!r}, not {trust_domain!r}: "
                "pass the same --trust-domain as before or use another data dir"
            )
        extra: list[x509.Certificate] = []
        trusted = ca_dir / _TRUSTED
        if trusted.exists():
            extra = _load_certs(trusted)
        ca = cls(trust_domain, signer, signer_key, extra_roots=extra, data_dir=data_dir, now=now)
        ca._next = pending
        rotations = ca_dir / _ROTATIONS
        if rotations.exists():
            try:
                ca._rotations = {
                    str(k): float(v) for k, v in json.loads(rotations.read_text()).items()
                }
            except (ValueError, AttributeError) as exc:
                raise CaError(f"{rotations} is corrupt ({exc}): remove it to continue") from None
        return ca

    @classmethod
    def from_files(
        cls,
        cert_path: Path,
        key_path: Path,
        chain_paths: Sequence[Path] = (),
        *,
        trust_domain: str = "cluster.local",
        extra_roots: Sequence[Path] = (),
        now: float | None = None,
    ) -> CertificateAuthority:
        """An operator-provided root or intermediate (chain: its issuers up to the root)."""
        certs = _load_certs(Path(cert_path))
        signer, inline_chain = certs[0], certs[1:]
        chain = list(inline_chain)
        for p in chain_paths:
            chain.extend(_load_certs(Path(p)))
        roots: list[x509.Certificate] = []
        for p in extra_roots:
            roots.extend(_load_certs(Path(p)))
        return cls(
            trust_domain, signer, _load_key(Path(key_path)), chain, extra_roots=roots, now=now
        )

    # -- trust bundle and rotation ---------------------------------------------------

    def roots(self) -> list[x509.Certificate]:
        """Every root in the trust bundle: the signing root, the next root, extra roots."""
        out = [self._root]
        if self._next is not None:
            out.append(self._next[0])
        out.extend(self._extra)
        seen: set[str] = set()
        unique = []
        for r in out:
            fp = fingerprint(r)
            if fp not in seen:
                seen.add(fp)
                unique.append(r)
        return unique

    def trust_bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, b"".join(_pem(r) for r in self.roots()))

    @property
    def signing_root(self) -> x509.Certificate:
        return self._root

    @property
    def signer(self) -> x509.Certificate:
        """The certificate that signs leaves (the root, or an intermediate)."""
        return self._signer

    def add_root(self, root_pem: bytes) -> None:
        """Trust another root (e.g. an operator's next root) without signing with it."""
        for cert in x509.load_pem_x509_certificates(root_pem):
            if not _self_signed(cert):
                raise CaError(
                    f"{cert.subject.rfc4514_string()} is not a self-signed root certificate"
                )
            if fingerprint(cert) not in {fingerprint(r) for r in self.roots()}:
                self._extra.append(cert)
        self._persist_trusted()

    def retire_root(self, fp: str, *, now: float | None = None, force: bool = False) -> None:
        """Stop trusting a root (after the overlap); the signing root cannot be retired.

        A root that stopped signing less than DEFAULT_TTL ago is refused unless `force`:
        leaves it signed may not all have been renewed by the new root yet.
        """
        fp = fp.lower().replace(":", "")
        if fp == fingerprint(self._root):
            raise CaError("the root that currently signs cannot be retired: rotate first")
        if self._next is not None and fp == fingerprint(self._next[0]):
            raise CaError("the pending next root cannot be retired: complete or abandon rotation")
        now = time.time() if now is None else now
        stopped = self._rotations.get(fp)
        if stopped is not None and now < stopped + DEFAULT_TTL and not force:
            until = _ts(stopped + DEFAULT_TTL).isoformat()
            raise CaError(
                f"root {fp[:16]} stopped signing at {_ts(stopped).isoformat()}; leaves it "
                f"signed may be in use until {until}: retire it after that (or force it)"
            )
        before = len(self._extra)
        self._extra = [r for r in self._extra if fingerprint(r) != fp]
        if len(self._extra) == before:
            raise CaError(f"no trusted root has fingerprint {fp}")
        self._rotations.pop(fp, None)
        self._persist_trusted()

    def begin_rotation(self, now: float | None = None) -> x509.Certificate:
        """Generate the next root and put it in the bundle; it does not sign yet.

        Distribute the bundle (every proxy then trusts both roots), then call
        `complete_rotation`.
        """
        if self._data_dir is None:
            raise CaError(
                "this CA uses operator-provided files: add the new root with add_root, then "
                "restart with the new signing files and the old root as an extra root"
            )
        if self._next is not None:
            return self._next[0]
        now = time.time() if now is None else now
        cert, key = _new_root(self.trust_domain, now)
        ca_dir = self._data_dir / _CA_DIR
        _write_private(ca_dir / _NEXT_KEY, private_key_pem(key))
        _write_private(ca_dir / _NEXT_CERT, _pem(cert), 0o644)
        self._next = (cert, key)
        return cert

    def complete_rotation(self, now: float | None = None) -> None:
        """Sign with the next root from now on; the old root stays trusted until retired."""
        if self._next is None or self._data_dir is None:
            raise CaError("no rotation in progress: call begin_rotation first")
        cert, key = self._next
        old = self._root
        ca_dir = self._data_dir / _CA_DIR
        self._rotations[fingerprint(old)] = time.time() if now is None else now
        self._extra.append(old)
        self._persist_trusted()
        _write_private(ca_dir / _ROOT_KEY, private_key_pem(key))
        _write_private(ca_dir / _ROOT_CERT, _pem(cert), 0o644)
        (ca_dir / _NEXT_KEY).unlink()
        (ca_dir / _NEXT_CERT).unlink()
        self._signer, self._key, self._root, self._served_chain = cert, key, cert, []
        self._next = None

    def _persist_trusted(self) -> None:
        if self._data_dir is None:
            return
        path = self._data_dir / _CA_DIR / _TRUSTED
        if self._extra:
            _write_private(path, b"".join(_pem(r) for r in self._extra), 0o644)
        elif path.exists():
            path.unlink()
        _write_private(
            self._data_dir / _CA_DIR / _ROTATIONS,
            json.dumps(self._rotations, sort_keys=True).encode(),
            0o644,
        )

    # -- signing ---------------------------------------------------------------------

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: SpiffeId,
        ttl: float = DEFAULT_TTL,
        now: float | None = None,
        *,
        subject_common_name: str | None = None,
    ) -> list[bytes]:
        """Sign `csr_pem` for `identity`; returns PEM `[leaf, *intermediates]`.

        The leaf carries one URI SAN (the identity), a random serial and a not-before
        backdated by BACKDATE. `subject_common_name` is only for node certificates.
        Raises CsrRejected when the CSR's signature does not verify, its key is not
        ECDSA P-256, or it asks for names other than `identity`.
        """
        now = time.time() if now is None else now
        if identity.trust_domain != self.trust_domain:
            raise CsrRejected(
                f"identity {identity} is not in this CA's trust domain {self.trust_domain!r}"
            )
        if not 0 < ttl <= MAX_TTL:
            raise CsrRejected(f"ttl {ttl:g}s is out of range (0, {MAX_TTL:g}]")
        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise CsrRejected(f"CSR is not a PEM certificate request: {exc}") from None
        try:
            valid = csr.is_signature_valid
        except (ValueError, TypeError):
            valid = False
        if not valid:
            raise CsrRejected(
                "CSR signature does not verify with the CSR's public key: the request was "
                "altered or signed with another key"
            )
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or not isinstance(
            pub.curve, ec.SECP256R1
        ):
            kind = (
                f"ECDSA {pub.curve.name}"
                if isinstance(pub, ec.EllipticCurvePublicKey)
                else type(pub).__name__.removeprefix("_")
            )
            raise CsrRejected(f"CSR key is {kind}; the mesh issues only ECDSA P-256 keys")
        _check_csr_names(csr, identity)
        signer_expiry = min(c.not_valid_after_utc.timestamp() for c in [self._signer, self._root])
        not_after = min(now + ttl, signer_expiry)
        if not_after <= now:
            raise CsrRejected(
                f"the signing CA certificate expired at {_ts(signer_expiry).isoformat()}: "
                "rotate the CA"
            )
        subject = x509.Name(
            [x509.NameAttribute(NameOID.COMMON_NAME, subject_common_name)]
            if subject_common_name
            else []
        )
        leaf = build_leaf_certificate(
            pub,
            subject=subject,
            issuer=self._signer.subject,
            signer_key=self._key,
            not_before=now - BACKDATE,
            not_after=not_after,
            san=[x509.UniformResourceIdentifier(str(identity))],
            san_critical=not subject_common_name,  # critical when the subject is empty
        )
        return [_pem(leaf), *(_pem(c) for c in self._served_chain)]

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self.trust_domain!r}, "
            f"signer={self._signer.subject.rfc4514_string()!r}, "
            f"roots={[fingerprint(r)[:16] for r in self.roots()]})"
        )


def _issued_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_ca_cert(cert: x509.Certificate, now: float) -> None:
    name = cert.subject.rfc4514_string()
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaError(f"{name} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CaError(f"{name} may not sign certificates (keyUsage lacks keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    if cert.not_valid_after_utc.timestamp() <= now:
        raise CaError(
            f"CA certificate {name} expired at {cert.not_valid_after_utc.isoformat()}: "
            "rotate the CA"
        )


def _check_private(path: Path) -> None:
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise CaError(
            f"{path} is readable by others (mode {mode:o}): run `chmod 600 {path}` "
            "and consider the key compromised if others had access"
        )


def _check_csr_names(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> None:
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if others:
        raise CsrRejected(
            f"CSR asks for non-URI names {[str(getattr(n, 'value', n)) for n in others]}; "
            "mesh certificates carry only the SPIFFE URI SAN"
        )
    if uris and uris != [str(identity)]:
        raise CsrRejected(f"CSR asks for URI SAN {', '.join(uris)}, but the identity is {identity}")


def csr_digest(csr_pem: bytes) -> str:
    """A short stable id for a CSR, for logs (never log the CSR's key material)."""
    return hashlib.sha256(csr_pem).hexdigest()[:16]
