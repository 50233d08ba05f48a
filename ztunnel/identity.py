"""Workload identity: SPIFFE IDs, certificates, trust bundles and the identity manager."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import random as _random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_TRUST_DOMAIN = "cluster.local"
# Mesh components' own identity: every ztunnel node certificate carries
# spiffe://<td>/ns/ambit-system/sa/ztunnel (the node name is in the subject CN).
NODE_NAMESPACE = "ambit-system"
NODE_SERVICE_ACCOUNT = "ztunnel"

_TRUST_DOMAIN_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_SPIFFE_ID_LEN = 2048


def validate_trust_domain(trust_domain: str) -> str:
    """Return `trust_domain` if it is a valid SPIFFE trust domain name, else raise ValueError."""
    if not trust_domain:
        raise ValueError("trust domain is empty: use a name such as 'cluster.local'")
    if len(trust_domain) > 255:
        raise ValueError(f"trust domain is {len(trust_domain)} characters long (at most 255)")
    if not _TRUST_DOMAIN_RE.match(trust_domain):
        raise ValueError(
            f"trust domain {trust_domain!r} may only contain lowercase letters, digits, "
            "'.', '-' and '_'"
        )
    return trust_domain


def _validate_segment(what: str, value: str) -> None:
    if not value:
        raise ValueError(f"{what} is empty")
    if value in (".", ".."):
        raise ValueError(f"{what} may not be {value!r}")
    if not _SEGMENT_RE.match(value):
        raise ValueError(f"{what} {value!r} may only contain letters, digits, '.', '-' and '_'")


@dataclass(frozen=True, order=True)
class SpiffeId:
    """A workload identity `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        _validate_segment("namespace", self.namespace)
        _validate_segment("service account", self.service_account)

    @classmethod
    def parse(cls, uri: str) -> SpiffeId:
        """Parse `spiffe://td/ns/NS/sa/SA`; raise ValueError saying what is wrong."""
        if not isinstance(uri, str):
            raise ValueError(f"SPIFFE ID must be a string, not {type(uri).__name__}")
        if len(uri) > _MAX_SPIFFE_ID_LEN:
            raise ValueError(f"SPIFFE ID is {len(uri)} characters long (at most 2048)")
        if not uri.startswith("spiffe://"):
            raise ValueError(f"{uri!r} is not a SPIFFE ID: it must start with 'spiffe://'")
        if any(c in uri for c in "?#%@ \t\r\n"):
            raise ValueError(
                f"{uri!r} is not a SPIFFE ID: query, fragment, user info, percent-encoding "
                "and whitespace are not allowed"
            )
        parts = urlsplit(uri)
        netloc = parts.netloc
        if ":" in netloc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: the trust domain may not have a port")
        try:
            validate_trust_domain(netloc)
        except ValueError as exc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: {exc}") from None
        segments = parts.path.split("/")
        # path is "/ns/NS/sa/SA" -> ["", "ns", NS, "sa", SA]
        if len(segments) != 5 or segments[0] != "" or segments[1] != "ns" or segments[3] != "sa":
            raise ValueError(
                f"{uri!r} is not a workload SPIFFE ID: the path must be /ns/<namespace>/sa/"
                "<service-account>"
            )
        try:
            return cls(netloc, segments[2], segments[4])
        except ValueError as exc:
            raise ValueError(f"{uri!r} is not a SPIFFE ID: {exc}") from None

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"


def node_identity(trust_domain: str = DEFAULT_TRUST_DOMAIN) -> SpiffeId:
    """The SPIFFE ID of ztunnel node certificates (see config.nodeauth)."""
    return SpiffeId(trust_domain, NODE_NAMESPACE, NODE_SERVICE_ACCOUNT)


def _cert_times(cert: x509.Certificate) -> tuple[float, float]:
    return (
        cert.not_valid_before_utc.timestamp(),
        cert.not_valid_after_utc.timestamp(),
    )


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI subject alternative names of `cert` (empty when it has none)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


def spiffe_id_of(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in `cert`'s single spiffe:// URI SAN; ValueError saying why not."""
    uris = [u for u in uri_sans(cert) if u.lower().startswith("spiffe://")]
    if not uris:
        raise ValueError("certificate has no spiffe:// URI SAN")
    if len(uris) > 1:
        raise ValueError(f"certificate has {len(uris)} spiffe:// URI SANs (exactly one allowed)")
    return SpiffeId.parse(uris[0])


def split_pem(pem: bytes) -> list[bytes]:
    """Split concatenated PEM certificates into one PEM block each."""
    return [
        c.public_bytes(serialization.Encoding.PEM) for c in x509.load_pem_x509_certificates(pem)
    ]


@dataclass(frozen=True)
class Certificate:
    """A workload certificate with its chain and private key (the key never shows in repr)."""

    identity: SpiffeId
    cert_pem: bytes = field(repr=False)
    chain_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    not_before: float
    not_after: float

    @classmethod
    def from_pem(cls, certs: Sequence[bytes], key_pem: bytes) -> Certificate:
        """Build from `[leaf, *intermediates]` PEM blocks and the PEM private key.

        Checks that the leaf has exactly one SPIFFE URI SAN and that the key matches it.
        """
        if not certs:
            raise ValueError("no certificates given: expected the leaf followed by its chain")
        blocks: list[bytes] = []
        for pem in certs:
            blocks.extend(split_pem(pem))
        leaf = x509.load_pem_x509_certificate(blocks[0])
        identity = spiffe_id_of(leaf)
        key = serialization.load_pem_private_key(key_pem, password=None)
        pub = key.public_key()
        if pub.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ValueError(f"private key does not match the certificate for {identity}")
        not_before, not_after = _cert_times(leaf)
        return cls(
            identity=identity,
            cert_pem=blocks[0],
            chain_pem=b"".join(blocks[1:]),
            key_pem=key_pem,
            not_before=not_before,
            not_after=not_after,
        )

    @property
    def full_chain_pem(self) -> bytes:
        """Leaf followed by its intermediates: what a TLS peer presents."""
        return self.cert_pem + self.chain_pem

    def x509(self) -> x509.Certificate:
        """The parsed leaf certificate."""
        return x509.load_pem_x509_certificate(self.cert_pem)

    def valid_at(self, now: float) -> bool:
        return self.not_before <= now < self.not_after

    def renewal_time(self) -> float:
        """Half-life of the certificate: when renewal should start."""
        return self.not_before + (self.not_after - self.not_before) / 2

    def describe(self) -> dict[str, object]:
        """Public facts for admin dumps (`/certs`): never the key."""
        leaf = self.x509()
        return {
            "identity": str(self.identity),
            "serial": format(leaf.serial_number, "x"),
            "not_before": self.not_before,
            "not_after": self.not_after,
            "chain_length": len(split_pem(self.chain_pem)) if self.chain_pem else 0,
        }


@dataclass(frozen=True)
class TrustBundle:
    """The roots a mesh member trusts; several during a root rotation (old + new)."""

    trust_domain: str
    roots_pem: bytes

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        if not x509.load_pem_x509_certificates(self.roots_pem):
            raise ValueError("trust bundle holds no PEM certificates")

    def roots(self) -> list[x509.Certificate]:
        return x509.load_pem_x509_certificates(self.roots_pem)


def generate_key() -> ec.EllipticCurvePrivateKey:
    """A new ECDSA P-256 private key (the only key type the mesh issues)."""
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make_csr(identity: SpiffeId, key: ec.EllipticCurvePrivateKey) -> bytes:
    """A PEM CSR for `identity` (URI SAN only, empty subject) signed with `key`."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(identity))]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


# --- identity manager: sans-IO schedule ------------------------------------------------


class Priority(enum.IntEnum):
    """Fetch order: a connection waiting beats prefetching, which beats renewal."""

    WAITING = 0  # a connection is blocked on this identity
    PREFETCH = 1  # a newly scheduled workload has no certificate yet
    RENEW = 2  # a still-valid certificate reached its half-life


@dataclass(frozen=True)
class Fetch:
    """Start fetching a certificate for `identity` now."""

    identity: SpiffeId
    priority: Priority
    attempt: int  # 1 for the first try, counting consecutive failures
    ticket: int  # pass the Fetch back to fetch_succeeded/fetch_failed


@dataclass(frozen=True)
class Wait:
    """Nothing to start before `until` (None: nothing scheduled, or all slots busy)."""

    until: float | None


@dataclass(frozen=True)
class Ready:
    certificate: Certificate


@dataclass(frozen=True)
class Pending:
    """The caller must wait for the fetch in flight (or the imminent retry)."""


@dataclass(frozen=True)
class Unavailable:
    """No valid certificate and the next attempt is too far away to wait for."""

    reason: str
    retry_at: float


@dataclass(frozen=True)
class FailOutcome:
    retry_at: float
    fail_waiters: bool  # waiters have no certificate to fall back on: fail them now
    kept: Certificate | None  # the still-valid certificate kept in service


@dataclass
class _Entry:
    identity: SpiffeId
    cert: Certificate | None = None
    wanted: bool = False
    waiting: int = 0
    due: float = 0.0
    failures: int = 0
    in_flight: bool = False
    ticket: int = -1
    last_error: str | None = None
    version: int = 0


class IdentitySchedule:
    """Sans-IO core of the identity manager: which certificate to fetch, and when.

    All times are passed in. Per identity it keeps the current certificate, the
    next due time (now for new identities, half-life for renewal, jittered
    exponential backoff after a failure) and whether connections are waiting.
    Due fetches are started highest priority first, at most `max_in_flight` at once.
    """

    def __init__(
        self,
        *,
        random: Callable[[], float],
        max_in_flight: int = 8,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        max_demand_wait: float = 5.0,
    ) -> None:
        self._random = random
        self.max_in_flight = max_in_flight
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.max_demand_wait = max_demand_wait
        self._entries: dict[SpiffeId, _Entry] = {}
        self._timers: list[tuple[float, int, SpiffeId, int]] = []  # due, seq, id, version
        self._ready: list[tuple[int, int, SpiffeId, int]] = []  # priority, seq, id, version
        self._seq = itertools.count()
        self.in_flight = 0

    # -- queries -----------------------------------------------------------------------

    def identities(self) -> list[SpiffeId]:
        return sorted(self._entries)

    def certificate(self, identity: SpiffeId, now: float) -> Certificate | None:
        """The cached certificate if it is valid at `now`."""
        e = self._entries.get(identity)
        if e is None or e.cert is None or not e.cert.valid_at(now):
            return None
        return e.cert

    def state(self, identity: SpiffeId) -> dict[str, object] | None:
        e = self._entries.get(identity)
        if e is None:
            return None
        return {
            "identity": str(identity),
            "wanted": e.wanted,
            "waiting": e.waiting,
            "in_flight": e.in_flight,
            "next_attempt": e.due,
            "failures": e.failures,
            "last_error": e.last_error,
            "certificate": e.cert.describe() if e.cert else None,
        }

    # -- inputs ------------------------------------------------------------------------

    def set_wanted(self, identities: Iterable[SpiffeId], now: float) -> list[SpiffeId]:
        """The identities of workloads on this node; returns those forgotten.

        New ones are prefetched; ones that left are dropped (unless a connection is
        waiting for one right now).
        """
        wanted = set(identities)
        forgotten = []
        for ident, e in list(self._entries.items()):
            if ident in wanted:
                continue
            if e.waiting:
                e.wanted = False
                continue
            del self._entries[ident]
            if e.in_flight:
                self.in_flight -= 1
            forgotten.append(ident)
        for ident in sorted(wanted):
            entry = self._entries.get(ident)
            if entry is None:
                entry = self._entries[ident] = _Entry(ident, wanted=True)
                self._schedule(entry, now)
            else:
                entry.wanted = True
        return forgotten

    def demand(self, identity: SpiffeId, now: float) -> Ready | Pending | Unavailable:
        """A connection needs a certificate for `identity`.

        Ready when a valid one is cached. Pending registers a waiter (call
        `cancel_demand` if it gives up); it is resolved by the next fetch outcome.
        Unavailable when the last attempt failed and the retry is more than
        `max_demand_wait` away.
        """
        e = self._entries.get(identity)
        if e is None:
            e = self._entries[identity] = _Entry(identity)
            e.due = now
        cert = self.certificate(identity, now)
        if cert is not None:
            return Ready(cert)
        if not e.in_flight and e.failures and e.due - now > self.max_demand_wait:
            return Unavailable(e.last_error or "the last attempt failed", e.due)
        e.waiting += 1
        if not e.in_flight:
            self._schedule(e, max(now, min(e.due, now + self.max_demand_wait)))
        return Pending()

    def cancel_demand(self, identity: SpiffeId) -> None:
        e = self._entries.get(identity)
        if e is not None and e.waiting:
            e.waiting -= 1

    def next_action(self, now: float) -> Fetch | Wait:
        """The next fetch to start, or how long nothing needs to happen."""
        while self._timers and self._timers[0][0] <= now:
            _, seq, ident, version = heapq.heappop(self._timers)
            e = self._entries.get(ident)
            if e is not None and e.version == version and not e.in_flight:
                heapq.heappush(self._ready, (self._priority(e, now), seq, ident, version))
        if self.in_flight < self.max_in_flight:
            while self._ready:
                _, _, ident, version = heapq.heappop(self._ready)
                e = self._entries.get(ident)
                if e is None or e.version != version or e.in_flight:
                    continue
                e.in_flight = True
                e.version += 1
                e.ticket = next(self._seq)
                self.in_flight += 1
                return Fetch(ident, self._priority(e, now), e.failures + 1, e.ticket)
        else:
            return Wait(None)
        while self._timers:
            due, _, ident, version = self._timers[0]
            e = self._entries.get(ident)
            if e is not None and e.version == version and not e.in_flight:
                return Wait(due)
            heapq.heappop(self._timers)
        return Wait(None)

    def _flight(self, fetch: Fetch) -> _Entry | None:
        e = self._entries.get(fetch.identity)
        if e is None or not e.in_flight or e.ticket != fetch.ticket:
            return None  # forgotten (and perhaps wanted again) while in flight
        return e

    def fetch_succeeded(self, fetch: Fetch, cert: Certificate, now: float) -> int:
        """Record a new certificate; returns how many waiters it satisfies (-1: forgotten)."""
        e = self._flight(fetch)
        if e is None:
            return -1
        self.in_flight -= 1
        e.in_flight = False
        e.cert = cert
        e.failures = 0
        e.last_error = None
        waiters, e.waiting = e.waiting, 0
        self._schedule(e, max(now, cert.renewal_time()))
        return waiters

    def fetch_failed(self, fetch: Fetch, reason: str, now: float) -> FailOutcome | None:
        """Record a failed attempt and schedule the retry (None: identity was forgotten)."""
        e = self._flight(fetch)
        if e is None:
            return None
        self.in_flight -= 1
        e.in_flight = False
        e.failures += 1
        e.last_error = reason
        kept = e.cert if e.cert is not None and e.cert.valid_at(now) else None
        if kept is None:
            e.cert = None
        retry_at = now + self.backoff(e.failures)
        fail_waiters = e.waiting > 0 and kept is None
        if fail_waiters:
            e.waiting = 0
        self._schedule(e, retry_at)
        return FailOutcome(retry_at, fail_waiters, kept)

    def backoff(self, failures: int) -> float:
        """Delay after `failures` consecutive failures: exponential, capped, jittered.

        The delay is uniformly spread over [base/2, base], base = initial * 2^(n-1).
        """
        base = min(self.backoff_max, self.backoff_initial * 2.0 ** max(0, failures - 1))
        return base * (0.5 + 0.5 * self._random())

    # -- internals ---------------------------------------------------------------------

    def _priority(self, e: _Entry, now: float) -> Priority:
        if e.waiting:
            return Priority.WAITING
        if e.cert is None or not e.cert.valid_at(now):
            return Priority.PREFETCH
        return Priority.RENEW

    def _schedule(self, e: _Entry, due: float) -> None:
        e.version += 1
        e.due = due
        heapq.heappush(self._timers, (due, next(self._seq), e.identity, e.version))


# --- identity manager: asyncio adapter ---------------------------------------------------

Fetcher = Callable[[SpiffeId, bytes], Awaitable[list[bytes]]]


class IdentityUnavailable(Exception):
    """No certificate can be had for an identity right now; the message says why."""


class IdentityManager:
    """Per-identity certificates for ztunnel/waypoint: on-demand fetch, cache, renewal.

    `fetch(identity, csr_pem)` asks the control plane to sign (returns PEM leaf +
    chain). `clock` and `random` are injected; `run()` is the worker and belongs in
    the caller's TaskGroup. Private keys are generated here and never leave the
    returned Certificate objects (nor appear in logs).
    """

    def __init__(
        self,
        fetch: Fetcher,
        *,
        clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        max_in_flight: int = 8,
        backoff_initial: float = 1.0,
        backoff_max: float = 300.0,
        max_demand_wait: float = 5.0,
        fetch_timeout: float = 30.0,
        max_idle: float = 60.0,
    ) -> None:
        self._fetch_fn = fetch
        self._clock = clock
        self.schedule = IdentitySchedule(
            random=random,
            max_in_flight=max_in_flight,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_demand_wait=max_demand_wait,
        )
        self._fetch_timeout = fetch_timeout
        self._max_idle = max_idle
        self._waiters: dict[SpiffeId, list[asyncio.Future[Certificate]]] = {}
        self._wake = asyncio.Event()
        self._log = structlog.get_logger("ztunnel.identity")
        self.fetches = 0

    def cached(self, identity: SpiffeId) -> Certificate | None:
        """The current valid certificate, without fetching."""
        return self.schedule.certificate(identity, self._clock())

    def set_wanted(self, identities: Iterable[SpiffeId]) -> None:
        """Identities of the workloads now on this node: prefetch new, forget gone."""
        for ident in self.schedule.set_wanted(identities, self._clock()):
            self._log.info("identity forgotten", identity=str(ident))
        self._wake.set()

    def wakeup(self) -> None:
        """Re-evaluate the schedule now (e.g. after the injected clock moved)."""
        self._wake.set()

    async def get(self, identity: SpiffeId) -> Certificate:
        """A valid certificate for `identity`, fetching it first if needed.

        Raises IdentityUnavailable when fetching failed. Bound the wait with the
        caller's own timeout; cancelling is safe.
        """
        status = self.schedule.demand(identity, self._clock())
        if isinstance(status, Ready):
            return status.certificate
        if isinstance(status, Unavailable):
            raise IdentityUnavailable(
                f"no certificate for {identity}: {status.reason}; next attempt in "
                f"{max(0.0, status.retry_at - self._clock()):.0f}s"
            )
        fut: asyncio.Future[Certificate] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(identity, []).append(fut)
        self._wake.set()
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():
                self.schedule.cancel_demand(identity)
            waiters = self._waiters.get(identity)
            if waiters is not None and fut in waiters:
                waiters.remove(fut)

    def describe(self) -> list[dict[str, object]]:
        """State of every identity for the admin `/certs` page (no keys)."""
        out = []
        for ident in self.schedule.identities():
            st = self.schedule.state(ident)
            if st is not None:
                out.append(st)
        return out

    async def run(self) -> None:
        """Start due fetches forever; cancel to stop (in-flight fetches are cancelled)."""
        async with asyncio.TaskGroup() as tg:
            while True:
                self._wake.clear()
                now = self._clock()
                action = self.schedule.next_action(now)
                if isinstance(action, Fetch):
                    tg.create_task(self._fetch(action))
                    continue
                delay = self._max_idle
                if action.until is not None:
                    delay = min(delay, max(0.0, action.until - now))
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wake.wait()

    async def _fetch(self, action: Fetch) -> None:
        identity = action.identity
        self.fetches += 1
        try:
            key = generate_key()
            csr = make_csr(identity, key)
            async with asyncio.timeout(self._fetch_timeout):
                pems = await self._fetch_fn(identity, csr)
            cert = Certificate.from_pem(pems, private_key_pem(key))
            if cert.identity != identity:
                raise ValueError(f"the CA returned a certificate for {cert.identity}")
            now = self._clock()
            if not cert.valid_at(now):
                raise ValueError(
                    f"the CA returned a certificate valid {cert.not_before:.0f}.."
                    f"{cert.not_after:.0f}, not at {now:.0f}: is this node's clock right?"
                )
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reason = (
                f"certificate request timed out after {self._fetch_timeout:g}s: "
                "is the control plane reachable?"
                if isinstance(exc, TimeoutError)
                else f"{type(exc).__name__}: {exc}"
            )
            self._failed(action, reason)
        else:
            self._succeeded(action, cert)
        finally:
            self._wake.set()

    def _succeeded(self, action: Fetch, cert: Certificate) -> None:
        identity = action.identity
        now = self._clock()
        n = self.schedule.fetch_succeeded(action, cert, now)
        if n < 0:
            return
        self._log.info(
            "certificate issued",
            identity=str(identity),
            serial=format(cert.x509().serial_number, "x"),
            not_after=cert.not_after,
            renew_at=cert.renewal_time(),
        )
        for fut in self._waiters.pop(identity, []):
            if not fut.done():
                fut.set_result(cert)

    def _failed(self, action: Fetch, reason: str) -> None:
        identity = action.identity
        now = self._clock()
        outcome = self.schedule.fetch_failed(action, reason, now)
        if outcome is None:
            return
        self._log.warning(
            "certificate fetch failed",
            identity=str(identity),
            attempt=action.attempt,
            error=reason,
            retry_in=round(outcome.retry_at - now, 3),
            kept_valid_until=outcome.kept.not_after if outcome.kept else None,
        )
        if outcome.fail_waiters:
            err = IdentityUnavailable(
                f"no certificate for {identity}: {reason}; next attempt in "
                f"{outcome.retry_at - now:.0f}s"
            )
            for fut in self._waiters.pop(identity, []):
                if not fut.done():
                    fut.set_exception(err)
