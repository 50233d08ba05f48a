"""CONNECT request building and validation (DESIGN section 4: 400 paths)."""

from __future__ import annotations

import re

import pytest

from ztunnel.hbone.request import (
    ConnectTarget,
    Refuse,
    format_authority,
    forwarded_for,
    new_traceparent,
    parse_authority,
    parse_connect,
    request_headers,
)


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("10.0.0.5:8080", ("10.0.0.5", 8080)),
        ("[fd00::5]:443", ("fd00::5", 443)),
        ("[::ffff:10.0.0.1]:80", ("::ffff:a00:1", 80)),
        ("example.com:80", None),
        ("10.0.0.5", None),
        ("10.0.0.5:0", None),
        ("10.0.0.5:65536", None),
        ("10.0.0.5:+80", None),
        ("fd00::5:443", None),
        ("[10.0.0.5]:80", None),
        ("[fd00::5]443", None),
        ("", None),
        (":80", None),
    ],
)
def test_parse_authority(authority: str, expected: tuple[str, int] | None) -> None:
    assert parse_authority(authority) == expected


def test_request_headers_carry_connect_forwarded_and_a_fresh_traceparent() -> None:
    h1 = request_headers("10.0.0.5:8080", forwarded=forwarded_for("10.0.0.1", 40000))
    h2 = request_headers("10.0.0.5:8080", forwarded=forwarded_for("10.0.0.1", 40000))
    assert h1[:3] == [
        (":method", "CONNECT"),
        (":authority", "10.0.0.5:8080"),
        ("forwarded", 'for="10.0.0.1:40000"'),
    ]
    tp1, tp2 = dict(h1)["traceparent"], dict(h2)["traceparent"]
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", tp1)
    assert tp1 != tp2
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", new_traceparent())


def test_ipv6_is_bracketed_and_quoted() -> None:
    assert forwarded_for("fd00::1", 5000) == 'for="[fd00::1]:5000"'
    assert format_authority("fd00::1", 80) == "[fd00::1]:80"
    assert format_authority("10.1.1.1", 80) == "10.1.1.1:80"


def test_parse_connect_accepts_a_valid_request() -> None:
    target = parse_connect(
        request_headers("[fd00::5]:8080", forwarded='for="[fd00::1]:5000"', traceparent="tp")
    )
    assert isinstance(target, ConnectTarget)
    assert (target.host, target.port, target.authority) == ("fd00::5", 8080, "[fd00::5]:8080")
    assert target.forwarded_for == "[fd00::1]:5000"
    assert target.traceparent == "tp"


@pytest.mark.parametrize(
    ("headers", "fragment"),
    [
        ([(":method", "GET"), (":authority", "10.0.0.5:80"), (":path", "/")], "not CONNECT"),
        ([(":method", "CONNECT")], "without :authority"),
        ([(":method", "CONNECT"), (":authority", "svc.local:80")], "not ip:port"),
        ([(":method", "CONNECT"), (":authority", "10.0.0.5")], "not ip:port"),
    ],
)
def test_parse_connect_refuses_with_400(headers: list[tuple[str, str]], fragment: str) -> None:
    result = parse_connect(headers)
    assert isinstance(result, Refuse)
    assert result.status == 400 and fragment in result.reason
