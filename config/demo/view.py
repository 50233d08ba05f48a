"""The demo's live view: a `rich` panel refreshed in place, or plain lines when not a tty."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TextIO

from config.demo import report


@dataclass(frozen=True)
class LiveState:
    """What the view shows: measurements so far."""

    elapsed: float
    duration: float
    shop: list[report.RequestResult] = field(default_factory=list)
    legacy: list[report.RequestResult] = field(default_factory=list)
    edges: list[report.Edge] = field(default_factory=list)
    waypoint: str = ""


def plain_line(s: LiveState) -> str:
    """One periodic line summarising `s` (pure)."""
    c = report.group_counts(s.shop)
    lc = report.group_counts(s.legacy)
    la = report.latency(s.shop)
    v1, v2 = c.get("v1", 0), c.get("v2", 0)
    split = f"v1 {v1 / (v1 + v2):.0%}" if v1 + v2 else "v1 -"
    lat = f"p50 {la.p50:.1f} ms p99 {la.p99:.1f} ms" if la else "p50 -"
    conns = sum(e.connections for e in s.edges)
    mtls = sum(e.connections for e in s.edges if e.security == (report.MUTUAL_TLS,))
    return (f"[{s.elapsed:4.0f}/{s.duration:.0f}s] shop {c.get('ok', 0)}/{c.get('total', 0)} "
            f"answered, {split}, {lat} | legacy {lc.get('total', 0)} attempts, "
            f"{lc.get('ok', 0) + lc.get('http_error', 0)} answered | mesh {conns} conns, "
            f"{mtls} mTLS")


class View:
    """Context manager: `update(state)` redraws (live) or prints a line every few seconds."""

    def __init__(self, live: bool, out: TextIO = sys.stdout, every: float = 5.0) -> None:
        self.live = live
        self.out = out
        self.every = every
        self._live: Any = None
        self._last = -1e9

    def __enter__(self) -> View:
        if self.live:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(console=Console(file=self.out), refresh_per_second=4,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.__exit__(exc_type, exc, tb)
            self._live = None

    def update(self, s: LiveState) -> None:
        if self._live is not None:
            self._live.update(self.panel(s))
            return
        if s.elapsed - self._last >= self.every:
            self._last = s.elapsed
            print(plain_line(s), file=self.out, flush=True)

    @staticmethod
    def panel(s: LiveState) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        c = report.group_counts(s.shop)
        lc = report.group_counts(s.legacy)
        la = report.latency(s.shop)
        v1, v2 = c.get("v1", 0), c.get("v2", 0)
        shown = min(s.elapsed, s.duration)
        top = Table.grid(padding=(0, 2))
        top.add_column(no_wrap=True)
        top.add_column(overflow="ellipsis", no_wrap=True)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=max(s.duration, 1e-9), completed=shown, width=30),
                    f"{shown:.0f}/{s.duration:.0f} s")
        top.add_row("progress", bar)
        top.add_row("shop requests", f"{c.get('ok', 0)} answered of {c.get('total', 0)}, "
                    f"{c.get('http_error', 0) + c.get('no_answer', 0)} failed")
        top.add_row("catalog split", f"v1 {v1}  v2 {v2}"
                    + (f"  ({v1 / (v1 + v2):.1%} v1)" if v1 + v2 else ""))
        top.add_row("latency", f"p50 {la.p50:.1f} ms  p99 {la.p99:.1f} ms" if la else "-")
        top.add_row("legacy", f"{lc.get('total', 0)} attempts, "
                    f"{lc.get('ok', 0) + lc.get('http_error', 0)} answered")
        top.add_row("waypoint", s.waypoint or "-")
        edges = Table(title="connections seen by the ztunnels", expand=False)
        for col in ("from", "to", "conns", "denied", "security", "from identity"):
            edges.add_column(col, justify="right" if col in ("conns", "denied") else "left",
                             no_wrap=True)

        def name(wl: str, ns: str) -> str:
            return wl if ns == "shop" else f"{ns}/{wl}"

        for e in s.edges:
            sec = "/".join(e.security) or "-"
            edges.add_row(name(e.source, e.source_ns), name(e.destination, e.destination_ns),
                          str(e.connections), str(e.denied),
                          f"[green]{sec}[/green]" if sec == report.MUTUAL_TLS else
                          f"[red]{sec}[/red]",
                          ", ".join(p.split("/", 5)[-1] for p in e.source_principals)
                          or "-")
        return Panel(Group(top, edges), title="ambit demo: what the mesh is doing")
