"""The `ambit control-plane` process: store, admin API (unix socket + TLS), credentials."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import signal
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from config.api import ApiError, ApiServer, admin_uri
from config.ca import CaError, CertificateAuthority, fingerprint
from config.push import PUSH_PORT, PushServer, ServerCertificate, ServiceAccountCheck
from config.store import DEFAULT_SERVICE_CIDR, Store
from config.tokens import DEFAULT_TTL as DEFAULT_TOKEN_TTL
from config.tokens import TokenStore, validate_subject
from ztunnel import sdnotify

log = structlog.get_logger("ambit.control-plane")

API_CA = "api-ca.pem"
API_CA_KEY = "api-ca-key.pem"
API_SERVER = "api-server.pem"
API_SERVER_KEY = "api-server-key.pem"
ADMIN_CERT = "admin.pem"
ADMIN_KEY = "admin-key.pem"
_TEN_YEARS = dt.timedelta(days=3650)


@dataclass(frozen=True)
class ApiPki:
    """Files of the admin API's own small PKI (separate from the mesh CA)."""

    ca: Path
    server_cert: Path
    server_key: Path
    admin_cert: Path
    admin_key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _issue(
    ca_cert: x509.Certificate | None,
    ca_key: ec.EllipticCurvePrivateKey | None,
    cn: str,
    *,
    uri: str = "",
    is_ca: bool = False,
    server: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ambit"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject if ca_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + _TEN_YEARS)
        .add_extension(
            x509.BasicConstraints(ca=is_ca, path_length=0 if is_ca else None), critical=True
        )
    )
    if is_ca:
        b = b.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        b = b.add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False),
            critical=True,
        )
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        names: list[x509.GeneralName] = []
        if uri:
            names.append(x509.UniformResourceIdentifier(uri))
        if server:
            names += [
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1")),
            ]
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = b.sign(ca_key or key, hashes.SHA256())
    return cert, key


def ensure_api_pki(data_dir: str, trust_domain: str) -> ApiPki:
    """Create on first start (and afterwards load) the API CA, server and admin credentials."""
    d = Path(data_dir)
    pki = ApiPki(d / API_CA, d / API_SERVER, d / API_SERVER_KEY, d / ADMIN_CERT, d / ADMIN_KEY)
    if not (d / API_CA_KEY).exists() or not pki.ca.exists():
        ca_cert, ca_key = _issue(None, None, "ambit admin API CA", is_ca=True)
        _write(d / API_CA_KEY, _key_pem(ca_key), 0o600)
        _write(pki.ca, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
        for p in (pki.server_cert, pki.admin_cert):
            p.unlink(missing_ok=True)
        log.info("created the admin API CA", path=str(pki.ca))
    ca_cert = x509.load_pem_x509_certificate(pki.ca.read_bytes())
    loaded = serialization.load_pem_private_key((d / API_CA_KEY).read_bytes(), None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{d / API_CA_KEY} is not an EC private key: remove the api-ca files "
            "to have them recreated"
        )
    if not pki.server_cert.exists():
        cert, key = _issue(
            ca_cert,
            loaded,
            "ambit control plane",
            uri=f"spiffe://{trust_domain}/ambit/control-plane",
            server=True,
        )
        _write(pki.server_key, _key_pem(key), 0o600)
        _write(pki.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    if not pki.admin_cert.exists():
        cert, key = _issue(ca_cert, loaded, "ambit admin", uri=admin_uri(trust_domain))
        _write(pki.admin_key, _key_pem(key), 0o600)
        _write(pki.admin_cert, cert.public_bytes(serialization.Encoding.PEM), 0o600)
        log.info("created the admin credential", cert=str(pki.admin_cert), key=str(pki.admin_key))
    return pki


def issue_api_credential(data_dir: str, name: str, uri: str) -> tuple[Path, Path]:
    """Issue another client credential from the API CA (e.g. a second admin: pass admin_uri).

    Writes `<name>.pem` and `<name>-key.pem` (0600) into `data_dir`; returns their paths.
    """
    d = Path(data_dir)
    ca_cert = x509.load_pem_x509_certificate((d / API_CA).read_bytes())
    ca_key = serialization.load_pem_private_key((d / API_CA_KEY).read_bytes(), None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{d / API_CA_KEY} is not an EC private key")
    cert, key = _issue(ca_cert, ca_key, name, uri=uri)
    cert_path, key_path = d / f"{name}.pem", d / f"{name}-key.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o600)
    return cert_path, key_path


def api_server_context(pki: ApiPki) -> ssl.SSLContext:
    """TLS 1.3 server context that demands a client certificate from the API CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(str(pki.ca))
    ctx.load_cert_chain(str(pki.server_cert), str(pki.server_key))
    return ctx


def parse_hostport(text: str, what: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"bad {what} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:15010")
    return host.strip("[]"), int(port)


@dataclass(frozen=True)
class ControlPlaneConfig:
    data_dir: str
    socket: str
    listen: str = ""
    trust_domain: str = "cluster.local"
    service_cidr: str = DEFAULT_SERVICE_CIDR
    root_namespace: str = "istio-system"
    proxy_listen: str = f"0.0.0.0:{PUSH_PORT}"
    # "store": resources come from `ambit apply`; "kubernetes": mirrored from the API server
    source: str = "store"
    kubeconfig: str | None = None  # kubernetes: None = in-cluster, else KUBECONFIG/~/.kube
    # kubernetes: image of the waypoint Deployments created per Gateway ("" = create none)
    waypoint_image: str = ""
    waypoint_control_plane: str = ""  # address waypoints dial ("" = the in-cluster Service)


SOURCES = ("store", "kubernetes")


TOKENS_DB = "tokens.db"


def _loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """Route asyncio's own reports (e.g. failed TLS handshakes) to the JSON log."""
    exc = context.get("exception")
    log.warning(
        "connection error",
        message=context.get("message", ""),
        error=f"{type(exc).__name__}: {exc}" if exc is not None else "",
    )


def _sd_notify(fn: Callable[[str], bool], text: str) -> None:
    """Tell systemd (Type=notify units); a broken notify socket is logged, never fatal."""
    try:
        fn(text)
    except sdnotify.NotifyError as e:
        log.warning("systemd notification failed", error=str(e))


def token_issuer(
    store: Store,
    tokens: TokenStore,
    ttl: float = DEFAULT_TOKEN_TTL,
    ca: CertificateAuthority | None = None,
) -> Callable[[str, str], Mapping[str, Any]]:
    """Join tokens for `ambit token create`: any node name; waypoints must be declared.

    With `ca`, the printed token ends in `#sha256:<root fingerprint>`: the proxy checks the
    control plane holds that root before it sends the secret part.
    """

    def issue(kind: str, name: str) -> Mapping[str, Any]:
        validate_subject(name)
        if kind == "waypoint":
            if "/" not in name:
                raise ApiError(400, f"bad waypoint {name!r}: expected NAMESPACE/NAME")
            ns, _, gw = name.partition("/")
            if store.get("Gateway", ns, gw) is None:
                raise ApiError(
                    404,
                    f"Gateway {ns}/{gw} not found: apply the waypoint's "
                    "Gateway (gatewayClassName istio-waypoint) first",
                )
        elif "/" in name:
            raise ApiError(400, f"bad node name {name!r}: use --waypoint NS/NAME for waypoints")
        token = tokens.create(name, ttl)
        if ca is not None:
            token += f"#sha256:{fingerprint(ca.signing_root)}"
        log.info("join token created", kind=kind, subject=name, ttl=ttl)
        return {"token": token, "subject": name, "kind": kind, "ttl": ttl}

    return issue


def _iso(t: dt.datetime | float) -> str:
    if isinstance(t, float):
        t = dt.datetime.fromtimestamp(t, tz=dt.UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def ca_state(ca: CertificateAuthority) -> dict[str, Any]:
    """The CA's roots for `ambit ca status`: which signs, which waits, which are retiring."""
    signing = fingerprint(ca.signing_root)
    pending = ca._next[0] if ca._next is not None else None  # read only: ca.py has no accessor
    pending_fp = fingerprint(pending) if pending is not None else ""
    roots = []
    for r in ca.roots():
        fp = fingerprint(r)
        stopped = ca._rotations.get(fp)  # read only: ca.py has no accessor
        if fp == signing:
            state = "signing"
        elif fp == pending_fp:
            state = "next"  # trusted everywhere, signs after `ambit ca rotate complete`
        elif stopped is not None:
            state = "previous"  # trusted until retired
        else:
            state = "trusted"
        roots.append({
            "fingerprint": fp,
            "subject": r.subject.rfc4514_string(),
            "not_after": _iso(r.not_valid_after_utc),
            "signing": fp == signing,
            "state": state,
            "stopped_signing": _iso(stopped) if stopped is not None else "",
        })
    return {
        "trust_domain": ca.trust_domain,
        "signer": ca.signer.subject.rfc4514_string(),
        "rotation": "begun" if pending is not None else "",
        "roots": roots,
    }


def ca_operator(
    ca: CertificateAuthority, push: PushServer, server_cert: ServerCertificate | None
) -> Callable[[str, Mapping[str, Any]], Mapping[str, Any]]:
    """Root rotation for the admin API; each step pushes the new trust bundle to every proxy.

    `begin`: a new root joins the bundle (does not sign yet). `complete`: it signs from
    now on (the push listener's own certificate is re-issued from it), the old root stays
    trusted. `retire` (fingerprint, force): the old root leaves the bundle.
    """

    def operate(action: str, data: Mapping[str, Any]) -> Mapping[str, Any]:
        try:
            if action == "status":
                return ca_state(ca)
            if action == "begin":
                cert = ca.begin_rotation()
                log.info("root rotation begun", next_root=fingerprint(cert))
            elif action == "complete":
                old = fingerprint(ca.signing_root)
                ca.complete_rotation()
                log.info("root rotation completed", signing_root=fingerprint(ca.signing_root),
                         previous_root=old)
            elif action == "retire":
                fp = str(data.get("fingerprint", ""))
                if not fp:
                    raise ApiError(400, "bad request: give the fingerprint of the root to retire")
                ca.retire_root(fp, force=bool(data.get("force", False)))
                log.info("root retired", fingerprint=fp.lower().replace(":", ""),
                         forced=bool(data.get("force", False)))
            else:
                raise ApiError(404, f"no rotation step {action!r}: use begin, complete or retire")
        except CaError as e:
            raise ApiError(409, _with_hint(str(e))) from None
        push.refresh_trust_bundle()
        if action == "complete" and server_cert is not None:
            server_cert.renew()  # proxies keep trusting it once the old root is retired
        out = ca_state(ca)
        out["version"] = push.index.version
        return out

    return operate


def _with_hint(message: str) -> str:
    """CA refusals phrased with the command that resolves them."""
    hints = {
        "rotate first": "rotate first (`ambit ca rotate begin`, then `ambit ca rotate complete`)",
        "complete or abandon rotation": "run `ambit ca rotate complete` first",
        "call begin_rotation first": "run `ambit ca rotate begin` first",
        "(or force it)": "(or add --force)",
    }
    for k, v in hints.items():
        message = message.replace(k, v)
    return message.replace(
        "with add_root, then restart",
        "to the trust bundle, then restart",
    )


async def _wait_for_kubernetes(
    cfg: ControlPlaneConfig, store: Store, tg: asyncio.TaskGroup, stop: asyncio.Event
) -> tuple[asyncio.Task[None], ServiceAccountCheck] | None:
    """Start the Kubernetes source in `tg`; once the store holds the whole cluster, its
    task and the ServiceAccount token check for joining proxies; None when `stop` came
    first. A source that cannot start raises ValueError."""
    from config.kube_source import (
        KubeApiError,
        ServiceAccountAuthenticator,
        load_configuration,
        run_source,
    )
    from config.kube_waypoint import WaypointSettings

    try:
        authenticator = ServiceAccountAuthenticator(await load_configuration(cfg.kubeconfig))
    except KubeApiError as e:
        raise ValueError(f"the Kubernetes source cannot start: {e}") from None

    waypoints = None
    if cfg.waypoint_image:
        waypoints = WaypointSettings(image=cfg.waypoint_image)
        if cfg.waypoint_control_plane:
            waypoints = WaypointSettings(
                image=cfg.waypoint_image, control_plane=cfg.waypoint_control_plane
            )
    synced = asyncio.Event()
    failed: list[str] = []

    async def source() -> None:
        try:
            await run_source(
                store, kubeconfig=cfg.kubeconfig, waypoints=waypoints,
                on_synced=lambda s: synced.set(),
            )
        except KubeApiError as e:
            failed.append(str(e))
            stop.set()

    task = tg.create_task(source(), name="kubernetes-source")
    log.info("waiting for the first full list of the Kubernetes API before serving",
             kubeconfig=cfg.kubeconfig or "in-cluster")
    _sd_notify(sdnotify.status, "listing the Kubernetes API")
    waiters = [asyncio.ensure_future(synced.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
    if failed:
        raise ValueError(f"the Kubernetes source cannot start: {failed[0]}")
    if not synced.is_set():
        task.cancel()
        return None
    return task, authenticator.authenticate


async def run(cfg: ControlPlaneConfig, stop: asyncio.Event | None = None) -> None:
    """Run the control plane until SIGTERM/SIGINT (or `stop` is set).

    With `cfg.source == "kubernetes"` the cluster is mirrored into the store first: the
    listeners open, the ready line is printed and systemd is told READY only once the
    store holds a full list of every watched kind (no proxy gets a partial snapshot).
    """
    if cfg.source not in SOURCES:
        raise ValueError(f"unknown --source {cfg.source!r}: use one of {', '.join(SOURCES)}")
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.set_exception_handler(_loop_exception)
    ca = CertificateAuthority.load_or_create(Path(cfg.data_dir), cfg.trust_domain)
    store = Store(cfg.data_dir, service_cidr=cfg.service_cidr, root_namespace=cfg.root_namespace)
    tokens = TokenStore(Path(cfg.data_dir) / TOKENS_DB)
    servers: list[asyncio.Server] = []
    try:
        async with asyncio.TaskGroup() as tg:
            source: asyncio.Task[None] | None = None
            service_accounts: ServiceAccountCheck | None = None
            if cfg.source == "kubernetes":
                started = await _wait_for_kubernetes(cfg, store, tg, stop)
                if started is None:
                    return
                source, service_accounts = started
            await _serve(cfg, ca=ca, store=store, tokens=tokens, servers=servers, tg=tg,
                         stop=stop, service_accounts=service_accounts)
            if source is not None:
                source.cancel()
    finally:
        for s in servers:
            s.close()
        tokens.close()
        store.close()
        with contextlib.suppress(OSError):
            os.unlink(cfg.socket)


async def _serve(
    cfg: ControlPlaneConfig,
    *,
    ca: CertificateAuthority,
    store: Store,
    tokens: TokenStore,
    servers: list[asyncio.Server],
    tg: asyncio.TaskGroup,
    stop: asyncio.Event,
    service_accounts: ServiceAccountCheck | None = None,
) -> None:
    push = PushServer(store, ca, tokens, root_namespace=cfg.root_namespace,
                      service_accounts=service_accounts)
    server_cert = ServerCertificate(ca, Path(cfg.data_dir)) if cfg.proxy_listen else None
    if server_cert is not None:
        push.verify_contexts.append(server_cert.ctx)
    api = ApiServer(
        store,
        trust_domain=cfg.trust_domain,
        token_issuer=token_issuer(store, tokens, ca=ca),
        status_provider=push.status,
        ca_operator=ca_operator(ca, push, server_cert),
    )
    background: list[asyncio.Task[None]] = []
    servers.append(await api.start_unix(cfg.socket))
    ready = f"ready socket={cfg.socket}"
    log.info("admin API listening", socket=cfg.socket)
    if cfg.listen:
        host, port = parse_hostport(cfg.listen, "--listen")
        pki = ensure_api_pki(cfg.data_dir, cfg.trust_domain)
        tls_server = await api.start_tls(host, port, api_server_context(pki))
        servers.append(tls_server)
        bound = tls_server.sockets[0].getsockname()
        ready += f" tls={bound[0]}:{bound[1]}"
        log.info(
            "admin API listening on TLS",
            address=f"{bound[0]}:{bound[1]}",
            admin_cert=str(pki.admin_cert),
        )
    if cfg.proxy_listen and server_cert is not None:
        host, port = parse_hostport(cfg.proxy_listen, "--proxy-listen")
        background.append(tg.create_task(server_cert.run(), name="push-certificate-renewal"))
        push_server = await push.start(host, port, server_cert.ctx)
        servers.append(push_server)
        bound = push_server.sockets[0].getsockname()
        ready += f" proxies={bound[0]}:{bound[1]}"
        log.info("proxy config stream listening", address=f"{bound[0]}:{bound[1]}")
    log.info("control plane ready", data_dir=cfg.data_dir, version=store.version,
             source=cfg.source)
    print(ready, file=sys.stdout, flush=True)
    _sd_notify(sdnotify.ready, f"config version {store.version}; {ready[6:]}")
    background.append(tg.create_task(push.follow_store()))
    await stop.wait()
    log.info("control plane stopping")
    _sd_notify(sdnotify.stopping, "closing listeners")
    for task in background:
        task.cancel()
    for s in servers:
        s.close()
    for session in list(push.sessions.values()):
        session.writer.close()
