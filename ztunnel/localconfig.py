"""`--local-config FILE`: load a snapshot file, reload it on change, persist the last good one."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import structlog

T = TypeVar("T")
_log = structlog.get_logger("ztunnel.config")

POLL_INTERVAL = 0.2
PERSIST_NAME = "last-good-snapshot.yaml"


class ConfigError(Exception):
    """The configuration file could not be read or is invalid; the message says why."""


@dataclass(frozen=True)
class FileStamp:
    inode: int
    mtime_ns: int
    size: int


def stamp(path: str) -> FileStamp | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return FileStamp(st.st_ino, st.st_mtime_ns, st.st_size)


def read_document(path: str) -> tuple[bytes, Any]:
    """Read a YAML or JSON document; raise ConfigError naming the file and the problem."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw)
    except ValueError:
        import yaml  # only for YAML documents: keeps the JSON start-up path lean

        try:
            doc = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"config {path} is not valid YAML/JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise ConfigError(f"config {path} must be a mapping at the top level")
    return raw, doc


def persist(data_dir: str, raw: bytes) -> str:
    """Atomically store the last good config document under `data_dir` (mode 0600)."""
    os.makedirs(data_dir, mode=0o700, exist_ok=True)
    target = os.path.join(data_dir, PERSIST_NAME)
    fd, tmp = tempfile.mkstemp(dir=data_dir, prefix=".snapshot-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def persisted_path(data_dir: str) -> str:
    return os.path.join(data_dir, PERSIST_NAME)


class LocalConfig(Generic[T]):
    """A snapshot file on disk; `parse` turns the document into the snapshot object.

    `load()` reads it now (raising ConfigError); `watch(apply)` polls for changes and
    calls `apply` with each new valid snapshot. An invalid edit is logged and ignored:
    the last good snapshot stays in force.
    """

    def __init__(
        self,
        path: str,
        parse: Callable[[dict[str, Any], str], T],
        *,
        data_dir: str | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self.path = path
        self._parse = parse
        self._data_dir = data_dir
        self._poll = poll_interval
        self._stamp: FileStamp | None = None
        self.current: T | None = None
        self.document: dict[str, Any] | None = None
        self.errors = 0

    def load(self) -> T:
        st = stamp(self.path)
        raw, doc = read_document(self.path)
        try:
            snap = self._parse(doc, os.path.dirname(os.path.abspath(self.path)))
        except ConfigError as exc:
            if self.path in str(exc):
                raise
            raise ConfigError(f"config {self.path}: {exc}") from exc
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"config {self.path} is invalid: {exc}") from exc
        self._stamp = st
        self.current = snap
        self.document = doc
        if self._data_dir is not None:
            try:
                persist(self._data_dir, raw)
            except OSError as exc:
                _log.warning("cannot persist last good config", error=str(exc),
                             data_dir=self._data_dir)
        return snap

    def changed(self) -> bool:
        return stamp(self.path) != self._stamp

    async def watch(self, apply: Callable[[T], Awaitable[None]]) -> None:
        """Poll the file; on each change, parse and apply. Runs until cancelled."""
        while True:
            await asyncio.sleep(self._poll)
            if not self.changed():
                continue
            st = stamp(self.path)
            try:
                snap = self.load()
            except ConfigError as exc:
                self.errors += 1
                self._stamp = st  # don't retry the same broken content every poll
                _log.error("config reload failed; keeping the last good config", error=str(exc))
                continue
            _log.info("config reloaded", path=self.path)
            await apply(snap)


# ----------------------------------------------------------------------------- local CA

LOCAL_CA_KEY = "local_ca"
DEFAULT_LEAF_TTL = 24 * 3600.0


class LocalCA:
    """Signs workload CSRs with a CA certificate and key from files (static / dev setups).

    The `--local-config` document may say `"local_ca": {"cert": "ca.pem", "key":
    "ca-key.pem"}` (paths relative to the document); ztunnel then mints its local
    workloads' certificates itself through the IdentityManager's fetch hook. With
    `"generate": true` a missing CA is created there first (development only).
    """

    def __init__(self, cert_pem: bytes, key_pem: bytes, *, ttl: float = DEFAULT_LEAF_TTL) -> None:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        self.cert_pem = cert_pem
        self.cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError("local CA key must be an EC (P-256) private key")
        self._key = key
        self.ttl = ttl

    @classmethod
    def from_files(cls, cert_path: str, key_path: str) -> LocalCA:
        try:
            with open(cert_path, "rb") as f:
                cert = f.read()
            with open(key_path, "rb") as f:
                key = f.read()
        except OSError as exc:
            raise ConfigError(
                f"cannot read local CA file {exc.filename}: {exc.strerror}: "
                "check local_ca.cert / local_ca.key in the config"
            ) from exc
        try:
            return cls(cert, key)
        except ValueError as exc:
            raise ConfigError(f"local CA {cert_path} / {key_path} is invalid: {exc}") from exc

    async def sign(self, identity: object, csr_pem: bytes) -> list[bytes]:
        """IdentityManager fetcher: a leaf for the CSR's SPIFFE ID, followed by nothing."""
        import datetime as dt
        import time as _time

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509.oid import ExtendedKeyUsageOID

        csr = x509.load_pem_x509_csr(csr_pem)
        if not csr.is_signature_valid:
            raise ValueError("CSR signature is invalid")
        uri = f"{identity}"
        now = _time.time()
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime.fromtimestamp(now - 60, tz=dt.UTC))
            .not_valid_after(dt.datetime.fromtimestamp(now + self.ttl, tz=dt.UTC))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=True,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False,
                    crl_sign=False, encipher_only=False, decipher_only=False,
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
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True
            )
            .sign(self._key, hashes.SHA256())
        )
        return [leaf.public_bytes(serialization.Encoding.PEM)]


def generate_dev_ca(cert_path: str, key_path: str, trust_domain: str) -> None:
    """Create a self-signed root CA at the two paths unless both exist (dev setups only).

    Safe when several ztunnels share the paths and start together: the key and the
    certificate are written to temporary files and linked into place without
    replacing; whoever links first wins and the others use its files.
    """
    if os.path.exists(cert_path) and os.path.exists(key_path):
        return
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ambit dev"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"Ambit dev root {trust_domain}")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    # Key first: a certificate never appears without its key.
    for path, data in ((key_path, key_pem), (cert_path, cert.public_bytes(
            serialization.Encoding.PEM))):
        os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".ca-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.chmod(tmp, 0o600)
            try:
                os.link(tmp, path)
            except FileExistsError:
                if path == key_path:
                    # Another process is creating the CA: use its files once complete.
                    import time as _time

                    deadline = _time.monotonic() + 2.0
                    while not os.path.exists(cert_path) and _time.monotonic() < deadline:
                        _time.sleep(0.02)
                    return
        finally:
            os.unlink(tmp)
    _log.warning("generated a development CA: use a real CA in production",
                 cert=cert_path, key=key_path)


@dataclass(frozen=True)
class LocalDocument:
    """A parsed `--local-config` file: the snapshot plus the optional local CA."""

    snapshot: Any  # ztunnel.snapshot.Snapshot (kept loose to avoid an import cycle)
    local_ca: LocalCA | None


def parse_local_document(doc: dict[str, Any], base_dir: str) -> LocalDocument:
    """Split `local_ca` off the document and validate the rest as a Snapshot."""
    from ztunnel.snapshot import Snapshot, SnapshotError

    data = dict(doc)
    ca_spec = data.pop(LOCAL_CA_KEY, None)
    ca: LocalCA | None = None
    if ca_spec is not None:
        if not isinstance(ca_spec, dict) or not {"cert", "key"} <= set(ca_spec):
            raise ConfigError(f"{LOCAL_CA_KEY} must be a mapping with 'cert' and 'key' paths")
        cert_path = os.path.join(base_dir, str(ca_spec["cert"]))
        key_path = os.path.join(base_dir, str(ca_spec["key"]))
        if ca_spec.get("generate") is True:
            td = str(data.get("trust_domain", "cluster.local"))
            try:
                generate_dev_ca(cert_path, key_path, td)
            except OSError as exc:
                raise ConfigError(f"cannot create the dev CA at {cert_path}: {exc}") from exc
        ca = LocalCA.from_files(cert_path, key_path)
    try:
        snap = Snapshot.from_dict(data)
    except SnapshotError as exc:
        raise ConfigError(str(exc)) from exc
    return LocalDocument(snap, ca)
