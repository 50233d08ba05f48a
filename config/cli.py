"""The `ambit` command line: control plane and client commands."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ambit", description="Ambit service mesh control.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="build a sandbox mesh, drive traffic, show what it did")
    sub.add_parser("check", help="preflight checks for this host")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        print("ambit demo: not yet (the demo lands with the operations issue)")
        return 0
    if args.command == "check":
        from netsetup.check import run_cli

        return run_cli()
    print(f"ambit {args.command}: not implemented", file=sys.stderr)
    return 2
