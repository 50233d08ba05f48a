"""`ambit demo`: a two-node sandbox mesh with a small shop app, driven and measured."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `ambit demo` options (kept here so building the CLI parser stays cheap)."""
    p.description = ("Build a two-node sandbox mesh (control plane, ztunnels, a waypoint, "
                     "a small shop app), drive traffic, and print what the mesh did, "
                     "measured from its proxies and the app.")
    p.epilog = ("exit status: 0 measurements agree with the configuration, 3 they "
                "contradict it, 1 setup failed, 130 interrupted. Needs root.")
    p.add_argument("--duration", type=float, default=30.0, metavar="SECONDS",
                   help="how long to drive traffic (default 30)")
    p.add_argument("--rate", type=float, default=20.0, metavar="RPS",
                   help="requests per second of the shop's load generator (default 20)")
    p.add_argument("--keep", action="store_true",
                   help="leave the sandbox running and print how to explore and remove it")
    p.add_argument("--teardown", metavar="PREFIX", default=None,
                   help="remove a sandbox left by `ambit demo --keep` (its prefix) and exit")
    p.add_argument("--no-waypoint", action="store_true",
                   help="L4 only: no waypoint, no HTTPRoute (ztunnel balances catalog)")
    p.add_argument("--prefix", default=None,
                   help="netns name prefix (default: ambdemo plus this process id)")
    p.add_argument("--plain", action="store_true",
                   help="periodic plain lines instead of the live view (default when stdout "
                        "is not a terminal)")
