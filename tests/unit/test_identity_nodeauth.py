"""Node authorization: join token -> node certificate, and the node-impersonation rule."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import pytest
from cryptography import x509

from config.ca import CertificateAuthority
from config.nodeauth import (
    NodePrincipal,
    Refused,
    authorize_csr,
    authorize_principal_csr,
    issue_node_certificate,
    node_identity,
    principal_of,
    sign_workload_csr,
)
from config.tokens import TokenStore
from tests.pki import TestPKI
from ztunnel.identity import SpiffeId, generate_key, make_csr, uri_sans

NOW = 1_800_000_000.0
TD = "cluster.local"
FRONTEND = SpiffeId(TD, "shop", "frontend")
CART = SpiffeId(TD, "shop", "cart")
SCHEDULE = {"node-1": {FRONTEND}, "node-2": {CART}}


def scheduled(node: str) -> Collection[SpiffeId]:
    return SCHEDULE.get(node, set())


def _setup(tmp_path: Path) -> tuple[CertificateAuthority, TokenStore]:
    ca = CertificateAuthority.load_or_create(tmp_path, TD, now=NOW)
    return ca, TokenStore(tmp_path / "ambit.db")


def test_join_token_is_exchanged_for_a_node_certificate(tmp_path: Path) -> None:
    ca, tokens = _setup(tmp_path)
    token = tokens.create("node-1", now=NOW)
    csr = make_csr(node_identity(TD), generate_key())
    pems = issue_node_certificate(ca, tokens, token, "node-1", csr, now=NOW)
    leaf = x509.load_pem_x509_certificate(pems[0])
    assert uri_sans(leaf) == ["spiffe://cluster.local/ns/ambit-system/sa/ztunnel"]
    assert leaf.subject.rfc4514_string() == "CN=node:node-1"
    assert principal_of(leaf, TD) == NodePrincipal("node", "node-1")


def test_waypoint_token_gives_the_waypoint_its_own_identity(tmp_path: Path) -> None:
    ca, tokens = _setup(tmp_path)
    token = tokens.create("shop/waypoint", now=NOW)
    ident = SpiffeId(TD, "shop", "waypoint")
    pems = issue_node_certificate(
        ca, tokens, token, "shop/waypoint", make_csr(ident, generate_key()), now=NOW
    )
    leaf = x509.load_pem_x509_certificate(pems[0])
    assert uri_sans(leaf) == [str(ident)]
    assert principal_of(leaf, TD) == NodePrincipal("waypoint", "shop/waypoint")


def test_a_bad_csr_does_not_burn_the_token(tmp_path: Path) -> None:
    ca, tokens = _setup(tmp_path)
    token = tokens.create("node-1", now=NOW)
    wrong = make_csr(FRONTEND, generate_key())  # asks for a workload identity
    with pytest.raises(Refused) as err:
        issue_node_certificate(ca, tokens, token, "node-1", wrong, now=NOW)
    assert err.value.rule == "csr"
    assert "but the identity is spiffe://cluster.local/ns/ambit-system/sa/ztunnel" in str(err.value)
    issue_node_certificate(
        ca, tokens, token, "node-1", make_csr(node_identity(TD), generate_key()), now=NOW
    )


def test_expired_token_is_refused_by_the_join_token_rule(tmp_path: Path) -> None:
    ca, tokens = _setup(tmp_path)
    token = tokens.create("node-1", ttl=60, now=NOW)
    with pytest.raises(Refused) as err:
        issue_node_certificate(
            ca, tokens, token, "node-1", make_csr(node_identity(TD), generate_key()), now=NOW + 61
        )
    assert str(err.value) == (
        "join-token: token expired: create a new one with `ambit token create --node node-1`"
    )


def test_token_for_another_node_is_refused_by_the_join_token_rule(tmp_path: Path) -> None:
    ca, tokens = _setup(tmp_path)
    token = tokens.create("node-1", now=NOW)
    with pytest.raises(Refused) as err:
        issue_node_certificate(
            ca, tokens, token, "node-2", make_csr(node_identity(TD), generate_key()), now=NOW
        )
    assert err.value.rule == "join-token"
    assert err.value.message.startswith("join token is bound to node node-1, not node node-2")


def test_csr_for_an_identity_not_on_the_requesting_node_is_refused() -> None:
    with pytest.raises(Refused) as err:
        authorize_csr("node-1", CART, scheduled)
    assert err.value.rule == "node-impersonation"
    assert str(err.value) == (
        "node-impersonation: identity spiffe://cluster.local/ns/shop/sa/cart "
        "is not scheduled on node node-1"
    )


def test_csr_for_an_identity_scheduled_on_the_node_is_allowed() -> None:
    authorize_csr("node-1", FRONTEND, scheduled)
    authorize_csr("node-2", CART, scheduled)


def test_mesh_component_identities_are_never_issued_to_workloads() -> None:
    with pytest.raises(Refused) as err:
        authorize_csr("node-1", node_identity(TD), lambda _: {node_identity(TD)})
    assert err.value.rule == "reserved-identity"


def test_a_waypoint_may_only_obtain_its_own_identity() -> None:
    wp = NodePrincipal("waypoint", "shop/waypoint")
    authorize_principal_csr(wp, SpiffeId(TD, "shop", "waypoint"), scheduled)
    with pytest.raises(Refused) as err:
        authorize_principal_csr(wp, FRONTEND, scheduled)
    assert err.value.rule == "waypoint-identity"
    with pytest.raises(Refused, match="node-impersonation"):
        authorize_principal_csr(NodePrincipal("node", "node-2"), FRONTEND, scheduled)


def test_a_workload_certificate_is_not_a_node_principal() -> None:
    leaf = TestPKI().issue("shop", "frontend").x509()
    with pytest.raises(Refused) as err:
        principal_of(leaf, TD)
    assert err.value.rule == "node-certificate"
    assert "join with a token" in err.value.message


def test_signing_endpoint_authorizes_then_signs(tmp_path: Path) -> None:
    ca, _ = _setup(tmp_path)
    node = NodePrincipal("node", "node-1")
    pems = sign_workload_csr(ca, node, FRONTEND, make_csr(FRONTEND, generate_key()), scheduled)
    assert uri_sans(x509.load_pem_x509_certificate(pems[0])) == [str(FRONTEND)]
    with pytest.raises(Refused, match=r"^node-impersonation: "):
        sign_workload_csr(ca, node, CART, make_csr(CART, generate_key()), scheduled)
    with pytest.raises(Refused, match=r"^csr: CSR asks for URI SAN"):
        sign_workload_csr(ca, node, FRONTEND, make_csr(CART, generate_key()), scheduled)
