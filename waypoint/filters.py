"""HTTPRoute filters as pure transforms of the request/response model.

* `modify_headers`: RequestHeaderModifier / ResponseHeaderModifier (`set` replaces
  every header of that name, `add` appends, `remove` deletes; names are
  case-insensitive).
* `redirect`: RequestRedirect -> a `LocalResponse` with `location` (default 302).
* `rewrite`: URLRewrite of the hostname and the path (`ReplaceFullPath` or
  `ReplacePrefixMatch`, which needs the prefix the route matched).
* `mirror_wanted`: whether a RequestMirror copy goes out for this request.
"""

from __future__ import annotations

from collections.abc import Mapping
from random import Random
from typing import Any

from config.resources import HeaderModifier
from waypoint.model import Headers, LocalResponse, Request, set_header

__all__ = [
    "mirror_wanted",
    "modify_headers",
    "redirect",
    "replace_path",
    "rewrite",
]

_DEFAULT_PORTS = {"http": 80, "https": 443}


def modify_headers(headers: Headers, mod: HeaderModifier) -> Headers:
    """Apply a header modifier: set, then add, then remove."""
    out = headers
    for name, value in mod.set:
        out = set_header(out, name, value)
    if mod.add:
        out = out + tuple((n.lower(), v) for n, v in mod.add)
    if mod.remove:
        gone = {n.lower() for n in mod.remove}
        out = tuple((k, v) for k, v in out if k not in gone)
    return out


def replace_path(path_mod: Mapping[str, Any], path: str, matched_prefix: str | None) -> str:
    """The new path for an HTTPPathModifier (`path` without the query)."""
    typ = path_mod.get("type")
    if typ == "ReplaceFullPath":
        return str(path_mod.get("replaceFullPath", "/")) or "/"
    if typ == "ReplacePrefixMatch":
        repl = str(path_mod.get("replacePrefixMatch", "/"))
        prefix = (matched_prefix or "/").rstrip("/")
        rest = path[len(prefix) :] if path.startswith(prefix) else path
        # "/foo" + "/bar" and "/" + "/bar" both give one slash between them
        base = repl.rstrip("/")
        if not rest:
            return base or "/"
        if not rest.startswith("/"):
            rest = "/" + rest
        return (base + rest) or "/"
    return path


def _split_authority(authority: str) -> tuple[str, int | None]:
    if authority.startswith("["):
        end = authority.find("]")
        host = authority[: end + 1]
        rest = authority[end + 1 :]
        return host, int(rest[1:]) if rest.startswith(":") and rest[1:].isdigit() else None
    if authority.count(":") == 1:
        h, p = authority.split(":", 1)
        return h, int(p) if p.isdigit() else None
    return authority, None


def redirect(
    spec: Mapping[str, Any], request: Request, matched_prefix: str | None = None
) -> LocalResponse:
    """RequestRedirect: the redirect response for `request`.

    The port follows the Gateway API: the given port; else the scheme's well-known
    port when the scheme changes; else the request's port. Well-known ports are
    left out of `location`.
    """
    scheme = str(spec.get("scheme") or request.scheme)
    host, req_port = _split_authority(request.authority)
    if spec.get("hostname"):
        host = str(spec["hostname"])
    port: int | None
    if spec.get("port") is not None:
        port = int(spec["port"])
    elif spec.get("scheme"):
        port = _DEFAULT_PORTS.get(scheme)
    else:
        port = req_port
    path = request.path_only
    if isinstance(spec.get("path"), Mapping):
        path = replace_path(spec["path"], path, matched_prefix)
    query = request.query
    target = path + ("?" + query if query else "")
    netloc = host if port is None or _DEFAULT_PORTS.get(scheme) == port else f"{host}:{port}"
    status = int(spec.get("statusCode") or 302)
    location = f"{scheme}://{netloc}{target}"
    return LocalResponse(
        status,
        b"",
        (("location", location),),
        flags="",
        details=f"redirected to {location}",
    )


def rewrite(spec: Mapping[str, Any], request: Request, matched_prefix: str | None) -> Request:
    """URLRewrite: the request with its hostname and/or path rewritten."""
    authority = request.authority
    headers = request.headers
    if spec.get("hostname"):
        authority = str(spec["hostname"])
        headers = set_header(headers, "host", authority) if any(
            k == "host" for k, _ in headers
        ) else headers
    path = request.path
    if isinstance(spec.get("path"), Mapping):
        new = replace_path(spec["path"], request.path_only, matched_prefix)
        q = request.query
        path = new + ("?" + q if q else "")
    return request.with_(authority=authority, path=path, headers=headers)


def mirror_wanted(percent: float, rng: Random) -> bool:
    """Whether this request is mirrored (`percent` of requests, 0-100)."""
    if percent >= 100:
        return True
    if percent <= 0:
        return False
    return rng.random() * 100 < percent
