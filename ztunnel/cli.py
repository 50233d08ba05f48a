"""The `ztunnel` command line: run the node proxy."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ztunnel", description="Ambit node proxy (ztunnel).")
    p.add_argument("--node", required=True, help="name of this node")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--control-plane", metavar="HOST:PORT", help="control plane address")
    src.add_argument("--local-config", metavar="FILE", help="static snapshot file")
    p.add_argument("--token", help="join token (with --control-plane)")
    p.add_argument("--data-dir", default="/var/lib/ambit/ztunnel", help="state directory")
    return p


def main(argv: list[str] | None = None) -> int:
    build_parser().parse_args(argv)
    print("ztunnel: the node proxy is not built yet", file=sys.stderr)
    return 2
