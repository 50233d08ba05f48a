"""SPIFFE IDs and certificates: parsing, round trips, and what a repr may show."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.pki import TestPKI
from ztunnel.identity import Certificate, SpiffeId, TrustBundle, generate_key, private_key_pem

segment = st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,30}", fullmatch=True).filter(
    lambda s: s not in (".", "..")
)
domain = st.from_regex(r"[a-z0-9][a-z0-9.-]{0,30}", fullmatch=True)


def test_parse_and_format() -> None:
    sid = SpiffeId.parse("spiffe://cluster.local/ns/shop/sa/cart")
    assert sid == SpiffeId("cluster.local", "shop", "cart")
    assert str(sid) == "spiffe://cluster.local/ns/shop/sa/cart"


@given(domain, segment, segment)
def test_round_trip(td: str, ns: str, sa: str) -> None:
    sid = SpiffeId(td, ns, sa)
    assert SpiffeId.parse(str(sid)) == sid


@given(st.text(max_size=80))
def test_parse_never_fails_with_anything_but_value_error(text: str) -> None:
    try:
        sid = SpiffeId.parse(text)
    except ValueError as exc:
        assert str(exc)
    else:
        assert str(sid) == text


@pytest.mark.parametrize(
    ("uri", "reason"),
    [
        ("http://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("SPIFFE://cluster.local/ns/a/sa/b", "must start with 'spiffe://'"),
        ("spiffe://Cluster.local/ns/a/sa/b", "may only contain lowercase letters"),
        ("spiffe://cluster.local:443/ns/a/sa/b", "may not have a port"),
        ("spiffe://user@cluster.local/ns/a/sa/b", "user info"),
        ("spiffe://cluster.local/ns/a/sa/b?x=1", "query"),
        ("spiffe://cluster.local/ns/a/sa/b#f", "fragment"),
        ("spiffe://cluster.local/ns/a", "path must be /ns/<namespace>/sa/<service-account>"),
        ("spiffe://cluster.local/ns/a/sa/b/c", "path must be"),
        ("spiffe://cluster.local/ns//sa/b", "namespace is empty"),
        ("spiffe://cluster.local/ns/../sa/b", "namespace may not be '..'"),
        ("spiffe:///ns/a/sa/b", "trust domain is empty"),
        ("spiffe://cluster.local/ns/a/sa/b%20c", "percent-encoding"),
    ],
)
def test_bad_ids_say_what_is_wrong(uri: str, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        SpiffeId.parse(uri)
    assert reason in str(err.value)


def test_ids_order_and_hash() -> None:
    a, b = SpiffeId("td", "a", "x"), SpiffeId("td", "b", "x")
    assert sorted([b, a]) == [a, b]
    assert len({a, SpiffeId.parse(str(a))}) == 1


def test_certificate_repr_and_describe_hide_the_key() -> None:
    cert = TestPKI(intermediate=True).issue("shop", "cart")
    assert "PRIVATE" not in repr(cert) and "key_pem" not in repr(cert)
    info = cert.describe()
    assert info["identity"] == "spiffe://cluster.local/ns/shop/sa/cart"
    assert info["chain_length"] == 1
    assert "PRIVATE" not in repr(info)


def test_certificate_from_pem_checks_the_key_matches() -> None:
    cert = TestPKI().issue("shop", "cart")
    again = Certificate.from_pem([cert.cert_pem], cert.key_pem)
    assert again == cert
    with pytest.raises(ValueError, match="private key does not match"):
        Certificate.from_pem([cert.cert_pem], private_key_pem(generate_key()))


def test_certificate_without_uri_san_has_no_identity() -> None:
    cert = TestPKI().issue("shop", "cart", no_uri=True)
    with pytest.raises(ValueError, match="no spiffe:// URI SAN"):
        Certificate.from_pem([cert.cert_pem], cert.key_pem)


def test_trust_bundle_needs_certificates() -> None:
    with pytest.raises(ValueError):
        TrustBundle("cluster.local", b"not pem")
    assert TrustBundle("cluster.local", TestPKI().root_pem).roots()
