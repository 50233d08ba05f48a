"""The control plane's admin API: JSON over HTTP/1.1 on a unix socket and on mutual TLS."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import http.client
import json
import os
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import structlog
from cryptography import x509

from config.resources import ResourceKey, resolve_kind
from config.store import Conflict, HistoryCompacted, NotFound, Store
from config.validate import Document, ValidationFailed

log = structlog.get_logger("ambit.api")

DEFAULT_SOCKET = "/run/ambit/control.sock"
MAX_HEADER = 64 * 1024
MAX_BODY = 32 * 1024 * 1024  # read only from admin callers
REQUEST_TIMEOUT = 30.0  # seconds to send the request head, and again for the body

TokenIssuer = Callable[[str, str], Mapping[str, Any]]  # (kind "node"|"waypoint", name) -> token
StatusProvider = Callable[[], Mapping[str, Any]]
# (step "status"|"begin"|"complete"|"retire", request body) -> the CA's roots afterwards
CaOperator = Callable[[str, Mapping[str, Any]], Mapping[str, Any]]


class ApiError(Exception):
    """An error answer: HTTP status and a one-line reason (plus optional details)."""

    def __init__(self, status: int, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = details


@dataclass(frozen=True)
class Caller:
    """Who is calling: `admin` is true for the local root socket and for admin certificates."""

    transport: str  # "unix" | "tls"
    identity: str  # uid=0 or the certificate's URI SAN
    admin: bool


def admin_uri(trust_domain: str) -> str:
    """The URI SAN an admin client certificate carries."""
    return f"spiffe://{trust_domain}/ambit/admin"


# ---------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------


class ApiServer:
    """Dispatches API requests to the store (and to the token issuer / status provider)."""

    def __init__(
        self,
        store: Store,
        *,
        trust_domain: str = "cluster.local",
        token_issuer: TokenIssuer | None = None,
        status_provider: StatusProvider | None = None,
        ca_operator: CaOperator | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
        max_body: int = MAX_BODY,
    ) -> None:
        self.store = store
        self.trust_domain = trust_domain
        self.request_timeout = request_timeout
        self.max_body = max_body
        self.token_issuer = token_issuer
        self.status_provider = status_provider
        self.ca_operator = ca_operator
        self._write_lock = asyncio.Lock()

    async def start_unix(self, path: str) -> asyncio.Server:
        """Listen on a root-only unix socket (mode 0600; peers must be root or our own uid)."""
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        old = os.umask(0o177)
        try:
            server = await asyncio.start_unix_server(self._serve_unix, path=path, limit=MAX_HEADER)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        return server

    async def start_tls(self, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.Server:
        """Listen on TLS; every request must present an admin client certificate."""
        return await asyncio.start_server(self._serve_tls, host, port, ssl=ctx, limit=MAX_HEADER)

    async def _serve_unix(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        uid = -1
        if sock is not None:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
        admin = uid in (0, os.geteuid())
        await self._serve(reader, writer, Caller("unix", f"uid={uid}", admin))

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        der = None
        ssl_obj = writer.get_extra_info("ssl_object")
        if ssl_obj is not None:
            der = ssl_obj.getpeercert(binary_form=True)
        ident = ""
        if der:
            cert = x509.load_der_x509_certificate(der)
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
                uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
                ident = uris[0] if uris else ""
            except x509.ExtensionNotFound:
                ident = ""
        admin = ident == admin_uri(self.trust_domain)
        await self._serve(reader, writer, Caller("tls", ident or "anonymous", admin))

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, caller: Caller
    ) -> None:
        try:
            status, payload = await self._one_request(reader, caller)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            writer.close()
            return
        body = json.dumps(payload, sort_keys=True).encode()
        head = (
            f"HTTP/1.1 {status} {http.client.responses.get(status, 'Status')}\r\n"
            f"Date: {email.utils.formatdate(usegmt=True)}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        try:
            writer.write(head + body)
            async with asyncio.timeout(self.request_timeout):  # a client that stops reading
                await writer.drain()
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(self.request_timeout):
                    await writer.wait_closed()

    async def _one_request(self, reader: asyncio.StreamReader, caller: Caller) -> tuple[int, Any]:
        try:
            async with asyncio.timeout(self.request_timeout):
                head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return 431, {"error": "request headers too large"}
        except TimeoutError:
            return 408, {"error": f"no complete request within {self.request_timeout:g}s"}
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, {"error": "malformed request line"}
        method, target = parts[0], parts[1]
        headers = {}
        for ln in lines[1:]:
            if ":" in ln:
                k, v = ln.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if not caller.admin:  # before reading a single byte of the body
            log.info("api request", method=method, path=urlsplit(target).path,
                     caller=caller.identity, status=403)
            return 403, {
                "error": f"{caller.identity} is not an admin credential: the API "
                "needs the admin certificate (admin.pem in the control "
                "plane's data dir) or root on the local socket"
            }
        if "transfer-encoding" in headers:
            return 411, {"error": "send the body with a Content-Length (no Transfer-Encoding)"}
        text = headers.get("content-length", "0") or "0"
        if not text.isascii() or not text.isdigit():
            return 400, {"error": f"bad Content-Length {text[:40]!r}: expected a byte count"}
        length = int(text)
        if length > self.max_body:
            return 413, {"error": f"request body over {self.max_body} bytes"}
        try:
            async with asyncio.timeout(self.request_timeout):
                raw = await reader.readexactly(length) if length else b""
        except TimeoutError:
            return 408, {"error": f"request body not received within {self.request_timeout:g}s"}
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            return 400, {"error": "request body is not JSON"}
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        try:
            result = await self.dispatch(method, url.path, query, data)
            log.info(
                "api request", method=method, path=url.path, caller=caller.identity, status=200
            )
            return 200, result
        except Exception as e:  # a bug must not take the connection down silently
            if not isinstance(e, ApiError):
                log.exception("api request failed", method=method, path=url.path)
                e = ApiError(
                    500, f"internal error: {type(e).__name__}: {e} (see the control plane's log)"
                )
            log.info(
                "api request",
                method=method,
                path=url.path,
                caller=caller.identity,
                status=e.status,
                error=e.message,
            )
            out: dict[str, Any] = {"error": e.message}
            if e.details is not None:
                out["details"] = e.details
            return e.status, out

    async def dispatch(self, method: str, path: str, query: Mapping[str, str], data: Any) -> Any:
        """Run one API call; raise ApiError for an error answer."""
        route = (method, path)
        try:
            if route == ("GET", "/v1/status"):
                return self._status()
            if route == ("POST", "/v1/apply"):
                return await self._apply(data)
            if route == ("GET", "/v1/resources"):
                return self._get(query)
            if route == ("POST", "/v1/delete"):
                return await self._delete(data)
            if route == ("POST", "/v1/label"):
                return await self._label(data)
            if route == ("POST", "/v1/tokens"):
                return self._token(data)
            if route == ("GET", "/v1/ca"):
                return self._ca("status", {})
            if route == ("POST", "/v1/ca/rotate"):
                step = data.get("step") if isinstance(data, dict) else None
                if step not in ("begin", "complete", "retire"):
                    raise ApiError(
                        400, 'bad request: expected {"step": "begin"|"complete"|"retire"}'
                    )
                return self._ca(str(step), data)
            if route == ("GET", "/v1/changes"):
                since = int(query.get("since", "0"))
                return {
                    "version": self.store.version,
                    "changes": [c.to_json() for c in self.store.changes_since(since)],
                }
        except ValidationFailed as e:
            n = len(e.problems)
            first = str(e.problems[0]) if n else "invalid request"
            msg = first if n == 1 else f"{n} problems, nothing applied; first: {first}"
            raise ApiError(422, msg, [p.to_json() for p in e.problems]) from None
        except NotFound as e:
            raise ApiError(404, str(e)) from None
        except Conflict as e:
            raise ApiError(409, str(e)) from None
        except HistoryCompacted as e:
            raise ApiError(410, str(e)) from None
        except (KeyError, ValueError, TypeError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            raise ApiError(400, f"bad request: {msg}") from None
        raise ApiError(404, f"no such endpoint {method} {path}")

    def _status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": self.store.version, "resources": self.store.counts()}
        if self.status_provider is not None:
            out.update(self.status_provider())
        return out

    async def _apply(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("documents"), list):
            raise ApiError(400, 'bad request: expected {"documents": [...]}')
        docs = [Document.from_json(d) for d in data["documents"]]
        dry = bool(data.get("dryRun", False))
        async with self._write_lock:
            results = await asyncio.to_thread(self.store.apply, docs, dry_run=dry)
        return {"version": self.store.version, "results": [r.to_json() for r in results]}

    def _get(self, q: Mapping[str, str]) -> dict[str, Any]:
        kind = resolve_kind(q["kind"]).kind if q.get("kind") else None
        ns = q.get("namespace")
        name = q.get("name")
        if name:
            if kind is None:
                raise ApiError(400, "bad request: a name needs a kind")
            info = resolve_kind(kind)
            r = self.store.get(kind, (ns or "default") if info.namespaced else "", name)
            if r is None:
                where = f" in namespace {ns or 'default'}" if info.namespaced else ""
                raise ApiError(404, f"{kind} {name!r} not found{where}")
            return {"version": self.store.version, "items": [r.to_json()]}
        items = self.store.list_resources(kind, ns)
        return {"version": self.store.version, "items": [r.to_json() for r in items]}

    async def _delete(self, data: Any) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("resources"), list):
            raise ApiError(400, 'bad request: expected {"resources": [...]}')
        keys = []
        for r in data["resources"]:
            info = resolve_kind(str(r["kind"]))
            ns = str(r.get("namespace") or "default") if info.namespaced else ""
            keys.append(ResourceKey(info.kind, ns, str(r["name"])))
        async with self._write_lock:
            results = await asyncio.to_thread(self.store.delete, keys)
        return {"version": self.store.version, "results": [r.to_json() for r in results]}

    async def _label(self, data: Any) -> dict[str, Any]:
        info = resolve_kind(str(data["kind"]))
        ns = str(data.get("namespace") or "default") if info.namespaced else ""
        key = ResourceKey(info.kind, ns, str(data["name"]))
        set_labels = {str(k): v for k, v in dict(data.get("set") or {}).items()}
        remove = [str(k) for k in data.get("remove") or []]
        async with self._write_lock:
            r = await asyncio.to_thread(self.store.label, key, set_labels, remove)
        return {"version": self.store.version, "results": [r.to_json()]}

    def _ca(self, step: str, data: Mapping[str, Any]) -> Mapping[str, Any]:
        """`ambit ca status` (step "status", GET) and the rotation steps (POST)."""
        if self.ca_operator is None:
            raise ApiError(501, "this control plane has no CA to rotate")
        return self.ca_operator(step, data)

    def _token(self, data: Any) -> Mapping[str, Any]:
        if self.token_issuer is None:
            raise ApiError(501, "this control plane cannot issue join tokens (no CA configured)")
        if data.get("node"):
            return self.token_issuer("node", str(data["node"]))
        if data.get("waypoint"):
            return self.token_issuer("waypoint", str(data["waypoint"]))
        raise ApiError(400, "bad request: give a node or a waypoint")


# ---------------------------------------------------------------------------
# client
# ---------------------------------------------------------------------------


class ClientError(Exception):
    """A failed API call; `str()` is the one-line reason to show the operator."""

    def __init__(self, message: str, status: int = 0, details: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.details = details


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.unix_path)
        except OSError:
            s.close()
            raise
        self.sock = s


@dataclass(frozen=True)
class TlsCredentials:
    cert: str  # admin.pem
    key: str  # admin-key.pem
    ca: str  # the API CA bundle (api-ca.pem)


class ApiClient:
    """Blocking client used by the CLI: `--socket PATH` or `--server HOST:PORT` (+ admin cert)."""

    def __init__(
        self,
        *,
        socket_path: str = DEFAULT_SOCKET,
        server: str = "",
        creds: TlsCredentials | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.socket_path = socket_path
        self.server = server
        self.creds = creds
        self.timeout = timeout
        self.last_date: str | None = None  # the Date header of the last answer

    def where(self) -> str:
        return self.server or self.socket_path

    def _connection(self) -> http.client.HTTPConnection:
        if not self.server:
            return _UnixConnection(self.socket_path, self.timeout)
        host, _, port = self.server.rpartition(":")
        if not host or not port.isdigit():
            raise ClientError(f"bad --server {self.server!r}: expected HOST:PORT")
        if self.creds is None:
            raise ClientError(
                "--server needs the admin credential: pass --cert, --key and "
                "--cacert (admin.pem, admin-key.pem, api-ca.pem from the control "
                "plane's data dir)"
            )
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        ctx.check_hostname = False
        try:
            ctx.load_verify_locations(self.creds.ca)
            ctx.load_cert_chain(self.creds.cert, self.creds.key)
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"cannot load the admin credential: {e}") from None
        return http.client.HTTPSConnection(
            host.strip("[]"), int(port), context=ctx, timeout=self.timeout
        )

    def call(
        self, method: str, path: str, body: Any = None, query: Mapping[str, str] | None = None
    ) -> Any:
        conn = self._connection()
        target = path + ("?" + urlencode(query) if query else "")
        payload = json.dumps(body).encode() if body is not None else b""
        try:
            conn.request(method, target, body=payload, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            self.last_date = resp.getheader("Date")
        except (FileNotFoundError, ConnectionRefusedError):
            raise ClientError(
                f"cannot reach the control plane at {self.where()}: is `ambit "
                "control-plane` running?"
            ) from None
        except PermissionError:
            raise ClientError(
                f"permission denied on {self.where()}: the local socket is root-only (run as root)"
            ) from None
        except (ssl.SSLError, http.client.RemoteDisconnected, ConnectionResetError) as e:
            if not self.server:
                raise ClientError(
                    f"the control plane at {self.where()} closed the connection: see its log"
                ) from None
            reason = getattr(e, "reason", None) or str(e) or type(e).__name__
            raise ClientError(
                f"TLS with the control plane at {self.where()} failed "
                f"({reason}): is --cert/--key the admin credential of that "
                "control plane (admin.pem in its data dir)?"
            ) from None
        except TimeoutError:
            raise ClientError(
                f"the control plane at {self.where()} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as e:
            raise ClientError(
                f"cannot reach the control plane at {self.where()}: {e.strerror or e}"
            ) from None
        finally:
            conn.close()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            raise ClientError(
                f"the control plane at {self.where()} sent a non-JSON answer (HTTP {resp.status})"
            ) from None
        if resp.status != 200:
            raise ClientError(
                str(data.get("error", f"HTTP {resp.status}")), resp.status, data.get("details")
            )
        return data

    # convenience wrappers
    def apply(self, docs: list[Document], dry_run: bool = False) -> Any:
        return self.call(
            "POST", "/v1/apply", {"documents": [d.to_json() for d in docs], "dryRun": dry_run}
        )

    def get(self, kind: str, name: str = "", namespace: str | None = None) -> Any:
        q = {"kind": kind}
        if name:
            q["name"] = name
        if namespace is not None:
            q["namespace"] = namespace
        return self.call("GET", "/v1/resources", query=q)

    def delete(self, keys: list[Mapping[str, str]]) -> Any:
        return self.call("POST", "/v1/delete", {"resources": keys})

    def label(
        self, kind: str, name: str, namespace: str, set_labels: Mapping[str, str], remove: list[str]
    ) -> Any:
        return self.call(
            "POST",
            "/v1/label",
            {
                "kind": kind,
                "name": name,
                "namespace": namespace,
                "set": dict(set_labels),
                "remove": remove,
            },
        )

    def status(self) -> Any:
        return self.call("GET", "/v1/status")

    def token(self, *, node: str = "", waypoint: str = "") -> Any:
        return self.call("POST", "/v1/tokens", {"node": node, "waypoint": waypoint})

    def ca_status(self) -> Any:
        return self.call("GET", "/v1/ca")

    def ca_rotate(self, step: str, fingerprint: str = "", force: bool = False) -> Any:
        body: dict[str, Any] = {"step": step}
        if fingerprint:
            body["fingerprint"] = fingerprint
        if force:
            body["force"] = True
        return self.call("POST", "/v1/ca/rotate", body)


async def serve_forever(servers: list[asyncio.Server], stop: Callable[[], Awaitable[None]]) -> None:
    """Serve until `stop()` returns, then close every server."""
    try:
        await stop()
    finally:
        for s in servers:
            s.close()
        for s in servers:
            with contextlib.suppress(Exception):
                await s.wait_closed()
