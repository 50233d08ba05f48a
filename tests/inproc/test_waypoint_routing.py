"""HTTPRoute matching and precedence end to end: which backend answered a real request."""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.inproc.test_waypoint_e2e import Mesh, backend_ref, count_backends, get, route, which

BACKENDS = ["front", "a", "b", "c", "d", "e", "f", "g", "h"]


def prefix(v: str) -> dict[str, Any]:
    return {"path": {"type": "PathPrefix", "value": v}}


def exact(v: str) -> dict[str, Any]:
    return {"path": {"type": "Exact", "value": v}}


def regex(v: str) -> dict[str, Any]:
    return {"path": {"type": "RegularExpression", "value": v}}


def to(name: str, *matches: dict[str, Any], **extra: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {"backendRefs": [backend_ref(name)], **extra}
    if matches:
        rule["matches"] = list(matches)
    return rule


ROUTES = [
    route([
        to("a", exact("/api/v1")),
        to("b", prefix("/api")),
        to("c", prefix("/api/v2")),
        to("d", regex("/r/[0-9]+")),
        to("e", prefix("/r")),
        to("f", {"path": {"type": "PathPrefix", "value": "/m"}, "method": "POST"}),
        to("g", {"path": {"type": "PathPrefix", "value": "/m"},
                 "headers": [{"name": "x-team", "value": "blue"}]}),
        to("h", {"path": {"type": "PathPrefix", "value": "/m"},
                 "headers": [{"name": "x-team", "value": "blue"},
                             {"name": "x-env", "value": "prod"}]}),
        to("a", {"path": {"type": "PathPrefix", "value": "/q"},
                 "queryParams": [{"name": "v", "value": "2"}]}),
        to("b", {"path": {"type": "PathPrefix", "value": "/q"},
                 "headers": [{"name": "x-q", "type": "RegularExpression",
                              "value": "^v[0-9]$"}]}),
        to("c", prefix("/q")),
        to("d", exact("/redirect"), filters=[{"type": "RequestRedirect",
                                              "requestRedirect": {"path": {
                                                  "type": "ReplaceFullPath",
                                                  "replaceFullPath": "/moved"},
                                                  "statusCode": 301}}]),
        to("e", prefix("/rewrite"), filters=[{"type": "URLRewrite", "urlRewrite": {"path": {
            "type": "ReplacePrefixMatch", "replacePrefixMatch": "/new"}}}]),
        to("f", prefix("/hdr"), filters=[{"type": "RequestHeaderModifier",
                                          "requestHeaderModifier": {
                                              "set": [{"name": "x-added", "value": "yes"}],
                                              "remove": ["x-drop"]}}]),
        to("g", prefix("/resp"), filters=[{"type": "ResponseHeaderModifier",
                                           "responseHeaderModifier": {
                                               "add": [{"name": "x-resp", "value": "1"}]}}]),
        to("front", prefix("/")),
    ], name="main"),
    # equally specific matches in two routes: the older route (created first) wins,
    # even though the younger one sorts first by name
    route([to("h", prefix("/tie"))], name="zz-older"),
    route([to("g", prefix("/tie"))], name="aa-younger"),
]


CASES: list[tuple[str, str, dict[str, str], str]] = [
    # (method, path, headers, expected backend)
    ("GET", "/api/v1", {}, "a"),
    ("GET", "/api/v1?x=1", {}, "a"),
    ("GET", "/api/v1/more", {}, "b"),
    ("GET", "/api", {}, "b"),
    ("GET", "/api/v2/x", {}, "c"),
    ("GET", "/api/v20", {}, "b"),
    ("GET", "/apix", {}, "front"),
    ("GET", "/r/123", {}, "e"),  # any prefix beats a regular expression
    ("GET", "/r/12a", {}, "e"),
    ("GET", "/r", {}, "e"),
    ("POST", "/m/1", {}, "f"),
    ("GET", "/m/1", {}, "front"),
    ("GET", "/m/1", {"x-team": "blue"}, "g"),
    ("GET", "/m/1", {"x-team": "blue", "x-env": "prod"}, "h"),
    ("POST", "/m/1", {"x-team": "blue", "x-env": "prod"}, "f"),
    ("GET", "/m/1", {"X-Team": "blue"}, "g"),
    ("GET", "/m/1", {"x-team": "Blue"}, "front"),
    ("GET", "/q?v=2", {}, "a"),
    ("GET", "/q?v=3", {}, "c"),
    ("GET", "/q", {"x-q": "v7"}, "b"),
    ("GET", "/q?v=2", {"x-q": "v7"}, "b"),
    ("GET", "/q", {"x-q": "v77"}, "c"),
    ("GET", "/%61pi/v1", {}, "a"),
    ("GET", "/x/../api/v2/y", {}, "c"),
    ("GET", "/tie/1", {}, "h"),
    ("GET", "/", {}, "front"),
]


async def test_route_matching_and_precedence_cases() -> None:
    mesh = Mesh(dict.fromkeys(BACKENDS, 1), ROUTES, {}, access_log=False)
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        failures = []
        for method, path, headers, want in CASES:
            status, text, _ = await get(s, url + path, method=method, headers=headers)
            got = which(text) if status == 200 else str(status)
            if got != want:
                failures.append(f"{method} {path} {headers}: {got}, expected {want}")
        assert not failures, "\n".join(failures)
        assert len(CASES) >= 25


async def test_filters_redirect_rewrite_and_header_modifiers() -> None:
    mesh = Mesh(dict.fromkeys(BACKENDS, 1), ROUTES, {}, access_log=False)
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        async with s.get(url + "/redirect", allow_redirects=False) as r:
            assert r.status == 301 and r.headers["location"].endswith("/moved")
        status, text, _ = await get(s, url + "/rewrite/x?k=v")
        assert status == 200 and which(text) == "e"
        assert mesh.backends["e"][0].requests[-1]["path"] == "/new/x?k=v"
        status, text, _ = await get(s, url + "/hdr", headers={"x-drop": "1", "x-keep": "2"})
        seen = mesh.backends["f"][0].requests[-1]["headers"]
        assert seen.get("x-added") == "yes" and "x-drop" not in seen and seen["x-keep"] == "2"
        status, _, headers = await get(s, url + "/resp")
        assert status == 200 and headers["x-resp"] == "1"


async def test_weights_50_50_within_5_points_over_2000_requests() -> None:
    mesh = Mesh({"front": 1, "a": 1, "b": 1}, [route([
        {"backendRefs": [backend_ref("a", 50), backend_ref("b", 50)]},
    ])], {}, access_log=False)
    got = await count_backends(mesh)
    assert sum(got.values()) == 2000
    assert abs(got["a"] / 20 - 50) <= 5, got
