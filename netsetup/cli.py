"""The `python -m netsetup` command line: capture preflight and sandbox cleanup."""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="netsetup", description="Ambit capture plumbing.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="check that this host can capture traffic")
    c = sub.add_parser("cleanup", help="remove sandbox netns left behind by a crashed run")
    c.add_argument("prefix", help="name prefix of the sandbox (e.g. the demo's 'ambdemo')")
    args = p.parse_args(argv)
    if args.command == "check":
        from netsetup.check import run_cli

        return run_cli()
    if args.command == "cleanup":
        from netsetup.sandbox import cleanup_leftovers

        if len(args.prefix) < 3:
            p.error("prefix must be at least 3 characters, so unrelated netns are never matched")
        removed = cleanup_leftovers(args.prefix)
        for name in removed:
            print(f"removed netns {name}")
        if not removed:
            print(f"no netns starting with {args.prefix!r}")
        return 0
    return 2
