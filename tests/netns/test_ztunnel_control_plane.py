"""Tier 3: ztunnels configured by the real control plane (`--control-plane`), not a file.

The control plane runs in the sandbox's fabric netns; each node's ztunnel joins with a
token, receives its snapshot, has its workloads' certificates signed, and carries
traffic. Labeling the namespace out of the mesh unenrolls the workloads; a ztunnel
restarted while the control plane is down starts from the snapshot it persisted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools

PY = sys.executable
ROOT = str(Path(__file__).parents[2])
ECHO_PORT = 9000
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


def _manifests(sb: Sandbox) -> str:
    docs = [
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n"
        "    istio.io/dataplane-mode: ambient\n",
    ]
    for name, sa in (("client", "client"), ("server", "server")):
        w = sb.workload(name)
        docs.append(
            "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\n"
            f"metadata:\n  name: {name}\n  namespace: shop\n  annotations:\n"
            f"    ambit.dev/node: {w.node}\n    ambit.dev/netns: {w.netns}\n"
            f"spec:\n  address: {w.ip}\n  serviceAccount: {sa}\n  labels:\n    app: {name}\n"
        )
    return "---\n".join(docs)


def _echo(sb: Sandbox, client: str, host: str, line: str, timeout: int = 5) -> str:
    r = sb.exec(sb.workload(client).netns, ["nc", "-N", "-w", str(timeout), host,
                                            str(ECHO_PORT)], input=line + "\n",
                timeout=timeout + 5)
    return r.stdout.strip()


def _wait(pred: Callable[[], bool], what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_ztunnels_follow_the_control_plane() -> None:
    require_root_and_tools("ip", "nft", "nc", "curl")
    sb = Sandbox(unique_prefix("ztcp"), nodes=2, workload_names=[["client"], ["server"]])
    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-cp-"))
    cp_log = open(tmp / "cp.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        sb.build()
        sock = str(tmp / "control.sock")
        cp = sb.popen(sb.fabric_netns, [PY, "-m", "config", "control-plane", "--data-dir",
                                        str(tmp / "cp"), "--socket", sock, "--proxy-listen",
                                        f"{sb.fabric_ip}:15012"],
                      stdout=subprocess.PIPE, stderr=cp_log, cwd=ROOT)
        assert cp.stdout is not None
        ready = cp.stdout.readline().decode()
        assert ready.startswith("ready "), (tmp / "cp.log").read_text()
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")},
               "AMBIT_SOCKET": sock}

        def ambit(*args: str, stdin: str | None = None) -> str:
            r = subprocess.run([PY, "-m", "config", *args], input=stdin, env=env, cwd=ROOT,
                               capture_output=True, text=True, check=False, timeout=30)
            assert r.returncode == 0, r.stderr
            return r.stdout

        ambit("apply", "-f", "-", stdin=_manifests(sb))
        sb.popen(sb.workload("server").netns, [PY, "-c", ECHO_SERVER, str(ECHO_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logs = {}
        procs = {}

        def start(node: str, token: str) -> None:
            logs[node] = tmp / f"zt-{node}.log"
            with open(logs[node], "ab") as out:
                procs[node] = sb.popen(
                    sb.node(node).netns,
                    [PY, "-m", "ztunnel", "--node", node, "--control-plane",
                     f"{sb.fabric_ip}:15012", "--token", token, "--data-dir",
                     str(tmp / f"zt-{node}"), "--drain-timeout", "1"],
                    stdout=subprocess.DEVNULL, stderr=out, cwd=ROOT)

        def log_has(node: str, needle: str) -> bool:
            return needle in logs[node].read_text(errors="replace")

        for node in ("n1", "n2"):
            start(node, ambit("token", "create", "--node", node).strip())
        _wait(lambda: log_has("n1", '"workload enrolled"'), "client enrolled")
        _wait(lambda: log_has("n2", '"workload enrolled"'), "server enrolled")
        server_ip = sb.workload("server").ip
        client_ip = sb.workload("client").ip
        assert _echo(sb, "client", server_ip, "via-cp") == f"{client_ip} via-cp"
        _wait(lambda: log_has("n2", "spiffe://cluster.local/ns/shop/sa/client"),
              "the client's principal in the server node's access log")

        # Unlabel the namespace: both workloads leave the mesh, capture is removed.
        ambit("label", "namespace", "shop", "istio.io/dataplane-mode-")
        _wait(lambda: log_has("n1", '"workload unenrolled"'), "client unenrolled")

        def tables(name: str) -> str:
            return subprocess.run(["ip", "netns", "exec", sb.workload(name).netns, "nft",
                                   "list", "tables"], capture_output=True, text=True,
                                  check=False).stdout

        _wait(lambda: "ambit" not in tables("client"), "capture rules removed")
        assert _echo(sb, "client", server_ip, "direct") == f"{client_ip} direct"

        # Restart n1's ztunnel with the control plane gone: it starts from the
        # snapshot it persisted instead of failing.
        os.killpg(cp.pid, signal.SIGTERM)
        cp.wait(timeout=10)
        os.killpg(procs["n1"].pid, signal.SIGTERM)
        procs["n1"].wait(timeout=10)
        seen = logs["n1"].read_text().count('"ztunnel started"')
        start("n1", "")
        _wait(lambda: logs["n1"].read_text().count('"ztunnel started"') > seen,
              "ztunnel started from the saved snapshot")
        dump = sb.exec(sb.node("n1").netns, ["curl", "-s", "http://127.0.0.1:15000/config_dump"])
        assert json.loads(dump.stdout)["snapshot"]["node"] == "n1"
        assert procs["n1"].poll() is None
    finally:
        cp_log.close()
        sb.teardown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
