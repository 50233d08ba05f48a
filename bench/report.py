"""Benchmark report: goal verdicts, the RESULTS.md text, a JSON dump and the PNG plot."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import shutil
import ssl
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from bench.harness import PathResult, Settings
from bench.measure import cpu_model

THROUGHPUT_SHARE_OF_TLS = 0.90
MEASURED_CODE = ("ztunnel/hbone", "ztunnel/tls.py", "ztunnel/identity.py", "bench/*.py")
RTT_MARGIN_US = 15.0


@dataclass(frozen=True)
class Goal:
    """One goal of the benchmark and whether this run met it (None: not measured)."""

    text: str
    met: bool | None
    detail: str


@dataclass(frozen=True)
class Machine:
    """Where the numbers come from."""

    date: str
    nproc: int
    cpu: str
    kernel: str
    python: str
    openssl: str
    packages: dict[str, str]
    tools: dict[str, str]
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    revision: str = ""


def _first_line(cmd: Sequence[str]) -> str:
    if shutil.which(cmd[0]) is None:
        return "not installed"
    proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=10, check=False)
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    for ln in lines:
        if Path(cmd[0]).name.startswith("stunnel") and not ln.startswith("stunnel"):
            continue
        return ln.strip()
    return "unknown"


def code_revision(repo: Path) -> str:
    """The commit measured, and whether the HBONE or bench code differed from it."""
    if shutil.which("git") is None:
        return ""
    head = subprocess.run(
        ["git", "-C", str(repo), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    )
    if head.returncode != 0:
        return ""
    dirty = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", *MEASURED_CODE],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    note = f" with uncommitted changes in {', '.join(MEASURED_CODE)}" if dirty else ""
    return head.stdout.strip() + note


def machine_info(
    now: datetime.datetime, load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
) -> Machine:
    """Facts about this machine and the software versions in play (load: 1/5/15 min)."""
    packages = {}
    for dist in ("uvloop", "h2", "hpack", "cryptography"):
        try:
            packages[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            packages[dist] = "not installed"
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"
    return Machine(
        date=now.strftime("%Y-%m-%d %H:%M UTC"),
        nproc=os.cpu_count() or 0,
        cpu=cpu_model(),
        kernel=platform.release(),
        python=platform.python_version(),
        openssl=ssl.OPENSSL_VERSION,
        packages=packages,
        tools={
            "iperf3": _first_line(["iperf3", "--version"]),
            "stunnel": _first_line([stunnel, "-version"]),
        },
        load_before=load_before,
        load_after=os.getloadavg(),
        revision=code_revision(Path(__file__).resolve().parents[1]),
    )


def _by_name(results: Sequence[PathResult]) -> dict[str, PathResult]:
    return {r.name: r for r in results if r.error is None}


def evaluate_goals(results: Sequence[PathResult]) -> list[Goal]:
    """The issue's goals: HBONE >= 90% of (b)'s throughput, RTT within 15 us of (b), >= (c)."""
    ok = _by_name(results)
    errors = {r.name: r.error for r in results if r.error is not None}
    goals: list[Goal] = []

    def missing(*names: str) -> str | None:
        gone = [n for n in names if n not in ok]
        if not gone:
            return None
        return "; ".join(f"{n} not measured: {errors.get(n, 'not selected')}" for n in gone)

    for attr, what in (("gbps_single", "1 stream"), ("gbps_multi", "8 streams")):
        text = f"HBONE throughput >= {THROUGHPUT_SHARE_OF_TLS:.0%} of (b), {what}"
        why = missing("hbone", "tls")
        if why:
            goals.append(Goal(text, None, why))
        else:
            h, b = getattr(ok["hbone"], attr), getattr(ok["tls"], attr)
            share = h / b if b else 0.0
            met = share >= THROUGHPUT_SHARE_OF_TLS
            detail = f"{h:.2f} vs {b:.2f} Gbit/s = {share:.0%} of (b)"
            if not met:
                short = THROUGHPUT_SHARE_OF_TLS * b - h
                detail += f"; short by {short:.2f} Gbit/s ({THROUGHPUT_SHARE_OF_TLS - share:.0%})"
            goals.append(Goal(text, met, detail))

    text = f"HBONE median RTT within {RTT_MARGIN_US:.0f} us of (b)"
    why = missing("hbone", "tls")
    if why:
        goals.append(Goal(text, None, why))
    else:
        diff = ok["hbone"].rtt_median_us - ok["tls"].rtt_median_us
        met = diff <= RTT_MARGIN_US
        detail = (
            f"{ok['hbone'].rtt_median_us:.1f} vs {ok['tls'].rtt_median_us:.1f} us = {diff:+.1f} us"
        )
        if not met:
            detail += f"; over by {diff - RTT_MARGIN_US:.1f} us"
        goals.append(Goal(text, met, detail))

    for attr, what in (("gbps_single", "1 stream"), ("gbps_multi", "8 streams")):
        text = f"HBONE throughput >= (c) stunnel, {what}"
        why = missing("hbone", "stunnel")
        if why:
            goals.append(Goal(text, None, why))
        else:
            h, c = getattr(ok["hbone"], attr), getattr(ok["stunnel"], attr)
            met = h >= c
            detail = f"{h:.2f} vs {c:.2f} Gbit/s = {h / c if c else 0.0:.0%} of (c)"
            if not met:
                detail += f"; short by {c - h:.2f} Gbit/s"
            goals.append(Goal(text, met, detail))
    return goals


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _spread(r: PathResult, key: str, spec: str) -> str:
    """`median (min-max)` over the runs of `r`, or just the median for one run."""
    median = getattr(r, key)
    values = [v for run in r.runs if (v := run.get(key)) is not None]
    if median is None:
        return "n/a"
    if len(values) < 2:
        return format(median, spec)
    return f"{median:{spec}} ({min(values):{spec}}-{max(values):{spec}})"


def ratio_rows(results: Sequence[PathResult]) -> list[tuple[str, ...]]:
    """HBONE relative to each baseline: (baseline, x1, x8, rtt diff, conn/s, cpu ratio)."""
    ok = _by_name(results)
    if "hbone" not in ok:
        return []
    h = ok["hbone"]
    rows: list[tuple[str, ...]] = []
    for name in ("tls", "stunnel", "direct"):
        if name not in ok:
            continue
        b = ok[name]
        cpu = (
            f"{h.cpu_s_per_gb_single / b.cpu_s_per_gb_single:.2f}x"
            if h.cpu_s_per_gb_single and b.cpu_s_per_gb_single
            else "n/a"
        )
        rows.append(
            (
                b.label,
                f"{h.gbps_single / b.gbps_single:.0%}" if b.gbps_single else "n/a",
                f"{h.gbps_multi / b.gbps_multi:.0%}" if b.gbps_multi else "n/a",
                f"{h.rtt_median_us - b.rtt_median_us:+.1f} us",
                f"{h.conn_per_s / b.conn_per_s:.0%}" if b.conn_per_s else "n/a",
                cpu,
            )
        )
    return rows


def render_markdown(
    results: Sequence[PathResult],
    machine: Machine,
    settings: Settings,
    *,
    command: str,
    plot_name: str | None,
    analysis: str = "",
) -> str:
    """The text of RESULTS.md for one run."""
    out: list[str] = ["# HBONE benchmark results", ""]
    out += [
        "Produced by one run of the harness on one machine; every path is measured in the same",
        "run, interleaved, and each figure is the median over the repeats.",
        "",
        "```",
        command,
        "```",
        "",
        f"- date: {machine.date}"
        + (f"; code: commit {machine.revision}" if machine.revision else ""),
        f"- machine: {machine.nproc} CPUs ({machine.cpu}), Linux {machine.kernel}",
        f"- Python {machine.python}, {machine.openssl}; "
        + ", ".join(f"{k} {v}" for k, v in machine.packages.items()),
        f"- {machine.tools['iperf3']}; {machine.tools['stunnel']}",
        "- load average (1/5/15 min) before the run: "
        + "/".join(f"{x:.2f}" for x in machine.load_before)
        + ", after: "
        + "/".join(f"{x:.2f}" for x in machine.load_after)
        + " (anything above 0 besides this run is other work sharing the CPUs)",
        f"- settings: iperf3 {settings.seconds:g} s per run (1 stream, then `-P 8`), "
        f"{settings.rtt_count} 1-byte round trips (TCP_NODELAY), {settings.conn_count} new "
        f"connections, {settings.repeat} repeat(s)",
        "- all processes on 127.0.0.1; TLS 1.3 with TLS_AES_256_GCM_SHA384, ECDSA P-256 "
        "SPIFFE certificates, client certificates required on every TLS hop",
        "",
        "## Paths",
        "",
        "- (a) HBONE: `bench.hbone client` accepts plain TCP and opens an HBONE stream "
        "(ztunnel.hbone pool) to `bench.hbone server` (ztunnel.hbone server), which connects "
        "to the target.",
        "- (b) `bench.relays tls-client` / `tls-server`: the same shape with plain mTLS, no "
        "HTTP/2 (buffered uvloop protocols, one TLS connection per TCP connection).",
        "- (c) two `stunnel` processes, client and server mode, the same certificates.",
        "- (d) the client talks to the target directly.",
        "",
        "## Results",
        "",
        "Each cell: median over the runs, and (when there are several) the lowest and highest run.",
        "",
        "| path | 1 stream Gbit/s | 8 streams Gbit/s | RTT median us | RTT p99 us "
        "| relay CPU us per round trip | new connections/s "
        "| relay CPU-s/GB (1 / 8 streams) | relay RSS MiB "
        "| other load, CPUs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if r.error is not None:
            out.append(f"| {r.label} | failed: {r.error} | | | | | | | | |")
            continue
        out.append(
            f"| {r.label} | {_spread(r, 'gbps_single', '.2f')} "
            f"| {_spread(r, 'gbps_multi', '.2f')} | {_spread(r, 'rtt_median_us', '.1f')} "
            f"| {_spread(r, 'rtt_p99_us', '.0f')} | {_spread(r, 'relay_cpu_per_rtt_us', '.1f')} "
            f"| {_spread(r, 'conn_per_s', '.0f')} "
            f"| {_spread(r, 'cpu_s_per_gb_single', '.2f')} / "
            f"{_spread(r, 'cpu_s_per_gb_multi', '.2f')} | {_fmt(r.relay_rss_mib, '.1f')} "
            f"| {_spread(r, 'other_cpus', '.2f')} |"
        )
    out += [
        "",
        "CPU-s/GB: user+system CPU seconds of both relay processes (from /proc/PID/stat) "
        "per 10^9 bytes received by iperf3. Relay CPU per round trip: the same, over the "
        "1-byte round trips (both relays together, each handles one message each way). "
        "New connections/s: one client opening "
        "connections one after another (connect, one 1-byte round trip, close); for (b) and "
        "(c) each is a new TLS handshake, for (a) a new stream on the pooled HBONE "
        "connection. Other load: CPU time used by processes that are not part of the benchmark "
        "while the throughput runs of that path ran (from /proc/stat), in CPUs; "
        f"{machine.nproc}.00 would mean no CPU left for the benchmark at all.",
        "",
    ]
    failed = [r for r in results if r.error is None and r.failed_runs]
    if failed:
        out += [
            "Runs that failed and are not in the medians: "
            + ", ".join(
                f"{r.label}: {r.failed_runs} of {r.failed_runs + r.samples}" for r in failed
            ),
            "",
        ]
    rows = ratio_rows(results)
    if rows:
        out += [
            "## HBONE relative to each baseline",
            "",
            "| baseline | throughput, 1 stream | throughput, 8 streams | median RTT "
            "| new connections/s | CPU per GB |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        out += [f"| {' | '.join(row)} |" for row in rows]
        out.append("")
    out += ["## Goals", ""]
    for g in evaluate_goals(results):
        mark = {True: "met", False: "MISSED", None: "not measured"}[g.met]
        out.append(f"- **{mark}**: {g.text}: {g.detail}")
    out.append("")
    if plot_name is not None:
        out += ["## Plot", "", f"![throughput, latency and CPU per path]({plot_name})", ""]
    if analysis.strip():
        out += ["## Analysis", "", analysis.strip(), ""]
    traced = [r for r in results if r.syscalls]
    if traced:
        out += [
            "## System calls per GB (strace, separate unmeasured run: `iperf3 -n 1000000000`, "
            "1 stream)",
            "",
            "Counts do not depend on how busy the machine is. `<1KiB`: calls moving less than "
            "1 KiB (on a tunnel: control frames such as WINDOW_UPDATE, not payload).",
            "",
            "| path | relay | system call | calls per GB | mean bytes per call |",
            "|---|---|---|---:|---:|",
        ]
        for r in traced:
            for side, call, per_gb, mean in r.syscalls:
                out.append(f"| {r.label} | {side} | {call} | {per_gb:.0f} | {mean:.0f} |")
        out.append("")
    profiled = [r for r in results if r.profile]
    if profiled:
        out += [
            "## Profile (py-spy --native; separate, unmeasured runs: "
            "single-stream iperf3, 1-byte ping-pongs, new connections)",
            "",
        ]
        for r in profiled:
            for part, frames in r.profile.items():
                out += [f"{r.label}, {part} (% of samples):", "", "```"]
                out += [f"{share:5.1f}%  {frame}" for frame, share in frames]
                out += ["```", ""]
    return "\n".join(out)


def results_json(
    results: Sequence[PathResult], machine: Machine, settings: Settings, *, command: str
) -> str:
    """Everything measured, machine-readable."""
    doc = {
        "command": command,
        "machine": dataclasses.asdict(machine),
        "settings": dataclasses.asdict(settings),
        "results": [dataclasses.asdict(r) for r in results],
        "goals": [dataclasses.asdict(g) for g in evaluate_goals(results)],
    }
    return json.dumps(doc, indent=2) + "\n"


def load_results_json(text: str) -> tuple[list[PathResult], Machine, Settings, str]:
    """Read back what `results_json` wrote: (results, machine, settings, command)."""
    doc = json.loads(text)
    m = dict(doc["machine"])
    m["load_before"] = tuple(m.get("load_before", (0.0, 0.0, 0.0)))
    m["load_after"] = tuple(m.get("load_after", (0.0, 0.0, 0.0)))
    machine = Machine(**m)
    st = dict(doc["settings"])
    st["paths"] = tuple(st["paths"])
    settings = Settings(**st)
    results = []
    for raw in doc["results"]:
        r = dict(raw)
        r["profile"] = {k: [(f, float(v)) for f, v in frames] for k, frames in r["profile"].items()}
        r["syscalls"] = [tuple(row) for row in r.get("syscalls", [])]
        results.append(PathResult(**r))
    return results, machine, settings, str(doc.get("command", "python -m bench"))


def _errors(rs: Sequence[PathResult], key: str) -> tuple[list[float], list[float]]:
    """Distances from the median down to the lowest run and up to the highest."""
    lo, hi = [], []
    for r in rs:
        median = getattr(r, key) or 0.0
        values = [v for run in r.runs if (v := run.get(key)) is not None] or [median]
        lo.append(max(median - min(values), 0.0))
        hi.append(max(max(values) - median, 0.0))
    return lo, hi


def plot(results: Sequence[PathResult], path: Path) -> None:
    """Three bar charts (throughput, round trip, CPU per GB) as one PNG; whiskers span the
    lowest to the highest run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.error is None]
    labels = [r.label.split(" ", 1)[0] + "\n" + r.name for r in ok]
    xs = list(range(len(ok)))
    w = 0.38
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    charts = (
        ("iperf3 throughput (Gbit/s)", ("gbps_single", "1 stream"), ("gbps_multi", "8 streams")),
        ("1-byte round trip (us, log scale)", ("rtt_median_us", "median"), ("rtt_p99_us", "p99")),
        (
            "relay CPU seconds per GB",
            ("cpu_s_per_gb_single", "1 stream"),
            ("cpu_s_per_gb_multi", "8 streams"),
        ),
    )
    for ax, (title, *series) in zip(axes, charts, strict=True):
        for offset, (key, label) in zip((-w / 2, w / 2), series, strict=True):
            ax.bar(
                [x + offset for x in xs],
                [getattr(r, key) or 0.0 for r in ok],
                w,
                yerr=_errors(ok, key),
                capsize=3,
                label=label,
            )
        ax.set_title(title)
        ax.legend()
        ax.set_xticks(xs, labels)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
