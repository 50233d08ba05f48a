"""The systemd units pass `systemd-analyze verify` and stay hardened (offline security score)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "systemd"
UNITS = ("ambit-control-plane.service", "ztunnel.service", "waypoint@.service")
# Highest acceptable `systemd-analyze security` exposure (0 = locked down, 10 = unsafe).
# ztunnel holds three capabilities and must see the host's network namespaces.
EXPOSURE = {"ambit-control-plane.service": 2.0, "ztunnel.service": 3.5, "waypoint@.service": 2.0}


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.fail(
            "systemd-analyze is missing: install the Debian package `systemd` (`make deps` does)"
        )
    return tool


def _parse(text: str) -> dict[str, dict[str, list[str]]]:
    """Unit file -> section -> key -> values (keys may repeat)."""
    out: dict[str, dict[str, list[str]]] = {}
    section: dict[str, list[str]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = out.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        section.setdefault(key, []).append(value)
    return out


def _staged(tmp_path: Path) -> dict[str, Path]:
    """Copy the units with ExecStart pointing at this checkout's installed console scripts.

    `verify` checks that every ExecStart program exists and is executable, so this also
    proves the unit names commands that `pip install .` really provides.
    """
    bindir = os.path.dirname(sys.executable)
    out: dict[str, Path] = {}
    for name in UNITS:
        text = (UNIT_DIR / name).read_text()
        assert "/usr/local/bin/" in text, f"{name}: ExecStart should use /usr/local/bin/"
        staged = tmp_path / name.replace("@.", "@shop-waypoint.")
        staged.write_text(text.replace("/usr/local/bin/", bindir + "/"))
        out[name] = staged
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = _analyze()
    staged = _staged(tmp_path)
    for name, path in staged.items():
        r = subprocess.run(
            [tool, "verify", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        # verify only warns about unknown keys and bad values: any output is a failure
        assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), (
            f"{name}: systemd-analyze verify said:\n{r.stdout}{r.stderr}"
        )


def test_verify_catches_a_broken_unit(tmp_path: Path) -> None:
    """The check above is not vacuous: a missing program fails verify."""
    tool = _analyze()
    text = (UNIT_DIR / "ztunnel.service").read_text()
    bad = tmp_path / "ztunnel.service"
    bad.write_text(text.replace("/usr/local/bin/", str(tmp_path / "nowhere") + "/"))
    r = subprocess.run(
        [tool, "verify", str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert r.returncode != 0
    assert "not executable" in r.stderr


@pytest.mark.parametrize("name", UNITS)
def test_exposure_stays_low(tmp_path: Path, name: str) -> None:
    tool = _analyze()
    path = _staged(tmp_path)[name]
    threshold = f"--threshold={EXPOSURE[name] * 10:.0f}"  # the tool counts in tenths
    r = subprocess.run(
        [tool, "security", "--offline=true", threshold, "--no-pager", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    summary = [ln for ln in r.stdout.splitlines() if "Overall exposure level" in ln]
    assert r.returncode == 0, f"{name}: exposure above {EXPOSURE[name]}: {summary}"


@pytest.mark.parametrize("name", UNITS)
def test_notify_restart_and_filesystem_hardening(name: str) -> None:
    svc = _parse((UNIT_DIR / name).read_text())["Service"]
    assert svc["Type"] == ["notify"]
    assert svc["NotifyAccess"] == ["main"]
    assert svc["Restart"][0] in ("always", "on-failure")
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["NoNewPrivileges"] == ["yes"]
    assert svc["KillMode"] == ["mixed"]
    assert svc["StateDirectory"], "a data directory must stay writable"


def test_ztunnel_capabilities_are_exactly_what_capture_and_setns_need() -> None:
    unit = _parse((UNIT_DIR / "ztunnel.service").read_text())
    svc = unit["Service"]
    assert set(svc["CapabilityBoundingSet"][0].split()) == {
        "CAP_NET_ADMIN",
        "CAP_SYS_ADMIN",
        "CAP_SYS_PTRACE",
    }
    assert svc["RestrictNamespaces"] == ["net"]
    assert "AF_NETLINK" in svc["RestrictAddressFamilies"][0].split()
    for forbidden in ("PrivateNetwork", "ProtectProc", "PrivateUsers", "DynamicUser"):
        assert forbidden not in svc, f"{forbidden}= would hide the host's network namespaces"
    assert set(svc["ReadWritePaths"][0].split()) == {"/var/lib/ambit/ztunnel", "/run/ambit/ztunnel"}
    assert unit["Unit"]["StartLimitIntervalSec"] == ["0"]
    assert svc["WatchdogSec"] == ["30s"]  # ztunnel pings it (ztunnel.sdnotify.watchdog)


def test_ztunnel_can_enable_request_migration_in_workload_netns() -> None:
    """ztunnel writes /proc/sys/net/ipv4/tcp_migrate_req inside each workload netns for
    loss-free listener handover; ProtectKernelTunables= would make /proc/sys read-only."""
    svc = _parse((UNIT_DIR / "ztunnel.service").read_text())["Service"]
    assert "ProtectKernelTunables" not in svc
    assert not any(p.startswith(("/proc/sys", "-/proc/sys"))
                   for v in svc.get("ReadOnlyPaths", []) + svc.get("InaccessiblePaths", [])
                   for p in v.split())
    for name in ("ambit-control-plane.service", "waypoint@.service"):  # they write none
        assert _parse((UNIT_DIR / name).read_text())["Service"]["ProtectKernelTunables"] == [
            "yes"]


@pytest.mark.parametrize("name", ("ambit-control-plane.service", "waypoint@.service"))
def test_control_plane_and_waypoint_hold_no_capabilities(name: str) -> None:
    svc = _parse((UNIT_DIR / name).read_text())["Service"]
    assert svc["CapabilityBoundingSet"] == [""]
    assert svc["DynamicUser"] == ["yes"]


CREDENTIALS_DIR = "/run/credentials/unit"


def _exec_argv(name: str, env: dict[str, str]) -> tuple[str, list[str]]:
    """ExecStart= of a unit with ${VAR}/$VAR expanded from `env` and %I/%i filled in."""
    line = _parse((UNIT_DIR / name).read_text())["Service"]["ExecStart"][0]
    line = (line.replace("%I", "shop/waypoint").replace("%i", "shop-waypoint")
            .replace("%d", CREDENTIALS_DIR))
    argv: list[str] = []
    for word in shlex.split(line):
        if word.startswith("$") and not word.startswith("${"):
            argv.extend(env.get(word[1:], "").split())  # $VAR: split into words, as systemd
            continue
        expanded = word
        for k, v in env.items():
            expanded = expanded.replace("${" + k + "}", v)
        argv.append(expanded)
    return os.path.basename(argv[0]), argv[1:]


def test_exec_start_lines_parse_with_the_real_command_lines() -> None:
    """The units call the console scripts with options they really have."""
    from config.cli import build_parser as ambit_parser
    from waypoint.cli import build_parser as waypoint_parser
    from ztunnel.cli import build_parser as ztunnel_parser

    env = {"AMBIT_NODE": "node-1", "AMBIT_CONTROL_PLANE": "cp.example.org:15012",
           "AMBIT_CP_ARGS": "--listen 0.0.0.0:15443"}
    prog, args = _exec_argv("ambit-control-plane.service", env)
    assert prog == "ambit"
    cp = ambit_parser().parse_args(args)
    assert cp.data_dir == "/var/lib/ambit/control-plane" and cp.listen == "0.0.0.0:15443"
    prog, args = _exec_argv("ztunnel.service", env)
    assert prog == "ztunnel"
    zt = ztunnel_parser().parse_args(args)
    assert (zt.node, zt.control_plane) == ("node-1", "cp.example.org:15012")
    assert zt.token_file == f"{CREDENTIALS_DIR}/token" and zt.token == ""
    svc = _parse((UNIT_DIR / "ztunnel.service").read_text())["Service"]
    stop = int(svc["TimeoutStopSec"][0].removesuffix("s"))
    assert 0 < zt.drain_timeout < stop, "the drain must end before systemd kills ztunnel"
    prog, args = _exec_argv("waypoint@.service", env)
    assert prog == "waypoint"
    wp = waypoint_parser().parse_args(args)
    assert wp.gateway == ("shop", "waypoint")  # parsed to (namespace, name)
    assert wp.token_file == f"{CREDENTIALS_DIR}/token" and wp.token == ""


@pytest.mark.parametrize(
    ("name", "source"),
    [("ztunnel.service", "/etc/ambit/ztunnel.token"),
     ("waypoint@.service", "/etc/ambit/waypoint/%i.token")],
)
def test_join_tokens_are_credentials_never_command_line_words(name: str, source: str) -> None:
    """/proc/PID/cmdline is world-readable: the token comes from a systemd credential."""
    svc = _parse((UNIT_DIR / name).read_text())["Service"]
    exec_start = svc["ExecStart"][0]
    assert "--token " not in exec_start and "TOKEN" not in exec_start, exec_start
    assert "--token-file %d/token" in exec_start
    assert svc["LoadCredential"] == [f"token:{source}"]
    # an empty fallback once the token file is deleted after the first join
    assert svc["SetCredential"] == ["token:\\n"]
