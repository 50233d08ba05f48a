"""HBONE connection pool: sharing, limits, idle release, GOAWAY/dead handling, refused retry."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from tests.inproc.test_hbone_h2_interop import h2_server
from tests.inproc.test_hbone_tunnel import Env, echo_server, hbone_env, read_all
from tests.pki import TestPKI
from ztunnel.hbone.errors import HboneError
from ztunnel.hbone.pool import HboneConnectionPool, PoolKey
from ztunnel.hbone.request import forwarded_for
from ztunnel.hbone.stream import HboneStream


def kw(env: Env, port: int, **extra: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "src_identity_cert": env.client_cert,
        "trust": env.pki.bundle,
        "dst_identity": env.server_cert.identity,
        "src_ip": None,
        "dst": env.server.address,
        "authority": f"127.0.0.1:{port}",
        "forwarded_for": forwarded_for("127.0.0.1", 41000),
    }
    args.update(extra)
    return args


async def echo_once(stream: HboneStream, data: bytes) -> bytes:
    stream.write(data)
    stream.write_eof()
    return await read_all(stream)


async def test_concurrent_opens_share_one_connection() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()
        streams = await asyncio.gather(*(pool.open_stream(**kw(env, port)) for _ in range(10)))
        assert pool.connections_opened == 1
        assert len({s.connection for s in streams}) == 1
        results = await asyncio.gather(*(echo_once(s, b"%d" % i) for i, s in enumerate(streams)))
        assert results == [b"%d" % i for i in range(10)]
        await pool.close()


async def test_new_connection_when_streams_reach_the_limit() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool(max_streams_per_conn=3)
        streams = [await pool.open_stream(**kw(env, port)) for _ in range(7)]
        assert pool.connections_opened == 3
        per_conn = sorted(len(c.streams) for c in pool.connections())
        assert per_conn == [1, 3, 3]
        for s in streams:
            assert await echo_once(s, b"x") == b"x"
        await pool.close()


async def test_limit_is_capped_by_the_peer_setting() -> None:
    async with echo_server() as port, hbone_env(max_concurrent_streams=2) as env:
        pool = HboneConnectionPool(max_streams_per_conn=100)
        streams = [await pool.open_stream(**kw(env, port)) for _ in range(5)]
        assert pool.connections_opened == 3
        for s in streams:
            assert await echo_once(s, b"y") == b"y"
        await pool.close()


async def test_keys_separate_connections() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()
        a = await pool.open_stream(**kw(env, port))
        b = await pool.open_stream(**kw(env, port, src_ip="127.0.0.1"))
        other_client = env.pki.issue("ns-src", "other")
        c = await pool.open_stream(**kw(env, port, src_identity_cert=other_client))
        assert pool.connections_opened == 3
        assert len({a.connection, b.connection, c.connection}) == 3
        assert b.connection.local_addr[0] == "127.0.0.1"
        await pool.close()


async def test_idle_connections_are_released() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool(idle_timeout=0.2)
        s = await pool.open_stream(**kw(env, port))
        conn = s.connection
        assert await echo_once(s, b"z") == b"z"
        await asyncio.wait_for(conn.closed, 2)
        assert pool.connections() == []
        s2 = await pool.open_stream(**kw(env, port))
        assert s2.connection is not conn and pool.connections_opened == 2
        assert await echo_once(s2, b"again") == b"again"
        await pool.close()


async def test_busy_connection_is_not_released_while_idle_timer_runs() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool(idle_timeout=0.1)
        s = await pool.open_stream(**kw(env, port))
        await asyncio.sleep(0.4)
        assert s.connection.usable
        assert await echo_once(s, b"alive") == b"alive"
        await pool.close()


async def test_goaway_connection_is_not_handed_out() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()
        first = await pool.open_stream(**kw(env, port))
        for server_conn in list(env.server.connections):
            server_conn.goaway()  # drain this connection, keep the listener
        while first.connection.core.goaway_received is False:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        second = await pool.open_stream(**kw(env, port))
        assert second.connection is not first.connection
        assert pool.connections_opened == 2
        # The in-flight stream on the draining connection still completes.
        assert await echo_once(first, b"draining") == b"draining"
        assert await echo_once(second, b"fresh") == b"fresh"
        await pool.close()


async def test_dead_connection_is_replaced() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()
        first = await pool.open_stream(**kw(env, port))
        conn = first.connection
        assert await echo_once(first, b"1") == b"1"
        for server_conn in list(env.server.connections):
            server_conn.abort()
        await asyncio.wait_for(conn.closed, 2)
        second = await pool.open_stream(**kw(env, port))
        assert second.connection is not conn
        assert await echo_once(second, b"2") == b"2"
        await pool.close()


def h2_args(pki: TestPKI, client: Any, server: Any, addr: tuple[str, int]) -> dict[str, Any]:
    return {
        "src_identity_cert": client,
        "trust": pki.bundle,
        "dst_identity": server.identity,
        "src_ip": None,
        "dst": addr,
        "authority": "10.0.0.1:80",
        "forwarded_for": None,
    }


async def test_refused_stream_is_retried_once_on_a_fresh_connection() -> None:
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "h2")
    client_cert = pki.issue("ns-src", "client")
    async with h2_server(server_cert, pki, refuse_connections=1) as (addr, protocols):
        pool = HboneConnectionPool()
        stream = await pool.open_stream(**h2_args(pki, client_cert, server_cert, addr))
        assert pool.connections_opened == 2
        assert [len(p.requests) for p in protocols] == [1, 1]
        assert await echo_once(stream, b"retried") == b"retried"
        await pool.close()


async def test_refused_twice_gives_up_with_a_clear_error() -> None:
    pki = TestPKI()
    server_cert = pki.issue("ns-dst", "h2")
    client_cert = pki.issue("ns-src", "client")
    async with h2_server(server_cert, pki, refuse_connections=10) as (addr, protocols):
        pool = HboneConnectionPool()
        with pytest.raises(HboneError, match="REFUSED_STREAM") as err:
            await pool.open_stream(**h2_args(pki, client_cert, server_cert, addr))
        assert err.value.refused
        assert pool.connections_opened == 2 and len(protocols) == 2
        await pool.close()


async def test_connect_socket_hook_gets_the_key_and_timeouts_are_actionable() -> None:
    async with hbone_env() as env:
        seen: list[PoolKey] = []

        async def hanging(key: PoolKey) -> socket.socket:
            seen.append(key)
            await asyncio.sleep(30)
            raise AssertionError("not reached")

        pool = HboneConnectionPool(hanging, connect_timeout=0.2)
        with pytest.raises(HboneError, match=r"timed out after 0\.2s: is HBONE port \d+ blocked"):
            await pool.open_stream(**kw(env, 80, src_ip="10.0.0.9", dst=("10.0.0.5", 15008)))
        ids = (env.client_cert.identity, env.server_cert.identity)
        assert seen == [PoolKey(*ids, "10.0.0.9", ("10.0.0.5", 15008))]
        await pool.close()


async def test_wrong_destination_identity_is_reported() -> None:
    async with hbone_env() as env:
        pool = HboneConnectionPool()
        wrong = env.pki.identity("ns-dst", "impostor-expected")
        with pytest.raises(HboneError, match=f"expected {wrong}"):
            await pool.open_stream(**kw(env, 80, dst_identity=wrong))
        assert pool.connections() == []
        await pool.close()


async def test_drain_lets_streams_finish_then_closes() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()
        s = await pool.open_stream(**kw(env, port))
        drain = asyncio.get_running_loop().create_task(pool.drain(timeout=5))
        await asyncio.sleep(0.05)
        assert not drain.done()
        with pytest.raises(HboneError, match="pool is closed"):
            await pool.open_stream(**kw(env, port))
        assert await echo_once(s, b"last words") == b"last words"
        await asyncio.wait_for(drain, 5)
        assert pool.connections() == []


async def test_waiters_share_a_failed_connect_instead_of_queueing_timeouts() -> None:
    async with hbone_env() as env:
        calls = 0

        async def hanging(key: PoolKey) -> socket.socket:
            nonlocal calls
            calls += 1
            await asyncio.sleep(30)
            raise AssertionError("not reached")

        pool = HboneConnectionPool(hanging, connect_timeout=0.3)
        started = asyncio.get_running_loop().time()
        results = await asyncio.gather(
            *(pool.open_stream(**kw(env, 80)) for _ in range(5)), return_exceptions=True
        )
        elapsed = asyncio.get_running_loop().time() - started
        assert all(isinstance(r, HboneError) and "timed out" in str(r) for r in results)
        assert calls == 1
        assert elapsed < 1.5  # one timeout, not five in a row
        # A later attempt tries again.
        with pytest.raises(HboneError, match="timed out"):
            await pool.open_stream(**kw(env, 80))
        assert calls == 2
        await pool.close()


async def test_many_short_streams_leave_nothing_behind() -> None:
    async with echo_server() as port, hbone_env() as env:
        pool = HboneConnectionPool()

        async def one(i: int) -> bytes:
            s = await pool.open_stream(**kw(env, port))
            return await echo_once(s, b"%d" % i)

        for batch in range(4):
            got = await asyncio.gather(*(one(batch * 50 + i) for i in range(50)))
            assert got == [b"%d" % (batch * 50 + i) for i in range(50)]
        (conn,) = pool.connections()
        assert not conn.streams and conn.core.open_streams == 0
        assert not conn._paused_sources
        for server_conn in env.server.connections:
            for _ in range(100):  # the server side finishes its splices right after
                if not server_conn.streams:
                    break
                await asyncio.sleep(0.01)
            assert not server_conn.streams and server_conn.core.open_streams == 0
        assert pool.connections_opened == 1
        await pool.close()
