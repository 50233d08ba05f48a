"""Mutual-TLS contexts for HBONE (TLS 1.3, AES-GCM, client certs) and peer identity checks."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import ssl
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptography import x509

from ztunnel.identity import Certificate, SpiffeId, TrustBundle, spiffe_id_of, uri_sans

__all__ = [
    "ALLOWED_CIPHERS",
    "PeerIdentityError",
    "cached_client_context",
    "cached_server_context",
    "client_context",
    "describe_handshake_error",
    "peer_identity",
    "server_context",
]

# TLS 1.3 suites the mesh negotiates (strongest first). ChaCha20 is excluded: AES-GCM
# is hardware accelerated on every machine the mesh targets and twice as fast there.
ALLOWED_CIPHERS = ("TLS_AES_256_GCM_SHA384", "TLS_AES_128_GCM_SHA256")


class PeerIdentityError(Exception):
    """The TLS peer is not who the caller may talk to; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@functools.cache
def _libssl() -> ctypes.CDLL | None:
    """The libssl the `ssl` module is linked to (symbols resolve through `_ssl`)."""
    try:
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_set_ciphersuites.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.SSL_CTX_set_ciphersuites.restype = ctypes.c_int
    except (OSError, AttributeError, ImportError):
        return None
    return lib


def _ssl_ctx_pointer(ctx: ssl.SSLContext) -> int | None:
    """The OpenSSL SSL_CTX* behind `ctx`, checked against its options; None if unsure."""
    lib = _libssl()
    if lib is None:
        return None
    # PySSLContext is `PyObject_HEAD; SSL_CTX *ctx; ...` in every CPython 3 release.
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        return None
    if int(lib.SSL_CTX_get_options(ptr)) != int(ctx.options):
        return None
    return ptr


def _restrict_tls13_suites(ctx: ssl.SSLContext) -> None:
    """Limit TLS 1.3 suites to AES-GCM (Python's ssl has no API for TLS 1.3 suites).

    When the OpenSSL call is unavailable the server still prefers AES-GCM and
    `peer_identity` refuses any other negotiated suite, so the policy holds either way.
    """
    ptr = _ssl_ctx_pointer(ctx)
    lib = _libssl()
    if ptr is None or lib is None:
        return
    lib.SSL_CTX_set_ciphersuites(ptr, ":".join(ALLOWED_CIPHERS).encode())


@contextlib.contextmanager
def _private_files(*contents: bytes) -> Iterator[list[str]]:
    """Paths holding `contents` readable only by this process (memfd; 0600 temp files else)."""
    fds: list[int] = []
    tmpdir: tempfile.TemporaryDirectory[str] | None = None
    try:
        if hasattr(os, "memfd_create"):
            paths = []
            for data in contents:
                fd = os.memfd_create("ambit-tls", os.MFD_CLOEXEC)
                fds.append(fd)
                os.write(fd, data)
                paths.append(f"/proc/self/fd/{fd}")
            yield paths
        else:  # pragma: no cover - non-Linux
            tmpdir = tempfile.TemporaryDirectory(prefix="ambit-tls-")
            paths = []
            for i, data in enumerate(contents):
                p = Path(tmpdir.name) / f"f{i}.pem"
                fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                paths.append(str(p))
            yield paths
    finally:
        for fd in fds:
            os.close(fd)
        if tmpdir is not None:  # pragma: no cover - non-Linux
            tmpdir.cleanup()


def _base_context(
    purpose: int, cert: Certificate, trust: TrustBundle, alpn: Sequence[str]
) -> ssl.SSLContext:
    if cert.identity.trust_domain != trust.trust_domain:
        raise ValueError(
            f"certificate for {cert.identity} is not in trust domain {trust.trust_domain!r}: "
            "the identity manager and the trust bundle disagree"
        )
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False  # identity is the URI SAN, checked by peer_identity
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= getattr(ssl, "OP_NO_TICKET", 0)  # no session resumption across identities
    _restrict_tls13_suites(ctx)
    ctx.load_verify_locations(cadata=trust.roots_pem.decode("ascii"))
    with _private_files(cert.full_chain_pem, cert.key_pem) as (cert_path, key_path):
        ctx.load_cert_chain(cert_path, key_path)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx


def server_context(
    cert: Certificate, trust: TrustBundle, alpn: Sequence[str] = ("h2",)
) -> ssl.SSLContext:
    """Server side of mesh mTLS: TLS 1.3 only, AES-GCM, client certificate required.

    The client chain is verified against `trust` during the handshake (dates included);
    call `peer_identity` afterwards for the SPIFFE identity.
    """
    return _base_context(ssl.PROTOCOL_TLS_SERVER, cert, trust, alpn)


def client_context(
    cert: Certificate, trust: TrustBundle, alpn: Sequence[str] = ("h2",)
) -> ssl.SSLContext:
    """Client side of mesh mTLS: presents `cert`, verifies the server against `trust`.

    Hostname checking is off: the server's identity is its URI SAN, checked with
    `peer_identity(..., expected=...)` right after the handshake.
    """
    return _base_context(ssl.PROTOCOL_TLS_CLIENT, cert, trust, alpn)


@functools.lru_cache(maxsize=1024)
def _cached_context(
    server: bool, cert: Certificate, trust: TrustBundle, alpn: tuple[str, ...]
) -> ssl.SSLContext:
    return (server_context if server else client_context)(cert, trust, alpn)


def cached_server_context(
    cert: Certificate, trust: TrustBundle, alpn: Sequence[str] = ("h2",)
) -> ssl.SSLContext:
    """`server_context`, memoized per (certificate, bundle, ALPN): building one costs ~2 ms.

    A renewed certificate or a new bundle is a new key, so callers simply ask again
    with the current ones for every connection.
    """
    return _cached_context(True, cert, trust, tuple(alpn))


def cached_client_context(
    cert: Certificate, trust: TrustBundle, alpn: Sequence[str] = ("h2",)
) -> ssl.SSLContext:
    """`client_context`, memoized like `cached_server_context`."""
    return _cached_context(False, cert, trust, tuple(alpn))


def peer_identity(
    tls: ssl.SSLObject | ssl.SSLSocket, trust: TrustBundle, expected: SpiffeId | None = None
) -> SpiffeId:
    """The verified peer's SPIFFE identity; PeerIdentityError(reason) when it may not be used.

    Reasons: no certificate, not TLS 1.3 / not AES-GCM, no (or several) spiffe URI SAN,
    another trust domain, or not the `expected` identity.
    """
    version = tls.version()
    if version != "TLSv1.3":
        raise PeerIdentityError(f"peer negotiated {version}, the mesh requires TLSv1.3")
    cipher = tls.cipher()
    if cipher is None or cipher[0] not in ALLOWED_CIPHERS:
        name = cipher[0] if cipher else "no cipher"
        raise PeerIdentityError(
            f"peer negotiated {name}; the mesh allows only {', '.join(ALLOWED_CIPHERS)}"
        )
    der = tls.getpeercert(binary_form=True)
    if not der:
        raise PeerIdentityError(
            "peer presented no certificate: mesh peers must present their workload certificate"
        )
    leaf = x509.load_der_x509_certificate(der)
    uris = uri_sans(leaf)
    if not any(u.lower().startswith("spiffe://") for u in uris):
        raise PeerIdentityError(
            "peer certificate has no URI SAN with a SPIFFE ID "
            f"(subject {leaf.subject.rfc4514_string() or 'empty'}): "
            "it was not issued by the mesh CA for a workload"
        )
    try:
        identity = spiffe_id_of(leaf)
    except ValueError as exc:
        raise PeerIdentityError(
            f"peer certificate URI SAN is not a usable SPIFFE ID: {exc}"
        ) from None
    if identity.trust_domain != trust.trust_domain:
        raise PeerIdentityError(
            f"peer identity {identity} is in trust domain {identity.trust_domain!r}, "
            f"this mesh's trust domain is {trust.trust_domain!r}"
        )
    if expected is not None and identity != expected:
        raise PeerIdentityError(
            f"peer identity is {identity}, expected {expected}: "
            "the destination is not running as the workload the control plane announced"
        )
    return identity


_ALERT_HINTS = {
    "CERTIFICATE_EXPIRED": "the peer refused our certificate as expired: is renewal failing, "
    "or is this node's clock wrong?",
    "UNKNOWN_CA": "the peer does not trust our certificate's root: do both sides have the "
    "same trust bundle (a root rotation in progress)?",
    "BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "CERTIFICATE_REQUIRED": "the peer requires a client certificate and none was sent",
    "CERTIFICATE_UNKNOWN": "the peer refused our certificate (certificate unknown)",
    "NO_APPLICATION_PROTOCOL": "the peer does not speak ALPN h2 (not an HBONE endpoint?)",
    "PROTOCOL_VERSION": "the peer does not speak TLS 1.3",
    "HANDSHAKE_FAILURE": "no common cipher suite or parameters with the peer",
}

_VERIFY_HINTS = {
    10: "peer certificate has expired: the peer's certificate renewal is failing or a clock "
    "is wrong",
    9: "peer certificate is not yet valid: a clock is behind (check NTP on both nodes)",
    20: "peer certificate does not chain to a trusted root (unable to get local issuer): "
    "it was issued by another CA, or the trust bundle is stale",
    19: "peer certificate does not chain to a trusted root (its chain ends in an untrusted "
    "self-signed root): it was issued by another CA, or the trust bundle is stale",
    18: "peer certificate is self-signed and not in the trust bundle",
    2: "peer certificate's issuer is unknown: the intermediate is missing from its chain",
    21: "peer certificate does not chain to a trusted root (unable to verify the first "
    "certificate)",
}


def describe_handshake_error(exc: BaseException) -> str:
    """A one-line operator-facing explanation of a TLS handshake failure."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        hint = _VERIFY_HINTS.get(code)
        detail = exc.verify_message or str(exc)
        return f"{hint} ({detail})" if hint else f"peer certificate rejected: {detail}"
    if isinstance(exc, ssl.SSLEOFError | ssl.SSLZeroReturnError):
        return (
            "the peer closed the connection during the TLS handshake: it probably rejected "
            f"our certificate (check its logs) ({exc})"
        )
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or "").upper()
        for key, hint in _ALERT_HINTS.items():
            if key in reason:
                return f"{hint} ({exc.reason})"
        return f"TLS handshake failed: {exc.reason or exc}"
    if isinstance(exc, PeerIdentityError):
        return exc.reason
    if isinstance(exc, ConnectionResetError | BrokenPipeError | EOFError):
        return (
            "the peer closed the connection during the TLS handshake: it probably rejected "
            "our certificate (check its logs)"
        )
    return f"TLS handshake failed: {exc}"
