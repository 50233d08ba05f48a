"""Throwaway in-memory PKI for tests (root, optional intermediate) and a loopback mTLS harness."""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from config.ca import build_ca_certificate, build_leaf_certificate
from ztunnel.identity import Certificate, SpiffeId, TrustBundle, private_key_pem

_PEM = serialization.Encoding.PEM


def _ca_cert(
    name: str,
    *,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    path_length: int | None,
    trust_domain: str,
) -> x509.Certificate:
    now = time.time()
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ambit test"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    return build_ca_certificate(
        subject,
        key,
        not_before=now - 86400,
        not_after=now + 10 * 86400,
        issuer=issuer,
        issuer_key=issuer_key,
        path_length=path_length,
        trust_domain=trust_domain,
    )


class TestPKI:
    """A root CA (and optional intermediate) in memory, issuing SPIFFE workload certs.

    Knobs produce the bad certificates the rejection tests need: expired (`not_before`
    in the past with a short `ttl`), not yet valid, another `uri`, or `no_uri`.
    """

    __test__ = False  # not a pytest test class

    def __init__(self, trust_domain: str = "cluster.local", intermediate: bool = False) -> None:
        self.trust_domain = trust_domain
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.root = _ca_cert(
            f"Ambit test root {trust_domain}",
            key=self.root_key,
            issuer=None,
            issuer_key=self.root_key,
            path_length=None,
            trust_domain=trust_domain,
        )
        self.intermediate: x509.Certificate | None = None
        self.intermediate_key: ec.EllipticCurvePrivateKey | None = None
        if intermediate:
            self.intermediate_key = ec.generate_private_key(ec.SECP256R1())
            self.intermediate = _ca_cert(
                f"Ambit test intermediate {trust_domain}",
                key=self.intermediate_key,
                issuer=self.root,
                issuer_key=self.root_key,
                path_length=0,
                trust_domain=trust_domain,
            )

    @property
    def bundle(self) -> TrustBundle:
        return TrustBundle(self.trust_domain, self.root.public_bytes(_PEM))

    @property
    def root_pem(self) -> bytes:
        return self.root.public_bytes(_PEM)

    def identity(self, namespace: str, service_account: str) -> SpiffeId:
        return SpiffeId(self.trust_domain, namespace, service_account)

    def issue(
        self,
        namespace: str,
        service_account: str,
        *,
        ttl: float = 3600,
        not_before: float | None = None,
        uri: str | None = None,
        no_uri: bool = False,
    ) -> Certificate:
        """A leaf for spiffe://<td>/ns/<namespace>/sa/<service_account>.

        `uri` replaces the URI SAN (e.g. another trust domain); `no_uri` leaves it out
        (the cert then carries a DNS SAN instead). The returned `identity` is always the
        requested namespace/service account, whatever the SAN says.
        """
        identity = self.identity(namespace, service_account)
        start = time.time() - 300 if not_before is None else not_before
        key = ec.generate_private_key(ec.SECP256R1())
        signer = self.intermediate or self.root
        signer_key = self.intermediate_key or self.root_key
        san: list[x509.GeneralName]
        if no_uri:
            san = [x509.DNSName(f"{service_account}.{namespace}.svc")]
        else:
            san = [x509.UniformResourceIdentifier(uri or str(identity))]
        leaf = build_leaf_certificate(
            key.public_key(),
            issuer=signer.subject,
            signer_key=signer_key,
            not_before=start,
            not_after=start + ttl,
            san=san,
        )
        chain = self.intermediate.public_bytes(_PEM) if self.intermediate else b""
        return Certificate(
            identity=identity,
            cert_pem=leaf.public_bytes(_PEM),
            chain_pem=chain,
            key_pem=private_key_pem(key),
            not_before=leaf.not_valid_before_utc.timestamp(),
            not_after=leaf.not_valid_after_utc.timestamp(),
        )

    def write_files(self, cert: Certificate, directory: Path) -> tuple[Path, Path, Path]:
        """Write cert(+chain), key (0600) and CA bundle for external peers (nghttpx, node...).

        Returns (cert_path, key_path, ca_path). Files are named after the identity so
        several certificates can share a directory.
        """
        directory.mkdir(parents=True, exist_ok=True)
        stem = f"{cert.identity.namespace}.{cert.identity.service_account}"
        cert_path = directory / f"{stem}.crt.pem"
        key_path = directory / f"{stem}.key.pem"
        ca_path = directory / "ca.pem"
        cert_path.write_bytes(cert.full_chain_pem)
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, cert.key_pem)
        finally:
            os.close(fd)
        ca_path.write_bytes(self.bundle.roots_pem)
        return cert_path, key_path, ca_path


# --- a real handshake over loopback TCP, reporting what each side saw ---------------

Check = Callable[[ssl.SSLSocket], Any]


@dataclass
class Side:
    error: BaseException | None = None  # handshake / transport error
    result: Any = None  # what the check returned
    check_error: BaseException | None = None  # what the check raised
    version: str | None = None
    cipher: str | None = None
    alpn: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Outcome:
    server: Side
    client: Side
    echoed: bytes = b""


def _inspect(side: Side, tls: ssl.SSLSocket, check: Check | None) -> None:
    side.version = tls.version()
    c = tls.cipher()
    side.cipher = c[0] if c else None
    side.alpn = tls.selected_alpn_protocol()
    if check is not None:
        try:
            side.result = check(tls)
        except Exception as exc:
            side.check_error = exc


def _linger(tls: ssl.SSLSocket) -> None:
    """After a failed handshake, half-close and drain until the client hangs up, so the
    TLS alert reaches it instead of being wiped by a reset (closing with unread data)."""
    try:
        tls.shutdown(socket.SHUT_WR)
        tls.settimeout(2)
        while socket.socket.recv(tls, 4096):
            pass
    except OSError:
        pass


def handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    check_server: Check | None = None,
    check_client: Check | None = None,
) -> Outcome:
    """Handshake, exchange one byte each way (so TLS 1.3 client-cert alerts arrive), run
    the checks on the live connections (e.g. `peer_identity`), then close both ends."""
    out = Outcome(Side(), Side())
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(10)
    port = listener.getsockname()[1]

    def serve() -> None:
        try:
            raw, _ = listener.accept()
        except OSError as exc:
            out.server.error = exc
            return
        raw.settimeout(10)
        tls = server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        try:
            tls.do_handshake()
            data = tls.recv(1)
            tls.sendall(data)
            _inspect(out.server, tls, check_server)
        except (OSError, ssl.SSLError) as exc:
            out.server.error = exc
            _linger(tls)
        finally:
            tls.close()

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=10)
        tls: ssl.SSLSocket | None = None
        try:
            tls = client_ctx.wrap_socket(raw, server_hostname=None)
            tls.sendall(b"x")
            out.echoed = tls.recv(1)
            if not out.echoed:
                raise ConnectionResetError("server closed the connection after the handshake")
            _inspect(out.client, tls, check_client)
        except (OSError, ssl.SSLError) as exc:
            out.client.error = exc
        finally:
            (tls or raw).close()
    finally:
        thread.join(15)
        listener.close()
    return out
