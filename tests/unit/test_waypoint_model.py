"""The waypoint's request model: path normalization (with properties), header helpers, config."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.unit.test_waypoint_authz import TARGET, policy
from tests.unit.test_waypoint_routes import backend, build, exact, req, route, rule
from waypoint.chain import ChainState, RequestPlan, build_chain, plan_request
from waypoint.model import LocalResponse, Request, header_value, normalize_path, set_header


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("/a/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/a/./b", "/a/b"),
        ("/a/b/..", "/a/"),
        ("/..", "/"),
        ("/../../x", "/x"),
        ("/a%2fb", "/a%2Fb"),
        ("/a/%2e%2e/admin", "/admin"),
        ("/x?q=/../%61", "/x?q=/../%61"),
        ("/a//b", "/a//b"),
        ("*", "*"),
        ("/%zz", "/%zz"),
        ("/%", "/%"),
        ("/.hidden/x", "/.hidden/x"),
    ],
)
def test_normalize_path(raw: str, want: str) -> None:
    assert normalize_path(raw) == want


_segment = st.sampled_from(["a", "b", ".", "..", "%2e", "%2E%2e", "%61", "%2F", "", "c.d"])


@given(st.lists(_segment, max_size=8), st.text(max_size=5))
def test_normalize_is_idempotent_and_removes_dot_segments(segs: list[str], q: str) -> None:
    raw = "/" + "/".join(segs) + ("?" + q if q else "")
    out = normalize_path(raw)
    assert normalize_path(out) == out
    path, _, query = out.partition("?")
    assert path.startswith("/")
    assert not any(s in (".", "..") for s in path.split("/"))
    assert query == raw.partition("?")[2]


def test_header_helpers() -> None:
    h = (("a", "1"), ("b", "2"), ("a", "3"))
    assert header_value(h, "A") == "1,3"
    assert header_value(h, "c") is None
    assert set_header(h, "A", "x") == (("b", "2"), ("a", "x"))
    r = Request(
        "GET", "/p?x=1&y=&x=2", "[fd00::1]:8080", h, source_principal="spiffe://td/ns/shop/sa/web"
    )
    assert r.host == "fd00::1" and r.path_only == "/p" and r.query == "x=1&y=&x=2"
    assert r.query_params == (("x", "1"), ("y", ""), ("x", "2"))
    assert r.source_namespace == "shop"
    assert Request("GET", "/", "Front.App:80").host == "front.app"


def test_deny_cannot_be_bypassed_with_dot_segments_or_escapes() -> None:
    c = build(
        [
            policy(
                {
                    **TARGET,
                    "action": "DENY",
                    "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}],
                }
            )
        ]
    )
    for path in ("/admin", "/x/../admin", "/%61dmin/users", "/./admin", "/a/%2e%2e/admin"):
        p = plan_request(c, req(path), 0.0, random.Random(1))
        assert isinstance(p, LocalResponse) and p.status == 403, path
    assert backend(c, req("/public/../shop")) == "front"


def test_upstream_gets_the_normalized_path() -> None:
    c = build([route([rule("a", exact("/admin")), rule("c")])])
    p = plan_request(c, req("/x/../%61dmin?q=1"), 0.0, random.Random(1))
    assert isinstance(p, RequestPlan)
    assert p.backend.name == "a" and p.request.path == "/admin?q=1"
    p.release(0.0)


def test_state_forgets_rate_limits_and_backends_that_are_gone() -> None:
    from tests.unit.test_waypoint_chain import SVC, ratelimit

    state = ChainState()
    c1 = build([ratelimit(1, "1s", SVC)])
    build_chain(c1.config, state)
    assert len(state.buckets) == 1 and "app/front:80" in state.clusters
    c2 = build([], backends=("a",))
    build_chain(c2.config, state)
    assert state.buckets == {}
    assert set(state.clusters) == {"app/front:80", "app/a:80"}
