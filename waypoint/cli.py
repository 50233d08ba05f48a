"""The `waypoint` command line: run an L7 waypoint proxy for a Gateway."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="waypoint", description="Ambit L7 waypoint proxy.")
    p.add_argument("--gateway", required=True, metavar="NS/NAME", help="the waypoint Gateway")
    p.add_argument("--control-plane", required=True, metavar="HOST:PORT")
    p.add_argument("--token", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("waypoint: the L7 proxy is not built yet", file=sys.stderr)
    return 2
