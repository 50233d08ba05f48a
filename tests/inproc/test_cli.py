"""The real `ambit control-plane` process driven by the real `ambit` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

NS = """apiVersion: v1
kind: Namespace
metadata: {name: shop}
"""
SVC = """apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: networking.istio.io/v1
kind: WorkloadEntry
metadata: {name: web-1, namespace: shop, annotations: {ambit.dev/node: node-a}}
spec: {address: 10.1.0.5, labels: {app: web}, serviceAccount: web}
"""


@dataclass
class ControlPlane:
    proc: subprocess.Popen[str]
    socket: str
    tls: str
    proxies: str
    data: Path
    stderr: Path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
        env["AMBIT_SOCKET"] = self.socket
        return env


@contextmanager
def control_plane(
    tmp_path: Path, data: Path | None = None, env: dict[str, str] | None = None
) -> Iterator[ControlPlane]:
    data = data or tmp_path / "data"
    sock = str(tmp_path / "run" / "control.sock")
    err = tmp_path / f"cp-{os.getpid()}-{len(list(tmp_path.glob('cp-*')))}.log"
    with open(err, "w") as errf:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "config",
                "control-plane",
                "--data-dir",
                str(data),
                "--socket",
                sock,
                "--listen",
                "127.0.0.1:0",
                "--proxy-listen",
                "127.0.0.1:0",
            ],
            stdout=subprocess.PIPE,
            stderr=errf,
            text=True,
            env=env,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"control plane did not start: {err.read_text()}"
        fields = dict(kv.split("=", 1) for kv in line.split()[1:])
        yield ControlPlane(proc, fields["socket"], fields["tls"], fields["proxies"], data, err)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def ambit(
    *args: str, env: dict[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "config", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def error_of(p: subprocess.CompletedProcess[str]) -> str:
    """The single error event a failed command logged (JSON, since stderr is a pipe)."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, p.stderr
    event = json.loads(lines[0])
    assert event["level"] == "error"
    return str(event["event"])


def test_apply_get_label_delete_status(tmp_path: Path) -> None:
    (tmp_path / "ns.yaml").write_text(NS)
    (tmp_path / "svc.yaml").write_text(SVC)
    with control_plane(tmp_path) as cp:
        env = cp.env()
        p = ambit(
            "apply", "-f", str(tmp_path / "ns.yaml"), "-f", str(tmp_path / "svc.yaml"), env=env
        )
        assert p.returncode == 0, p.stderr
        assert p.stdout.splitlines() == [
            "namespace/shop created",
            "service/web -n shop created",
            "workloadentry/web-1 -n shop created",
        ]
        p = ambit("get", "svc", "-n", "shop", env=env)
        assert p.returncode == 0, p.stderr
        header, row = p.stdout.splitlines()
        assert header.split() == ["NAME", "CLUSTER-IP", "PORTS", "WAYPOINT", "VERSION"]
        assert row.split()[:4] == ["web", "10.96.0.1", "80/TCP", "<none>"]
        p = ambit("get", "workloadentries", "-A", "-o", "json", env=env)
        out = json.loads(p.stdout)
        assert out["kind"] == "List"
        assert [i["spec"]["address"] for i in out["items"]] == ["10.1.0.5"]
        p = ambit("label", "namespace", "shop", "istio.io/dataplane-mode=ambient", env=env)
        assert p.stdout.strip() == "namespace/shop labeled", p.stderr
        p = ambit("get", "ns", "shop", "-o", "yaml", env=env)
        ns = yaml.safe_load(p.stdout)
        assert ns["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
        p = ambit("label", "ns", "shop", "istio.io/dataplane-mode-", env=env)
        assert p.returncode == 0, p.stderr
        p = ambit("status", env=env)
        assert p.returncode == 0, p.stderr
        assert "resources: Namespace 3, Service 1, WorkloadEntry 1" in p.stdout
        assert "CA: trust domain cluster.local, root sha256:" in p.stdout
        p = ambit("delete", "-f", str(tmp_path / "svc.yaml"), env=env)
        assert p.stdout.splitlines() == [
            "service/web -n shop deleted",
            "workloadentry/web-1 -n shop deleted",
        ], p.stderr
        p = ambit("delete", "namespace", "shop", env=env)
        assert p.stdout.strip() == "namespace/shop deleted", p.stderr
        p = ambit("get", "svc", "-A", env=env)
        assert p.returncode == 0 and p.stdout == ""
        assert "No services found." in p.stderr


def test_bad_file_applies_nothing_and_says_where(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(NS + "---\n" + SVC.replace("address: 10.1.0.5", "address: 10.1.0.500"))
    with control_plane(tmp_path) as cp:
        p = ambit("apply", "-f", str(bad), env=cp.env())
        assert p.returncode == 1
        assert error_of(p) == (
            f"{bad}: document 3 (WorkloadEntry shop/web-1): spec.address: "
            "expected an IPv4 or IPv6 address, got '10.1.0.500'"
        )
        p = ambit("get", "ns", "shop", env=cp.env())
        assert p.returncode == 1
        assert error_of(p) == "Namespace 'shop' not found"


def test_apply_from_directory_and_stdin(tmp_path: Path) -> None:
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "01-ns.yaml").write_text(NS)
    (d / "02-svc.yml").write_text(SVC)
    (d / "README.md").write_text("not a manifest")
    with control_plane(tmp_path) as cp:
        p = ambit("apply", "-f", str(d), env=cp.env())
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == 3
        policy = (
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"
            "metadata: {name: deny-all, namespace: shop}\nspec: {}\n"
        )
        p = ambit("apply", "-f", "-", env=cp.env(), stdin=policy)
        assert p.stdout.strip() == "authorizationpolicy/deny-all -n shop created", p.stderr
        p = ambit("get", "ap", "-n", "shop", env=cp.env())
        assert p.stdout.splitlines()[1].split() == ["deny-all", "ALLOW", "0", "6"]
        # what `get -o yaml` prints applies back as it is, changing nothing
        dump = ambit("get", "svc", "-A", "-o", "yaml", env=cp.env()).stdout
        p = ambit("apply", "-f", "-", env=cp.env(), stdin=dump)
        assert p.stdout.strip() == "service/web -n shop unchanged", p.stderr


def test_tls_with_the_admin_credential_and_restart_keeps_state(tmp_path: Path) -> None:
    (tmp_path / "all.yaml").write_text(NS + "---\n" + SVC)
    data = tmp_path / "data"
    with control_plane(tmp_path, data) as cp:
        env = cp.env()
        env.pop("AMBIT_SOCKET")
        env.update(
            AMBIT_SERVER=cp.tls,
            AMBIT_CERT=str(data / "admin.pem"),
            AMBIT_KEY=str(data / "admin-key.pem"),
            AMBIT_CACERT=str(data / "api-ca.pem"),
        )
        p = ambit("apply", "-f", str(tmp_path / "all.yaml"), "--socket", "/nonexistent", env=env)
        assert p.returncode == 0, p.stderr
        p = ambit("get", "svc", "web", "-n", "shop", "-o", "json", env=env)
        vip = json.loads(p.stdout)["spec"]["clusterIP"]
        version = json.loads(p.stdout)["metadata"]["resourceVersion"]
    with control_plane(tmp_path, data) as cp:
        p = ambit("get", "svc", "web", "-n", "shop", "-o", "json", env=cp.env())
        again = json.loads(p.stdout)
        assert again["spec"]["clusterIP"] == vip
        assert again["metadata"]["resourceVersion"] == version


def test_unreachable_control_plane(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
    sock = str(tmp_path / "none.sock")
    for argv in (["status", "--socket", sock], ["--socket", sock, "status"]):
        p = ambit(*argv, env=env)
        assert p.returncode == 1
        assert error_of(p) == (
            f"cannot reach the control plane at {sock}: is `ambit control-plane` running?"
        )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["control-plane"],
        ["apply"],
        ["delete"],
        ["get"],
        ["label"],
        ["token"],
        ["token", "create"],
        ["status"],
    ],
)
def test_every_command_has_help(argv: list[str]) -> None:
    p = ambit(*argv, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: ambit")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["get"], "ambit get: the following arguments are required: kind (see `ambit get --help`)"),
        (
            ["get", "gizmos"],
            "unknown resource type 'gizmos' (known: namespaces, workloadentries, "
            "services, authorizationpolicies, peerauthentications, gateways, "
            "httproutes, destinationrules, httpfaults, ratelimits)",
        ),
        (
            ["label", "ns", "shop", "novalue"],
            "bad label 'novalue': use KEY=VALUE to set or KEY- to remove",
        ),
        (
            ["apply", "-f", "/nonexistent.yaml"],
            "/nonexistent.yaml: document 1: no such file or directory",
        ),
        (
            ["token", "create", "--waypoint", "noslash"],
            "bad --waypoint 'noslash': expected NAMESPACE/NAME",
        ),
        (["delete"], "say what to delete: -f FILE, or KIND NAME [-n NAMESPACE]"),
    ],
)
def test_bad_input_exits_non_zero_with_one_line(
    argv: list[str], message: str, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
    env["AMBIT_SOCKET"] = str(tmp_path / "none.sock")
    p = ambit(*argv, env=env)
    assert p.returncode in (1, 2)
    assert error_of(p) == message


def test_control_plane_logs_json_and_stops_on_sigterm(tmp_path: Path) -> None:
    import socket
    import time

    with control_plane(tmp_path) as cp:
        ambit("status", env=cp.env())
        for addr in (cp.tls, cp.proxies):  # not TLS at all: refused, and logged as JSON
            host, _, port = addr.rpartition(":")
            with socket.create_connection((host, int(port)), timeout=5) as junk:
                junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
                junk.recv(100)
        time.sleep(0.2)
        cp.proc.send_signal(signal.SIGTERM)
        assert cp.proc.wait(timeout=10) == 0
        events = [json.loads(ln) for ln in cp.stderr.read_text().splitlines() if ln.strip()]
        names = [e["event"] for e in events]
        assert "control plane ready" in names and "control plane stopping" in names
        assert any(e.get("path") == "/v1/status" and e.get("status") == 200 for e in events)
        assert not os.path.exists(cp.socket)


def test_token_create_for_nodes_and_declared_waypoints(tmp_path: Path) -> None:
    from config.tokens import TokenError, TokenStore

    gw = (
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n"
        "metadata: {name: waypoint, namespace: shop}\n"
        "spec:\n  gatewayClassName: istio-waypoint\n"
        "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n"
    )
    with control_plane(tmp_path) as cp:
        env = cp.env()
        p = ambit("token", "create", "--node", "node-a", env=env)
        assert p.returncode == 0, p.stderr
        node_token, _, pin = p.stdout.strip().partition("#")
        assert node_token.startswith("ambit-join.")
        root = (cp.data / "ca" / "root-cert.pem").read_bytes()
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes

        fp = x509.load_pem_x509_certificate(root).fingerprint(hashes.SHA256()).hex()
        assert pin == f"sha256:{fp}"
        p = ambit("token", "create", "--waypoint", "shop/waypoint", env=env)
        assert p.returncode == 1
        assert error_of(p) == (
            "Gateway shop/waypoint not found: apply the waypoint's Gateway "
            "(gatewayClassName istio-waypoint) first"
        )
        assert ambit("apply", "-f", "-", env=env, stdin=NS + "---\n" + gw).returncode == 0
        p = ambit("token", "create", "--waypoint", "shop/waypoint", env=env)
        assert p.returncode == 0, p.stderr
        with TokenStore(cp.data / "tokens.db") as tokens:
            tokens.redeem(node_token, "node-a")
            wp_token = p.stdout.strip().partition("#")[0]
            with pytest.raises(TokenError, match="bound to waypoint shop/waypoint, not node"):
                tokens.redeem(wp_token, "node-a")
            tokens.redeem(wp_token, "shop/waypoint")


async def test_status_lists_connected_nodes_their_version_and_cert_expiry(tmp_path: Path) -> None:
    import asyncio

    from config.push import PushClient

    with control_plane(tmp_path) as cp:
        env = cp.env()
        assert ambit("apply", "-f", "-", env=env, stdin=NS + "---\n" + SVC).returncode == 0
        token = ambit("token", "create", "--node", "node-a", env=env).stdout.strip()
        client = PushClient(cp.proxies, "node-a", tmp_path / "node-a", token=token, timeout=5)
        applied = asyncio.Event()

        async def on_snapshot(snap: object) -> None:
            applied.set()

        async with asyncio.TaskGroup() as tg:
            task = tg.create_task(client.follow(on_snapshot))
            async with asyncio.timeout(10):
                await applied.wait()
                while True:
                    p = await asyncio.to_thread(ambit, "status", env=env)
                    assert p.returncode == 0, p.stderr
                    rows = [ln.split() for ln in p.stdout.splitlines()]
                    node = [r for r in rows if r[:2] == ["node", "node-a"]]
                    if node and node[0][4] == "synced":
                        break
                    await asyncio.sleep(0.1)
            task.cancel()
        assert ["KIND", "NAME", "VERSION", "LATEST", "STATE", "CERT-EXPIRY"] in rows
        _kind, _name, version, latest, _state, expiry = node[0]
        assert version == latest
        assert expiry.endswith("Z") and expiry[:2] == "20"


def test_control_plane_tells_systemd_when_it_is_ready(tmp_path: Path) -> None:
    import socket

    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sd:
        sd.bind(path)
        sd.settimeout(10)
        env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
        env["NOTIFY_SOCKET"] = path
        with control_plane(tmp_path, env=env) as cp:
            msg = sd.recv(4096).decode()
            assert "READY=1" in msg.splitlines()
            assert f"MAINPID={cp.proc.pid}" in msg.splitlines()
            cp.proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in sd.recv(4096).decode().splitlines()


# -- `ambit check`: ports, control plane, clock (the capture rows need root + netns and
#    are tested in tests/netns/test_preflight.py) -------------------------------------


def test_check_port_rows_pass_when_free_and_fail_when_taken() -> None:
    import socket

    from config.check import port_checks

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        rows = port_checks([(free, "ztunnel admin"), (busy, "ztunnel metrics")], "127.0.0.1")
    assert [(r.name, r.ok) for r in rows] == [(f"port {free} free", True),
                                               (f"port {busy} free", False)]
    assert rows[0].detail == "free (ztunnel admin)"
    assert rows[1].detail == "in use (ztunnel metrics needs it)"
    assert f"ss -ltnp 'sport = :{busy}'" in rows[1].remedy


def _check_rows(argv: list[str], env: dict[str, str]) -> dict[str, object]:
    """`ambit check ARGV` in-process without the capture rows; {name: CheckResult}."""
    from config.check import run_cli
    from config.cli import build_parser

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        args = build_parser().parse_args(["check", *argv])
    finally:
        os.environ.clear()
        os.environ.update(saved)
    printed: list[str] = []
    status = run_cli(args, capture=list, out=printed.append)
    rows = {line.split("  ")[0].strip(): line for line in printed[0].splitlines()}
    return {"status": status, "table": printed[0], **rows}


def test_check_reaches_the_control_plane_and_compares_clocks(tmp_path: Path) -> None:
    with control_plane(tmp_path) as cp:
        env = cp.env()
        rows = _check_rows(["--role", "control-plane"], env)  # --socket from $AMBIT_SOCKET
        assert "PASS    answered at " + cp.socket in str(rows["control plane"]), rows["table"]
        assert "PASS" in str(rows["clock skew"]) and "against the control plane" in str(
            rows["clock skew"])
        assert "PASS" in str(rows["clock"])
        # over TLS with the admin credential, as given on the command line
        rows = _check_rows(["--server", cp.tls, "--cert", str(cp.data / "admin.pem"),
                            "--key", str(cp.data / "admin-key.pem"),
                            "--cacert", str(cp.data / "api-ca.pem")], env)
        assert f"PASS    answered at {cp.tls}" in str(rows["control plane"]), rows["table"]
    rows = _check_rows([], env)  # the same socket, the control plane gone
    assert "FAIL    unreachable at " + cp.socket in str(rows["control plane"]), rows["table"]
    assert "fix: start it (`systemctl start ambit-control-plane`)" in str(rows["table"])
    assert "clock skew" not in rows
    assert rows["status"] == 1


def test_check_without_a_control_plane_named_skips_that_row(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AMBIT_")}
    if os.path.exists("/run/ambit/control.sock"):
        env["AMBIT_SOCKET"] = str(tmp_path / "absent.sock")  # named, so checked: fails
        rows = _check_rows([], env)
        assert "FAIL    unreachable at" in str(rows["control plane"])
        return
    rows = _check_rows([], env)
    assert "PASS    not checked: no --server/--socket" in str(rows["control plane"])
