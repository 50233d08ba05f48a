"""Resilience end to end: dead endpoints, outliers, latency-aware balancing, pools, drain."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import aiohttp
from aiohttp import web

from tests.inproc.test_waypoint_e2e import Backend, Mesh, backend_ref, get, route, which
from waypoint.chain import LB_ANNOTATION


def dr(host: str, policy: dict[str, Any], annotations: dict[str, str] | None = None
       ) -> dict[str, Any]:
    md: dict[str, Any] = {"name": f"dr-{host}", "namespace": "app"}
    if annotations:
        md["annotations"] = annotations
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
            "metadata": md, "spec": {"host": host, "trafficPolicy": policy}}


async def test_dead_endpoint_is_retried_elsewhere_and_all_dead_is_503_uf() -> None:
    mesh = Mesh({"front": 1, "a": 2}, [route([{"backendRefs": [backend_ref("a")]}])], {})
    mesh.backends["a"][0].down = True
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        # the default retry (connect failures, to another endpoint) hides one dead
        # endpoint: every request gets a 200 from the live one
        statuses: Counter[int] = Counter()
        for _ in range(20):
            statuses[(await get(s, url + "/"))[0]] += 1
        assert statuses == Counter({200: 20})
        assert mesh.backends["a"][0].peers  # it was tried
        mesh.backends["a"][1].down = True
        assert mesh.waypoint is not None
        mesh.waypoint.upstreams.close_idle()  # its kept-alive connections went with it
        status, text, _ = await get(s, url + "/")
        assert status == 503 and "connect" in text
        metrics = mesh.waypoint.registry
        assert any(s.labels.get("response_flags") == "UF" and s.value == 1.0
                   for m in metrics.collect() if m.name == "istio_requests"
                   for s in m.samples if s.name == "istio_requests_total")


async def test_outlier_detection_ejects_a_failing_endpoint() -> None:
    mesh = Mesh({"front": 1, "a": 2}, [
        route([{"backendRefs": [backend_ref("a")]}]),
        dr("a", {"outlierDetection": {"consecutive5xxErrors": 2, "interval": "1s",
                                      "baseEjectionTime": "30s", "maxEjectionPercent": 50}}),
    ], {})

    async def broken(b: Backend, r: web.Request) -> web.StreamResponse:
        return web.Response(status=500, text="broken")

    mesh.backends["a"][0].handler = broken
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        got: Counter[int] = Counter()
        for _ in range(40):
            got[(await get(s, url + "/"))[0]] += 1
    # two 500s eject the broken endpoint; everything after goes to the healthy one
    assert got[500] <= 3 and got[200] >= 37, got
    assert len(mesh.backends["a"][0].requests) <= 3


async def test_latency_aware_balancing_steers_away_from_a_slow_endpoint() -> None:
    mesh = Mesh({"front": 1, "a": 2}, [
        route([{"backendRefs": [backend_ref("a")]}]),
        dr("a", {"loadBalancer": {"simple": "LEAST_REQUEST"}},
           annotations={LB_ANNOTATION: "PEAK_EWMA"}),
    ], {}, access_log=False)
    slow = mesh.backends["a"][0]
    slow.delay = 0.05
    async with mesh.running(), mesh.forward("front") as url:
        conn = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=conn) as s:

            async def worker() -> None:
                for _ in range(25):
                    await get(s, url + "/")

            async with asyncio.TaskGroup() as tg:
                for _ in range(8):
                    tg.create_task(worker())
    fast = mesh.backends["a"][1]
    assert len(slow.requests) + len(fast.requests) == 200
    assert len(slow.requests) < 40, (len(slow.requests), len(fast.requests))


async def test_connection_pool_limit_answers_503_uo() -> None:
    mesh = Mesh({"front": 1, "a": 1}, [
        route([{"backendRefs": [backend_ref("a")]}]),
        dr("a", {"connectionPool": {"http": {"http2MaxRequests": 2}}}),
    ], {})
    mesh.backends["a"][0].delay = 0.3
    async with mesh.running(), mesh.forward("front") as url:
        conn = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=conn) as s:
            results = await asyncio.gather(*(get(s, url + "/") for _ in range(6)))
    statuses = Counter(r[0] for r in results)
    assert statuses[200] == 2 and statuses[503] == 4, statuses
    assert all("overflow" in r[1] for r in results if r[0] == 503)
    assert mesh.waypoint is not None
    assert mesh.waypoint.registry.get_sample_value(
        "istio_requests_total", {**_labels(), "response_code": "503",
                                 "response_flags": "UO"}) == 4.0


def _labels() -> dict[str, str]:
    return {"reporter": "waypoint", "source_workload": "unknown",
            "source_workload_namespace": "app",
            "source_principal": "cluster.local/ns/app/sa/client", "source_app": "unknown",
            "destination_workload": "unknown", "destination_workload_namespace": "unknown",
            "destination_principal": "unknown", "destination_app": "unknown",
            "destination_service": "unknown", "destination_service_name": "unknown",
            "destination_service_namespace": "unknown", "request_protocol": "http",
            "grpc_response_status": "-", "connection_security_policy": "mutual_tls"}


async def test_drain_lets_in_flight_requests_finish() -> None:
    mesh = Mesh({"front": 1}, [], {})
    mesh.backends["front"][0].delay = 0.4
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        assert mesh.waypoint is not None
        wp = mesh.waypoint
        pending = asyncio.ensure_future(get(s, url + "/slow"))
        await asyncio.sleep(0.15)  # the request is with the backend now
        await wp.drain(5.0)
        status, text, _ = await pending
        assert status == 200 and which(text) == "front"


async def test_max_connections_queue_then_overflow_and_requests_per_connection() -> None:
    mesh = Mesh({"front": 1, "a": 1}, [
        route([{"backendRefs": [backend_ref("a")]}]),
        dr("a", {"connectionPool": {"tcp": {"maxConnections": 1},
                                    "http": {"http1MaxPendingRequests": 1,
                                             "maxRequestsPerConnection": 2}}}),
    ], {})
    mesh.backends["a"][0].delay = 0.3
    async with mesh.running(), mesh.forward("front") as url:
        conn = aiohttp.TCPConnector(limit=8)
        async with aiohttp.ClientSession(connector=conn) as s:
            results = await asyncio.gather(*(get(s, url + "/") for _ in range(3)))
            statuses = Counter(r[0] for r in results)
            # one on the only connection, one waits for it, the third overflows
            assert statuses == Counter({200: 2, 503: 1}), statuses
            mesh.backends["a"][0].delay = 0.0
            assert mesh.waypoint is not None
            ups = mesh.waypoint.upstreams
            opened = ups.connections_opened
            for _ in range(6):
                assert (await get(s, url + "/"))[0] == 200
            # two requests per connection at most: six requests need three more
            assert ups.connections_opened - opened == 3


async def test_upstream_dying_mid_response_is_not_a_whole_response() -> None:
    mesh = Mesh({"front": 1}, [], {})

    async def dies(b: Backend, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked
        await resp.prepare(request)
        await resp.write(b"partial " * 100)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()  # the workload crashes mid-body
        return resp

    mesh.backends["front"][0].handler = dies
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        try:
            async with s.get(url + "/") as r:
                assert r.status == 200
                await r.read()
            raise AssertionError("a cut-off body was passed off as complete")
        except aiohttp.ClientPayloadError:
            pass
        # the waypoint still serves the next request
        mesh.backends["front"][0].handler = None
        assert (await get(s, url + "/"))[0] == 200
    assert mesh.waypoint is not None
    flags = {s.labels["response_flags"] for m in mesh.waypoint.registry.collect()
             if m.name == "istio_requests" for s in m.samples
             if s.name == "istio_requests_total"}
    assert "UC" in flags


async def test_rate_limit_429_and_fault_delay() -> None:
    rl = {"apiVersion": "ambit.dev/v1alpha1", "kind": "RateLimit",
          "metadata": {"name": "rl", "namespace": "app"},
          "spec": {"tokenBucket": {"maxTokens": 3, "fillInterval": "60s"}}}
    delay = {"apiVersion": "ambit.dev/v1alpha1", "kind": "HTTPFault",
             "metadata": {"name": "slow", "namespace": "app"},
             "spec": {"delay": {"fixedDelay": "200ms"}}}

    def ext(kind: str, name: str) -> dict[str, Any]:
        return {"type": "ExtensionRef",
                "extensionRef": {"group": "ambit.dev", "kind": kind, "name": name}}

    mesh = Mesh({"front": 1, "a": 1}, [route([
        {"matches": [{"path": {"type": "PathPrefix", "value": "/limited"}}],
         "filters": [ext("RateLimit", "rl")], "backendRefs": [backend_ref("a")]},
        {"matches": [{"path": {"type": "PathPrefix", "value": "/slow"}}],
         "filters": [ext("HTTPFault", "slow")], "backendRefs": [backend_ref("a")]},
        {"backendRefs": [backend_ref("a")]},
    ]), rl, delay], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        got = [(await get(s, url + "/limited"))[0] for _ in range(5)]
        assert got == [200, 200, 200, 429, 429]
        async with s.get(url + "/limited") as r:
            assert r.status == 429 and int(r.headers["retry-after"]) >= 1
        assert (await get(s, url + "/other"))[0] == 200  # other rules are not limited
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        assert (await get(s, url + "/slow"))[0] == 200
        assert loop.time() - t0 >= 0.19
    assert mesh.waypoint is not None
    flags = {(smp.labels["response_code"], smp.labels["response_flags"])
             for m in mesh.waypoint.registry.collect() if m.name == "istio_requests"
             for smp in m.samples if smp.name == "istio_requests_total"}
    assert ("429", "RL") in flags and ("200", "DI") in flags


async def test_drain_closes_idle_keep_alive_connections_at_once() -> None:
    mesh = Mesh({"front": 1}, [], {})
    async with mesh.running(), mesh.forward("front") as url, aiohttp.ClientSession() as s:
        assert (await get(s, url + "/"))[0] == 200  # leaves a kept-alive connection idle
        assert mesh.waypoint is not None
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await mesh.waypoint.drain(5.0)
        assert loop.time() - t0 < 2.0  # not the whole drain timeout
