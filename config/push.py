"""Config push on port 15012: node join, workload certificates and the versioned snapshot stream.

Wire format: TLS 1.3, then newline-delimited JSON messages both ways.

Client -> control plane, first message of a connection:

* ``{"type": "bundle"}`` -> ``{"type": "bundle", "trust_bundle": PEM}`` (public; a proxy
  whose token carries ``#sha256:<root fingerprint>`` checks it, then joins over TLS
  verified against that root)
* ``{"type": "join", "subject": NODE | "NS/NAME", "token": T, "csr": PEM}`` (no client
  certificate needed) -> ``{"type": "certificate", "chain": [PEM...], "trust_bundle": PEM}``
* with a node (or waypoint) certificate, any number of:
  ``{"type": "csr", "id": N, "identity": SPIFFE, "csr": PEM}`` ->
  ``{"type": "certificate", "id": N, "chain": [...]}``;
  ``{"type": "renew", "csr": PEM}`` renews the proxy's own node/waypoint certificate
* ``{"type": "subscribe", "version": V, "hash": H[, "address": IP]}``: the last snapshot the
  proxy holds (0/"" for none; waypoints register their address). The control plane then
  sends ``{"type": "snapshot", "version", "hash", "snapshot": {...}}`` (full),
  ``{"type": "delta", "from_hash", "version", "hash", "set", "upsert", "remove"}``, or
  ``{"type": "uptodate", "version", "hash"}`` when the proxy already holds the content
  (so a reconnect, even to a restarted control plane, resends nothing). The proxy
  answers every snapshot/delta with ``{"type": "ack", "version"}`` or
  ``{"type": "nack", "version", "error"}``; after a nack the next update is a full one.
* a node, after subscribing: ``{"type": "claims", "addresses": {IP: NETNS}}``, the
  addresses that live in network namespaces on its host (the whole set, re-sent when it
  changes; at most ``placement.MAX_CLAIMS``). They place WorkloadEntries that have no
  ``ambit.dev/node`` annotation (see ``config.placement``); they are dropped when the
  node disconnects.

Errors: ``{"type": "error", "rule": R, "message": M}`` then the connection closes.
The node is always the one named by the client certificate: a node reads only its own
configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import ssl
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from config.ca import CertificateAuthority, CsrRejected
from config.nodeauth import (
    NodePrincipal,
    Refused,
    authorize_principal_csr,
    issue_node_certificate,
    principal_of,
)
from config.placement import MAX_CLAIMS, ClaimsError, bound_claims, parse_claims
from config.resources import FieldError, Resource, ResourceKey, parse_resource
from config.snapshot import (
    L7_RESOURCES,
    UNKNOWN_NODE,
    MeshIndex,
    NodeState,
    NodeViews,
    ReplicaState,
    content_hash,
    make_delta,
    replica_apply_delta,
    replica_from_dict,
    sorted_dict,
)
from config.store import HistoryCompacted, Store
from config.tokens import TOKEN_PREFIX, TokenStore
from ztunnel import snapshot as zs
from ztunnel.identity import (
    Certificate,
    SpiffeId,
    generate_key,
    make_csr,
    node_identity,
    private_key_pem,
    spiffe_id_of,
)

log = structlog.get_logger("ambit.push")

# (token, subject) -> who may join, or Refused: a Kubernetes ServiceAccount token check
ServiceAccountCheck = Callable[[str, str], Awaitable[NodePrincipal]]

PUSH_PORT = 15012
WAYPOINT_KINDS = frozenset(
    {
        "HTTPRoute",
        "AuthorizationPolicy",
        "DestinationRule",
        "HTTPFault",
        "RateLimit",
        "Service",
        "Gateway",
    }
)
MAX_MESSAGE = 256 * 1024 * 1024  # control plane -> proxy (whole snapshots)
# proxy -> control plane: CSRs, subscribe, acks, nacks (their error cut to NACK_ERROR_MAX):
# a line longer than this is refused, so an unauthenticated peer cannot make the control
# plane buffer more than this per connection
CLIENT_MESSAGE_LIMIT = 64 * 1024
NACK_ERROR_MAX = 4096
FIRST_MESSAGE_TIMEOUT = 10.0  # seconds from the TLS handshake to the first message
HANDSHAKE_TIMEOUT = 10.0
MAX_UNAUTHENTICATED = 128  # connections not (yet) carrying a client certificate or done
SAVE_INTERVAL = 1.0  # seconds between writes of the proxy's snapshot file
CLAIMS_CHECK = 0.25  # seconds between checks for new address claims to send
FULL_SEND_CONCURRENCY = 4  # whole snapshots being written at once
RAW_SNAPSHOT = "_raw_snapshot"  # internal: a snapshot already encoded as JSON bytes
CONTROL_PLANE_SA = ("ambit-system", "control-plane")


def control_plane_identity(trust_domain: str) -> SpiffeId:
    return SpiffeId(trust_domain, *CONTROL_PLANE_SA)


# ---------------------------------------------------------------------------
# server
# ---------------------------------------------------------------------------


@dataclass
class Session:
    """One connected proxy."""

    principal: NodePrincipal
    peer: str
    cert_expiry: float
    writer: asyncio.StreamWriter
    connected: float = field(default_factory=time.time)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    sent_hash: str = ""
    sent_version: int = 0
    sent: dict[str, Any] | None = None  # dict form of the last snapshot sent
    acked_hash: str = ""
    acked_version: int = 0
    state: str = "connecting"  # connecting | pending | synced | nacked
    error: str = ""
    node: NodeState | None = None  # per-item view state (nodes; waypoints diff whole dicts)

    def status(self) -> dict[str, Any]:
        return {
            "kind": self.principal.kind,
            "name": self.principal.name,
            "peer": self.peer,
            "version": self.acked_version,
            "sent_version": self.sent_version,
            "state": self.state,
            "error": self.error,
            "cert_expiry": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.cert_expiry)),
            "connected_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected)),
        }


def write_private(path: Path, data: bytes) -> None:
    """Atomically replace `path` with `data`, mode 0600 (never wider, even if `path` was):
    written to a temporary file in the same directory, fsynced, renamed over `path`, and
    the directory fsynced, so a crash leaves the old content or the new, never a mix."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_secret(path: Path, text: str) -> str:
    """Write a secret (e.g. a join token for `--token-file`) to a 0600 file; returns the path.

    Secrets passed as command-line words are readable by every local user in
    /proc/PID/cmdline; a 0600 file is readable only by its owner."""
    write_private(path, text.encode() + b"\n")
    return str(path)


NEXT = ".next"  # suffix of a credential pair being installed


def _pair(cert: Path, key: Path) -> Certificate | None:
    """The certificate+key pair in these files, None if absent, unreadable or mismatched."""
    try:
        return Certificate.from_pem([cert.read_bytes()], key.read_bytes())
    except (OSError, ValueError):
        return None


def store_credential_pair(cert: Path, key: Path, chain_pem: bytes, key_pem: bytes) -> None:
    """Install a certificate chain and its key so a crash never leaves a mismatched pair.

    Both are written (0600, fsynced) next to their final names with the suffix `.next`,
    then renamed key first, cert second; `recover_credential_pair` finishes an install
    that a crash interrupted between the two renames.
    """
    cert_next, key_next = cert.with_name(cert.name + NEXT), key.with_name(key.name + NEXT)
    write_private(cert_next, chain_pem)
    write_private(key_next, key_pem)
    os.replace(key_next, key)
    os.replace(cert_next, cert)
    _fsync_dir(cert.parent)


def recover_credential_pair(cert: Path, key: Path) -> Certificate | None:
    """The installed pair, after finishing an interrupted `store_credential_pair`.

    The current files win when they match each other (leftover `.next` files of an
    install that never reached its renames are removed); otherwise the `.next` files are
    rolled forward when they complete a matching pair. None when no matching pair exists.
    """
    cert_next, key_next = cert.with_name(cert.name + NEXT), key.with_name(key.name + NEXT)
    current = _pair(cert, key)
    if current is None:
        new_cert = cert_next if cert_next.exists() else cert
        new_key = key_next if key_next.exists() else key
        if (new_cert, new_key) != (cert, key) and _pair(new_cert, new_key) is not None:
            log.warning("finishing an interrupted certificate install", cert=str(cert))
            if new_key != key:
                os.replace(new_key, key)
            if new_cert != cert:
                os.replace(new_cert, cert)
            _fsync_dir(cert.parent)
            return _pair(cert, key)
        return None
    for leftover in (cert_next, key_next):
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    return current


SERVER_CERT_TTL = 90 * 86400.0  # the push server's own certificate
SERVER_CERT = "push-server.pem"
SERVER_KEY = "push-server-key.pem"


class ServerCertificate:
    """The push server's TLS identity, re-issued from the mesh CA at half-life.

    `ctx` is the live server context: `renew()` loads the new certificate into that same
    object, so every handshake after it presents the new certificate while connections
    already open keep theirs. Run `run()` in the control plane's TaskGroup.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        data_dir: Path,
        *,
        ttl: float = SERVER_CERT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.ca = ca
        self.data_dir = data_dir
        self.ttl = ttl
        self.clock = clock
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        # a joining proxy has no certificate yet; everything else checks for one
        self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.ctx.load_verify_locations(cadata=ca.trust_bundle().roots_pem.decode())
        self.issued = 0.0
        self.not_after = 0.0
        self.renewals = 0
        self.renew()

    @property
    def renew_at(self) -> float:
        """When the certificate reaches half its lifetime (clock seconds)."""
        return self.issued + (self.not_after - self.issued) / 2

    def renew(self) -> None:
        """Issue a fresh certificate and key and load them into the live context."""
        now = self.clock()
        key = generate_key()
        identity = control_plane_identity(self.ca.trust_domain)
        chain = self.ca.sign_csr(make_csr(identity, key), identity, ttl=self.ttl, now=now)
        cert_path, key_path = self.data_dir / SERVER_CERT, self.data_dir / SERVER_KEY
        store_credential_pair(cert_path, key_path, b"".join(chain), private_key_pem(key))
        self.ctx.load_cert_chain(str(cert_path), str(key_path))
        leaf = x509.load_pem_x509_certificate(chain[0])
        self.issued = now
        self.not_after = leaf.not_valid_after_utc.timestamp()
        log.info("push server certificate issued", identity=str(identity),
                 expires=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)))
        self.renewals += 1

    def renew_if_due(self) -> bool:
        if self.clock() < self.renew_at:
            return False
        self.renew()
        return True

    async def run(self, retry: float = 60.0) -> None:
        """Renew at every half-life until cancelled; a failed renewal is retried (the
        current certificate stays in use meanwhile)."""
        while True:
            await asyncio.sleep(max(0.0, self.renew_at - self.clock()))
            try:
                self.renew_if_due()
            except (OSError, ssl.SSLError, CsrRejected) as e:
                log.error("push server certificate renewal failed; retrying",
                          error=str(e), retry_in=retry,
                          expires=time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                time.gmtime(self.not_after)))
                await asyncio.sleep(max(1.0, min(retry, (self.not_after - self.clock()) / 4)))


def push_server_context(ca: CertificateAuthority, data_dir: Path) -> ssl.SSLContext:
    """TLS 1.3 server context: the control plane's mesh identity; client certs verified if
    sent. Not renewed: long-running servers use ServerCertificate and run its `run()`."""
    return ServerCertificate(ca, data_dir).ctx


class PushServer:
    """Keeps a MeshIndex in step with the store and streams each proxy its snapshot."""

    def __init__(
        self,
        store: Store,
        ca: CertificateAuthority,
        tokens: TokenStore,
        *,
        root_namespace: str = "istio-system",
        first_message_timeout: float = FIRST_MESSAGE_TIMEOUT,
        max_unauthenticated: int = MAX_UNAUTHENTICATED,
        message_limit: int = CLIENT_MESSAGE_LIMIT,
        service_accounts: ServiceAccountCheck | None = None,
    ) -> None:
        self.store = store
        self.ca = ca
        self.tokens = tokens
        self.first_message_timeout = first_message_timeout
        self.max_unauthenticated = max_unauthenticated
        self.message_limit = message_limit
        # Kubernetes: join with a ServiceAccount token instead of a join token
        self.service_accounts = service_accounts
        self.unauthenticated = 0  # connections counted against max_unauthenticated
        self.refused_busy = 0
        # waypoints also get a compact view of the mesh's clients: they name the source
        # workload in telemetry and verify `forwarded: for=` against it
        self.index = MeshIndex(trust_domain=ca.trust_domain, root_namespace=root_namespace,
                               waypoint_clients=True)
        self.index.trust_bundle_pem = ca.trust_bundle().roots_pem.decode()
        version, items = store.snapshot()
        parsed = [r for r in (_parse_stored(i.key, i.body) for i in items) if r is not None]
        self.index.load(parsed, version)
        # the store version the index reflects; config versions run `_bundle_changes`
        # ahead of it (one per trust bundle change since start), so every pushed change
        # has a version of its own
        self._store_version = version
        self._bundle_changes = 0
        # server contexts that verify proxies' certificates: told about new roots
        self.verify_contexts: list[ssl.SSLContext] = []
        self.sessions: dict[tuple[str, str], Session] = {}
        self.views = NodeViews(self.index)
        self._dirty = asyncio.Event()
        self._full_sends = asyncio.Semaphore(FULL_SEND_CONCURRENCY)
        self._cache: dict[str, tuple[int, dict[str, Any], str]] = {}

    # -- store -> index ----------------------------------------------------------------

    async def follow_store(self) -> None:
        """Apply every store change to the index and update the sessions (runs forever)."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._publish())
            while True:
                try:
                    async for ch in self.store.watch(self._store_version):
                        self._store_version = ch.version
                        self.index.apply(ch.key, _parse_stored(ch.key, ch.body),
                                         ch.version + self._bundle_changes)
                        self._dirty.set()
                except HistoryCompacted as e:
                    log.warning("change history moved past this watcher; relisting", reason=str(e))
                    self._relist()
                    self._dirty.set()

    def _relist(self) -> None:
        """Bring the index to the store's current state without the change history."""
        version, items = self.store.snapshot()
        present = {item.key for item in items}
        for key in [k for k in self.index.resources if k not in present]:
            self.index.apply(key, None, version)
        for item in items:
            cur = self.index.resources.get(item.key)
            if cur is not None and dict(cur.body) == {k: v for k, v in item.body.items()}:
                continue
            self.index.apply(item.key, _parse_stored(item.key, item.body), version)
        self._store_version = version
        self.index.version = version + self._bundle_changes

    def refresh_trust_bundle(self) -> bool:
        """Push the CA's current trust bundle, after a rotation step, as a new config version.

        Every connected proxy gets it as an ordinary delta (acked like any other), and the
        push listener starts accepting certificates of a newly added root. A root retired
        from the bundle stays accepted by this listener until the control plane restarts
        (its node certificates are gone by then: retiring waits out their lifetime).
        Returns False when the bundle did not change.
        """
        pem = self.ca.trust_bundle().roots_pem.decode()
        if pem == self.index.trust_bundle_pem:
            return False
        for ctx in self.verify_contexts:
            ctx.load_verify_locations(cadata=pem)
        self.index.trust_bundle_pem = pem
        self.index.version = max(self.index.version, self._store_version) + 1
        self._bundle_changes = self.index.version - self._store_version
        log.info("trust bundle changed; pushing it to every proxy",
                 roots=len(self.ca.roots()), version=self.index.version)
        self._dirty.set()
        return True

    async def _publish(self) -> None:
        """After each burst of changes: fold them into the views once, wake every session."""
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            self.changed()

    def changed(self) -> None:
        """Fold index changes into the views and wake every session."""
        self._cache.clear()
        self.views.refresh()
        seqs = [
            s.node.seq for s in self.sessions.values() if s.node is not None and s.node.seq >= 0
        ]
        self.views.trim(min(seqs, default=self.views.seq))
        for s in self.sessions.values():
            s.wake.set()

    def status(self) -> dict[str, Any]:
        """Connected proxies, plus nodes that run workloads but are not connected."""
        out = [s.status() for s in self.sessions.values()]
        connected = {(s.principal.kind, s.principal.name) for s in self.sessions.values()}
        for node in sorted(self.index.nodes() - {UNKNOWN_NODE}):
            if ("node", node) not in connected:
                out.append(
                    {
                        "kind": "node",
                        "name": node,
                        "version": "-",
                        "state": "disconnected",
                        "cert_expiry": "-",
                    }
                )
        root = self.ca.signing_root
        ca = {
            "trust_domain": self.ca.trust_domain,
            "root_fingerprint": root.fingerprint(hashes.SHA256()).hex(),
            "root_expiry": root.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "roots": len(self.ca.roots()),
        }
        conflicts = self.index.unplaced_conflicts()
        for c in conflicts:  # shown in `ambit status` next to the nodes
            out.append({"kind": "WorkloadEntry", "name": c.workload, "version": "-",
                        "state": f"unplaced: {c.address} claimed by {', '.join(c.nodes)}",
                        "cert_expiry": "-"})
        return {
            "proxies": sorted(out, key=lambda p: (p["kind"], p["name"])),
            # the version proxies are brought to: the store's, plus trust bundle changes
            "config_version": self.index.version,
            "ca": ca,
            "unplaced": [
                {"workload": c.workload, "address": c.address, "nodes": list(c.nodes)}
                for c in conflicts
            ],
        }

    # -- per principal view ------------------------------------------------------------

    def view(self, principal: NodePrincipal) -> tuple[int, dict[str, Any], str]:
        """(version, snapshot dict, content hash) for a node or waypoint, cached per version."""
        key = f"{principal.kind}:{principal.name}"
        cached = self._cache.get(key)
        if cached is not None and cached[0] == self.index.version:
            return cached
        if principal.kind == "node":
            d = sorted_dict(self.index.node_snapshot(principal.name))
        else:
            ns, _, name = principal.name.partition("/")
            snap = self.index.waypoint_snapshot(ns, name)
            d = sorted_dict(snap)
            d[L7_RESOURCES] = self._l7_resources(snap)
        out = (self.index.version, d, content_hash(d))
        self._cache[key] = out
        return out

    def _l7_resources(self, snap: zs.Snapshot) -> list[dict[str, Any]]:
        """Manifests a waypoint applies itself (routes, L7 policy, faults, limits...) in the
        namespaces of the services bound to it and the root namespace."""
        namespaces = {s.namespace for s in snap.services} | {self.index.root_namespace}
        out = [
            dict(r.body)
            for key, r in sorted(
                self.index.resources.items(),
                key=lambda kv: (kv[0].kind, kv[0].namespace, kv[0].name),
            )
            if key.kind in WAYPOINT_KINDS and key.namespace in namespaces
        ]
        return out

    def _scheduled(self, node: str) -> list[SpiffeId]:
        out = []
        for ns in self.index.namespaces():
            for w in self.index.workloads_in(ns).values():
                if w.node == node:
                    out.append(SpiffeId(self.ca.trust_domain, w.namespace, w.service_account))
        return out

    # -- connections -------------------------------------------------------------------

    async def start(self, host: str, port: int, ctx: ssl.SSLContext) -> asyncio.Server:
        return await asyncio.start_server(
            self._handle, host, port, ssl=ctx, limit=self.message_limit,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        peer_s = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.unauthenticated >= self.max_unauthenticated:
            self.refused_busy += 1
            if self.refused_busy % 100 == 1:
                log.warning("too many unauthenticated proxy connections; closing new ones",
                            peer=peer_s, limit=self.max_unauthenticated,
                            refused=self.refused_busy)
            writer.close()
            return
        pending = _Unauthenticated(self)
        try:
            await self._converse(reader, writer, peer_s, pending)
        except Refused as e:
            log.warning("push request refused", peer=peer_s, rule=e.rule, reason=e.message)
            await _send(writer, {"type": "error", "rule": e.rule, "message": e.message})
        except _FirstMessageTimeout as e:
            log.info("proxy connection closed", peer=peer_s, reason=str(e))
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await _send(writer, {"type": "error", "rule": "timeout", "message": str(e)})
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError, TimeoutError):
            pass
        except ValueError as e:
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await _send(writer, {"type": "error", "rule": "protocol", "message": str(e)})
        finally:
            pending.done()
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
                async with asyncio.timeout(5):
                    await writer.wait_closed()

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        pending: _Unauthenticated,
    ) -> None:
        try:
            async with asyncio.timeout(self.first_message_timeout):
                msg = await _recv(reader, self.message_limit)
        except TimeoutError:
            raise _FirstMessageTimeout(
                f"no message within {self.first_message_timeout:g}s of connecting"
            ) from None
        if msg is None:
            return
        if msg.get("type") == "bundle":  # public: lets a joining proxy check its pin
            await _send(writer, {"type": "bundle", "trust_bundle": self.index.trust_bundle_pem})
            return
        if msg.get("type") == "join":
            token, subject = str(msg.get("token", "")), str(msg.get("subject", ""))
            csr = str(msg.get("csr", "")).encode()
            if self.service_accounts is not None and not token.startswith(TOKEN_PREFIX):
                chain = await self._join_with_service_account(token, subject, csr)
            else:
                chain = issue_node_certificate(self.ca, self.tokens, token, subject, csr)
            log.info("proxy joined", subject=msg.get("subject"), peer=peer)
            await _send(
                writer,
                {
                    "type": "certificate",
                    "chain": [c.decode() for c in chain],
                    "trust_bundle": self.index.trust_bundle_pem,
                },
            )
            return
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        if not der:
            raise Refused(
                "node-certificate",
                "no client certificate: join with a token (`ambit token create`) first",
            )
        cert = x509.load_der_x509_certificate(der)
        principal = principal_of(cert, self.ca.trust_domain)
        pending.done()  # a verified node/waypoint certificate: no longer counted
        expiry = cert.not_valid_after_utc.timestamp()
        session: Session | None = None
        error: Exception | None = None
        async with asyncio.TaskGroup() as tg:  # owns this connection's sender
            try:
                while msg is not None:
                    typ = msg.get("type")
                    if typ == "csr":
                        await self._csr(writer, principal, msg)
                    elif typ == "renew":
                        await self._renew(writer, principal, msg)
                    elif typ == "subscribe" and session is None:
                        session = Session(principal, peer, expiry, writer)
                        self._subscribe(session, msg)
                        tg.create_task(self._sender(session))
                    elif typ in ("ack", "nack") and session is not None:
                        self._ack(session, msg)
                    elif typ == "claims" and session is not None and principal.kind == "node":
                        self._claims(principal.name, msg)
                    else:
                        raise ValueError(f"unexpected message type {typ!r}")
                    msg = await _recv(reader, self.message_limit)
            except (
                Refused,
                ValueError,
                ConnectionError,
                asyncio.IncompleteReadError,
                ssl.SSLError,
            ) as e:
                error = e
            finally:
                if session is not None:
                    if self.sessions.get(_skey(principal)) is session:
                        del self.sessions[_skey(principal)]
                        if principal.kind == "node":
                            self._set_claims(principal.name, None)
                    log.info("proxy disconnected", kind=principal.kind, name=principal.name)
                    session.state = "closed"
                    session.wake.set()
        if error is not None:
            raise error

    async def _join_with_service_account(
        self, token: str, subject: str, csr: bytes
    ) -> list[bytes]:
        """A node or waypoint certificate for a reviewed Kubernetes ServiceAccount token."""
        assert self.service_accounts is not None
        principal = await self.service_accounts(token, subject)
        if principal.kind == "waypoint":
            ns, _, name = principal.name.partition("/")
            if self.store.get("Gateway", ns, name) is None:
                raise Refused("join-token", f"Gateway {ns}/{name} not found: a waypoint "
                              "joins only for a declared Gateway (class istio-waypoint)")
        try:
            return self.ca.sign_csr(csr, principal.identity(self.ca.trust_domain),
                                    subject_common_name=principal.common_name)
        except CsrRejected as e:
            raise Refused("csr", e.reason) from None

    async def _csr(
        self, writer: asyncio.StreamWriter, principal: NodePrincipal, msg: Mapping[str, Any]
    ) -> None:
        try:
            identity = SpiffeId.parse(str(msg.get("identity", "")))
        except ValueError as e:
            raise Refused("csr", str(e)) from None
        authorize_principal_csr(principal, identity, self._scheduled)
        try:
            chain = self.ca.sign_csr(str(msg.get("csr", "")).encode(), identity)
        except CsrRejected as e:
            raise Refused("csr", e.reason) from None
        await _send(
            writer,
            {"type": "certificate", "id": msg.get("id"), "chain": [c.decode() for c in chain]},
        )

    async def _renew(
        self, writer: asyncio.StreamWriter, principal: NodePrincipal, msg: Mapping[str, Any]
    ) -> None:
        """A proxy renews its own node/waypoint certificate with the one it still holds."""
        identity = principal.identity(self.ca.trust_domain)
        try:
            chain = self.ca.sign_csr(
                str(msg.get("csr", "")).encode(),
                identity,
                subject_common_name=principal.common_name,
            )
        except CsrRejected as e:
            raise Refused("csr", e.reason) from None
        log.info("proxy certificate renewed", kind=principal.kind, name=principal.name)
        await _send(
            writer,
            {
                "type": "certificate",
                "id": msg.get("id"),
                "chain": [c.decode() for c in chain],
                "trust_bundle": self.index.trust_bundle_pem,
            },
        )

    def _subscribe(self, s: Session, msg: Mapping[str, Any]) -> None:
        old = self.sessions.get(_skey(s.principal))
        if old is not None:  # a reconnect replaces the stale stream
            old.state = "closed"
            old.wake.set()
            old.writer.close()
        self.sessions[_skey(s.principal)] = s
        s.acked_hash = s.sent_hash = str(msg.get("hash", ""))
        s.acked_version = s.sent_version = int(msg.get("version", 0))
        if s.principal.kind == "node":
            s.node = NodeState(s.principal.name)
        address = msg.get("address")
        if s.principal.kind == "waypoint" and isinstance(address, str) and address:
            ns, _, name = s.principal.name.partition("/")
            zs.canonical_ip(address)
            if self.index.waypoint_addresses.get((ns, name)) != address:
                self.index.set_waypoint_address(ns, name, address)
                self._dirty.set()
        log.info(
            "proxy subscribed",
            kind=s.principal.kind,
            name=s.principal.name,
            version=s.acked_version,
            peer=s.peer,
        )
        s.state = "pending"
        s.wake.set()

    def _claims(self, node: str, msg: Mapping[str, Any]) -> None:
        try:
            claims = parse_claims(msg.get("addresses"))
        except ClaimsError as e:
            raise ValueError(f"{e} (node {node})") from None
        self._set_claims(node, claims)

    def _set_claims(self, node: str, claims: Mapping[str, str] | None) -> None:
        """Record what `node` claims; log placements that become contested."""
        before = {c.workload for c in self.index.unplaced_conflicts()}
        if not self.index.set_claims(node, claims):
            return
        for c in self.index.unplaced_conflicts():
            if c.workload not in before:
                log.warning("workload address claimed by several nodes", workload=c.workload,
                            address=c.address, nodes=list(c.nodes), reason=c.message())
        self._dirty.set()

    def _ack(self, s: Session, msg: Mapping[str, Any]) -> None:
        version = int(msg.get("version", -1))
        if msg["type"] == "ack":
            if version == s.sent_version:
                s.acked_version, s.acked_hash = version, s.sent_hash
                s.state, s.error = "synced", ""
            return
        s.state, s.error = "nacked", str(msg.get("error", ""))[:500]
        s.acked_hash = ""  # the proxy may not hold what we think: next update is full
        s.sent = None
        if s.node is not None:
            s.node.seq = -1
        log.warning(
            "proxy rejected config",
            kind=s.principal.kind,
            name=s.principal.name,
            version=version,
            error=s.error,
        )

    async def _sender(self, s: Session) -> None:
        try:
            await self._send_updates(s)
        except (ConnectionError, ssl.SSLError) as e:
            log.info("config stream write failed", name=s.principal.name, reason=str(e))
            s.state = "closed"
            s.writer.close()

    async def _send_updates(self, s: Session) -> None:
        while s.state != "closed":
            await s.wake.wait()
            s.wake.clear()
            if s.state == "closed":
                return
            msg = self._node_update(s) if s.node is not None else self._waypoint_update(s)
            if msg is None:
                if s.state == "synced" and s.sent_hash == s.acked_hash:
                    # nothing this proxy sees changed: it is current at the new version too
                    version = self.views.version if s.node is not None else self.index.version
                    s.sent_version = s.acked_version = version
                continue
            s.sent_hash, s.sent_version = msg["hash"], msg["version"]
            if msg["type"] == "uptodate":
                s.acked_hash, s.acked_version, s.state = s.sent_hash, s.sent_version, "synced"
            elif s.state != "nacked":
                s.state = "pending"
            raw = msg.pop(RAW_SNAPSHOT, None)
            if raw is None:
                await _send(s.writer, msg)
                continue
            # whole snapshots are MiBs: a few at a time keeps buffers (and RSS) bounded
            async with self._full_sends:
                head = json.dumps(msg, separators=(",", ":")).encode()
                s.writer.write(head[:-1] + b',"snapshot":' + raw + b"}\n")
                await s.writer.drain()

    def _node_update(self, s: Session) -> dict[str, Any] | None:
        st = s.node
        assert st is not None
        version = self.views.version
        if self.views.needs_full(st):  # subscribed, nacked or too far behind
            raw = self.views.full_json(st)
            h = self.views.hash_of(st)
            if h == s.acked_hash:
                return {"type": "uptodate", "version": version, "hash": h}
            return {"type": "snapshot", "version": version, "hash": h, RAW_SNAPSHOT: raw}
        before = self.views.hash_of(st)
        res = self.views.update(st)
        if res is None:
            return None
        kind, body = res
        h = self.views.hash_of(st)
        if kind == "snapshot":
            return {"type": "snapshot", "version": version, "hash": h, "snapshot": body}
        return {"type": "delta", "from_hash": before, "version": version, "hash": h, **body}

    def _waypoint_update(self, s: Session) -> dict[str, Any] | None:
        version, d, h = self.view(s.principal)
        if h == s.sent_hash and s.state != "nacked":
            if s.state == "pending" and h == s.acked_hash:
                return {"type": "uptodate", "version": version, "hash": h}
            return None
        if s.sent is not None and s.state != "nacked":
            msg = {
                "type": "delta",
                "from_hash": s.sent_hash,
                "version": version,
                "hash": h,
                **make_delta(s.sent, d),
            }
        else:
            msg = {"type": "snapshot", "version": version, "hash": h, "snapshot": d}
        s.sent = d
        return msg


def _parse_stored(key: ResourceKey, body: Mapping[str, Any] | None) -> Resource | None:
    """A stored manifest parsed (None for a delete, or if it no longer validates)."""
    if body is None:
        return None
    try:
        return parse_resource(dict(body))
    except FieldError as e:  # stored by an older version with other rules
        log.error(
            "stored resource no longer valid; leaving it out", resource=str(key), reason=str(e)
        )
        return None


def _skey(p: NodePrincipal) -> tuple[str, str]:
    return (p.kind, p.name)


async def _send(writer: asyncio.StreamWriter, msg: Mapping[str, Any]) -> None:
    writer.write(json.dumps(msg, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


class _FirstMessageTimeout(Exception):
    pass


class _Unauthenticated:
    """Counts a connection against PushServer.max_unauthenticated until `done()`."""

    def __init__(self, server: PushServer) -> None:
        self.server: PushServer | None = server
        server.unauthenticated += 1

    def done(self) -> None:
        if self.server is not None:
            self.server.unauthenticated -= 1
            self.server = None


async def _recv(reader: asyncio.StreamReader, limit: int = 0) -> dict[str, Any] | None:
    try:
        line = await reader.readline()
    except ValueError:  # the StreamReader's limit: no newline within it
        raise ValueError(f"message longer than {limit} bytes: refused" if limit
                         else "message too long: refused") from None
    if not line:
        return None
    try:
        msg = json.loads(line)
    except ValueError:
        raise ValueError("message is not JSON") from None
    if not isinstance(msg, dict):
        raise ValueError("message is not a JSON object")
    return msg


# ---------------------------------------------------------------------------
# client (used by ztunnel and waypoints)
# ---------------------------------------------------------------------------


class PushError(Exception):
    """The control plane refused a request; `rule` names why (join-token, csr, ...)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


NODE_CERT = "node-cert.pem"
NODE_KEY = "node-key.pem"
TRUST = "trust-bundle.pem"
LAST_SNAPSHOT = "snapshot.json"


class PushClient:
    """A proxy's side: join once with a token, then fetch certificates and follow config.

    `subject` is the node name, or `NS/NAME` for a waypoint. State (node certificate,
    trust bundle, last good snapshot) lives in `data_dir`.
    """

    def __init__(
        self,
        address: str,
        subject: str,
        data_dir: Path,
        *,
        trust_domain: str = zs.DEFAULT_TRUST_DOMAIN,
        token: str = "",
        token_file: Path | None = None,
        waypoint_address: str = "",
        timeout: float = 10.0,
    ) -> None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"bad control plane address {address!r}: expected HOST:PORT")
        self.host, self.port = host.strip("[]"), int(port)
        self.address = address
        self.subject = subject
        self.data_dir = Path(data_dir)
        self.trust_domain = trust_domain
        self.ca_pin = ""
        self._token = ""
        self.token = token
        # re-read before every join: mounted credentials (Kubernetes projected service
        # account tokens) rotate while the proxy runs
        self.token_file = token_file
        self.waypoint_address = waypoint_address
        self.timeout = timeout
        self._ids = 0
        # addresses in this node's netns (address -> netns), sent on the config stream;
        # None: this proxy reports none (waypoints, static tests)
        self._claims: dict[str, str] | None = None
        self._claims_gen = 0

    def set_claims(self, claims: Mapping[str, str]) -> None:
        """Report these addresses (address -> netns) to the control plane: sent on the
        open config stream within CLAIMS_CHECK seconds, and again on every reconnect."""
        kept, left = bound_claims(claims)
        if kept != self._claims:
            if left:
                log.warning("some local addresses are not reported (too many, or netns "
                            "names too long): annotate their WorkloadEntries with "
                            "ambit.dev/node", left_out=left[:10], count=len(left),
                            limit=MAX_CLAIMS)
            self._claims = kept
            self._claims_gen += 1

    @property
    def token(self) -> str:
        """The join token's secret part (without a `#sha256:` pin)."""
        return self._token

    @token.setter
    def token(self, value: str) -> None:
        """Set the token as printed by `ambit token create` (or read from a token file): it
        may carry the CA's root fingerprint, `<token>#sha256:<hex>`, kept as `ca_pin`."""
        secret, _, pin = value.strip().partition("#")
        self._token = secret
        self.ca_pin = pin.removeprefix("sha256:").lower() if pin else ""

    # -- files ---------------------------------------------------------------------

    def _identity(self) -> SpiffeId:
        if "/" in self.subject:
            ns, _, name = self.subject.partition("/")
            return SpiffeId(self.trust_domain, ns, name)
        return node_identity(self.trust_domain)

    def node_certificate(self) -> Certificate | None:
        """The node (or waypoint) certificate in the data dir, if it is a valid, matching
        pair (finishing an install a crash interrupted)."""
        c, k = self.data_dir / NODE_CERT, self.data_dir / NODE_KEY
        if not c.exists() and not c.with_name(c.name + NEXT).exists():
            return None
        cert = recover_credential_pair(c, k)
        return cert if cert is not None and cert.valid_at(time.time()) else None

    def _saved(self) -> tuple[ReplicaState, dict[str, Any]] | None:
        """The saved snapshot, parsed (None when missing or unusable)."""
        p = self.data_dir / LAST_SNAPSHOT
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            return replica_from_dict(data), data
        except (zs.SnapshotError, ValueError, KeyError, TypeError) as e:
            log.warning("ignoring the saved snapshot", path=str(p), reason=str(e))
            return None

    def last_snapshot(self) -> zs.Snapshot | None:
        """The last snapshot this proxy applied (kept across restarts)."""
        saved = self._saved()
        return saved[0].snapshot if saved is not None else None

    def _refresh_trust(self, pem: str) -> None:
        """Follow trust bundle changes (root rotation) for future connections."""
        path = self.data_dir / TRUST
        if pem and (not path.exists() or path.read_text() != pem):
            write_private(path, pem.encode())

    def _save_snapshot(self, d: Mapping[str, Any]) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=".snapshot")
        with os.fdopen(fd, "w") as f:
            json.dump(d, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.data_dir / LAST_SNAPSHOT)

    # -- connections ---------------------------------------------------------------

    def _context(self, with_cert: bool, pinned_root: str = "") -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        trust = self.data_dir / TRUST
        if pinned_root:
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(cadata=pinned_root)
        elif with_cert and trust.exists():
            recover_credential_pair(self.data_dir / NODE_CERT, self.data_dir / NODE_KEY)
            ctx.verify_mode = ssl.CERT_REQUIRED
            ctx.load_verify_locations(str(trust))
            ctx.load_cert_chain(str(self.data_dir / NODE_CERT), str(self.data_dir / NODE_KEY))
        else:  # joining: the token is the secret; the trust bundle comes back with the cert
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    @contextlib.asynccontextmanager
    async def _connect(
        self, with_cert: bool, pinned_root: str = ""
    ) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._context(with_cert, pinned_root),
                    limit=MAX_MESSAGE,
                )
        except TimeoutError:
            raise ConnectionError(
                f"connection to the control plane at {self.address} timed "
                f"out: is port {self.port} reachable?"
            ) from None
        except ssl.SSLCertVerificationError as e:
            if pinned_root:
                raise PushError(
                    "join-token",
                    f"the control plane at {self.address} presents a certificate the CA "
                    f"the token names (sha256:{self.ca_pin[:16]}...) did not sign: if its "
                    "root was rotated since the token was created, create a new token",
                ) from None
            raise ConnectionError(
                f"TLS with the control plane at {self.address} failed: {e.reason or e}"
            ) from None
        except ssl.SSLError as e:
            raise ConnectionError(
                f"TLS with the control plane at {self.address} failed: {e.reason or e}"
            ) from None
        except OSError as e:
            raise ConnectionError(
                f"cannot reach the control plane at {self.address}: {e.strerror or e}"
            ) from None
        try:
            if with_cert or pinned_root:
                self._check_server(writer)
            yield reader, writer
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    def _check_server(self, writer: asyncio.StreamWriter) -> None:
        ssl_obj = writer.get_extra_info("ssl_object")
        der = ssl_obj.getpeercert(binary_form=True) if ssl_obj is not None else None
        want = control_plane_identity(self.trust_domain)
        try:
            got = spiffe_id_of(x509.load_der_x509_certificate(der)) if der else None
        except ValueError:
            got = None
        if got != want:
            raise ConnectionError(
                f"the server at {self.address} is not the control plane: "
                f"it presented {got or 'no SPIFFE identity'}, expected {want}"
            )

    async def join(self) -> Certificate:
        """Exchange the join token for this proxy's certificate (kept in data_dir)."""
        if self.token_file is not None:
            try:
                self.token = self.token_file.read_text()
            except OSError as exc:
                raise PushError(
                    "join-token",
                    f"cannot read the token file {self.token_file}: {exc.strerror}: "
                    "is the credential mounted?",
                ) from None
        if not self.token:
            raise PushError(
                "join-token",
                f"no node certificate in {self.data_dir} and no "
                f"--token: create one with `ambit token create "
                f"{'--waypoint' if '/' in self.subject else '--node'} "
                f"{self.subject}`",
            )
        key = generate_key()
        csr = make_csr(self._identity(), key)
        pinned = await self._pinned_root() if self.ca_pin else ""
        async with self._connect(with_cert=False, pinned_root=pinned) as (reader, writer):
            await _send(
                writer,
                {"type": "join", "subject": self.subject, "token": self.token, "csr": csr.decode()},
            )
            reply = await _expect(reader, "certificate")
        cert = self._store_credentials(reply, key)
        log.info("joined the mesh", subject=self.subject, identity=str(cert.identity))
        return cert

    async def _pinned_root(self) -> str:
        """The root whose fingerprint the token carries, from the server's public bundle.

        The join itself then runs over TLS verified against that root, so the token is
        never sent to a server that is not this mesh's control plane.
        """
        async with self._connect(with_cert=False) as (reader, writer):
            await _send(writer, {"type": "bundle"})
            reply = await _expect(reader, "bundle")
        for root in x509.load_pem_x509_certificates(str(reply["trust_bundle"]).encode()):
            if root.fingerprint(hashes.SHA256()).hex() == self.ca_pin:
                return root.public_bytes(serialization.Encoding.PEM).decode()
        raise PushError(
            "join-token",
            f"the server at {self.address} does not hold the CA "
            f"the token names (sha256:{self.ca_pin[:16]}...): is this the right "
            "control plane?",
        )

    async def ensure_joined(self) -> None:
        """Join when there is no valid node certificate; renew it past its half-life."""
        cert = self.node_certificate()
        if cert is None:
            await self.join()
        elif time.time() >= cert.renewal_time():
            try:
                await self.renew()
            except (ConnectionError, PushError, ValueError, ssl.SSLError) as e:
                log.warning(
                    "node certificate renewal failed; keeping the current one",
                    reason=str(e),
                    expires=cert.not_after,
                )

    async def renew(self) -> Certificate:
        """Replace the node certificate using the current (still valid) one."""
        key = generate_key()
        csr = make_csr(self._identity(), key)
        async with self._connect(with_cert=True) as (reader, writer):
            await _send(writer, {"type": "renew", "csr": csr.decode()})
            reply = await _expect(reader, "certificate")
        return self._store_credentials(reply, key)

    def _store_credentials(
        self, reply: Mapping[str, Any], key: ec.EllipticCurvePrivateKey
    ) -> Certificate:
        chain = [str(c).encode() for c in reply["chain"]]
        cert = Certificate.from_pem(chain, private_key_pem(key))
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        store_credential_pair(
            self.data_dir / NODE_CERT, self.data_dir / NODE_KEY, b"".join(chain),
            private_key_pem(key))
        if reply.get("trust_bundle"):
            write_private(self.data_dir / TRUST, str(reply["trust_bundle"]).encode())
        return cert

    async def fetch_certificate(self, identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        """Have the control plane sign a workload CSR (an IdentityManager fetcher)."""
        await self.ensure_joined()
        self._ids += 1
        async with self._connect(with_cert=True) as (reader, writer):
            await _send(
                writer,
                {
                    "type": "csr",
                    "id": self._ids,
                    "identity": str(identity),
                    "csr": csr_pem.decode(),
                },
            )
            reply = await _expect(reader, "certificate")
        return [c.encode() for c in reply["chain"]]

    async def follow(
        self,
        apply: Callable[[zs.Snapshot], Awaitable[None]],
        *,
        once: bool = False,
        on_resources: Callable[[list[Resource]], Awaitable[None]] | None = None,
    ) -> None:
        """Apply the saved snapshot, then every update from the control plane, forever.

        `apply` raising rejects an update (nack) and the proxy keeps what it had.
        Waypoints also get `on_resources(manifests)` (parsed HTTPRoutes, policies...),
        called before `apply` with every update.
        Reconnects with jittered exponential backoff; `once` returns after the first
        session ends (tests).
        """
        current: ReplicaState | None = None
        saved = self._saved()
        if saved is not None:
            current, data = saved
            if on_resources is not None:
                await on_resources([parse_resource(m) for m in data.get(L7_RESOURCES, [])])
            await apply(current.snapshot)
        delay = 0.5
        while True:
            try:
                await self.ensure_joined()
                async with self._connect(with_cert=True) as (reader, writer):
                    hello: dict[str, Any] = {
                        "type": "subscribe",
                        "version": current.snapshot.version if current is not None else 0,
                        "hash": current.hash if current is not None else "",
                    }
                    if self.waypoint_address:
                        hello["address"] = self.waypoint_address
                    await _send(writer, hello)
                    delay = 0.5
                    current = await self._stream(reader, writer, current, apply, on_resources)
            except PushError as e:
                log.error("control plane refused this proxy", rule=e.rule, reason=e.message)
                if e.rule in ("join-token", "node-certificate") or once:
                    raise
            except (ConnectionError, ssl.SSLError, ValueError) as e:
                log.warning("config stream lost", reason=str(e), retry_in=round(delay, 2))
                if once:
                    return
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 30.0)

    async def _stream(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        current: ReplicaState | None,
        apply: Callable[[zs.Snapshot], Awaitable[None]],
        on_resources: Callable[[list[Resource]], Awaitable[None]] | None,
    ) -> ReplicaState | None:
        """Follow one stream; deltas cost only the items they carry.

        The snapshot file is written at most once a second (and when the stream ends),
        so bursts of small changes do not each rewrite megabytes.
        """
        loop = asyncio.get_running_loop()
        last_save = -1e9
        dirty = False
        claims_sent = -1
        try:
            while True:
                if self._claims is not None and claims_sent != self._claims_gen:
                    claims_sent = self._claims_gen
                    await _send(writer, {"type": "claims", "addresses": self._claims})
                wait = max(0.0, last_save + SAVE_INTERVAL - loop.time()) if dirty else None
                if "/" not in self.subject:  # a node: its claims may change any time
                    wait = CLAIMS_CHECK if wait is None else min(wait, CLAIMS_CHECK)
                try:
                    async with asyncio.timeout(wait):
                        msg = await _recv(reader)
                except TimeoutError:
                    if dirty and loop.time() >= last_save + SAVE_INTERVAL:
                        assert current is not None
                        self._save_snapshot(current.to_dict())
                        last_save, dirty = loop.time(), False
                    continue
                if msg is None:
                    raise ConnectionError("the control plane closed the stream")
                typ = msg.get("type")
                if typ == "error":
                    raise PushError(str(msg.get("rule")), str(msg.get("message")))
                if typ not in ("snapshot", "delta"):
                    continue
                version = int(msg["version"])
                try:
                    if typ == "snapshot":
                        cand = replica_from_dict(msg["snapshot"])
                    else:
                        if current is None or msg.get("from_hash") != current.hash:
                            raise ValueError(
                                "delta does not apply to the snapshot this proxy holds"
                            )
                        cand = replica_apply_delta(current, msg)
                    if cand.hash != msg.get("hash"):
                        raise ValueError("snapshot content does not match its hash")
                    if on_resources is not None:
                        await on_resources(
                            [parse_resource(m) for m in cand.scalars.get(L7_RESOURCES, [])]
                        )
                    await apply(cand.snapshot)
                except Exception as e:
                    await _send(
                        writer,
                        {"type": "nack", "version": version,
                         "error": f"{type(e).__name__}: {e}"[:NACK_ERROR_MAX]},
                    )
                    continue
                current, dirty = cand, True
                self._refresh_trust(cand.snapshot.trust_bundle_pem)
                await _send(writer, {"type": "ack", "version": version})
        finally:
            if dirty and current is not None:
                self._save_snapshot(current.to_dict())


async def _expect(reader: asyncio.StreamReader, typ: str) -> dict[str, Any]:
    msg = await _recv(reader)
    if msg is None:
        raise ConnectionError("the control plane closed the connection")
    if msg.get("type") == "error":
        raise PushError(str(msg.get("rule")), str(msg.get("message")))
    if msg.get("type") != typ:
        raise ValueError(f"expected a {typ} message, got {msg.get('type')!r}")
    return msg
