"""The `python -m netsetup` command line: capture preflight and sandbox cleanup."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsetup", description="Ambit capture plumbing.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check that this host can capture traffic")
    args = p.parse_args(argv)
    if args.command == "check":
        from netsetup.check import run_cli

        return run_cli()
    return 2
