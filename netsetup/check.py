"""Preflight: prove, in a throwaway netns, that this host can do transparent capture."""

from __future__ import annotations

import functools
import itertools
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from netsetup.netns import iproute_in_netns, run_in_fresh_thread, socket_in_netns
from netsetup.rules import CaptureSpec

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36
# the marks and table the capture rules use (CaptureSpec's defaults)
PROXY_MARK = CaptureSpec.proxy_mark
CAPTURE_MARK = CaptureSpec.capture_mark
ROUTE_TABLE = CaptureSpec.route_table

_GRANT = (
    "grant CAP_NET_ADMIN and CAP_SYS_ADMIN: run as root with full capabilities, or "
    "systemd AmbientCapabilities=, or Kubernetes securityContext.capabilities.add"
)


@dataclass(frozen=True)
class CheckResult:
    """One preflight check: what was tried, whether it worked, and how to fix it if not."""

    name: str
    ok: bool
    detail: str
    remedy: str


def _cap_eff() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0  # pragma: no cover - every Linux has CapEff


def _check_caps(cap_eff: int) -> list[CheckResult]:
    out = []
    for cap, bit, why in (
        ("CAP_NET_ADMIN", CAP_NET_ADMIN, "install nftables rules, routes and socket marks"),
        ("CAP_SYS_ADMIN", CAP_SYS_ADMIN, "enter workload network namespaces with setns"),
    ):
        held = bool(cap_eff & (1 << bit))
        out.append(
            CheckResult(
                name=cap,
                ok=held,
                detail=f"held (needed to {why})" if held else f"missing: needed to {why}",
                remedy="" if held else f"{cap} missing: {_GRANT}",
            )
        )
    return out


def _last_line(text: str) -> str:
    """The line of a tool's stderr that says what went wrong (nft: the first "Error:")."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in lines:
        if "Error:" in ln:
            return ln[ln.index("Error:"):]
    return lines[-1] if lines else "no output"


def _table(hook: str, kind: str, *rules: str) -> str:
    body = "".join(f"    {r}\n" for r in rules)
    return (
        "table inet ambit_check {\n  chain c {\n"
        f"    type {kind} hook {hook} priority mangle; policy accept;\n{body}  }}\n}}\n"
    )


# name, ruleset, kernel options that provide it, module to load
_NFT_CHECKS: tuple[tuple[str, str, str, str], ...] = (
    (
        "nftables",
        _table("prerouting", "filter",
               f"meta l4proto tcp meta mark set {CAPTURE_MARK:#x} counter accept"),
        "CONFIG_NF_TABLES and CONFIG_NF_TABLES_INET",
        "nf_tables",
    ),
    (
        "nft tproxy",
        _table(
            "prerouting",
            "filter",
            "meta nfproto ipv4 meta l4proto tcp tproxy ip to 127.0.0.1:15001 accept",
            "meta nfproto ipv6 meta l4proto tcp tproxy ip6 to [::1]:15001 accept",
        ),
        "CONFIG_NFT_TPROXY (with CONFIG_NF_TPROXY_IPV4 and CONFIG_NF_TPROXY_IPV6)",
        "nft_tproxy",
    ),
    (
        "nft socket transparent",
        _table("prerouting", "filter",
               f"meta l4proto tcp socket transparent 1 meta mark set {CAPTURE_MARK:#x} accept"),
        "CONFIG_NFT_SOCKET (with CONFIG_NF_SOCKET_IPV4 and CONFIG_NF_SOCKET_IPV6)",
        "nft_socket",
    ),
    (
        "nft fib",
        _table("output", "route", "fib daddr type local return"),
        "CONFIG_NFT_FIB_INET (with CONFIG_NFT_FIB_IPV4 and CONFIG_NFT_FIB_IPV6)",
        "nft_fib_inet",
    ),
)


def _nft_check(netns: str, name: str, ruleset: str, options: str, module: str) -> CheckResult:
    applied = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if applied.returncode != 0:
        err = _last_line(applied.stderr)
        if "Operation not permitted" in err:
            remedy = f"nftables refused: CAP_NET_ADMIN missing: {_GRANT}"
        else:
            remedy = (
                f"the kernel lacks {options}: `modprobe {module}`, or use a kernel built "
                "with it (=y or =m)"
            )
        return CheckResult(name, False, f"applying a test table failed: {err}", remedy)
    deleted = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "delete", "table", "inet", "ambit_check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if deleted.returncode != 0:
        return CheckResult(
            name,
            False,
            f"test table applied but could not be deleted: {_last_line(deleted.stderr)}",
            "check the nftables version (`nft --version`, 0.9.3 or newer)",
        )
    provider = options.split(maxsplit=1)[0]
    return CheckResult(name, True, f"test table applied and deleted ({provider})", "")


def _nft_check_list(netns: str, name: str, ruleset: str, options: str, module: str
                    ) -> list[CheckResult]:
    return [_nft_check(netns, name, ruleset, options, module)]


def _policy_routing(netns: str) -> list[CheckResult]:
    out = []
    for family, dst, options, label in (
        (socket.AF_INET, "0.0.0.0/0", "CONFIG_IP_MULTIPLE_TABLES", "policy routing"),
        (socket.AF_INET6, "::/0", "CONFIG_IPV6_MULTIPLE_TABLES", "policy routing IPv6"),
    ):

        def attempt(family: int = family, dst: str = dst) -> str:
            with iproute_in_netns(netns) as ipr:
                lo = ipr.link_lookup(ifname="lo")[0]
                ipr.link("set", index=lo, state="up")
                ipr.rule("add", family=family, fwmark=CAPTURE_MARK, fwmask=0xFFFFFFFF,
                         table=ROUTE_TABLE, priority=100)
                ipr.route("add", family=family, dst=dst, type="local", scope="host",
                          oif=lo, table=ROUTE_TABLE)
                rules = [r for r in ipr.get_rules(family=family)
                         if r.get("FRA_FWMARK") == CAPTURE_MARK]
                if not rules:
                    return "rule added but not listed"
                ipr.route("del", family=family, dst=dst, type="local", scope="host",
                          oif=lo, table=ROUTE_TABLE)
                ipr.rule("del", family=family, fwmark=CAPTURE_MARK, fwmask=0xFFFFFFFF,
                         table=ROUTE_TABLE, priority=100)
                return ""

        try:
            problem = run_in_fresh_thread(attempt)
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
        if not problem:
            out.append(CheckResult(
                label, True,
                f"fwmark rule + local route in table {ROUTE_TABLE} added and removed", "",
            ))
            continue
        if "Operation not permitted" in problem or "(1," in problem:
            remedy = f"routing changes refused: CAP_NET_ADMIN missing: {_GRANT}"
        else:
            remedy = f"the kernel lacks {options}: use a kernel built with {options}=y"
        out.append(CheckResult(label, False, f"ip rule/route failed: {problem}", remedy))
    return out


def _socket_options(netns: str) -> list[CheckResult]:
    out = []

    def transparent() -> None:
        for fam, level, opt, addr in (
            (socket.AF_INET, socket.IPPROTO_IP, IP_TRANSPARENT, "203.0.113.1"),
            (socket.AF_INET6, socket.IPPROTO_IPV6, IPV6_TRANSPARENT, "2001:db8::1"),
        ):
            with socket_in_netns(netns, fam) as s:
                s.setsockopt(level, opt, 1)
                s.bind((addr, 0))  # a non-local address: only transparent sockets may
                s.listen()

    def mark() -> None:
        with socket_in_netns(netns) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
            if s.getsockopt(socket.SOL_SOCKET, SO_MARK) != PROXY_MARK:
                raise OSError("SO_MARK set but reads back differently")

    for label, fn, ok_detail in (
        ("IP_TRANSPARENT", transparent, "transparent listeners bind non-local addresses"),
        ("SO_MARK", mark, f"sockets can carry mark {PROXY_MARK:#x}"),
    ):
        try:
            fn()
            out.append(CheckResult(label, True, ok_detail, ""))
        except OSError as exc:
            perm = exc.errno in (1, 13)
            remedy = (
                f"{label} needs CAP_NET_ADMIN: {_GRANT}" if perm
                else f"{label} unavailable ({exc.strerror or exc}): check IPv6 is enabled "
                "(net.ipv6.conf.all.disable_ipv6=0) and the kernel supports it"
            )
            out.append(CheckResult(label, False, f"setsockopt/bind failed: {exc}", remedy))
    return out


def _guard(label: str, fn: Callable[[], list[CheckResult]]) -> list[CheckResult]:
    """Run a check group; an unexpected error becomes a failed result, never a crash."""
    try:
        return fn()
    except Exception as exc:
        return [CheckResult(label, False, f"check crashed: {type(exc).__name__}: {exc}",
                            "report this with the output of `ambit check`")]


def _not_tested(names: Sequence[str], why: str) -> list[CheckResult]:
    return [
        CheckResult(n, False, f"not tested: {why}", "fix the 'network namespace' check first")
        for n in names
    ]


_counter = itertools.count(1)
_DEPENDENT = [c[0] for c in _NFT_CHECKS] + [
    "policy routing", "policy routing IPv6", "IP_TRANSPARENT", "SO_MARK",
]


def check(netns_name: str | None = None) -> list[CheckResult]:
    """Run every preflight check for real, in a throwaway netns that is always removed."""
    results = _check_caps(_cap_eff())
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        results.append(CheckResult(
            "tools", False, f"not on PATH: {', '.join(missing)}",
            "install them: `apt-get install iproute2 nftables` (or your distribution's packages)",
        ))
        return [*results, *_not_tested(_DEPENDENT, "ip/nft missing")]
    name = netns_name or f"ambitcheck{os.getpid()}x{next(_counter)}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True,
                          check=False, timeout=30)
    if made.returncode != 0:
        err = _last_line(made.stderr)
        results.append(CheckResult(
            "network namespace", False, f"`ip netns add` failed: {err}",
            f"creating namespaces needs CAP_SYS_ADMIN and a kernel with CONFIG_NET_NS: {_GRANT}",
        ))
        return [*results, *_not_tested(_DEPENDENT, "no throwaway network namespace")]
    try:
        results.append(CheckResult("network namespace", True, "throwaway netns created", ""))
        for nft_name, ruleset, options, module in _NFT_CHECKS:
            results += _guard(
                nft_name,
                functools.partial(_nft_check_list, name, nft_name, ruleset, options, module),
            )
        results += _guard("policy routing", lambda: _policy_routing(name))
        results += _guard("socket options", lambda: _socket_options(name))
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False,
                       timeout=30)
    return results


def render_table(results: Sequence[CheckResult],
                 failed_note: str = "transparent capture will not work") -> str:
    """The report `ambit check` prints: one row per check, the remedy under each failure."""
    width = max([len("CHECK"), *(len(r.name) for r in results)])
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL"]
    for r in results:
        lines.append(f"{r.name:<{width}}  {'PASS' if r.ok else 'FAIL':<6}  {r.detail}")
        if not r.ok and r.remedy:
            lines.append(f"{'':<{width}}  {'':<6}  fix: {r.remedy}")
    failed = sum(not r.ok for r in results)
    if failed:
        lines.append(f"{failed} of {len(results)} checks failed: {failed_note}")
    else:
        lines.append(f"all {len(results)} checks passed")
    return "\n".join(lines) + "\n"


def run_cli(
    run: Callable[[], list[CheckResult]] = check, out: Callable[[str], object] | None = None
) -> int:
    """Print the preflight table; exit status 0 when every check passed, else 1."""
    results = run()
    (out or sys.stdout.write)(render_table(results))
    return 0 if all(r.ok for r in results) else 1
