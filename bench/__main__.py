"""`python -m bench`: HBONE vs a TLS relay pair, stunnel and direct; writes RESULTS.md."""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path

from bench.harness import PATHS, PathResult, Settings, run
from bench.measure import exit_on_signal
from bench.report import (
    Machine,
    load_results_json,
    machine_info,
    plot,
    render_markdown,
    results_json,
)

HERE = Path(__file__).resolve().parent
QUICK_OUT = Path(tempfile.gettempdir()) / "ambit-bench-quick"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the HBONE tunnel against (b) a Python mTLS relay pair, "
        "(c) stunnel and (d) direct, on loopback, in one run.",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: about a minute")
    p.add_argument(
        "--only",
        action="append",
        choices=sorted(PATHS),
        help="measure only this path (repeatable); default: all",
    )
    p.add_argument("--seconds", type=int, help="iperf3 duration per run (default 5, quick 1)")
    p.add_argument("--rtt-count", type=int, help="round trips per run (default 20000, quick 2000)")
    p.add_argument(
        "--conn-count", type=int, help="connections per run for the rate (default 1000, quick 200)"
    )
    p.add_argument(
        "--repeat", type=int, help="runs per path, medians reported (default 3, quick 1)"
    )
    p.add_argument("--profile", action="store_true", help="also sample relays with py-spy")
    p.add_argument(
        "--out",
        type=Path,
        help="directory for RESULTS.md, results.json and results.png (default: bench/, or "
        "a directory under /tmp with --quick so a smoke run never replaces the recorded "
        "results)",
    )
    p.add_argument(
        "--analysis",
        type=Path,
        default=HERE / "analysis.md",
        help="hand-written notes included in RESULTS.md (default: bench/analysis.md if present)",
    )
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument(
        "--render-from",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: rewrite RESULTS.md and the plot from a saved results.json "
        "(e.g. after editing the analysis notes)",
    )
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Defaults, then --quick, then explicit values."""
    quick = bool(args.quick)
    return Settings(
        seconds=args.seconds if args.seconds is not None else (1 if quick else 5),
        rtt_count=args.rtt_count if args.rtt_count is not None else (2000 if quick else 20_000),
        conn_count=args.conn_count if args.conn_count is not None else (200 if quick else 1000),
        repeat=args.repeat if args.repeat is not None else (1 if quick else 3),
        paths=tuple(n for n in PATHS if not args.only or n in args.only),
        profile=bool(args.profile),
    )


def write_outputs(
    out: Path,
    results: list[PathResult],
    machine: Machine,
    settings: Settings,
    *,
    command: str,
    analysis_file: Path,
    with_plot: bool,
) -> None:
    """RESULTS.md, results.json and (optionally) results.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_name = None
    if with_plot:
        plot(results, out / "results.png")
        plot_name = "results.png"
    analysis = analysis_file.read_text() if analysis_file.is_file() else ""
    (out / "RESULTS.md").write_text(
        render_markdown(
            results, machine, settings, command=command, plot_name=plot_name, analysis=analysis
        )
    )
    (out / "results.json").write_text(results_json(results, machine, settings, command=command))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_signal)
    if args.render_from is not None:
        try:
            results, machine, settings, command = load_results_json(args.render_from.read_text())
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"bench: cannot read {args.render_from}: {exc}", file=sys.stderr)
            return 2
        write_outputs(
            args.out or HERE,
            results,
            machine,
            settings,
            command=command,
            analysis_file=args.analysis,
            with_plot=not args.no_plot,
        )
        print(f"wrote {(args.out or HERE) / 'RESULTS.md'} from {args.render_from}")
        return 0
    if shutil.which("iperf3") is None:
        print(
            "bench: iperf3 is not installed: `make deps` or apt-get install iperf3", file=sys.stderr
        )
        return 2
    settings = settings_from_args(args)
    if min(settings.seconds, settings.rtt_count, settings.conn_count, settings.repeat) < 1:
        print(
            "bench: --seconds, --rtt-count, --conn-count and --repeat must be >= 1",
            file=sys.stderr,
        )
        return 2
    now = datetime.datetime.now(datetime.UTC)
    load_before = os.getloadavg()
    results = run(settings, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    out: Path = args.out or (QUICK_OUT if args.quick else HERE)
    command = "python -m bench " + shlex.join(sys.argv[1:] if argv is None else argv)
    write_outputs(
        out,
        results,
        machine_info(now, load_before),
        settings,
        command=command.strip(),
        analysis_file=args.analysis,
        with_plot=not args.no_plot,
    )
    for r in results:
        if r.error is not None:
            print(f"{r.name}: FAILED: {r.error}")
        else:
            print(
                f"{r.name:8s} {r.gbps_single:6.2f} Gbit/s x1 {r.gbps_multi:6.2f} Gbit/s x8 "
                f"rtt {r.rtt_median_us:7.1f} us p99 {r.rtt_p99_us:7.1f} us "
                f"{r.conn_per_s:6.0f} conn/s"
            )
    print(f"wrote {out / 'RESULTS.md'}")
    return 1 if any(r.error is not None for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
