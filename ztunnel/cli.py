"""The `ztunnel` command line: run the node proxy."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ztunnel.listeners.dns_server import UpstreamServer


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def _upstreams(text: str) -> tuple[UpstreamServer, ...]:
    from ztunnel.listeners.dns_server import parse_upstreams

    try:
        return parse_upstreams(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel", description="Ambit node proxy (ztunnel).")
    p.add_argument("--node", required=True, help="name of this node")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--control-plane", metavar="HOST:PORT", help="control plane address")
    src.add_argument("--local-config", metavar="FILE", help="static snapshot file (reloaded)")
    tok = p.add_mutually_exclusive_group()
    tok.add_argument("--token", default="", help="join token (with --control-plane)")
    tok.add_argument("--token-file", metavar="FILE",
                     help="read the join token from FILE (a mounted Kubernetes Secret)")
    p.add_argument("--data-dir", default="/var/lib/ambit/ztunnel", help="state directory")
    p.add_argument("--no-capture", action="store_true",
                   help="do not install capture rules (another agent manages them)")
    p.add_argument("--admin", type=_hostport, default=("127.0.0.1", 15000), metavar="HOST:PORT",
                   help="admin endpoint (default 127.0.0.1:15000)")
    p.add_argument("--metrics", type=_hostport, default=("0.0.0.0", 15020), metavar="HOST:PORT",
                   help="Prometheus metrics (default 0.0.0.0:15020)")
    p.add_argument("--ready", type=_hostport, default=("0.0.0.0", 15021), metavar="HOST:PORT",
                   help="readiness /healthz/ready (default 0.0.0.0:15021)")
    p.add_argument("--drain-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="on SIGTERM, how long open connections may finish (default 5)")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="onward connect and HBONE setup timeout (default 5)")
    p.add_argument("--idle-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="close connections idle this long (default 3600)")
    p.add_argument("--max-connections", type=int, default=10_000, metavar="N",
                   help="refuse connections above this many at once (default 10000)")
    p.add_argument("--dns-upstream", type=_upstreams, default=(), metavar="IP[:PORT],...",
                   help="the node's resolvers for names the mesh does not answer "
                        "(default: the nameservers of /etc/resolv.conf)")
    p.add_argument("--discovery-netns-prefix", metavar="PREFIX", default=None,
                   help="report only addresses of named netns starting with PREFIX (and "
                        "process netns) to the control plane for placing WorkloadEntries "
                        "without an ambit.dev/node annotation (default: every netns)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import uvloop

    from ztunnel import log
    from ztunnel.hbone.tuning import tune_allocator
    from ztunnel.listeners._base import Limits
    from ztunnel.localconfig import ConfigError
    from ztunnel.proxy import (
        ConfigSource,
        ControlPlaneSource,
        LocalFileSource,
        ProcessPorts,
        Ztunnel,
        ZtunnelOptions,
    )

    log.configure(args.log_level)
    # Before the loop allocates anything: glibc thresholds sized for relay buffers
    # (HBONE CPU per GB within ~10% of a plain TLS relay; a no-op off glibc).
    tune_allocator()
    if args.token_file:
        try:
            with open(args.token_file) as f:
                args.token = f.read().strip()
        except OSError as exc:
            print(f"ztunnel: cannot read --token-file {args.token_file}: {exc.strerror}",
                  file=sys.stderr)
            return 2
    if args.control_plane and not args.token and not os.path.exists(
        os.path.join(args.data_dir, "node-cert.pem")
    ):
        print("ztunnel: --control-plane needs --token on first start "
              "(create one with `ambit token create --node NAME`)", file=sys.stderr)
        return 2
    source: ConfigSource
    if args.local_config:
        source = LocalFileSource(args.local_config, args.data_dir, node=args.node)
    else:
        source = ControlPlaneSource(args.control_plane, args.node, args.data_dir, args.token,
                                    token_file=args.token_file,
                                    discovery_prefix=args.discovery_netns_prefix)
    options = ZtunnelOptions(
        node=args.node,
        data_dir=args.data_dir,
        manage_capture=not args.no_capture,
        ports=ProcessPorts(admin=args.admin, metrics=args.metrics, ready=args.ready),
        limits=Limits(
            max_connections=args.max_connections,
            connect_timeout=args.connect_timeout,
            idle_timeout=args.idle_timeout,
            drain_timeout=args.drain_timeout,
        ),
        dns_upstream=args.dns_upstream,
    )
    try:
        uvloop.run(Ztunnel(options, source).run())
        # Drained and stopped: skip the interpreter's teardown (module and object
        # finalization takes ~0.5 s on a loaded node), which would only delay the
        # restart of the proxy that the node's traffic is waiting for.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    except ConfigError as exc:
        print(f"ztunnel: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"ztunnel: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0
