"""`ambit check`: the capture preflight plus ports, control plane reachability and clock."""

from __future__ import annotations

import argparse
import email.utils
import errno
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from netsetup.check import CheckResult, render_table

NODE_PORTS: tuple[tuple[int, str], ...] = (
    (15000, "ztunnel admin"),
    (15020, "ztunnel metrics"),
    (15021, "ztunnel readiness"),
)
CONTROL_PLANE_PORTS: tuple[tuple[int, str], ...] = ((15012, "control plane proxy stream"),)
MIN_YEAR = 2024
MAX_SKEW = 60.0  # seconds between this host and the control plane


@dataclass(frozen=True)
class Reachability:
    """What asking the control plane for its status gave: an error, or its clock."""

    where: str
    error: str = ""
    server_time: float | None = None  # from the answer's Date header


def port_checks(ports: Sequence[tuple[int, str]], host: str = "0.0.0.0") -> list[CheckResult]:
    """Each port can be bound (TCP) right now: nothing else listens on it."""
    out = []
    for port, what in ports:
        name = f"port {port} free"
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is fine
            s.bind((host, port))
            s.listen(1)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                out.append(CheckResult(
                    name, False, f"in use ({what} needs it)",
                    f"find the owner with `ss -ltnp 'sport = :{port}'` and stop it (an "
                    "ambit process already running here is stopped with "
                    "`systemctl stop ztunnel` / `ambit-control-plane`)"))
            else:
                out.append(CheckResult(
                    name, False, f"cannot bind {host}:{port}: {e.strerror or e}",
                    "run `ambit check` as root on the host the proxy will run on"))
            continue
        finally:
            s.close()
        out.append(CheckResult(name, True, f"free ({what})", ""))
    return out


def clock_checks(now: float, reach: Reachability | None) -> list[CheckResult]:
    """The clock is plausible, and close to the control plane's when that answered."""
    year = time.gmtime(now).tm_year
    ntp = ("enable time synchronisation: `timedatectl set-ntp true` (systemd-timesyncd) or "
           "chronyd/ntpd; certificates are checked against the clock")
    out = [CheckResult(
        "clock", year >= MIN_YEAR,
        f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(now))}"
        + ("" if year >= MIN_YEAR else f": before {MIN_YEAR}, the clock is not set"),
        "" if year >= MIN_YEAR else ntp)]
    if reach is not None and not reach.error and reach.server_time is not None:
        skew = now - reach.server_time
        ok = abs(skew) <= MAX_SKEW
        out.append(CheckResult(
            "clock skew", ok,
            f"{skew:+.0f}s against the control plane at {reach.where}"
            + ("" if ok else f" (more than {MAX_SKEW:g}s)"),
            "" if ok else f"{ntp}, on this host and on the control plane's"))
    return out


def control_plane_check(reach: Reachability | None) -> CheckResult:
    if reach is None:
        return CheckResult(
            "control plane", True,
            "not checked: no --server/--socket/$AMBIT_SERVER given and no local socket", "")
    if reach.error:
        return CheckResult(
            "control plane", False, f"unreachable at {reach.where}: {reach.error}",
            "start it (`systemctl start ambit-control-plane`), or point `ambit check` at "
            "it with --server HOST:PORT (plus --cert/--key/--cacert) or --socket PATH; "
            "for proxies, open TCP 15012 to it")
    return CheckResult("control plane", True, f"answered at {reach.where}", "")


def _date_of(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return email.utils.parsedate_to_datetime(header).timestamp()
    except (TypeError, ValueError):
        return None


def reach_control_plane(args: argparse.Namespace, timeout: float = 5.0) -> Reachability | None:
    """Ask the control plane named by the CLI options for its status; None when none is
    named and the default local socket does not exist."""
    from config.api import DEFAULT_SOCKET, ApiClient, ClientError, TlsCredentials

    server = str(getattr(args, "server", "") or "")
    sock = str(getattr(args, "socket", "") or DEFAULT_SOCKET)
    if not server and sock == DEFAULT_SOCKET and not os.path.exists(sock):
        return None
    creds = TlsCredentials(args.cert, args.key, args.cacert) if server else None
    client = ApiClient(socket_path=sock, server=server, creds=creds, timeout=timeout)
    try:
        client.status()
    except ClientError as e:
        return Reachability(client.where(), error=str(e))
    return Reachability(client.where(), server_time=_date_of(client.last_date))


def host_checks(
    args: argparse.Namespace,
    *,
    now: Callable[[], float] = time.time,
    reach: Callable[[argparse.Namespace], Reachability | None] = reach_control_plane,
    check_ports: Callable[[Sequence[tuple[int, str]]], list[CheckResult]] = port_checks,
) -> list[CheckResult]:
    """Ports of the role, the control plane, the clock: one row each."""
    ports = CONTROL_PLANE_PORTS if getattr(args, "role", "node") == "control-plane" else (
        NODE_PORTS)
    reached = reach(args)
    return [*check_ports(ports), control_plane_check(reached), *clock_checks(now(), reached)]


def run_cli(
    args: argparse.Namespace,
    *,
    capture: Callable[[], list[CheckResult]] | None = None,
    out: Callable[[str], Any] | None = None,
) -> int:
    """Print the whole preflight table; 0 when every check passed, else 1."""
    if capture is None:
        from netsetup.check import check

        capture = check
    results = [*capture(), *host_checks(args)]
    (out or sys.stdout.write)(render_table(results, "fix them before running ambit here"))
    return 0 if all(r.ok for r in results) else 1


__all__ = [
    "CONTROL_PLANE_PORTS",
    "NODE_PORTS",
    "Reachability",
    "clock_checks",
    "control_plane_check",
    "host_checks",
    "port_checks",
    "reach_control_plane",
    "run_cli",
]
