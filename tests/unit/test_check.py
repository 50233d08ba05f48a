"""Preflight report: failures show their remedy; the exit status follows the results."""

from __future__ import annotations

from collections.abc import Sequence

from config.check import Reachability, clock_checks, control_plane_check, host_checks
from netsetup.check import (
    CAP_NET_ADMIN,
    CAP_SYS_ADMIN,
    CheckResult,
    _check_caps,
    _last_line,
    _table,
    render_table,
    run_cli,
)

PASSING = [
    CheckResult("CAP_NET_ADMIN", True, "held", ""),
    CheckResult("nft tproxy", True, "test table applied and deleted", ""),
]
FAILING = [
    CheckResult("CAP_NET_ADMIN", True, "held", ""),
    CheckResult(
        "nft tproxy",
        False,
        "applying a test table failed: Error: Could not process rule: No such file or directory",
        "the kernel lacks CONFIG_NFT_TPROXY: `modprobe nft_tproxy`",
    ),
    CheckResult("SO_MARK", False, "setsockopt/bind failed", "SO_MARK needs CAP_NET_ADMIN"),
]


def test_all_passing_table() -> None:
    assert render_table(PASSING) == (
        "CHECK          RESULT  DETAIL\n"
        "CAP_NET_ADMIN  PASS    held\n"
        "nft tproxy     PASS    test table applied and deleted\n"
        "all 2 checks passed\n"
    )


def test_failures_show_their_remedy_under_the_row() -> None:
    lines = render_table(FAILING).splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert lines[1].split()[:2] == ["CAP_NET_ADMIN", "PASS"]
    assert lines[2].startswith("nft tproxy     FAIL    applying a test table failed: Error:")
    assert lines[3] == (
        "                       fix: the kernel lacks CONFIG_NFT_TPROXY: `modprobe nft_tproxy`"
    )
    assert lines[4].startswith("SO_MARK        FAIL")
    assert lines[5].strip() == "fix: SO_MARK needs CAP_NET_ADMIN"
    assert lines[6] == "2 of 3 checks failed: transparent capture will not work"
    assert "fix:" not in lines[1]


def test_run_cli_exit_status_and_output() -> None:
    printed: list[str] = []
    assert run_cli(lambda: list(PASSING), printed.append) == 0
    assert printed == [render_table(PASSING)]
    printed.clear()
    assert run_cli(lambda: list(FAILING), printed.append) == 1
    assert "fix: SO_MARK needs CAP_NET_ADMIN" in printed[0]


def test_capabilities_from_the_effective_set() -> None:
    none = _check_caps(0)
    assert [(r.name, r.ok) for r in none] == [("CAP_NET_ADMIN", False), ("CAP_SYS_ADMIN", False)]
    assert none[0].remedy.startswith("CAP_NET_ADMIN missing: grant CAP_NET_ADMIN and CAP_SYS_ADMIN")
    assert "AmbientCapabilities" in none[1].remedy
    only_net = _check_caps(1 << CAP_NET_ADMIN)
    assert [r.ok for r in only_net] == [True, False]
    both = _check_caps((1 << CAP_NET_ADMIN) | (1 << CAP_SYS_ADMIN))
    assert all(r.ok and r.remedy == "" for r in both)


def test_tool_error_line_is_the_one_that_says_what_failed() -> None:
    nft_stderr = (
        "/dev/stdin:4:5-40: Error: Could not process rule: No such file or directory\n"
        "    meta l4proto tcp tproxy ip to 127.0.0.1:15001\n"
        "    ^^^^^^^^^^^^^^^^\n"
    )
    assert _last_line(nft_stderr) == "Error: Could not process rule: No such file or directory"
    assert _last_line("first\nlast\n") == "last"
    assert _last_line("") == "no output"


def test_test_tables_are_multiline_nft_syntax() -> None:
    assert _table("output", "route", "fib daddr type local return") == (
        "table inet ambit_check {\n"
        "  chain c {\n"
        "    type route hook output priority mangle; policy accept;\n"
        "    fib daddr type local return\n"
        "  }\n"
        "}\n"
    )


# -- `ambit check`: clock and control plane rows (config/check.py) ----------------------

NOW = 1_795_000_000.0  # 2026-11-18


def test_clock_in_the_present_passes() -> None:
    [row] = clock_checks(NOW, None)
    assert (row.name, row.ok, row.remedy) == ("clock", True, "")
    assert row.detail.startswith("2026-")


def test_clock_before_2024_fails_with_the_remedy() -> None:
    [row] = clock_checks(86400.0, None)  # 1970-01-02: an unset RTC
    assert not row.ok
    assert "before 2024" in row.detail
    assert "timedatectl set-ntp true" in row.remedy


def test_skew_against_the_control_plane() -> None:
    near = Reachability("/run/ambit/control.sock", server_time=NOW - 5)
    rows = clock_checks(NOW, near)
    assert [(r.name, r.ok) for r in rows] == [("clock", True), ("clock skew", True)]
    assert rows[1].detail.startswith("+5s against the control plane")
    far = Reachability("cp:15443", server_time=NOW + 90)
    skew = clock_checks(NOW, far)[1]
    assert not skew.ok and "-90s" in skew.detail and "more than 60s" in skew.detail
    assert "on this host and on the control plane's" in skew.remedy
    # unreachable, or an answer without a Date header: no skew row
    assert len(clock_checks(NOW, Reachability("cp:15443", error="refused"))) == 1
    assert len(clock_checks(NOW, Reachability("cp:15443"))) == 1


def test_control_plane_row() -> None:
    skipped = control_plane_check(None)
    assert skipped.ok and skipped.detail.startswith("not checked")
    ok = control_plane_check(Reachability("/run/ambit/control.sock", server_time=NOW))
    assert ok.ok and ok.detail == "answered at /run/ambit/control.sock"
    down = control_plane_check(Reachability("cp:15443", error="connection refused"))
    assert not down.ok and down.detail == "unreachable at cp:15443: connection refused"
    assert "systemctl start ambit-control-plane" in down.remedy
    assert "--server HOST:PORT" in down.remedy


def test_host_checks_pick_the_ports_of_the_role() -> None:
    import argparse

    asked: list[list[int]] = []

    def ports(p: Sequence[tuple[int, str]]) -> list[CheckResult]:
        asked.append([n for n, _ in p])
        return [CheckResult(f"port {n} free", True, "free", "") for n, _ in p]

    rows = host_checks(argparse.Namespace(role="control-plane"), now=lambda: NOW,
                       reach=lambda a: None, check_ports=ports)
    assert [r.name for r in rows] == ["port 15012 free", "control plane", "clock"]
    host_checks(argparse.Namespace(role="node"), now=lambda: NOW, reach=lambda a: None,
                check_ports=ports)
    assert asked == [[15012], [15000, 15020, 15021]]


def test_footer_of_the_host_table() -> None:
    table = render_table(FAILING, "fix them before running ambit here")
    assert table.splitlines()[-1] == "2 of 3 checks failed: fix them before running ambit here"
