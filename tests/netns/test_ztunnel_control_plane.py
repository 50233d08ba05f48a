"""Tier 3: ztunnels configured by the real control plane (`--control-plane`), not a file.

The control plane runs in the sandbox's fabric netns; each node's ztunnel joins with a
token, receives its snapshot, has its workloads' certificates signed, and carries
traffic. Labeling the namespace out of the mesh unenrolls the workloads; a ztunnel
restarted while the control plane is down starts from the snapshot it persisted.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from netsetup.sandbox import Sandbox, unique_prefix
from tests.conftest import require_root_and_tools
from tests.netns.meshkit import (
    ECHO_PORT,
    ECHO_SERVER,
    PY,
    ambient_namespace,
    start_control_plane,
    start_ztunnel,
    wait_for,
)


def _manifests(sb: Sandbox) -> str:
    docs = [ambient_namespace("shop")]
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


def test_ztunnels_follow_the_control_plane() -> None:
    require_root_and_tools("ip", "nft", "nc", "curl")
    sb = Sandbox(unique_prefix("ztcp"), nodes=2, workload_names=[["client"], ["server"]])
    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-cp-"))
    cp_log = open(tmp / "cp.log", "wb")  # noqa: SIM115 - closed in finally
    try:
        sb.build()
        cp = start_control_plane(sb, tmp, cp_log)
        ambit = cp.ambit

        ambit("apply", "-f", "-", stdin=_manifests(sb))
        sb.popen(sb.workload("server").netns, [PY, "-c", ECHO_SERVER, str(ECHO_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logs = {}
        procs = {}

        def start(node: str, token: str) -> None:
            logs[node] = tmp / f"zt-{node}.log"
            procs[node] = start_ztunnel(sb, tmp, node, "--token", token)

        def log_has(node: str, needle: str) -> bool:
            return needle in logs[node].read_text(errors="replace")

        for node in ("n1", "n2"):
            start(node, ambit("token", "create", "--node", node).strip())
        wait_for(lambda: log_has("n1", '"workload enrolled"'), "client enrolled")
        wait_for(lambda: log_has("n2", '"workload enrolled"'), "server enrolled")
        server_ip = sb.workload("server").ip
        client_ip = sb.workload("client").ip
        assert _echo(sb, "client", server_ip, "via-cp") == f"{client_ip} via-cp"
        wait_for(lambda: log_has("n2", "spiffe://cluster.local/ns/shop/sa/client"),
                 "the client's principal in the server node's access log")

        # Unlabel the namespace: both workloads leave the mesh, capture is removed.
        ambit("label", "namespace", "shop", "istio.io/dataplane-mode-")
        wait_for(lambda: log_has("n1", '"workload unenrolled"'), "client unenrolled")

        def tables(name: str) -> str:
            return subprocess.run(["ip", "netns", "exec", sb.workload(name).netns, "nft",
                                   "list", "tables"], capture_output=True, text=True,
                                  check=False).stdout

        wait_for(lambda: "ambit" not in tables("client"), "capture rules removed")
        assert _echo(sb, "client", server_ip, "direct") == f"{client_ip} direct"

        # Restart n1's ztunnel with the control plane gone: it starts from the
        # snapshot it persisted instead of failing.
        os.killpg(cp.proc.pid, signal.SIGTERM)
        cp.proc.wait(timeout=10)
        os.killpg(procs["n1"].pid, signal.SIGTERM)
        procs["n1"].wait(timeout=10)
        seen = logs["n1"].read_text().count('"ztunnel started"')
        start("n1", "")
        wait_for(lambda: logs["n1"].read_text().count('"ztunnel started"') > seen,
                 "ztunnel started from the saved snapshot")
        dump = sb.exec(sb.node("n1").netns, ["curl", "-s", "http://127.0.0.1:15000/config_dump"])
        assert json.loads(dump.stdout)["snapshot"]["node"] == "n1"
        assert procs["n1"].poll() is None
    finally:
        cp_log.close()
        sb.teardown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


# A new connection from the client every 20 ms, each in its own thread (5 s timeout):
# "<started> <ended> <local port> <outcome>" per connection. The local port finds the
# connection in ztunnel's access log, which tells a captured connection from a direct one.
PROBE = r"""
import socket, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
lock = threading.Lock()
def one():
    t = time.time(); sport = 0
    try:
        s = socket.socket(); s.settimeout(5)
        try:
            s.connect((host, port)); sport = s.getsockname()[1]
            s.sendall(b"probe\n"); line = s.makefile("rb").readline()
        finally:
            s.close()
        outcome = "ok" if line.endswith(b" probe\n") else "eof"
    except (ConnectionResetError, BrokenPipeError):
        outcome = "reset"
    except OSError as e:
        outcome = "error-%s" % (e.errno,)
    with lock:
        print("%.3f %.3f %d %s" % (t, time.time(), sport, outcome), flush=True)
while True:
    threading.Thread(target=one, daemon=True).start()
    time.sleep(0.02)
"""

DENY_CLIENT = """apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-client
  namespace: shop
spec:
  selector:
    matchLabels:
      app: server
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/shop/sa/client"]
"""
BOUND = 1.0  # issue 6: enrollment by label and a DENY policy take effect within 1 s
POLL = 0.02


def _poll(pred: Callable[[], bool], what: str, timeout: float = 10) -> float:
    """Poll `pred` every ~20 ms; the time it first held (seconds since epoch)."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return time.time()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g}s")
        time.sleep(POLL)


def test_label_and_policy_take_effect_within_a_second() -> None:
    """With workloads running and ztunnels following a real control plane: labeling the
    namespace enrolls them within 1 s (capture rules in place and traffic captured),
    unlabeling unenrolls them, and a DENY policy refuses new connections within 1 s.
    Each bound is measured from the return of the `ambit` command."""
    require_root_and_tools("ip", "nft", "nc", "curl")
    sb = Sandbox(unique_prefix("ztlb"), nodes=2, workload_names=[["client"], ["server"]])
    tmp = Path(tempfile.mkdtemp(prefix="ztunnel-label-"))
    cp_log = open(tmp / "cp.log", "wb")  # noqa: SIM115 - closed in finally
    probe: subprocess.Popen[bytes] | None = None
    try:
        sb.build()
        cp = start_control_plane(sb, tmp, cp_log)

        def ambit(*args: str, stdin: str | None = None) -> float:
            cp.ambit(*args, stdin=stdin)
            return time.time()

        def token(node: str) -> str:
            return cp.ambit("token", "create", "--node", node).strip()

        # the namespace exists without the ambient label: nothing is enrolled yet
        manifests = _manifests(sb).replace(
            "  labels:\n    istio.io/dataplane-mode: ambient\n", "", 1)
        assert "dataplane-mode" not in manifests
        ambit("apply", "-f", "-", stdin=manifests)
        sb.popen(sb.workload("server").netns, [PY, "-c", ECHO_SERVER, str(ECHO_PORT)],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        logs: dict[str, Path] = {}
        for node in ("n1", "n2"):
            logs[node] = tmp / f"zt-{node}.log"
            start_ztunnel(sb, tmp, node, "--token", token(node))
        for node in ("n1", "n2"):
            wait_for(lambda node=node: sb.exec(  # type: ignore[misc]
                sb.node(node).netns, ["curl", "-s", "-m", "2", "-o", "/dev/null", "-w",
                                      "%{http_code}", "http://127.0.0.1:15021/healthz/ready"]
            ).stdout == "200", f"ztunnel on {node} ready")
        server_ip = sb.workload("server").ip
        client_ip = sb.workload("client").ip
        assert _echo(sb, "client", server_ip, "direct") == f"{client_ip} direct"

        def tables(name: str) -> str:
            return subprocess.run(["ip", "netns", "exec", sb.workload(name).netns, "nft",
                                   "list", "tables"], capture_output=True, text=True,
                                  check=False).stdout

        def captured_ports() -> dict[int, list[float]]:
            """Client source ports of connections n1's ztunnel carried out of the client,
            with when each such connection ended (a port is used again later: connections
            refused by the DENY policy end in a reset, which frees theirs at once)."""
            ports: dict[int, list[float]] = {}
            for line in logs["n1"].read_text(errors="replace").splitlines():
                if '"direction": "outbound"' not in line:
                    continue
                entry = json.loads(line)
                src = str(entry.get("src_addr", ""))
                if src.startswith(client_ip + ":"):
                    ended = datetime.datetime.fromisoformat(entry["timestamp"]).timestamp()
                    ports.setdefault(int(src.rsplit(":", 1)[1]), []).append(ended)
            return ports

        probe = sb.popen(sb.workload("client").netns, [PY, "-c", PROBE, server_ip,
                                                       str(ECHO_PORT)],
                         stdout=subprocess.PIPE)
        time.sleep(0.5)

        # 1. label: the running workloads are enrolled
        labeled = ambit("label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
        rules_at = max(
            _poll(lambda: "ambit" in tables("client"), "client capture rules"),
            _poll(lambda: "ambit" in tables("server"), "server capture rules"))
        wait_for(lambda: bool(captured_ports()), "a captured connection in n1's access log")
        time.sleep(1.0)

        # 2. a DENY policy: new connections are refused
        applied = ambit("apply", "-f", "-", stdin=DENY_CLIENT)
        time.sleep(2.0)
        ambit("delete", "AuthorizationPolicy", "deny-client", "-n", "shop")
        time.sleep(1.0)

        # 3. unlabel: the workloads leave the mesh
        unlabeled = ambit("label", "namespace", "shop", "istio.io/dataplane-mode-")
        gone_at = max(
            _poll(lambda: "ambit" not in tables("client"), "client rules removed"),
            _poll(lambda: "ambit" not in tables("server"), "server rules removed"))
        time.sleep(1.0)

        os.killpg(probe.pid, signal.SIGTERM)
        probe_out, _ = probe.communicate(timeout=10)
        probe = None
        samples = [(float(t), float(e), int(p), o) for t, e, p, o in
                   (ln.split() for ln in probe_out.decode().splitlines())]
        captured = captured_ports()

        def carried(port: int, started: float) -> bool:
            """Whether the probe connection from `port` started at `started` went through
            ztunnel (a logged connection from that port that ended after it started)."""
            return any(ended >= started for ended in captured.get(port, ()))

        # enrollment: the first probe carried by ztunnel, started after the label
        first_captured = min(e for t, e, p, o in samples
                             if t > labeled and carried(p, t) and o == "ok")
        enroll = max(rules_at, first_captured) - labeled
        # the policy: denials begin, and every connection started after that is denied
        # until the policy is deleted
        window = [(t, e, o) for t, e, p, o in samples if applied < t < applied + 1.9]
        first_denied = min(e for t, e, o in window if o != "ok")
        late_ok = [round(t - applied, 3) for t, e, o in window if o == "ok"
                   and t > first_denied + 0.05]
        deny = first_denied - applied
        # unenrolled: connections started once the rules are gone go direct again
        direct = [(round(t - gone_at, 3), p, carried(p, t), o) for t, e, p, o in samples
                  if t > gone_at + 0.1]
        print(f"label -> enrolled (rules {rules_at - labeled:.3f}s, first captured connection "
              f"{first_captured - labeled:.3f}s) = {enroll:.3f}s; DENY applied -> first "
              f"refused connection {deny:.3f}s; unlabel -> rules gone "
              f"{gone_at - unlabeled:.3f}s")
        assert enroll < BOUND, f"enrolled {enroll:.3f}s after the label"
        assert deny < BOUND, f"DENY took effect {deny:.3f}s after apply"
        assert not late_ok, f"connections allowed after the DENY took effect: {late_ok}"
        not_direct = [d for d in direct if d[2] or d[3] != "ok"]
        assert direct and not not_direct, (
            f"after the rules were gone (seconds after, port, captured, outcome): {not_direct}")
        assert _echo(sb, "client", server_ip, "direct-again") == f"{client_ip} direct-again"
    finally:
        if probe is not None:
            os.killpg(probe.pid, signal.SIGKILL)
            probe.wait(timeout=10)
        cp_log.close()
        sb.teardown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
