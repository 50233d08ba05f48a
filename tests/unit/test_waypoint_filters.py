"""HTTPRoute filters: header modifiers, redirect, URL rewrite, mirror (pure and in the chain)."""

from __future__ import annotations

import random
from typing import Any

from config.resources import HeaderModifier
from tests.unit.test_waypoint_routes import build, prefix, req, route
from waypoint import filters as flt
from waypoint.chain import RequestPlan, plan_request
from waypoint.model import LocalResponse, Request, Response


def _r(
    path: str = "/foo/bar?x=1",
    authority: str = "front.app.svc.cluster.local:8080",
    headers: tuple[tuple[str, str], ...] = (),
) -> Request:
    return Request("GET", path, authority, headers)


# ----------------------------------------------------------------------------- headers


def test_header_modifier_set_add_remove() -> None:
    h = (("x-a", "1"), ("x-a", "2"), ("x-keep", "k"), ("x-drop", "d"))
    mod = HeaderModifier(set=(("X-A", "new"),), add=(("X-Add", "v"),), remove=("X-Drop",))
    out = flt.modify_headers(h, mod)
    assert ("x-a", "new") in out
    assert ("x-a", "1") not in out and ("x-a", "2") not in out
    assert ("x-add", "v") in out and ("x-keep", "k") in out
    assert all(k != "x-drop" for k, _ in out)


def test_header_add_keeps_existing_values() -> None:
    out = flt.modify_headers((("x-a", "1"),), HeaderModifier(add=(("x-a", "2"),)))
    assert out == (("x-a", "1"), ("x-a", "2"))


# ----------------------------------------------------------------------------- redirect


def test_redirect_defaults_to_302_same_scheme_host_port_path() -> None:
    r = flt.redirect({}, _r())
    assert r.status == 302
    assert dict(r.headers)["location"] == "http://front.app.svc.cluster.local:8080/foo/bar?x=1"


def test_redirect_scheme_change_uses_the_well_known_port() -> None:
    r = flt.redirect({"scheme": "https", "statusCode": 301}, _r())
    assert r.status == 301
    assert dict(r.headers)["location"] == "https://front.app.svc.cluster.local/foo/bar?x=1"


def test_redirect_hostname_port_and_full_path() -> None:
    spec = {
        "hostname": "new.example",
        "port": 9000,
        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/moved"},
    }
    loc = dict(flt.redirect(spec, _r()).headers)["location"]
    assert loc == "http://new.example:9000/moved?x=1"


def test_redirect_prefix_replacement() -> None:
    spec = {"path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/v2"}}
    loc = dict(flt.redirect(spec, _r("/foo/bar"), "/foo").headers)["location"]
    assert loc.endswith(":8080/v2/bar")


# ----------------------------------------------------------------------------- rewrite


def test_replace_prefix_match_cases() -> None:
    pm = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/xyz"}
    assert flt.replace_path(pm, "/foo/bar", "/foo") == "/xyz/bar"
    assert flt.replace_path(pm, "/foo", "/foo") == "/xyz"
    assert flt.replace_path(pm, "/foo/", "/foo") == "/xyz/"
    root = {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/"}
    assert flt.replace_path(root, "/foo/bar", "/foo") == "/bar"
    assert flt.replace_path(root, "/foo", "/foo") == "/"
    assert flt.replace_path(pm, "/foo/bar", "/foo/") == "/xyz/bar"


def test_rewrite_full_path_keeps_query_and_sets_host() -> None:
    spec = {
        "hostname": "b.app.svc.cluster.local",
        "path": {"type": "ReplaceFullPath", "replaceFullPath": "/new"},
    }
    out = flt.rewrite(spec, _r(headers=(("host", "front"),)), None)
    assert out.path == "/new?x=1"
    assert out.authority == "b.app.svc.cluster.local"
    assert out.header("host") == "b.app.svc.cluster.local"


def test_mirror_percent_draws() -> None:
    rng = random.Random(7)
    hits = sum(flt.mirror_wanted(30, rng) for _ in range(2000))
    assert 500 <= hits <= 700
    assert flt.mirror_wanted(100, rng) and not flt.mirror_wanted(0, rng)


# ----------------------------------------------------------------------------- in the chain


def _plan(rules: list[dict[str, Any]], r: Request, seed: int = 1) -> RequestPlan | LocalResponse:
    c = build([route(rules)])
    return plan_request(c, r, 0.0, random.Random(seed))


def test_chain_applies_request_header_modifier_and_rewrite_in_order() -> None:
    rules = [
        {
            "matches": [prefix("/api")],
            "filters": [
                {
                    "type": "RequestHeaderModifier",
                    "requestHeaderModifier": {
                        "set": [{"name": "x-route", "value": "api"}],
                        "remove": ["x-secret"],
                    },
                },
                {
                    "type": "URLRewrite",
                    "urlRewrite": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/internal"}
                    },
                },
            ],
            "backendRefs": [{"name": "a", "port": 80}],
        }
    ]
    p = _plan(rules, req("/api/users?page=2", headers=[("x-secret", "s")]))
    assert isinstance(p, RequestPlan)
    assert p.request.path == "/internal/users?page=2"
    assert p.request.header("x-route") == "api"
    assert p.request.header("x-secret") is None
    assert p.original.path == "/api/users?page=2"
    p.release(0.0)


def test_chain_redirect_answers_locally() -> None:
    rules = [
        {
            "matches": [prefix("/old")],
            "filters": [
                {
                    "type": "RequestRedirect",
                    "requestRedirect": {
                        "path": {"type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"},
                        "statusCode": 301,
                    },
                }
            ],
        }
    ]
    p = _plan(rules, req("/old/page"))
    assert isinstance(p, LocalResponse)
    assert p.status == 301
    assert dict(p.headers)["location"] == "http://front.app.svc.cluster.local/new/page"


def test_chain_response_header_modifier() -> None:
    rules = [
        {
            "filters": [
                {
                    "type": "ResponseHeaderModifier",
                    "responseHeaderModifier": {
                        "add": [{"name": "x-served-by", "value": "waypoint"}],
                        "remove": ["server"],
                    },
                }
            ],
            "backendRefs": [{"name": "a", "port": 80}],
        }
    ]
    p = _plan(rules, req("/"))
    assert isinstance(p, RequestPlan)
    resp = p.response(Response(200, (("server", "x"), ("content-type", "text/plain"))))
    assert resp.headers == (("content-type", "text/plain"), ("x-served-by", "waypoint"))
    p.release(0.0)


def test_chain_mirror_copies_the_request_without_changing_the_backend() -> None:
    rules = [
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "c", "port": 80}},
                }
            ],
            "backendRefs": [{"name": "a", "port": 80}],
        }
    ]
    p = _plan(rules, req("/x"))
    assert isinstance(p, RequestPlan)
    assert p.backend.name == "a"
    assert len(p.mirrors) == 1
    assert p.mirrors[0].backend.name == "c"
    assert p.mirrors[0].endpoint.address == "10.0.3.10"
    assert p.mirrors[0].request.path == "/x"
    p.release(0.0)


def test_chain_mirror_percent() -> None:
    rules = [
        {
            "filters": [
                {
                    "type": "RequestMirror",
                    "requestMirror": {"backendRef": {"name": "c", "port": 80}, "percent": 25},
                }
            ],
            "backendRefs": [{"name": "a", "port": 80}],
        }
    ]
    c = build([route(rules)])
    rng = random.Random(3)
    mirrored = 0
    for _ in range(2000):
        p = plan_request(c, req("/"), 0.0, rng)
        assert isinstance(p, RequestPlan)
        mirrored += len(p.mirrors)
        p.release(0.0)
    assert abs(mirrored / 20 - 25) <= 5
