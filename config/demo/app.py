"""The demo's app: plain Python HTTP servers, a raw TCP inventory and a load generator.

Each role runs as its own process inside a workload netns (stdlib only, so it starts in
a blink):

    python -m config.demo.app inventory --port 9000 --stats FILE
    python -m config.demo.app catalog --version v1 --port 8080 --inventory IP:9000 --stats FILE
    python -m config.demo.app frontend --port 8080 --catalog IP:80 --stats FILE
    python -m config.demo.app loadgen --target IP:PORT [--target ...] --rate 20
                                      --duration 30 --out FILE

Servers print `listening PORT` once bound and keep their own counters in `--stats`
(JSON, replaced atomically twice a second): what the app saw, to compare with what the
mesh reports. The load generator opens a fresh connection per request (so every
request is a connection the proxies count) and appends one JSON line per request to
`--out`: wall time, status, latency, the catalog version that answered, or the error.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import socketserver
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


class Stats:
    """Counters a server keeps about itself, written to a file by a daemon thread."""

    def __init__(self, role: str, path: str | None) -> None:
        self.role = role
        self.path = path
        self.lock = threading.Lock()
        self.codes: Counter[str] = Counter()
        self.peers: Counter[str] = Counter()

    def count(self, code: int | str, peer: str) -> None:
        with self.lock:
            self.codes[str(code)] += 1
            self.peers[peer] += 1

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return {"role": self.role, "codes": dict(self.codes), "peers": dict(self.peers),
                    "served": sum(self.codes.values())}

    def write(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(tmp, self.path)

    def start(self) -> None:
        def loop() -> None:
            while True:
                with contextlib.suppress(OSError):
                    self.write()
                time.sleep(0.5)

        threading.Thread(target=loop, daemon=True, name="stats").start()


def _http_get(addr: tuple[str, int], path: str, timeout: float,
              headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(addr[0], addr[1], timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def _ask_inventory(addr: tuple[str, int], item: str, timeout: float) -> str:
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(f"stock {item}\n".encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    line = data.decode(errors="replace").strip()
    if not line:
        raise ConnectionError(f"inventory {addr[0]}:{addr[1]} closed without answering")
    return line


Handler = Callable[[BaseHTTPRequestHandler], tuple[int, dict[str, Any]]]


def _serve_http(port: int, stats: Stats, handle: Handler) -> None:
    class H(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            try:
                code, body = handle(self)
            except Exception as e:  # the app answers every request, even on a bug
                code, body = 500, {"error": f"{type(e).__name__}: {e}"}
            stats.count(code, self.client_address[0])
            raw = (json.dumps(body) + "\n").encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(raw)
            self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    ThreadingHTTPServer.allow_reuse_address = True
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("0.0.0.0", port), H)
    stats.start()
    print(f"listening {port}", flush=True)
    server.serve_forever()


def run_inventory(args: argparse.Namespace) -> int:
    stats = Stats("inventory", args.stats)

    class H(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            line = self.rfile.readline().decode(errors="replace").strip()
            item = line.partition(" ")[2] or "unknown"
            # A stable, made-up stock level per item.
            level = sum(item.encode()) % 50 + 1
            self.wfile.write(f"in-stock {item} {level}\n".encode())
            stats.count("ok", self.client_address[0])

    class Server(socketserver.ThreadingTCPServer):
        allow_reuse_address = True
        daemon_threads = True

    server = Server(("0.0.0.0", args.port), H)
    stats.start()
    print(f"listening {args.port}", flush=True)
    server.serve_forever()
    return 0


def run_catalog(args: argparse.Namespace) -> int:
    stats = Stats(f"catalog-{args.version}", args.stats)
    n = 0
    lock = threading.Lock()

    def handle(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        nonlocal n
        with lock:
            n += 1
            mine = n
        if args.fail_every and mine % args.fail_every == 0:
            return 503, {"version": args.version, "error": "simulated overload"}
        item = req.path.rsplit("/", 1)[-1] or "sku-1"
        try:
            stock = _ask_inventory(args.inventory, item, args.timeout)
        except OSError as e:
            return 502, {"version": args.version, "error": f"inventory: {e}"}
        return 200, {"version": args.version, "item": item, "stock": stock}

    _serve_http(args.port, stats, handle)
    return 0


def run_frontend(args: argparse.Namespace) -> int:
    stats = Stats("frontend", args.stats)

    def handle(req: BaseHTTPRequestHandler) -> tuple[int, dict[str, Any]]:
        item = req.path.rsplit("/", 1)[-1] or "sku-1"
        try:
            code, raw = _http_get(args.catalog, f"/items/{item}", args.timeout)
        except OSError as e:
            return 502, {"error": f"catalog: {e}"}
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"raw": raw[:200].decode(errors="replace")}
        return (200 if code == 200 else 502), {"frontend": "ok", "catalog_status": code,
                                               "catalog": body}

    _serve_http(args.port, stats, handle)
    return 0


def run_loadgen(args: argparse.Namespace) -> int:
    targets: list[tuple[str, int]] = args.target
    out_lock = threading.Lock()
    out = open(args.out, "a", buffering=1)  # noqa: SIM115 - closed at the end
    stop = time.monotonic() + args.duration

    def one(i: int) -> None:
        host, port = targets[i % len(targets)]
        rec: dict[str, Any] = {"t": round(time.time(), 3), "target": f"{host}:{port}"}
        t0 = time.perf_counter()
        try:
            code, raw = _http_get((host, port), f"/items/sku-{i % 17}", args.timeout)
            rec["status"] = code
            try:
                body = json.loads(raw)
                version = body.get("catalog", {}).get("version")
                if version:
                    rec["version"] = version
            except (ValueError, AttributeError):
                pass
        except (OSError, http.client.HTTPException) as e:
            rec["status"] = 0
            rec["error"] = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        rec["ms"] = round((time.perf_counter() - t0) * 1000, 3)
        with out_lock:
            out.write(json.dumps(rec) + "\n")

    interval = 1.0 / args.rate
    with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        i = 0
        next_at = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= stop:
                break
            if now < next_at:
                time.sleep(min(next_at - now, stop - now))
                continue
            pool.submit(one, i)
            i += 1
            next_at += interval
    out.close()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m config.demo.app",
                                description="The ambit demo's small shop app.")
    sub = p.add_subparsers(dest="role", required=True)
    inv = sub.add_parser("inventory", help="raw TCP: 'stock ITEM' -> 'in-stock ITEM N'")
    inv.add_argument("--port", type=int, default=9000)
    cat = sub.add_parser("catalog", help="HTTP; asks inventory")
    cat.add_argument("--port", type=int, default=8080)
    cat.add_argument("--version", required=True)
    cat.add_argument("--inventory", type=_hostport, required=True)
    cat.add_argument("--fail-every", type=int, default=0,
                     help="answer 503 to every Nth request (retries hide it)")
    fe = sub.add_parser("frontend", help="HTTP; asks catalog")
    fe.add_argument("--port", type=int, default=8080)
    fe.add_argument("--catalog", type=_hostport, required=True)
    for sp in (inv, cat, fe):
        sp.add_argument("--stats", default=None, help="file for the server's own counters")
        sp.add_argument("--timeout", type=float, default=5.0)
    lg = sub.add_parser("loadgen", help="GET at a fixed rate, one JSON line per request")
    lg.add_argument("--target", type=_hostport, action="append", required=True)
    lg.add_argument("--rate", type=float, default=20.0)
    lg.add_argument("--duration", type=float, default=30.0)
    lg.add_argument("--concurrency", type=int, default=16)
    lg.add_argument("--timeout", type=float, default=5.0)
    lg.add_argument("--out", required=True)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    run = {"inventory": run_inventory, "catalog": run_catalog, "frontend": run_frontend,
           "loadgen": run_loadgen}[args.role]
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
