"""The identity manager on a real event loop with an injected clock (no sleeping)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from config.ca import CertificateAuthority
from ztunnel.identity import IdentityManager, IdentityUnavailable, SpiffeId

T0 = 1_800_000_000.0
FRONTEND = SpiffeId("cluster.local", "shop", "frontend")
CART = SpiffeId("cluster.local", "shop", "cart")


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class ControlPlane:
    """Signs CSRs with a real CA at the fake time; can be told to fail."""

    def __init__(self, tmp_path: Path, clock: FakeClock, ttl: float = 3600) -> None:
        self.ca = CertificateAuthority.load_or_create(tmp_path, "cluster.local", now=T0)
        self.clock = clock
        self.ttl = ttl
        self.calls: list[SpiffeId] = []
        self.fail: str | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        self.calls.append(identity)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError(self.fail)
        return self.ca.sign_csr(csr_pem, identity, self.ttl, self.clock())


async def settle() -> None:
    """Let the worker and fetch tasks run to quiescence (yields only, no timers)."""
    for _ in range(50):
        await asyncio.sleep(0)


@contextlib.asynccontextmanager
async def running(mgr: IdentityManager) -> AsyncIterator[IdentityManager]:
    async with asyncio.TaskGroup() as tg:
        task = tg.create_task(mgr.run())
        try:
            yield mgr
        finally:
            task.cancel()


def _manager(cp: ControlPlane, clock: FakeClock, **kw: float) -> IdentityManager:
    return IdentityManager(cp, clock=clock, random=lambda: 0.5, **kw)  # type: ignore[arg-type]


async def test_get_fetches_once_and_then_serves_from_cache(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    async with running(_manager(cp, clock)) as mgr:
        first, second = await asyncio.gather(mgr.get(FRONTEND), mgr.get(FRONTEND))
        assert first is second and first.identity == FRONTEND
        assert await mgr.get(FRONTEND) is first
        assert cp.calls == [FRONTEND]
        assert mgr.cached(FRONTEND) is first


async def test_scheduled_workloads_are_prefetched(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    async with running(_manager(cp, clock)) as mgr:
        mgr.set_wanted([FRONTEND, CART])
        await settle()
        assert sorted(cp.calls) == sorted([FRONTEND, CART])
        assert mgr.cached(CART) is not None


async def test_renewal_happens_at_half_life_on_the_injected_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock, ttl=3600)
    async with running(_manager(cp, clock)) as mgr:
        old = await mgr.get(FRONTEND)
        clock.now = old.renewal_time() - 1
        mgr.wakeup()
        await settle()
        assert cp.calls == [FRONTEND]
        clock.now = old.renewal_time()
        mgr.wakeup()
        await settle()
        assert cp.calls == [FRONTEND, FRONTEND]
        new = await mgr.get(FRONTEND)
        assert new.x509().serial_number != old.x509().serial_number
        assert new.not_after > old.not_after


async def test_failed_renewal_keeps_the_valid_certificate_and_backs_off(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock, ttl=3600)
    async with running(_manager(cp, clock, backoff_initial=10.0)) as mgr:
        old = await mgr.get(FRONTEND)
        cp.fail = "connection to 10.0.0.1:15012 refused"
        clock.now = old.renewal_time()
        with capture_logs() as logs:
            mgr.wakeup()
            await settle()
        assert len(cp.calls) == 2
        assert await mgr.get(FRONTEND) is old  # still valid: kept in service
        [event] = [e for e in logs if e["event"] == "certificate fetch failed"]
        assert event["retry_in"] == 7.5  # 10s base, jitter 0.5 -> 7.5s
        assert "refused" in event["error"]
        clock.now += 7.0
        mgr.wakeup()
        await settle()
        assert len(cp.calls) == 2  # still backing off
        cp.fail = None
        clock.now += 0.5
        mgr.wakeup()
        await settle()
        assert len(cp.calls) == 3
        assert (await mgr.get(FRONTEND)).not_after > old.not_after


async def test_a_waiting_connection_gets_the_failure_reason(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    cp.fail = "node-impersonation: identity spiffe://cluster.local/ns/shop/sa/cart is not..."
    async with running(_manager(cp, clock, backoff_initial=60.0)) as mgr:
        with pytest.raises(IdentityUnavailable) as err:
            await mgr.get(CART)
        assert str(err.value).startswith(
            "no certificate for spiffe://cluster.local/ns/shop/sa/cart: ConnectionError: "
            "node-impersonation"
        )
        # within the backoff, further connections fail fast without asking again
        with pytest.raises(IdentityUnavailable, match="next attempt in 45s"):
            await mgr.get(CART)
        assert len(cp.calls) == 1


async def test_waiting_connection_is_served_before_prefetches(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    cp.gate = asyncio.Event()
    others = [SpiffeId("cluster.local", "shop", f"w{i}") for i in range(5)]
    async with running(_manager(cp, clock, max_in_flight=1)) as mgr:
        mgr.set_wanted(others)
        await settle()
        assert len(cp.calls) == 1  # one slot: the first prefetch is in flight
        waiter = asyncio.ensure_future(mgr.get(FRONTEND))
        await settle()
        cp.gate.set()
        await waiter
        await settle()
        assert cp.calls[1] == FRONTEND  # ahead of the four queued prefetches
        assert sorted(cp.calls[2:] + cp.calls[:1]) == sorted(others)


async def test_identities_that_left_the_node_are_forgotten(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    async with running(_manager(cp, clock)) as mgr:
        mgr.set_wanted([FRONTEND, CART])
        await settle()
        mgr.set_wanted([CART])
        assert mgr.cached(FRONTEND) is None
        assert [d["identity"] for d in mgr.describe()] == [str(CART)]


async def test_a_certificate_for_another_identity_is_refused(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)

    async def wrong(identity: SpiffeId, csr_pem: bytes) -> list[bytes]:
        from ztunnel.identity import generate_key, make_csr

        return cp.ca.sign_csr(make_csr(CART, generate_key()), CART, 3600, clock())

    mgr = IdentityManager(wrong, clock=clock, random=lambda: 0.5)
    async with running(mgr):
        with pytest.raises(
            IdentityUnavailable,
            match=r"private key does not match the certificate for spiffe://cluster\.local/ns/shop/sa/cart",
        ):
            await mgr.get(FRONTEND)


async def test_private_keys_never_reach_the_logs_or_the_admin_dump(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock, ttl=3600)
    async with running(_manager(cp, clock)) as mgr:
        with capture_logs() as logs:
            cert = await mgr.get(FRONTEND)
            clock.now = cert.renewal_time()
            cp.fail = "down"
            mgr.wakeup()
            await settle()
        assert logs, "issuance and failure are logged"
        secret = cert.key_pem.decode()
        dumped = repr(logs) + repr(mgr.describe()) + repr(cert)
        assert "PRIVATE KEY" not in dumped
        assert secret.splitlines()[1] not in dumped


async def test_cancelled_waiter_does_not_block_others(tmp_path: Path) -> None:
    clock = FakeClock()
    cp = ControlPlane(tmp_path, clock)
    cp.gate = asyncio.Event()
    async with running(_manager(cp, clock)) as mgr:
        impatient = asyncio.ensure_future(mgr.get(FRONTEND))
        patient = asyncio.ensure_future(mgr.get(FRONTEND))
        await settle()
        impatient.cancel()
        await settle()
        cp.gate.set()
        assert (await patient).identity == FRONTEND
        assert impatient.cancelled()
