"""`ambit demo` orchestration: sandbox, control plane, ztunnels, waypoint, app, load, report.

    run_from_args(args) -> int     # what `ambit demo` calls (options in config.demo)
    run(DemoOptions(...)) -> int   # exit status: 0 when the measurements agree
    teardown(prefix) -> list[str]  # what `ambit demo --teardown PREFIX` does

Every process runs in a sandbox netns, logs to the demo's state directory
(`/run/ambit-demo/PREFIX`, or $AMBIT_DEMO_DIR) and is killed by pid at the end, also on
Ctrl-C, SIGTERM and errors; with `--keep` its pids go to `state.json` there and
`teardown` finds them again.

Exit status: 0 the measurements agree with the configuration, 3 they contradict it
(each contradiction is printed), 1 the mesh could not be set up, 2 bad usage, 130
interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

from config.demo import report
from config.demo.view import LiveState, View
from config.push import write_secret

MANIFESTS = Path(__file__).parent / "manifests"
DEFAULT_ROOT = "/run/ambit-demo"
PY = sys.executable
# Placement: the client side on n1 (with the waypoint), the servers on n2.
NODES: tuple[tuple[str, ...], ...] = (
    ("loadgen", "frontend", "client", "waypoint"),
    ("catalog-v1", "catalog-v2", "inventory"),
)
SHOP = ("loadgen", "frontend", "catalog-v1", "catalog-v2", "inventory")
VIPS = {"frontend": "10.96.100.10", "catalog": "10.96.100.11", "catalog_v1": "10.96.100.12",
        "catalog_v2": "10.96.100.13", "inventory": "10.96.100.14"}
APP_PORT = 8080
INVENTORY_PORT = 9000
LEGACY_RATE = 4.0


class DemoError(Exception):
    """The demo could not be set up; the message says what failed and where to look."""


@dataclass(frozen=True)
class DemoOptions:
    duration: float = 30.0
    rate: float = 20.0
    keep: bool = False
    waypoint: bool = True
    prefix: str | None = None
    live: bool | None = None  # None: live view when stdout is a terminal
    root: str = field(default_factory=lambda: os.environ.get("AMBIT_DEMO_DIR", DEFAULT_ROOT))


def demo_root() -> Path:
    return Path(os.environ.get("AMBIT_DEMO_DIR", DEFAULT_ROOT))


def render_manifests(values: dict[str, str], waypoint: bool) -> str:
    """The demo's manifests with the sandbox's names and addresses filled in."""
    docs = []
    paths = sorted(MANIFESTS.glob("*.yaml"))
    if not paths:
        raise DemoError(f"the demo's manifests are missing ({MANIFESTS}/*.yaml): this install "
                        "lacks the package data; install from a checkout (`pip install -e .`)")
    for path in paths:
        if path.name.startswith("30-") and not waypoint:
            continue
        docs.append(string.Template(path.read_text()).substitute(values))
    return "\n---\n".join(docs)


_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never a proxy


def _http_get(url: str, timeout: float = 3.0) -> tuple[int, str]:
    try:
        with _OPENER.open(url, timeout=timeout) as resp:
            return int(resp.status), resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode(errors="replace")
    except (OSError, ValueError) as e:
        return 0, str(e)


class Demo:
    """One run: owns the sandbox, the processes and the state directory."""

    def __init__(self, opts: DemoOptions, out: TextIO = sys.stdout) -> None:
        from netsetup.sandbox import Sandbox, unique_prefix

        self.opts = opts
        self.out = out
        self.prefix = opts.prefix or unique_prefix("ambdemo")
        self.dir = Path(opts.root) / self.prefix
        self.sb = Sandbox(self.prefix, nodes=len(NODES), workload_names=[list(n) for n in NODES])
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.argv: dict[str, list[str]] = {}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
        pkg_root = str(Path(__file__).resolve().parents[2])
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pkg_root, os.environ.get("PYTHONPATH", "")) if p)
        self.socket = str(self.dir / "control.sock")
        self.waypoint_running = False
        self.waypoint_note = ""
        self.own_dir = False

    # ------------------------------------------------------------------ helpers

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def log(self, name: str) -> Path:
        return self.dir / f"{name}.log"

    def start(self, name: str, netns: str, argv: list[str]) -> subprocess.Popen[bytes]:
        # A Ctrl-C between the fork and the sandbox recording the pid would leak the
        # process: hold stop signals until it is recorded.
        with _INTERRUPTS.deferred(), open(self.log(name), "ab") as log:
            proc = self.sb.popen(netns, argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 env=self.env)
            self.procs[name] = proc
            self.argv[name] = argv
            self.write_state()  # so `--teardown` finds every pid even if this process dies
        return proc

    def tail(self, name: str, n: int = 6) -> str:
        try:
            lines = self.log(name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + ln[:300] for ln in lines[-n:])

    def wait_for(self, what: str, pred: Callable[[], bool], timeout: float,
                 watch: tuple[str, ...] = ()) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if pred():
                return
            for name in watch:
                proc = self.procs.get(name)
                if proc is not None and proc.poll() is not None:
                    raise DemoError(f"{name} exited (status {proc.returncode}) while waiting "
                                    f"for {what}; its log {self.log(name)} ends with:\n"
                                    f"{self.tail(name)}")
            if time.monotonic() > deadline:
                hints = "".join(f"\n  {n}: {self.log(n)}\n{self.tail(n)}" for n in watch)
                raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}{hints}")
            time.sleep(0.1)

    def fetch(self, netns: str, url: str, timeout: float = 3.0) -> tuple[int, str]:
        """GET `url` from inside `netns` (a thread switched into it; no subprocess)."""
        from netsetup.netns import run_in_netns

        result: tuple[int, str] = run_in_netns(netns, _http_get, url, timeout)
        return result

    def ambit(self) -> Any:
        from config.api import ApiClient

        return ApiClient(socket_path=self.socket, timeout=15)

    def ip(self, name: str) -> str:
        return self.sb.workload(name).ip

    def values(self) -> dict[str, str]:
        v = {f"{k}_vip": ip for k, ip in VIPS.items()}
        for w in self.sb.workloads:
            key = w.name.replace("-", "_")
            v[f"{key}_ip"] = w.ip
            v[f"{key}_node"] = w.node
            v[f"{key}_netns"] = w.netns
        return v

    # ------------------------------------------------------------------ steps

    def build(self) -> None:
        from netsetup.sandbox import SandboxError

        self.dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.dir.mkdir(mode=0o700)
        except FileExistsError:
            raise DemoError(f"{self.dir} exists: a demo with prefix {self.prefix} is running "
                            f"or crashed; remove it with `ambit demo --teardown {self.prefix}`"
                            ) from None
        self.own_dir = True
        try:
            self.sb.build()
        except SandboxError as e:
            raise DemoError(str(e)) from None
        self.write_state()

    def start_control_plane(self) -> None:
        argv = [PY, "-m", "config", "control-plane", "--data-dir", str(self.dir / "cp"),
                "--socket", self.socket, "--proxy-listen", f"{self.sb.fabric_ip}:15012",
                "--log-level", "info"]
        self.start("control-plane", self.sb.fabric_netns, argv)
        self.wait_for("the control plane", lambda: "ready socket=" in self.log(
            "control-plane").read_text(errors="replace"), 30, ("control-plane",))

    def apply(self, text: str) -> None:
        from config.api import ClientError
        from config.validate import ValidationFailed, load_text

        try:
            self.ambit().apply(load_text(text, "demo manifests"))
        except (ClientError, ValidationFailed) as e:
            raise DemoError(f"applying the demo's manifests failed: {e}") from None

    def start_apps(self) -> None:
        st = self.dir
        apps = {
            "inventory": ["inventory", "--port", str(INVENTORY_PORT)],
            "catalog-v1": ["catalog", "--version", "v1", "--inventory",
                           f"{VIPS['inventory']}:{INVENTORY_PORT}"],
            "catalog-v2": ["catalog", "--version", "v2", "--inventory",
                           f"{VIPS['inventory']}:{INVENTORY_PORT}"]
            + (["--fail-every", "10"] if self.opts.waypoint else []),
            "frontend": ["frontend", "--catalog", f"{VIPS['catalog']}:80"],
        }
        for name, args in apps.items():
            self.start(name, self.sb.workload(name).netns,
                       [PY, "-m", "config.demo.app", *args, "--stats",
                        str(st / f"app-{name}.json")])
        for name in apps:
            self.wait_for(f"{name} to listen", lambda n=name: "listening" in self.log(  # type: ignore[misc]
                n).read_text(errors="replace"), 20, (name,))

    def start_ztunnels(self) -> None:
        api = self.ambit()
        for node in self.sb.nodes:
            token = api.token(node=node.name)["token"]
            self.start(f"ztunnel-{node.name}", node.netns,
                       [PY, "-m", "ztunnel", "--node", node.name, "--control-plane",
                        f"{self.sb.fabric_ip}:15012", "--token-file",
                        write_secret(self.dir / f"ztunnel-{node.name}.token", token), "--data-dir",
                        str(self.dir / f"ztunnel-{node.name}"), "--drain-timeout", "1",
                        "--connect-timeout", "3"])
        for node in self.sb.nodes:
            name = f"ztunnel-{node.name}"
            want = sum(1 for w in self.sb.workloads_on(node.name) if w.name in SHOP)
            self.wait_for(
                f"{name} to enroll its {want} shop workloads",
                lambda n=name, k=want: self.log(n).read_text(  # type: ignore[misc]
                    errors="replace").count('"workload enrolled"') >= k, 30, (name,))
            self.wait_for(f"{name} to be ready", lambda ns=node.netns: self.fetch(  # type: ignore[misc]
                ns, "http://127.0.0.1:15021/healthz/ready")[0] == 200, 20, (name,))

    def start_waypoint(self) -> None:
        """Start the shop's waypoint; on failure record why (the checks report it)."""
        try:
            token = self.ambit().token(waypoint="shop/waypoint")["token"]
        except Exception as e:
            self.waypoint_note = f"no waypoint token: {e}"
            return
        netns = self.sb.workload("waypoint").netns
        self.start("waypoint", netns, [PY, "-m", "waypoint", "--gateway", "shop/waypoint",
                                       "--control-plane", f"{self.sb.fabric_ip}:15012",
                                       "--token-file",
                                       write_secret(self.dir / "waypoint.token", token),
                                       "--address", self.ip("waypoint"),
                                       "--data-dir", str(self.dir / "waypoint"),
                                       "--drain-timeout", "1"])
        try:
            self.wait_for("the waypoint to be ready", lambda: self.fetch(
                netns, "http://127.0.0.1:15021/healthz/ready")[0] == 200, 30, ("waypoint",))
        except DemoError:
            last = (self.tail("waypoint", 1).strip() or "no output")[:200]
            code = self.procs["waypoint"].poll()
            self.waypoint_note = ("the waypoint did not become ready ("
                                  + (f"exit status {code}" if code is not None else "timeout")
                                  + f", last log line: {last}); `ambit demo --no-waypoint` "
                                  "shows the L4 part alone")
            proc = self.procs.get("waypoint")
            if proc is not None and proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            return
        self.waypoint_running = True
        self.waypoint_note = f"running at {self.ip('waypoint')} (pid {self.procs['waypoint'].pid})"
        from config.api import ClientError

        try:
            self.ambit().label("Namespace", "shop", "", {"istio.io/use-waypoint": "waypoint"},
                               [])
        except ClientError as e:
            raise DemoError(f"labelling namespace shop with its waypoint failed: {e}") from None

    def wait_synced(self, timeout: float = 10.0) -> bool:
        """Wait until every connected proxy acknowledged the latest configuration."""
        from config.api import ClientError

        def synced() -> bool:
            try:
                st = self.ambit().status()
            except ClientError:
                return False
            proxies = st.get("proxies") or []
            want = len(self.sb.nodes) + (1 if self.waypoint_running else 0)
            return len(proxies) >= want and all(
                p.get("state") == "synced" and p.get("version") == st.get("version")
                for p in proxies)

        try:
            self.wait_for("the proxies to apply the latest configuration", synced, timeout)
        except DemoError:
            return False
        return True

    def warm_up(self) -> None:
        url = f"http://{VIPS['frontend']}/items/warm-up"
        last: list[tuple[int, str]] = [(0, "")]

        def answered() -> bool:
            last[0] = self.fetch(self.sb.workload("loadgen").netns, url, 5)
            return last[0][0] == 200

        try:
            self.wait_for("the first answer through the mesh", answered, 30,
                          tuple(self.procs))
        except DemoError as e:
            raise DemoError(f"{e}\n  last answer: {last[0][0] or 'none'} "
                            f"{last[0][1][:200]}") from None

    # ------------------------------------------------------------------ measuring

    def scrape(self) -> tuple[list[report.Sample], list[report.Sample]]:
        tcp: list[report.Sample] = []
        for node in self.sb.nodes:
            code, text = self.fetch(node.netns, "http://127.0.0.1:15020/metrics")
            if code == 200:
                tcp += report.parse_metrics(text)
        l7: list[report.Sample] = []
        if self.waypoint_running:
            code, text = self.fetch(self.sb.workload("waypoint").netns,
                                    "http://127.0.0.1:15020/metrics")
            if code == 200:
                l7 = report.parse_metrics(text)
        return tcp, l7

    def results(self, name: str) -> list[report.RequestResult]:
        try:
            text = (self.dir / f"{name}.jsonl").read_text(errors="replace")
        except OSError:
            return []
        return report.parse_results(text.splitlines())

    def denials(self) -> list[report.Denial]:
        out: list[report.Denial] = []
        for node in self.sb.nodes:
            try:
                lines = self.log(f"ztunnel-{node.name}").read_text(errors="replace")
            except OSError:
                continue
            out += report.parse_denials(node.name, lines.splitlines())
        return out

    def app_stats(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name in ("frontend", "catalog-v1", "catalog-v2", "inventory"):
            with contextlib.suppress(OSError, ValueError):
                out[name] = json.loads((self.dir / f"app-{name}.json").read_text())
        return out

    def drive(self, view: View) -> report.Measurements:
        d = self.opts.duration
        lg = self.start("loadgen", self.sb.workload("loadgen").netns,
                        [PY, "-m", "config.demo.app", "loadgen", "--target",
                         f"{VIPS['frontend']}:80", "--rate", str(self.opts.rate), "--duration",
                         str(d), "--out", str(self.dir / "loadgen.jsonl")])
        legacy = self.start("legacy-loadgen", self.sb.workload("client").netns,
                            [PY, "-m", "config.demo.app", "loadgen", "--target",
                             f"{self.ip('frontend')}:{APP_PORT}", "--target",
                             f"{self.ip('catalog-v1')}:{APP_PORT}", "--rate", str(LEGACY_RATE),
                             "--duration", str(d), "--timeout", "2", "--out",
                             str(self.dir / "legacy-loadgen.jsonl")])
        t0 = time.monotonic()
        last_scrape = 0.0
        tcp: list[report.Sample] = []
        with view:
            while True:
                now = time.monotonic()
                if now - last_scrape >= 1.0:
                    tcp, _ = self.scrape()
                    last_scrape = now
                view.update(LiveState(
                    elapsed=now - t0, duration=d, shop=self.results("loadgen"),
                    legacy=self.results("legacy-loadgen"), edges=report.edges(tcp),
                    waypoint=self.waypoint_note if self.opts.waypoint else "off (--no-waypoint)"))
                if lg.poll() is not None and legacy.poll() is not None:
                    break
                if now - t0 > d + 30:
                    raise DemoError("the load generators did not stop 30 s after their "
                                    f"duration; see {self.log('loadgen')}")
                time.sleep(0.5)
        time.sleep(1.0)  # let the proxies account the last connections as closed
        tcp, l7 = self.scrape()
        return report.Measurements(
            duration_s=d, shop=tuple(self.results("loadgen")),
            legacy=tuple(self.results("legacy-loadgen")), legacy_ip=self.ip("client"),
            tcp=tuple(tcp), denials=tuple(self.denials()),
            waypoint_running=self.waypoint_running, waypoint_note=self.waypoint_note,
            l7=tuple(l7), app=self.app_stats())

    # ------------------------------------------------------------------ state

    def write_state(self) -> None:
        state = {
            "prefix": self.prefix, "dir": str(self.dir), "socket": self.socket,
            "netns": self.sb.netns_names,
            "processes": [{"name": n, "pid": p.pid, "argv": self.argv.get(n, [])}
                          for n, p in self.procs.items() if p.poll() is None],
        }
        tmp = self.dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2))
        os.replace(tmp, self.dir / "state.json")

    def close(self) -> None:
        self.sb.teardown()
        if self.own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.dir.parent.rmdir()  # only when no other demo is in there

    def explore_text(self) -> str:
        n1, n2 = self.sb.nodes[0].netns, self.sb.nodes[1].netns
        lg = self.sb.workload("loadgen").netns
        legacy = self.sb.workload("client").netns
        pids = " ".join(str(p.pid) for p in self.procs.values() if p.poll() is None)
        ambit = "ambit" if shutil.which("ambit") else f"{PY} -m config"
        return "\n".join([
            f"The demo mesh {self.prefix} is still running (processes {pids}).",
            "Explore it:",
            f"  ip netns exec {lg} curl -s http://{VIPS['frontend']}/items/sku-1",
            f"  ip netns exec {legacy} curl -sv -m 3 http://{self.ip('frontend')}:{APP_PORT}/"
            "   # refused: not in the mesh",
            f"  {ambit} --socket {self.socket} status",
            f"  {ambit} --socket {self.socket} get workloadentries -n shop",
            f"  ip netns exec {n1} curl -s http://127.0.0.1:15000/config_dump",
            f"  ip netns exec {n2} curl -s http://127.0.0.1:15020/metrics",
            *([f"  {ambit} --socket {self.socket} get httproutes -n shop -o yaml",
               f"  ip netns exec {self.sb.workload('waypoint').netns} curl -s "
               "http://127.0.0.1:15020/metrics | grep ^istio_requests_total"]
              if self.waypoint_running else []),
            f"  logs: {self.dir}/*.log",
            "Tear it down:",
            f"  {ambit} demo --teardown {self.prefix}",
        ])


class _Interrupts:
    """Turns stop signals into KeyboardInterrupt, except inside `deferred()` sections
    (starting a process and recording its pid), where it waits for the section's end."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum: int, frame: FrameType | None) -> None:
        if self.depth:
            self.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            if not self.depth and self.pending is not None:
                signum, self.pending = self.pending, None
                raise KeyboardInterrupt(f"signal {signum}")

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Stop signals are ignored here (teardown: a second Ctrl-C must not cut it short)."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
            self.pending = None


_INTERRUPTS = _Interrupts()


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGINT (also when inherited as ignored), SIGTERM and SIGHUP stop the demo and tear
    it down."""
    old = {s: signal.signal(s, _INTERRUPTS.handler)
           for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _preflight() -> None:
    if os.geteuid() != 0:
        raise DemoError("ambit demo builds network namespaces and nftables rules: run it as "
                        "root (sudo make demo)")
    missing = [t for t in ("ip", "nft") if shutil.which(t) is None]
    if missing:
        raise DemoError(f"missing {', '.join(missing)}: install iproute2 and nftables "
                        "(`make deps` does it)")


def run(opts: DemoOptions, out: TextIO = sys.stdout) -> int:
    """Run the demo; 0 when every measurement agrees with the configuration."""
    try:
        _preflight()
    except DemoError as e:
        print(f"ambit demo: {e}", file=sys.stderr)
        return 1
    from netsetup.sandbox import SandboxError

    try:
        demo = Demo(opts, out)
    except SandboxError as e:
        print(f"ambit demo: {e}", file=sys.stderr)
        return 2
    keep = False
    live = opts.live if opts.live is not None else out.isatty()
    view = View(live=live, out=out)
    with _signals_interrupt():
        try:
            demo.say(f"ambit demo: sandbox {demo.prefix} (2 nodes), state in {demo.dir}")
            demo.build()
            demo.say("  control plane ...")
            demo.start_control_plane()
            demo.apply(render_manifests(demo.values(), waypoint=opts.waypoint))
            demo.say("  applied: namespaces shop (ambient) and legacy, 6 workloads, 5 services, "
                     "PeerAuthentication STRICT, AuthorizationPolicy deny-legacy"
                     + (", waypoint Gateway, HTTPRoute catalog 90/10 with retries"
                        if opts.waypoint else ""))
            demo.start_apps()
            demo.say("  ztunnels on n1 and n2 ...")
            demo.start_ztunnels()
            if opts.waypoint:
                demo.say("  waypoint for shop ...")
                demo.start_waypoint()
                demo.say(f"  waypoint: {demo.waypoint_note}")
            if not demo.wait_synced():
                demo.say("  (the proxies did not all report the latest configuration yet; "
                         "see `ambit status`)")
            demo.warm_up()
            demo.say(f"  driving traffic for {opts.duration:g} s")
            m = demo.drive(view)
            summary = report.summarise(m, report.Expectations(waypoint=opts.waypoint))
            for line in report.render(summary, m):
                demo.say(line)
            if opts.keep:
                keep = True
                demo.write_state()
                demo.say("")
                demo.say(demo.explore_text())
            return 0 if summary.ok else 3
        except DemoError as e:
            print(f"ambit demo: {e}", file=sys.stderr)
            if demo.own_dir:
                print(f"ambit demo: logs were in {demo.dir} (removed with the sandbox)",
                      file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("ambit demo: interrupted, tearing down", file=sys.stderr)
            return 130
        finally:
            if not keep:
                with _INTERRUPTS.shielded():
                    demo.close()


def _alive_as(pid: int, argv: list[str]) -> bool:
    """Whether `pid` still runs the command the demo started (not a reused pid)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    have = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    return bool(argv) and have[-len(argv):] == argv


def teardown(prefix: str, root: Path | None = None) -> list[str]:
    """Kill the processes of a kept demo by pid and delete its netns; returns what it did."""
    from netsetup.sandbox import cleanup_leftovers

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,}", prefix):
        raise DemoError(f"bad demo prefix {prefix!r}: the prefix `ambit demo` printed, e.g. "
                        "ambdemo12345x1")
    d = (root or demo_root()) / prefix
    done: list[str] = []
    try:
        state = json.loads((d / "state.json").read_text())
    except (OSError, ValueError):
        state = {}
    procs = [(int(p["pid"]), list(p.get("argv", [])), str(p.get("name", "")))
             for p in state.get("processes", [])]
    live = [(pid, name) for pid, argv, name in procs if _alive_as(pid, argv)]
    for pid, name in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
            done.append(f"stopped {name} (pid {pid})")
    deadline = time.monotonic() + 5
    while live and time.monotonic() < deadline:
        live = [(pid, n) for pid, n in live if Path(f"/proc/{pid}").exists()
                and "zombie" not in _proc_state(pid)]
        time.sleep(0.1)
    for pid, name in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
            done.append(f"killed {name} (pid {pid})")
    for ns in cleanup_leftovers(prefix):
        done.append(f"removed netns {ns}")
    if d.exists():
        shutil.rmtree(d, ignore_errors=True)
        done.append(f"removed {d}")
        with contextlib.suppress(OSError):
            d.parent.rmdir()  # only when no other demo is in there
    return done


def _proc_state(pid: int) -> str:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.lower()
    except OSError:
        return "gone zombie"
    return ""


def run_from_args(args: argparse.Namespace) -> int:
    """Entry point of `ambit demo` (options from config.demo.add_arguments)."""
    if args.teardown is not None:
        if os.geteuid() != 0:
            print("ambit demo: --teardown must run as root", file=sys.stderr)
            return 1
        try:
            done = teardown(args.teardown)
        except DemoError as e:
            print(f"ambit demo: {e}", file=sys.stderr)
            return 2
        for line in done or [f"nothing left of {args.teardown}"]:
            print(line)
        return 0
    if args.duration <= 0 or args.rate <= 0:
        print("ambit demo: --duration and --rate must be positive", file=sys.stderr)
        return 2
    return run(DemoOptions(duration=args.duration, rate=args.rate, keep=args.keep,
                           waypoint=not args.no_waypoint, prefix=args.prefix,
                           live=False if args.plain else None))
