"""The `waypoint` command line: run an L7 waypoint proxy for a Gateway."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import structlog

from ztunnel import log as zlog
from ztunnel.identity import Certificate, TrustBundle, split_pem

log = structlog.get_logger("waypoint")


def _hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _gateway(value: str) -> tuple[str, str]:
    ns, sep, name = value.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAMESPACE/NAME")
    return ns, name


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="waypoint",
        description="Ambit L7 waypoint proxy: terminates HBONE, runs HTTP routes, "
        "retries, faults and L7 policy, and re-originates HBONE to the chosen endpoint.",
    )
    p.add_argument("--gateway", required=True, type=_gateway, metavar="NS/NAME",
                   help="the waypoint Gateway (class istio-waypoint) this process serves")
    src = p.add_argument_group("configuration source (one of)")
    src.add_argument("--control-plane", metavar="HOST:PORT",
                     help="the control plane's config stream (port 15012)")
    src.add_argument("--local-config", metavar="FILE",
                     help="a manifests file (YAML/JSON) instead of a control plane; "
                     "reloaded when it changes")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default="", help="join token (`ambit token create --waypoint "
                     "NS/NAME`); needed once, the certificate is kept in --data-dir")
    tok.add_argument("--token-file", metavar="FILE", help="read the token from FILE (re-read "
                     "before every join: a Kubernetes projected ServiceAccount token)")
    p.add_argument("--data-dir", default="", metavar="DIR",
                   help="certificate and last snapshot (control plane mode; default "
                   "/var/lib/ambit/waypoint, or a directory under /tmp when that is read-only)")
    p.add_argument("--address", default="", metavar="IP",
                   help="the address other proxies reach this waypoint on (registered "
                   "with the control plane)")
    p.add_argument("--cert", metavar="PEM", help="local mode: this waypoint's certificate "
                   "(chain) with its SPIFFE ID")
    p.add_argument("--key", metavar="PEM", help="local mode: its private key")
    p.add_argument("--ca", metavar="PEM", help="local mode: the mesh root(s)")
    p.add_argument("--trust-domain", default="cluster.local")
    p.add_argument("--listen", type=_hostport, default=("0.0.0.0", 15008),
                   metavar="HOST:PORT", help="HBONE listener (default 0.0.0.0:15008)")
    p.add_argument("--metrics", type=_hostport, default=("0.0.0.0", 15020),
                   metavar="HOST:PORT", help="Prometheus /metrics (default 0.0.0.0:15020)")
    p.add_argument("--ready", type=_hostport, default=("0.0.0.0", 15021),
                   metavar="HOST:PORT", help="/healthz/ready (default 0.0.0.0:15021)")
    p.add_argument("--upstream-hbone-port", type=int, default=15008, metavar="PORT",
                   help="HBONE port of destination workloads (default 15008)")
    p.add_argument("--otlp-endpoint", default=None, metavar="URL",
                   help="export spans as OTLP/HTTP JSON, e.g. http://127.0.0.1:4318/v1/traces")
    p.add_argument("--no-access-log", action="store_true", help="no log line per request")
    p.add_argument("--drain-timeout", type=float, default=5.0, metavar="SECONDS")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    return p


def _read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise OSError(f"cannot read --token-file {path}: {e.strerror}") from e


def _data_dir(given: str, gateway: tuple[str, str]) -> Path:
    """--data-dir, else the default, else (read-only root filesystem) one under /tmp."""
    if given:
        return Path(given)
    default = Path("/var/lib/ambit/waypoint")
    try:
        default.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.access(default, os.W_OK):
            return default
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"ambit-waypoint-{gateway[0]}-{gateway[1]}"
    log.warning("default data dir not writable; using a temporary one",
                default=str(default), data_dir=str(fallback))
    return fallback


class FileIdentity:
    """The waypoint's certificate and roots from files, re-read when they change.

    Called for every new TLS handshake (inbound and outbound); a stat of the three
    files when nothing changed. A renewal that is half written (a certificate whose
    key is not there yet) or unreadable keeps the previous pair, with a warning, and
    is tried again at the next call.
    """

    def __init__(self, cert: Path, key: Path, ca: Path, trust_domain: str) -> None:
        self.paths = (cert, key, ca)
        self.trust_domain = trust_domain
        self._stamp: tuple[int, ...] = ()
        self._failed: tuple[int, ...] = ()
        self._value: tuple[Certificate, TrustBundle] | None = None

    def __call__(self) -> tuple[Certificate, TrustBundle]:
        try:
            stamp = tuple(p.stat().st_mtime_ns for p in self.paths)
        except OSError as e:
            if self._value is not None:
                return self._value
            raise SystemExit(f"waypoint: cannot read {e.filename}: {e.strerror}") from e
        if self._value is not None and stamp == self._stamp:
            return self._value
        cert_p, key_p, ca_p = self.paths
        try:
            cert = Certificate.from_pem(split_pem(cert_p.read_bytes()), key_p.read_bytes())
            trust = TrustBundle(self.trust_domain, ca_p.read_bytes())
            if not trust.roots():
                raise ValueError(f"{ca_p} holds no root certificate")
        except (OSError, ValueError) as e:
            if self._value is None:
                raise SystemExit(f"waypoint: cannot load the certificate {cert_p}, key "
                                 f"{key_p} and roots {ca_p}: {e}") from e
            if stamp != self._failed:  # once per change of the files, not per handshake
                self._failed = stamp
                old = self._value[0]
                log.warning("cannot load the renewed certificate, key or roots; keeping "
                            "the previous ones: check that the files belong together",
                            cert=str(cert_p), key=str(key_p), roots=str(ca_p), error=str(e),
                            current_not_after=old.not_after)
            return self._value
        if self._value is not None and cert != self._value[0]:
            log.info("certificate renewed", identity=str(cert.identity),
                     serial=cert.describe()["serial"], not_after=cert.not_after)
        self._value, self._stamp = (cert, trust), stamp
        return self._value

    def current(self) -> Certificate | None:
        """The certificate last loaded (None before the first load)."""
        return self._value[0] if self._value is not None else None


#: how often the control-plane mode checks whether its certificate is past half-life
RENEW_CHECK_INTERVAL = 60.0


async def renew_once(client: Any, token_file: str | None, identity: FileIdentity) -> bool:
    """Renew (or re-join) through `client` when due; the new files reach the next
    handshakes through `identity`. False, with an error logged, when it failed."""
    try:
        if token_file:
            client.token = _read_token(token_file)
        await client.ensure_joined()
        cert = identity()[0]
    except asyncio.CancelledError:
        raise
    except Exception as e:
        current = identity.current()
        log.error("certificate renewal failed; retrying in a minute: is the control plane "
                  "reachable, and is the join token still valid?",
                  error=str(e) or type(e).__name__,
                  expires=current.not_after if current is not None else None)
        return False
    if time.time() >= cert.renewal_time():  # the client logged why, and kept the old one
        log.error("certificate still not renewed past its half-life; retrying in a minute: "
                  "see the renewal warning above", identity=str(cert.identity),
                  expires=cert.not_after)
        return False
    return True


async def _run(args: argparse.Namespace) -> int:
    from waypoint.server import (
        ConfigError,
        Waypoint,
        WaypointOptions,
        follow_control_plane,
        load_local_config,
    )

    options = WaypointOptions(
        gateway=args.gateway, hbone_address=args.listen, metrics_address=args.metrics,
        ready_address=args.ready, upstream_hbone_port=args.upstream_hbone_port,
        otlp_endpoint=args.otlp_endpoint, access_log=not args.no_access_log,
    )
    client = None
    if args.local_config:
        if not (args.cert and args.key and args.ca):
            print("waypoint: --local-config needs --cert, --key and --ca", file=sys.stderr)
            return 2
        identity = FileIdentity(Path(args.cert), Path(args.key), Path(args.ca),
                                 args.trust_domain)
        identity()
    else:
        from config.push import NODE_CERT, NODE_KEY, TRUST, PushClient

        d = _data_dir(args.data_dir, args.gateway)
        client = PushClient(args.control_plane, f"{args.gateway[0]}/{args.gateway[1]}",
                            d, trust_domain=args.trust_domain,
                            token=args.token, waypoint_address=args.address)
        try:
            if args.token_file:
                client.token = _read_token(args.token_file)
            await client.ensure_joined()
        except Exception as e:
            print(f"waypoint: cannot join the mesh: {e}", file=sys.stderr)
            return 1
        identity = FileIdentity(d / NODE_CERT, d / NODE_KEY, d / TRUST, args.trust_domain)

    wp = Waypoint(options, identity)
    local_address = args.address or (
        args.listen[0] if args.listen[0] not in ("0.0.0.0", "::") else "")
    if args.local_config:
        try:
            wp.set_config(load_local_config(args.local_config, args.gateway,
                                            address=local_address))
        except ConfigError as e:
            print(f"waypoint: {e}", file=sys.stderr)
            return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def reload_local() -> None:
        path = args.local_config
        last = os.stat(path).st_mtime
        version = 1
        while True:
            await asyncio.sleep(1.0)
            with contextlib.suppress(OSError):
                m = os.stat(path).st_mtime
                if m != last:
                    last = m
                    version += 1
                    try:
                        wp.set_config(load_local_config(path, args.gateway,
                                                        address=local_address,
                                                        version=version))
                    except ConfigError as e:
                        log.error("config reload failed; keeping the last good config",
                                  error=str(e))

    async def renew() -> None:
        assert client is not None
        while True:
            await asyncio.sleep(RENEW_CHECK_INTERVAL)
            await renew_once(client, args.token_file, identity)

    try:
        async with asyncio.TaskGroup() as tg:
            run = tg.create_task(wp.run())
            side = [tg.create_task(reload_local())] if args.local_config else [
                tg.create_task(follow_control_plane(client, wp)), tg.create_task(renew())]
            await wp.started()
            # what startup built (modules, classes, the first configuration) lives as
            # long as the process: keep it out of the cyclic collector's full passes,
            # which would otherwise rescan it while requests wait
            gc.freeze()
            # young-generation passes every 20 000 allocations instead of 700: a pass
            # scans only what is alive at that moment (the requests in flight), so
            # fewer passes cost less in all (the collector took ~2% of a saturated
            # waypoint's samples, none after); the request path makes few cycles
            gc.set_threshold(20_000, 10, 10)
            log.info("waypoint serving", gateway="/".join(args.gateway),
                     hbone=f"{wp.address[0]}:{wp.address[1]}")
            waiter = tg.create_task(stop.wait())
            await asyncio.wait([run, waiter], return_when=asyncio.FIRST_COMPLETED)
            for t in side:
                t.cancel()
            if not run.done():
                log.info("draining", timeout=args.drain_timeout)
                await wp.drain(args.drain_timeout)
            waiter.cancel()
    except OSError as e:
        print(f"waypoint: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if bool(args.control_plane) == bool(args.local_config):
        print("waypoint: give exactly one of --control-plane HOST:PORT or --local-config FILE",
              file=sys.stderr)
        return 2
    zlog.configure(args.log_level)
    # Before the loop allocates anything: glibc thresholds sized for relay buffers, as
    # ztunnel does (HBONE in and out both relay; a no-op off glibc).
    from ztunnel.hbone.tuning import tune_allocator

    if not tune_allocator():
        log.info("malloc tuning not applied (not glibc): HBONE relaying costs more CPU")
    try:
        import uvloop

        return uvloop.run(_run(args))
    except KeyboardInterrupt:
        return 130
