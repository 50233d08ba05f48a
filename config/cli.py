"""The `ambit` command line: control plane and client commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

DEFAULT_DATA_DIR = "/var/lib/ambit/control-plane"
DEFAULT_SOCKET = "/run/ambit/control.sock"


class CliError(Exception):
    """A one-line reason the command failed (exit status 1)."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line through the log (exit status 2)."""

    def error(self, message: str) -> NoReturn:
        _configure_logging()
        _fail(f"{self.prog}: {message} (see `{self.prog} --help`)")
        raise SystemExit(2)


def _client_options(defaults: bool) -> _Parser:
    """Options that say how to reach the control plane.

    They are accepted before and after the subcommand; after it they leave the values
    given before it alone unless repeated (their defaults there are suppressed).
    """
    p = _Parser(add_help=False)
    g = p.add_argument_group("reaching the control plane")

    def dflt(value: str) -> str:
        return value if defaults else argparse.SUPPRESS

    g.add_argument(
        "--socket",
        default=dflt(os.environ.get("AMBIT_SOCKET", DEFAULT_SOCKET)),
        help=f"local unix socket (default $AMBIT_SOCKET or {DEFAULT_SOCKET})",
    )
    g.add_argument(
        "--server",
        default=dflt(os.environ.get("AMBIT_SERVER", "")),
        metavar="HOST:PORT",
        help="TLS address of the API (default $AMBIT_SERVER); needs the admin credential",
    )
    g.add_argument(
        "--cert",
        default=dflt(os.environ.get("AMBIT_CERT", f"{DEFAULT_DATA_DIR}/admin.pem")),
        help="admin client certificate (default $AMBIT_CERT or DATA_DIR/admin.pem)",
    )
    g.add_argument(
        "--key",
        default=dflt(os.environ.get("AMBIT_KEY", f"{DEFAULT_DATA_DIR}/admin-key.pem")),
        help="admin client key (default $AMBIT_KEY or DATA_DIR/admin-key.pem)",
    )
    g.add_argument(
        "--cacert",
        default=dflt(os.environ.get("AMBIT_CACERT", f"{DEFAULT_DATA_DIR}/api-ca.pem")),
        help="CA of the API (default $AMBIT_CACERT or DATA_DIR/api-ca.pem)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="ambit", description="Ambit service mesh control.", parents=[_client_options(True)]
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("debug", "info", "warning", "error"),
        help="log level",
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    demo = sub.add_parser("demo", help="build a sandbox mesh, drive traffic, show what it did")
    from config.demo import add_arguments as add_demo_arguments

    add_demo_arguments(demo)
    ck = sub.add_parser(
        "check",
        parents=[_client_options(False)],
        help="preflight checks for this host: capture, ports, control plane, clock",
    )
    ck.add_argument(
        "--role",
        choices=("node", "control-plane"),
        default="node",
        help="what will run here: a node's ztunnel (ports 15000/15020/15021 free, the "
        "default) or the control plane (port 15012 free)",
    )
    client = _client_options(False)

    cp = sub.add_parser("control-plane", help="run the control plane")
    cp.add_argument(
        "--data-dir", default=DEFAULT_DATA_DIR, help=f"state directory (default {DEFAULT_DATA_DIR})"
    )
    cp.add_argument(
        "--listen",
        default="",
        metavar="HOST:PORT",
        help="also serve the admin API on TLS at this address",
    )
    cp.add_argument(
        "--socket",
        default=DEFAULT_SOCKET,
        help=f"local unix socket of the admin API (default {DEFAULT_SOCKET})",
    )
    cp.add_argument(
        "--proxy-listen",
        default="0.0.0.0:15012",
        metavar="HOST:PORT",
        help="config stream and certificate signing for nodes and waypoints "
        "(default 0.0.0.0:15012; empty to disable)",
    )
    cp.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain")
    cp.add_argument(
        "--source",
        default="store",
        choices=("store", "kubernetes"),
        help="where resources come from: `ambit apply` (store, the default) or the "
        "Kubernetes API (mirrored into the store; ready after the first full list)",
    )
    cp.add_argument(
        "--kubeconfig",
        metavar="PATH",
        default=None,
        help="with --source kubernetes: kubeconfig to use (default: the pod's "
        "ServiceAccount in a cluster, else KUBECONFIG or ~/.kube/config)",
    )
    cp.add_argument(
        "--waypoint-image",
        default="",
        metavar="IMAGE",
        help="with --source kubernetes: create a Deployment and Service of this image for "
        "each waypoint Gateway (default: create none)",
    )
    cp.add_argument(
        "--waypoint-control-plane",
        default="",
        metavar="HOST:PORT",
        help="address the created waypoints dial (default "
        "ambit-control-plane.ambit-system.svc:15012)",
    )
    cp.add_argument(
        "--service-cidr",
        default="10.96.0.0/16",
        help="range Service VIPs are allocated from (default 10.96.0.0/16)",
    )
    cp.add_argument(
        "--root-namespace",
        default="istio-system",
        help="namespace whose policies apply mesh-wide (default istio-system)",
    )
    cp.add_argument(
        "--log-level",
        default="info",
        dest="cp_log_level",
        choices=("debug", "info", "warning", "error"),
        help="log level",
    )

    ap = sub.add_parser("apply", parents=[client], help="create or update resources")
    ap.add_argument(
        "-f",
        "--filename",
        action="append",
        required=True,
        metavar="FILE|DIR|-",
        help="manifest file, directory of manifests, or - for stdin (repeatable)",
    )
    ap.add_argument("--dry-run", action="store_true", help="validate only, store nothing")

    dp = sub.add_parser("delete", parents=[client], help="delete resources")
    dp.add_argument(
        "-f",
        "--filename",
        action="append",
        metavar="FILE|DIR|-",
        help="delete the resources these manifests describe",
    )
    dp.add_argument("kind", nargs="?", help="resource type, e.g. service, svc, namespace")
    dp.add_argument("name", nargs="*", help="resource names")
    dp.add_argument("-n", "--namespace", default="default", help="namespace (default default)")

    gp = sub.add_parser("get", parents=[client], help="show resources")
    gp.add_argument("kind", help="resource type, e.g. services, svc, ns, ap, httproutes")
    gp.add_argument("name", nargs="?", default="", help="one resource name")
    scope = gp.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", default="default", help="namespace")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    gp.add_argument(
        "-o",
        "--output",
        default="table",
        choices=("table", "yaml", "json"),
        help="output format (default table)",
    )

    lp = sub.add_parser(
        "label",
        parents=[client],
        help="set or remove labels",
        description="ambit label namespace NAME KEY=VALUE | KEY- ...",
    )
    lp.add_argument("kind", help="resource type, e.g. namespace")
    lp.add_argument("name", help="resource name")
    lp.add_argument(
        "labels",
        nargs="+",
        metavar="KEY=VALUE|KEY-",
        help="labels to set (KEY=VALUE) or remove (KEY-)",
    )
    lp.add_argument("-n", "--namespace", default="default", help="namespace of the resource")

    tp = sub.add_parser("token", help="join tokens")
    tsub = tp.add_subparsers(dest="token_command", required=True, parser_class=_Parser)
    tc = tsub.add_parser("create", parents=[client], help="create a join token")
    who = tc.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", help="node name the token enrolls")
    who.add_argument("--waypoint", metavar="NS/NAME", help="waypoint Gateway the token is for")

    sub.add_parser("status", parents=[client], help="control plane, nodes and waypoints")

    cap = sub.add_parser("ca", help="the mesh CA: roots and root rotation")
    casub = cap.add_subparsers(dest="ca_command", required=True, parser_class=_Parser)
    casub.add_parser(
        "status", parents=[client], help="trusted roots, which one signs, when they expire"
    )
    rot = casub.add_parser(
        "rotate",
        parents=[client],
        help="rotate the root: begin (trust a new root), complete (sign with it), "
        "retire FINGERPRINT (stop trusting the old one)",
    )
    rot.add_argument("step", choices=("begin", "complete", "retire"), help="rotation step")
    rot.add_argument(
        "fingerprint", nargs="?", default="", help="retire: SHA-256 fingerprint of the root"
    )
    rot.add_argument(
        "--force",
        action="store_true",
        help="retire: even if the root signed certificates that may still be in use",
    )
    return p


def _configure_logging(level: str = "warning") -> None:
    from ztunnel.log import configure

    configure(level)


def _fail(message: str) -> None:
    import structlog

    structlog.get_logger("ambit").error(message)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from config.demo.runner import run_from_args

        return run_from_args(args)
    if args.command == "check":
        from config.check import run_cli as run_check

        return run_check(args)
    if args.command == "control-plane":
        _configure_logging(args.cp_log_level)
        return _control_plane(args)
    _configure_logging(args.log_level)
    try:
        return _client_command(args)
    except CliError as e:
        _fail(str(e))
        return 1


def _control_plane(args: argparse.Namespace) -> int:
    import asyncio

    import uvloop

    from config.ca import CaError
    from config.server import ControlPlaneConfig, run

    cfg = ControlPlaneConfig(
        data_dir=args.data_dir,
        socket=args.socket,
        listen=args.listen,
        trust_domain=args.trust_domain,
        service_cidr=args.service_cidr,
        root_namespace=args.root_namespace,
        proxy_listen=args.proxy_listen,
        source=args.source,
        kubeconfig=args.kubeconfig,
        waypoint_image=args.waypoint_image,
        waypoint_control_plane=args.waypoint_control_plane,
    )
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run(cfg))
    except (OSError, ValueError, CaError) as e:
        _fail(f"control plane cannot start: {e}")
        return 1
    return 0


def _client(args: argparse.Namespace) -> Any:
    from config.api import ApiClient, TlsCredentials

    creds = TlsCredentials(args.cert, args.key, args.cacert) if args.server else None
    return ApiClient(socket_path=args.socket, server=args.server, creds=creds)


def _client_command(args: argparse.Namespace) -> int:
    from config.api import ClientError

    try:
        if args.command == "apply":
            return _apply(args)
        if args.command == "delete":
            return _delete(args)
        if args.command == "get":
            return _get(args)
        if args.command == "label":
            return _label(args)
        if args.command == "token":
            return _token(args)
        if args.command == "status":
            return _status(args)
        if args.command == "ca":
            return _ca(args)
    except ClientError as e:
        details = e.details if isinstance(e.details, list) else []
        if len(details) > 1:
            raise CliError("\n".join(_problem_line(d) for d in details)) from None
        raise CliError(str(e)) from None
    raise CliError(f"unknown command {args.command!r}")


def _problem_line(d: Any) -> str:
    from config.validate import Problem

    try:
        return str(Problem(**d))
    except TypeError:
        return str(d)


def _load(paths: list[str]) -> Any:
    from config.validate import ValidationFailed, load_paths

    try:
        return load_paths(paths, sys.stdin)
    except ValidationFailed as e:
        raise CliError(str(e)) from None


def _print_results(data: Mapping[str, Any], suffix: str = "") -> None:
    for r in data.get("results", []):
        kind = str(r["kind"]).lower()
        ns = f" -n {r['namespace']}" if r.get("namespace") else ""
        print(f"{kind}/{r['name']}{ns} {r['action']}{suffix}")


def _apply(args: argparse.Namespace) -> int:
    docs = _load(args.filename)
    if not docs:
        raise CliError(f"no resources found in {', '.join(args.filename)}")
    data = _client(args).apply(docs, dry_run=args.dry_run)
    _print_results(data, " (dry run)" if args.dry_run else "")
    return 0


def _delete(args: argparse.Namespace) -> int:
    from config.resources import resolve_kind

    keys: list[dict[str, str]] = []
    if args.filename:
        if args.kind:
            raise CliError("give either -f FILE or KIND NAME, not both")
        for d in _load(args.filename):
            obj: dict[str, Any] = d.obj if isinstance(d.obj, dict) else {}
            md_raw = obj.get("metadata")
            md: dict[str, Any] = md_raw if isinstance(md_raw, dict) else {}
            if not obj.get("kind") or not md.get("name"):
                raise CliError(f"{d.source}: document {d.index}: needs kind and metadata.name")
            keys.append(
                {
                    "kind": str(obj["kind"]),
                    "name": str(md["name"]),
                    "namespace": str(md.get("namespace") or "default"),
                }
            )
    else:
        if not args.kind or not args.name:
            raise CliError("say what to delete: -f FILE, or KIND NAME [-n NAMESPACE]")
        try:
            kind = resolve_kind(args.kind).kind
        except KeyError as e:
            raise CliError(str(e.args[0])) from None
        keys = [{"kind": kind, "name": n, "namespace": args.namespace} for n in args.name]
    data = _client(args).delete(keys)
    _print_results(data)
    return 0


def _get(args: argparse.Namespace) -> int:
    from config.resources import resolve_kind

    try:
        info = resolve_kind(args.kind)
    except KeyError as e:
        raise CliError(str(e.args[0])) from None
    ns: str | None = None
    if info.namespaced and not args.all_namespaces:
        ns = args.namespace
    data = _client(args).get(info.kind, args.name, ns)
    items: list[dict[str, Any]] = data["items"]
    if args.output in ("yaml", "json"):
        out: Any = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        if args.output == "json":
            print(json.dumps(out, indent=2, sort_keys=True))
        else:
            import yaml

            print(yaml.safe_dump(out, sort_keys=False), end="")
        return 0
    if not items:
        where = f" in namespace {ns}" if ns else ""
        print(f"No {info.plural} found{where}.", file=sys.stderr)
        return 0
    show_ns = info.namespaced and args.all_namespaces
    header, rows = _table(info.kind, items)
    if show_ns:
        header = ["NAMESPACE", *header]
        rows = [
            [str(i["metadata"].get("namespace", "")), *r] for i, r in zip(items, rows, strict=True)
        ]
    print(_render(header, rows))
    return 0


def _table(kind: str, items: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    def labels(i: Mapping[str, Any]) -> Mapping[str, str]:
        md = i.get("metadata", {})
        lab = md.get("labels", {}) if isinstance(md, dict) else {}
        return lab if isinstance(lab, dict) else {}

    def spec(i: Mapping[str, Any]) -> Mapping[str, Any]:
        s = i.get("spec", {})
        return s if isinstance(s, dict) else {}

    rows: list[list[str]] = []
    if kind == "Namespace":
        header = ["NAME", "DATAPLANE-MODE", "WAYPOINT", "VERSION"]
        for i in items:
            lab = labels(i)
            rows.append(
                [
                    i["metadata"]["name"],
                    lab.get("istio.io/dataplane-mode", "<none>"),
                    lab.get("istio.io/use-waypoint", "<none>"),
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "Service":
        header = ["NAME", "CLUSTER-IP", "PORTS", "WAYPOINT", "VERSION"]
        for i in items:
            s = spec(i)
            ports = ",".join(
                f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in s.get("ports", [])
            )
            rows.append(
                [
                    i["metadata"]["name"],
                    str(s.get("clusterIP", "")),
                    ports,
                    labels(i).get("istio.io/use-waypoint", "<none>"),
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "WorkloadEntry":
        header = ["NAME", "ADDRESS", "NODE", "SERVICE-ACCOUNT", "VERSION"]
        for i in items:
            s = spec(i)
            ann = i["metadata"].get("annotations", {})
            rows.append(
                [
                    i["metadata"]["name"],
                    str(s.get("address", "")),
                    str(ann.get("ambit.dev/node", "<by address>")),
                    str(s.get("serviceAccount", "default")),
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "AuthorizationPolicy":
        header = ["NAME", "ACTION", "RULES", "VERSION"]
        for i in items:
            s = spec(i)
            rows.append(
                [
                    i["metadata"]["name"],
                    str(s.get("action", "ALLOW")),
                    str(len(s.get("rules", []) or [])),
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "PeerAuthentication":
        header = ["NAME", "MODE", "VERSION"]
        for i in items:
            mtls = spec(i).get("mtls") or {}
            rows.append(
                [
                    i["metadata"]["name"],
                    str(mtls.get("mode", "UNSET")),
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "Gateway":
        header = ["NAME", "CLASS", "ADDRESS", "VERSION"]
        for i in items:
            s = spec(i)
            addrs = ",".join(str(a.get("value")) for a in s.get("addresses", []) or [])
            rows.append(
                [
                    i["metadata"]["name"],
                    str(s.get("gatewayClassName", "")),
                    addrs or "<pending>",
                    i["metadata"]["resourceVersion"],
                ]
            )
    elif kind == "HTTPRoute":
        header = ["NAME", "PARENTS", "RULES", "VERSION"]
        for i in items:
            s = spec(i)
            parents = ",".join(
                f"{p.get('kind', 'Gateway')}/{p.get('name')}" for p in s.get("parentRefs", []) or []
            )
            rows.append(
                [
                    i["metadata"]["name"],
                    parents,
                    str(len(s.get("rules", []) or [])),
                    i["metadata"]["resourceVersion"],
                ]
            )
    else:
        header = ["NAME", "VERSION"]
        rows = [[i["metadata"]["name"], i["metadata"]["resourceVersion"]] for i in items]
    return header, rows


def _render(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = [
        "   ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
        for r in [header, *rows]
    ]
    return "\n".join(lines)


def _label(args: argparse.Namespace) -> int:
    from config.resources import resolve_kind

    try:
        info = resolve_kind(args.kind)
    except KeyError as e:
        raise CliError(str(e.args[0])) from None
    set_labels: dict[str, str] = {}
    remove: list[str] = []
    for item in args.labels:
        if item.endswith("-") and "=" not in item:
            remove.append(item[:-1])
        elif "=" in item:
            k, _, v = item.partition("=")
            set_labels[k] = v
        else:
            raise CliError(f"bad label {item!r}: use KEY=VALUE to set or KEY- to remove")
    data = _client(args).label(
        info.kind, args.name, args.namespace if info.namespaced else "", set_labels, remove
    )
    _print_results(data)
    return 0


def _token(args: argparse.Namespace) -> int:
    if args.waypoint and "/" not in args.waypoint:
        raise CliError(f"bad --waypoint {args.waypoint!r}: expected NAMESPACE/NAME")
    data = _client(args).token(node=args.node or "", waypoint=args.waypoint or "")
    print(data["token"])
    return 0


def _status(args: argparse.Namespace) -> int:
    data = _client(args).status()
    print(f"control plane: config version {data.get('version')}")
    counts = data.get("resources", {})
    if counts:
        print("resources: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    ca = data.get("ca")
    if isinstance(ca, dict):
        print(
            f"CA: trust domain {ca.get('trust_domain')}, root sha256:"
            f"{str(ca.get('root_fingerprint'))[:16]}... expires {ca.get('root_expiry')}"
            + (f", {ca.get('roots')} roots trusted" if ca.get("roots", 1) != 1 else "")
        )
    proxies = data.get("proxies")
    if proxies is None:
        return 0
    if not proxies:
        print("no nodes or waypoints connected")
        return 0
    header = ["KIND", "NAME", "VERSION", "LATEST", "STATE", "CERT-EXPIRY"]
    rows = [
        [
            str(p.get("kind", "")),
            str(p.get("name", "")),
            str(p.get("version", "")),
            str(data.get("config_version", data.get("version"))),
            str(p.get("state", "")),
            str(p.get("cert_expiry", "")),
        ]
        for p in proxies
    ]
    print(_render(header, rows))
    return 0


def _ca(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.ca_command == "status":
        _print_roots(client.ca_status())
        return 0
    if args.step == "retire" and not args.fingerprint:
        raise CliError(
            "retire needs the root's fingerprint: see `ambit ca status` "
            "(e.g. `ambit ca rotate retire 3f2a...`)"
        )
    if args.step != "retire" and (args.fingerprint or args.force):
        raise CliError(f"`ambit ca rotate {args.step}` takes no fingerprint or --force")
    data = client.ca_rotate(args.step, args.fingerprint, args.force)
    done = {
        "begin": "new root added to the trust bundle (not signing yet); once every proxy "
        "holds it (`ambit status`), run `ambit ca rotate complete`",
        "complete": "the new root signs from now on; the previous root stays trusted "
        "until `ambit ca rotate retire FINGERPRINT`, once certificates it signed expired; "
        "join tokens created before now name the previous root: create new ones",
        "retire": "root removed from the trust bundle",
    }[args.step]
    print(f"{done} (config version {data.get('version')})")
    _print_roots(data)
    return 0


def _print_roots(data: Mapping[str, Any]) -> None:
    print(f"trust domain {data.get('trust_domain')}, signer {data.get('signer')}")
    header = ["FINGERPRINT (SHA-256)", "STATE", "SIGNS", "NOT-AFTER", "STOPPED-SIGNING"]
    rows = [
        [
            str(r.get("fingerprint", "")),
            str(r.get("state", "")),
            "yes" if r.get("signing") else "no",
            str(r.get("not_after", "")),
            str(r.get("stopped_signing") or "-"),
        ]
        for r in data.get("roots", [])
    ]
    print(_render(header, rows))
