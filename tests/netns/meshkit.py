"""Pieces the tier-3 mesh tests share: an echo server, the control plane, `ambit`, ztunnels.

    cp = start_control_plane(sb, tmp, cp_log)   # in the fabric netns, ready to serve
    cp.ambit("apply", "-f", "-", stdin=manifests)
    start_ztunnel(sb, tmp, "n1", "--token", cp.ambit("token", "create", "--node", "n1"))
    wait_for(lambda: ..., "the client enrolled")
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from netsetup.sandbox import Sandbox
from tests.pki import TestPKI
from ztunnel.identity import private_key_pem

PY = sys.executable
ROOT = str(Path(__file__).parents[2])
CONTROL_PLANE_PORT = 15012
ECHO_PORT = 9000
# A tiny line echo server (stock Python): answers every line with "<peer ip> <line>".
ECHO_SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(128)
def serve(c, a):
    with c:
        f = c.makefile("rwb")
        for line in f:
            f.write(a[0].encode() + b" " + line); f.flush()
while True:
    c, a = s.accept(); threading.Thread(target=serve, args=(c, a), daemon=True).start()
"""


def ambient_namespace(name: str) -> str:
    """The manifest of a Namespace labeled into the mesh (istio.io/dataplane-mode: ambient)."""
    return (
        f"apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n  labels:\n"
        "    istio.io/dataplane-mode: ambient\n"
    )


def wait_for(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    """Poll `pred` every 100 ms until it holds; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@dataclass(frozen=True)
class ControlPlane:
    """A control plane process in the sandbox's fabric netns and how to reach it."""

    proc: subprocess.Popen[bytes]
    socket: str
    address: str  # host:port ztunnels join
    env: dict[str, str]  # this environment without AMBIT_*, plus AMBIT_SOCKET

    def ambit(self, *args: str, stdin: str | None = None) -> str:
        """Run `ambit <args>` against this control plane; its stdout (fails on exit != 0)."""
        r = subprocess.run([PY, "-m", "config", *args], input=stdin, env=self.env, cwd=ROOT,
                           capture_output=True, text=True, check=False, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout


def start_control_plane(sb: Sandbox, tmp: Path, log: IO[bytes]) -> ControlPlane:
    """Start `ambit control-plane` in the fabric netns (data in tmp/cp, socket
    tmp/control.sock, stderr to `log`) and wait for its "ready" line."""
    sock = str(tmp / "control.sock")
    address = f"{sb.fabric_ip}:{CONTROL_PLANE_PORT}"
    cp = sb.popen(sb.fabric_netns, [PY, "-m", "config", "control-plane", "--data-dir",
                                    str(tmp / "cp"), "--socket", sock, "--proxy-listen",
                                    address],
                  stdout=subprocess.PIPE, stderr=log, cwd=ROOT)
    assert cp.stdout is not None
    ready = cp.stdout.readline().decode()
    assert ready.startswith("ready "), Path(log.name).read_text()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")},
           "AMBIT_SOCKET": sock}
    return ControlPlane(cp, sock, address, env)


def start_ztunnel(sb: Sandbox, tmp: Path, node: str, *args: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """Start a ztunnel in `node`'s netns that follows the sandbox's control plane (data
    in tmp/zt-<node>, stderr appended to tmp/zt-<node>.log); `args` add the credential
    (`--token T` or `--token-file F`) and any other flags."""
    with open(tmp / f"zt-{node}.log", "ab") as out:
        return sb.popen(
            sb.node(node).netns,
            [PY, "-m", "ztunnel", "--node", node, "--control-plane",
             f"{sb.fabric_ip}:{CONTROL_PLANE_PORT}", "--data-dir", str(tmp / f"zt-{node}"),
             "--drain-timeout", "1", *args],
            stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT, env=env)


def write_local_ca(pki: TestPKI, directory: Path) -> None:
    """Write the test root as a ztunnel local CA: directory/ca.pem and ca-key.pem (0600)."""
    (directory / "ca.pem").write_bytes(pki.root_pem)
    (directory / "ca-key.pem").write_bytes(private_key_pem(pki.root_key))
    os.chmod(directory / "ca-key.pem", 0o600)
