"""Bidirectional TCP splice of two sockets: half-close and reset propagation, byte counts."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass
from typing import cast

# Pause reading from one side while the other side has this much unsent data queued.
HIGH_WATER = 1 << 20
LOW_WATER = 1 << 18


@dataclass(frozen=True)
class RelayResult:
    """What a finished relay did: bytes each way, how it ended, and how long it ran."""

    sent: int  # bytes from `a` (the downstream client) to `b` (the upstream)
    received: int  # bytes from `b` back to `a`
    duration: float
    error: str | None  # None: both sides closed cleanly (FIN both ways)


def set_linger_reset(sock: object) -> None:
    """Make the next close send a TCP RST instead of a FIN (reset propagation)."""
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is None:
        return
    with contextlib.suppress(OSError):
        setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Side(asyncio.Protocol):
    """One end of the splice; forwards everything it reads to its peer side."""

    def __init__(self, relay: _Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.peer: _Side | None = None
        self.transport: asyncio.Transport | None = None
        self.bytes_in = 0
        self.eof = False  # we read EOF from this side
        self.closed = asyncio.Event()
        self.pending: list[bytes] = []  # read before the peer's transport existed
        self.pending_eof = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but have its methods.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)
        peer = self.peer
        if peer is not None and (peer.pending or peer.pending_eof):
            for chunk in peer.pending:
                transport.write(chunk)
            peer.pending.clear()
            if peer.pending_eof:
                transport.write_eof()

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer is None:
            return
        if peer.transport is None:
            self.pending.append(data)
            return
        if not peer.transport.is_closing():
            peer.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is not None and peer.transport is None:
            self.pending_eof = True
        elif peer is not None and peer.transport is not None and not peer.transport.is_closing():
            if peer.transport.can_write_eof():
                peer.transport.write_eof()
            else:
                peer.transport.close()
        self.relay.check_done()
        return True  # keep our write half open until the peer also finishes

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.relay.error is None:
            self.relay.error = f"{self.name}: {exc.__class__.__name__}: {exc}"
        if exc is not None or not self.eof:
            # Reset, or closed without an orderly FIN: reset the other side as well.
            peer = self.peer
            if peer is not None and peer.transport is not None and not peer.transport.is_closing():
                if exc is not None:
                    set_linger_reset(peer.transport.get_extra_info("socket"))
                    peer.transport.abort()
                else:
                    peer.transport.close()
        self.closed.set()
        self.relay.check_done()

    def pause_writing(self) -> None:
        # Our outgoing buffer is full: stop reading from the peer.
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()


class _Relay:
    def __init__(self) -> None:
        self.error: str | None = None
        self.a = _Side(self, "downstream")
        self.b = _Side(self, "upstream")
        self.a.peer = self.b
        self.b.peer = self.a
        self.done = asyncio.Event()

    def check_done(self) -> None:
        a, b = self.a, self.b
        if a.closed.is_set() and b.closed.is_set():
            self.done.set()
            return
        # Both directions finished with FIN: close both.
        if a.eof and b.eof:
            for side in (a, b):
                if side.transport is not None and not side.transport.is_closing():
                    side.transport.close()

    def abort(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        for side in (self.a, self.b):
            if side.transport is not None and not side.transport.is_closing():
                set_linger_reset(side.transport.get_extra_info("socket"))
                side.transport.abort()


class RelayHandle:
    """Lets the owner of a running relay close it early (policy change, drain)."""

    def __init__(self) -> None:
        self._relay: _Relay | None = None
        self._pending: str | None = None

    def _attach(self, relay: _Relay) -> None:
        self._relay = relay
        if self._pending is not None:
            relay.abort(self._pending)

    def close(self, reason: str) -> None:
        """Reset both sides of the relay; the relay finishes with `error=reason`."""
        if self._relay is None:
            self._pending = reason
        else:
            self._relay.abort(reason)


async def _watch_idle(r: _Relay, idle_timeout: float) -> None:
    """Wait for the relay to finish; abort it once no byte moved for `idle_timeout`.

    Idleness is read off the byte counts a few times per timeout (per connection), so
    the per-read path does no clock work.
    """
    step = max(0.05, min(idle_timeout / 4, 5.0))
    last = (r.a.bytes_in, r.b.bytes_in)
    last_change = time.monotonic()
    while not r.done.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(r.done.wait(), timeout=step)
        counts = (r.a.bytes_in, r.b.bytes_in)
        now = time.monotonic()
        if counts != last:
            last, last_change = counts, now
        elif now - last_change >= idle_timeout and not r.done.is_set():
            r.abort(f"idle for {idle_timeout:g}s")
            await r.done.wait()


async def relay(
    a: socket.socket,
    b: socket.socket,
    *,
    idle_timeout: float | None = None,
    handle: RelayHandle | None = None,
    initial_to_b: bytes = b"",
) -> RelayResult:
    """Splice two connected sockets until both directions are closed; return the counts.

    A FIN from one side is passed on as a FIN (`shutdown(SHUT_WR)`) to the other; a
    reset on one side resets the other. `idle_timeout` resets both sides after that many
    seconds without data in either direction. The sockets are owned by the relay
    afterwards (closed when it returns).
    """
    loop = asyncio.get_running_loop()
    r = _Relay()
    start = time.monotonic()
    try:
        await loop.connect_accepted_socket(lambda: r.a, a)
        await loop.connect_accepted_socket(lambda: r.b, b)
    except BaseException:
        for s in (a, b):
            s.close()
        for side in (r.a, r.b):
            if side.transport is not None:
                side.transport.close()
        raise
    if initial_to_b and r.b.transport is not None:
        r.b.transport.write(initial_to_b)
        r.a.bytes_in += len(initial_to_b)
    if handle is not None:
        handle._attach(r)
    try:
        if idle_timeout is None:
            await r.done.wait()
        else:
            await _watch_idle(r, idle_timeout)
    except asyncio.CancelledError:
        r.abort("cancelled")
        raise
    return RelayResult(
        sent=r.a.bytes_in,
        received=r.b.bytes_in,
        duration=time.monotonic() - start,
        error=r.error,
    )
