"""An in-test Kubernetes API server: list (paginated, consistent), watch, resourceVersion, 410.

It serves cluster-wide collections the way kube-apiserver does for the parts a
controller relies on:

- one resourceVersion counter across all kinds (etcd's revision); every object carries
  the version of its last change; lists report the version they are consistent with;
- list with `limit`/`continue`: every page shows the collection as of the first page's
  version, even if objects change in between; a continue token older than the kept
  history is answered with HTTP 410 `Expired`;
- watch (`watch=1`) as a chunked stream of JSON lines: without resourceVersion (or "0")
  synthetic ADDED events for every object, then changes; with resourceVersion N, every
  change after N and then live ones; N older than the kept history: HTTP 200 then an
  ERROR event with a 410 `Expired` Status, as the real server does; `timeoutSeconds`
  ends the stream cleanly; BOOKMARK events only with `allowWatchBookmarks=true`;
- server-side apply (PATCH `application/apply-patch+yaml` with `fieldManager`) of
  namespaced objects and of their `/status` subresource (only status changes): created
  or updated (a no-op apply changes nothing), server-set fields kept (uid, a Service's
  allocated ClusterIP), invalid objects refused with 422 after checking them against the
  Kubernetes schemas;
- bearer-token authentication (401), unknown collections (404, like a CRD not installed),
  503 while `unavailable`;
- GET of one namespaced object (`/api/v1/namespaces/NS/pods/NAME`);
- TokenReview (POST `authentication.k8s.io/v1` `tokenreviews`) of the ServiceAccount
  tokens a test minted with `service_account_token`: bound tokens carry the pod and node
  in `status.user.extra` (`authentication.kubernetes.io/pod-name`, `.../node-name`, as
  kube-apiserver 1.30+ does); unknown tokens and tokens of other audiences are answered
  `authenticated: false` with an error, like the real server.

Tests drive it with put/delete/compact/drop_watches/bookmark/unavailable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import yaml
from aiohttp import web

Key = tuple[str, str]
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
_OBJECT_PATH = re.compile(
    r"^/(api/v1|apis/[^/]+/[^/]+)/namespaces/([^/]+)/([^/]+)/([^/]+)(/status)?$")


def _key(obj: Mapping[str, Any]) -> Key:
    md = obj["metadata"]
    return str(md.get("namespace", "")), str(md["name"])


@dataclass
class _Event:
    rv: int
    type: str
    obj: dict[str, Any]
    prev: dict[str, Any] | None


@dataclass
class _Collection:
    kind: str
    api_version: str
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    events: list[_Event] = field(default_factory=list)
    watchers: set[asyncio.Queue[tuple[str, Any]]] = field(default_factory=set)


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


class KubeApiServer:
    """Serve `collections` (path -> (kind, apiVersion)) on 127.0.0.1:0."""

    def __init__(self, collections: Mapping[str, tuple[str, str]], *, token: str = "test-token",
                 start_rv: int = 1000) -> None:
        self.collections = {p: _Collection(k, v) for p, (k, v) in collections.items()}
        self.token = token
        self.rv = start_rv
        self.floor = 0  # history is kept for versions > floor
        self.unserved: set[str] = set()
        self.unavailable = False  # answer 503 to everything (an API server restart)
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.open_watches = 0
        self.compact_after_first_page = False  # expire the list's continue token once
        self.validate = True  # check applied objects against the Kubernetes schemas (422)
        self.applied: list[tuple[str, str]] = []  # (field manager, object path)
        self._next_ip = 1
        self.service_account_tokens: dict[str, dict[str, Any]] = {}
        self.token_reviews = 0
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> KubeApiServer:
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self._handle)
        app.router.add_route("PATCH", "/{tail:.*}", self._apply)
        app.router.add_route("POST", TOKEN_REVIEWS, self._token_review)
        self._runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.drop_watches()
        assert self._runner is not None
        await self._runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- driving it from tests -----------------------------------------------------------

    def put(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create or replace an object (like a controller's update); returns it as stored."""
        c = self.collections[path]
        o = copy.deepcopy(dict(obj))
        o.setdefault("apiVersion", c.api_version)
        o.setdefault("kind", c.kind)
        md = o.setdefault("metadata", {})
        prev = c.objects.get(_key(o))
        self.rv += 1
        md["resourceVersion"] = str(self.rv)
        md["uid"] = prev["metadata"]["uid"] if prev else str(uuid.uuid4())
        md.setdefault("creationTimestamp", "2026-01-01T00:00:00Z")
        c.objects[_key(o)] = o
        self._record(c, _Event(self.rv, "MODIFIED" if prev else "ADDED", o, prev))
        return o

    def delete(self, path: str, namespace: str, name: str) -> None:
        c = self.collections[path]
        prev = c.objects.pop((namespace, name))
        self.rv += 1
        gone = copy.deepcopy(prev)
        gone["metadata"]["resourceVersion"] = str(self.rv)
        self._record(c, _Event(self.rv, "DELETED", gone, prev))

    def service_account_token(self, namespace: str, name: str, *, pod: str = "",
                              node: str = "", audiences: Iterable[str] = ("ambit",)) -> str:
        """Mint a ServiceAccount token (JWT-shaped, opaque here) the TokenReview accepts."""
        token = ("eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ." +
                 base64.urlsafe_b64encode(f"{namespace}:{name}:{pod}".encode()).decode().rstrip("=")
                 + "." + uuid.uuid4().hex)
        extra: dict[str, list[str]] = {}
        if pod:
            extra["authentication.kubernetes.io/pod-name"] = [pod]
            extra["authentication.kubernetes.io/pod-uid"] = [str(uuid.uuid4())]
        if node:
            extra["authentication.kubernetes.io/node-name"] = [node]
        self.service_account_tokens[token] = {
            "user": {"username": f"system:serviceaccount:{namespace}:{name}",
                     "uid": str(uuid.uuid4()),
                     "groups": ["system:serviceaccounts",
                                f"system:serviceaccounts:{namespace}", "system:authenticated"],
                     "extra": extra},
            "audiences": list(audiences)}
        return token

    def compact(self) -> None:
        """Forget all history up to now (etcd compaction): older versions get 410."""
        self.floor = self.rv
        for c in self.collections.values():
            c.events = [e for e in c.events if e.rv > self.floor]

    def drop_watches(self) -> None:
        """Cut every open watch connection abruptly (no clean end of stream)."""
        for c in self.collections.values():
            for q in c.watchers:
                q.put_nowait(("drop", None))

    def bookmark(self) -> None:
        for c in self.collections.values():
            for q in c.watchers:
                q.put_nowait(("bookmark", self.rv))

    def lists(self, path: str) -> int:
        """How many list requests (first pages) were made for `path`."""
        return sum(1 for p, q in self.requests if p == path and q.get("watch") not in ("1", "true")
                   and not q.get("continue"))

    def watches(self, path: str) -> list[dict[str, str]]:
        return [q for p, q in self.requests if p == path and q.get("watch") in ("1", "true")]

    def _record(self, c: _Collection, ev: _Event) -> None:
        c.events.append(ev)
        for q in c.watchers:
            q.put_nowait(("event", ev))

    # -- serving -------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.path
        query = dict(request.query)
        self.requests.append((path, query))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.unavailable:
            return web.json_response(_status(503, "ServiceUnavailable", "apiserver is "
                                             "shutting down"), status=503)
        c = self.collections.get(path)
        m = _OBJECT_PATH.match(path)
        if c is None and m is not None and not m.group(5):  # GET one object
            coll = f"/{m.group(1)}/{m.group(3)}"
            oc = self.collections.get(coll)
            obj = oc.objects.get((m.group(2), m.group(4))) if oc is not None else None
            if obj is None or coll in self.unserved:
                return web.json_response(_status(404, "NotFound", f"{m.group(3)} "
                                                 f"{m.group(4)!r} not found"), status=404)
            return web.json_response(obj)
        if c is None or path in self.unserved:
            return web.json_response(_status(404, "NotFound", "the server could not find the "
                                             "requested resource"), status=404)
        if query.get("watch") in ("1", "true"):
            return await self._watch(request, c, query)
        return self._list(c, query)

    async def _apply(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        m = _OBJECT_PATH.match(request.path)
        coll = f"/{m.group(1)}/{m.group(3)}" if m else ""
        c = self.collections.get(coll)
        if m is None or c is None or coll in self.unserved:
            return web.json_response(_status(404, "NotFound", "the server could not find the "
                                             "requested resource"), status=404)
        if request.content_type != "application/apply-patch+yaml":
            return web.json_response(_status(415, "UnsupportedMediaType",
                                             f"unsupported {request.content_type}"), status=415)
        manager = request.query.get("fieldManager", "")
        if not manager:
            return web.json_response(_status(400, "BadRequest", "PATCH with apply requires "
                                             "fieldManager"), status=400)
        obj = yaml.safe_load(await request.text())
        ns, name = m.group(2), m.group(4)
        md = obj.get("metadata") or {}
        if (obj.get("kind"), obj.get("apiVersion")) != (c.kind, c.api_version) or (
                md.get("name"), md.get("namespace", ns)) != (name, ns):
            return web.json_response(_status(400, "BadRequest", "the object does not match "
                                             "the request path"), status=400)
        prev = c.objects.get((ns, name))
        if m.group(5):  # the status subresource: only status changes
            if prev is None:
                return web.json_response(_status(404, "NotFound", f"{c.kind} {name!r} not "
                                                 "found"), status=404)
            self.applied.append((manager, request.path))
            updated = copy.deepcopy(prev)
            updated["status"] = copy.deepcopy(obj.get("status") or {})
            return web.json_response(self.put(coll, updated))
        if self.validate:
            try:
                kubernetes_validate.validate(obj, kubernetes_validate.utils.latest_version(),
                                             strict=True)
            except kubernetes_validate.ValidationError as e:
                return web.json_response(_status(422, "Invalid", f"{c.kind} {name!r} is "
                                                 f"invalid: {e.message}"), status=422)
        self.applied.append((manager, request.path))
        new = copy.deepcopy(obj)
        new["metadata"]["namespace"] = ns
        if c.kind == "Service":
            spec = new.setdefault("spec", {})
            ip = (prev or {}).get("spec", {}).get("clusterIP") or spec.get("clusterIP")
            if not ip:
                ip = f"10.96.200.{self._next_ip}"
                self._next_ip += 1
            spec["clusterIP"], spec["clusterIPs"] = ip, [ip]
        if prev is not None:
            same = copy.deepcopy(prev)
            for k in ("resourceVersion", "uid", "creationTimestamp"):
                same["metadata"].pop(k, None)
            if same == new:
                return web.json_response(prev)
        stored = self.put(coll, new)
        return web.json_response(stored, status=200 if prev else 201)

    async def _token_review(self, request: web.Request) -> web.Response:
        self.requests.append((request.path, dict(request.query)))
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        if self.unavailable:
            return web.json_response(_status(503, "ServiceUnavailable", "apiserver is "
                                             "shutting down"), status=503)
        review = await request.json()
        if (review.get("apiVersion"), review.get("kind")) != (
                "authentication.k8s.io/v1", "TokenReview"):
            return web.json_response(_status(400, "BadRequest", "expected an "
                                             "authentication.k8s.io/v1 TokenReview"), status=400)
        self.token_reviews += 1
        spec = review.get("spec") or {}
        wanted = list(spec.get("audiences") or ["https://kubernetes.default.svc"])
        known = self.service_account_tokens.get(str(spec.get("token") or ""))
        status: dict[str, Any]
        if known is None:
            status = {"user": {}, "error": "[invalid bearer token, service account token "
                      "has been invalidated]"}
        elif not set(wanted) & set(known["audiences"]):
            status = {"user": {}, "error": f"[invalid bearer token, token audiences "
                      f"{known['audiences']} is invalid for the target audiences {wanted}]"}
        else:
            status = {"authenticated": True, "user": copy.deepcopy(known["user"]),
                      "audiences": [a for a in wanted if a in known["audiences"]]}
        return web.json_response({"kind": "TokenReview", "apiVersion":
                                  "authentication.k8s.io/v1", "metadata": {},
                                  "spec": spec, "status": status}, status=201)

    def _state_at(self, c: _Collection, rv: int) -> dict[Key, dict[str, Any]]:
        state = dict(c.objects)
        for ev in reversed(c.events):
            if ev.rv <= rv:
                break
            if ev.type == "ADDED":
                state.pop(_key(ev.obj), None)
            else:
                assert ev.prev is not None
                state[_key(ev.prev)] = ev.prev
        return state

    def _list(self, c: _Collection, query: Mapping[str, str]) -> web.Response:
        limit = int(query.get("limit") or 0)
        cont = query.get("continue") or ""
        if cont:
            tok = json.loads(base64.b64decode(cont))
            list_rv, start = int(tok["rv"]), tuple(tok["start"])
            if list_rv < self.floor:
                return web.json_response(_status(
                    410, "Expired", "The provided continue parameter is too old to display a "
                    "consistent list result. You can start a new list without the continue "
                    "parameter."), status=410)
            state = self._state_at(c, list_rv)
            keys = sorted(k for k in state if k > start)
        else:
            list_rv = self.rv
            state = dict(c.objects)
            keys = sorted(state)
        page = keys[:limit] if limit else keys
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if not cont and limit and len(keys) > limit and self.compact_after_first_page:
            self.compact_after_first_page = False
            self.rv += 1  # an unrelated write, then compaction: the token is now too old
            self.compact()
        if limit and len(keys) > limit:
            meta["continue"] = base64.b64encode(json.dumps(
                {"rv": list_rv, "start": list(page[-1])}).encode()).decode()
            meta["remainingItemCount"] = len(keys) - limit
        return web.json_response({"kind": f"{c.kind}List", "apiVersion": c.api_version,
                                  "metadata": meta, "items": [state[k] for k in page]})

    async def _watch(self, request: web.Request, c: _Collection,
                     query: Mapping[str, str]) -> web.StreamResponse:
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        c.watchers.add(q)
        self.open_watches += 1
        bookmarks = query.get("allowWatchBookmarks") == "true"
        timeout = float(query.get("timeoutSeconds") or 1800)

        async def send(typ: str, obj: Mapping[str, Any]) -> None:
            await resp.write(json.dumps({"type": typ, "object": obj}).encode() + b"\n")

        try:
            rv_text = query.get("resourceVersion") or ""
            backlog: Iterable[tuple[str, Mapping[str, Any]]]
            if rv_text in ("", "0"):
                backlog = [("ADDED", o) for _, o in sorted(c.objects.items())]
            else:
                since = int(rv_text)
                if since < self.floor:
                    await send("ERROR", _status(410, "Expired",
                                                f"too old resource version: {since} "
                                                f"({self.floor})"))
                    return resp
                backlog = [(e.type, e.obj) for e in c.events if e.rv > since]
            for typ, obj in backlog:
                await send(typ, obj)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break  # clean end of stream: the client resumes from its last version
                try:
                    what, item = await asyncio.wait_for(q.get(), left)
                except TimeoutError:
                    break
                if what == "drop":
                    if request.transport is not None:
                        request.transport.abort()
                    return resp
                if what == "bookmark":
                    if bookmarks:
                        await send("BOOKMARK", {"kind": c.kind, "apiVersion": c.api_version,
                                                "metadata": {"resourceVersion": str(item)}})
                    continue
                await send(item.type, item.obj)
            with contextlib.suppress(ConnectionError):
                await resp.write_eof()
            return resp
        except ConnectionError:
            return resp
        finally:
            c.watchers.discard(q)
            self.open_watches -= 1
