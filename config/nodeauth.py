"""Node authorization: join token -> node certificate, and which identities a node may obtain.

Node and waypoint certificates
------------------------------
SPIFFE allows exactly one URI SAN per certificate, so the node's name goes in the
subject instead:

* a ztunnel node gets URI SAN ``spiffe://<td>/ns/ambit-system/sa/ztunnel`` and subject
  ``CN=node:<node-name>``;
* a waypoint gets its own workload identity ``spiffe://<td>/ns/<ns>/sa/<name>`` (the
  service account Istio gives a waypoint) and subject ``CN=waypoint:<ns>/<name>``.

No DNS SAN is used: it would make a node certificate a valid TLS server certificate for
a host name. Workload certificates have an empty subject, so a workload certificate
can never pass for a node; and no workload may obtain an ``ambit-system`` identity.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.x509.oid import NameOID

from config.ca import DEFAULT_TTL, CertificateAuthority, CsrRejected
from config.tokens import TokenError, TokenStore, validate_subject
from ztunnel.identity import (
    NODE_NAMESPACE,
    NODE_SERVICE_ACCOUNT,
    SpiffeId,
    TrustBundle,
    node_identity,
    spiffe_id_of,
)
from ztunnel.tls import PeerIdentityError, peer_identity

__all__ = [
    "NODE_NAMESPACE",
    "NODE_SERVICE_ACCOUNT",
    "NodePrincipal",
    "Refused",
    "authorize_csr",
    "authorize_principal_csr",
    "issue_node_certificate",
    "node_identity",
    "principal_of",
    "principal_of_peer",
    "sign_workload_csr",
]


class Refused(Exception):
    """A request was refused by the named `rule`; str() is "<rule>: <message>"."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


@dataclass(frozen=True)
class NodePrincipal:
    """Who is talking to the control plane: a ztunnel node or a waypoint."""

    kind: Literal["node", "waypoint"]
    name: str  # node name, or NS/NAME of the waypoint's Gateway

    @classmethod
    def from_subject(cls, subject: str) -> NodePrincipal:
        """From a token subject: `NAME` is a node, `NS/NAME` a waypoint."""
        validate_subject(subject)
        return cls("waypoint" if "/" in subject else "node", subject)

    @property
    def subject(self) -> str:
        return self.name

    def identity(self, trust_domain: str) -> SpiffeId:
        if self.kind == "node":
            return node_identity(trust_domain)
        ns, _, name = self.name.partition("/")
        return SpiffeId(trust_domain, ns, name)

    @property
    def common_name(self) -> str:
        return f"{self.kind}:{self.name}"

    def __str__(self) -> str:
        return f"{self.kind} {self.name}"


def issue_node_certificate(
    ca: CertificateAuthority,
    tokens: TokenStore,
    token: str,
    subject: str,
    csr_pem: bytes,
    *,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> list[bytes]:
    """Exchange a join token for the node's (or waypoint's) certificate: PEM leaf + chain.

    The CSR is checked before the token is consumed, so a bad CSR does not burn it.
    Raises Refused("join-token" | "csr", ...).
    """
    try:
        principal = NodePrincipal.from_subject(subject)
    except ValueError as exc:
        raise Refused("join-token", str(exc)) from None
    try:
        pems = ca.sign_csr(
            csr_pem,
            principal.identity(ca.trust_domain),
            ttl,
            now,
            subject_common_name=principal.common_name,
        )
    except CsrRejected as exc:
        raise Refused("csr", exc.reason) from None
    try:
        tokens.redeem(token, subject, now)
    except TokenError as exc:
        raise Refused("join-token", str(exc)) from None
    return pems


def principal_of(cert: x509.Certificate, trust_domain: str) -> NodePrincipal:
    """The node or waypoint a (chain-verified) certificate belongs to; Refused otherwise."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    kind, sep, name = cn.partition(":")
    if not sep or kind not in ("node", "waypoint"):
        raise Refused(
            "node-certificate",
            "the client certificate is not a node or waypoint certificate: "
            "join with a token (`ambit token create`) first",
        )
    try:
        principal = NodePrincipal.from_subject(name)
        identity = spiffe_id_of(cert)
    except ValueError as exc:
        raise Refused("node-certificate", f"malformed node certificate: {exc}") from None
    if principal.kind != kind:
        raise Refused("node-certificate", f"certificate names {kind} {name!r} inconsistently")
    expected = principal.identity(trust_domain)
    if identity != expected:
        raise Refused(
            "node-certificate",
            f"certificate for {principal} carries {identity}, expected {expected}",
        )
    return principal


def principal_of_peer(tls: ssl.SSLObject | ssl.SSLSocket, trust: TrustBundle) -> NodePrincipal:
    """The node or waypoint at the other end of a verified mTLS connection."""
    try:
        peer_identity(tls, trust)
    except PeerIdentityError as exc:
        raise Refused("node-certificate", exc.reason) from None
    der = tls.getpeercert(binary_form=True)
    assert der is not None  # peer_identity checked it
    return principal_of(x509.load_der_x509_certificate(der), trust.trust_domain)


def authorize_csr(
    node: str, identity: SpiffeId, scheduled: Callable[[str], Collection[SpiffeId]]
) -> None:
    """May `node` obtain a certificate for `identity`? Refused naming the rule if not.

    Rules, in order: `reserved-identity` (mesh-component identities are never issued to
    workloads), `node-impersonation` (only identities of workloads currently scheduled
    on the node).
    """
    if identity.namespace == NODE_NAMESPACE:
        raise Refused(
            "reserved-identity",
            f"identity {identity} is reserved for mesh components; "
            f"node {node} may not request it for a workload",
        )
    if identity not in scheduled(node):
        raise Refused(
            "node-impersonation",
            f"identity {identity} is not scheduled on node {node}",
        )


def authorize_principal_csr(
    principal: NodePrincipal,
    identity: SpiffeId,
    scheduled: Callable[[str], Collection[SpiffeId]],
) -> None:
    """`authorize_csr` for nodes; a waypoint may only renew its own identity."""
    if principal.kind == "node":
        authorize_csr(principal.name, identity, scheduled)
        return
    own = principal.identity(identity.trust_domain)
    if identity != own:
        raise Refused(
            "waypoint-identity",
            f"waypoint {principal.name} may only obtain its own identity {own}, not {identity}",
        )


def sign_workload_csr(
    ca: CertificateAuthority,
    principal: NodePrincipal,
    identity: SpiffeId,
    csr_pem: bytes,
    scheduled: Callable[[str], Collection[SpiffeId]],
    *,
    ttl: float = DEFAULT_TTL,
    now: float | None = None,
) -> list[bytes]:
    """What the control plane's signing endpoint does for an authenticated node/waypoint.

    Authorizes (`authorize_principal_csr`), then signs; a bad CSR is Refused("csr", ...).
    Returns PEM `[leaf, *intermediates]`.
    """
    authorize_principal_csr(principal, identity, scheduled)
    try:
        return ca.sign_csr(csr_pem, identity, ttl, now)
    except CsrRejected as exc:
        raise Refused("csr", exc.reason) from None
