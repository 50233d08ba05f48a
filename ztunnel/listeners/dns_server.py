"""DNS proxy on 15053 (UDP and TCP) in a workload's netns: mesh names locally, the rest upstream.

Queries captured by TPROXY keep their original destination (the resolver the client
asked). Service names are answered from the snapshot (`ztunnel.dns.answer`); anything
else is forwarded, as received, to that original resolver from inside the workload's
netns (SO_MARK 0x539, so it is not captured again). UDP replies are sent from a
transparent socket bound to the original resolver address, so the client's resolver
library accepts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any

from ztunnel.dns import DnsFormatError, Forward, LocalAnswer, TcpFramer, answer, frame_tcp
from ztunnel.listeners._base import (
    IP_ORIGDSTADDR,
    IPV6_ORIGDSTADDR,
    PROXY_MARK,
    SO_MARK,
    ProxyContext,
    TcpAcceptor,
    connect,
    listener_socket,
    log,
    onward_socket,
    set_transparent,
)
from ztunnel.snapshot import Workload

DNS_PORT = 15053
UPSTREAM_TIMEOUT = 5.0
MAX_INFLIGHT = 256


def _orig_dst(ancdata: list[tuple[int, int, bytes]]) -> tuple[str, int] | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR and len(data) >= 8:
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntoa(data[4:8]), port
        if level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR and len(data) >= 24:
            # struct sockaddr_in6: family, port, flowinfo, 16-byte address
            port = struct.unpack("!H", data[2:4])[0]
            return socket.inet_ntop(socket.AF_INET6, data[8:24]), port
    return None


class DnsListener:
    """UDP + TCP DNS proxy for one workload."""

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns: str | None,
        *,
        host: str = "127.0.0.1",
        port: int = DNS_PORT,
    ) -> None:
        self.ctx = ctx
        self.workload_uid = workload.uid
        self.netns = netns
        self._workload = workload
        self.udp = listener_socket(netns, host, port, kind=socket.SOCK_DGRAM)
        try:
            tcp = listener_socket(netns, host, self.udp.getsockname()[1])
        except BaseException:
            self.udp.close()
            raise
        self.tcp = TcpAcceptor(tcp, ctx, self._handle_tcp, f"dns {workload.name}")
        self.address: tuple[str, int] = self.udp.getsockname()[:2]
        self._stop = asyncio.Event()
        self._inflight: set[asyncio.Task[None]] = set()
        self.answered = 0
        self.forwarded = 0

    def close(self) -> None:
        """Release the sockets of a listener that never ran."""
        self.udp.close()
        self.tcp.close()

    def _client(self) -> Workload:
        return self.ctx.snapshot.workload_by_uid(self.workload_uid) or self._workload

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.tcp.run())
            queue: asyncio.Queue[tuple[bytes, Any, tuple[str, int] | None]] = asyncio.Queue(
                maxsize=MAX_INFLIGHT
            )

            def readable() -> None:
                for _ in range(64):
                    try:
                        data, anc, _flags, addr = self.udp.recvmsg(65535, 256)
                    except (BlockingIOError, InterruptedError):
                        return
                    except OSError as exc:
                        log.warning("dns recv failed", error=str(exc))
                        return
                    with contextlib.suppress(asyncio.QueueFull):  # overload: drop, client retries
                        queue.put_nowait((data, addr, _orig_dst(anc)))

            loop.add_reader(self.udp.fileno(), readable)
            try:
                while not self._stop.is_set():
                    get = asyncio.ensure_future(queue.get())
                    stop = asyncio.ensure_future(self._stop.wait())
                    await asyncio.wait({get, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if not get.done():
                        get.cancel()
                        break
                    data, addr, orig = get.result()
                    task = tg.create_task(self._handle_udp(data, addr, orig))
                    self._inflight.add(task)
                    task.add_done_callback(self._inflight.discard)
            finally:
                loop.remove_reader(self.udp.fileno())
                self.udp.close()

    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109 - listener contract
        self._stop.set()
        await self.tcp.drain(timeout)
        if self._inflight:
            await asyncio.wait(set(self._inflight), timeout=timeout)

    # ------------------------------------------------------------------ UDP

    async def _handle_udp(self, data: bytes, client: Any, orig: tuple[str, int] | None) -> None:
        try:
            result = answer(self.ctx.snapshot, data, client=self._client(), udp=True)
        except DnsFormatError:
            return
        if isinstance(result, LocalAnswer):
            self.answered += 1
            reply: bytes | None = result.data
        else:
            self.forwarded += 1
            reply = await self._forward_udp(result, orig)
        if reply is not None:
            self._send_udp(reply, client, orig)

    async def _forward_udp(self, fwd: Forward, orig: tuple[str, int] | None) -> bytes | None:
        if orig is None:
            return None
        loop = asyncio.get_running_loop()
        sock = onward_socket(self.netns, orig[0], kind=socket.SOCK_DGRAM)
        try:
            await loop.sock_connect(sock, orig)
            await loop.sock_sendall(sock, fwd.query)
            async with asyncio.timeout(UPSTREAM_TIMEOUT):
                return await loop.sock_recv(sock, 65535)
        except (TimeoutError, OSError) as exc:
            log.info("dns forward failed", upstream=f"{orig[0]}:{orig[1]}", error=str(exc))
            return None
        finally:
            sock.close()

    def _send_udp(self, reply: bytes, client: Any, orig: tuple[str, int] | None) -> None:
        if orig is None or orig == self.address:
            with contextlib.suppress(OSError):
                self.udp.sendto(reply, client)
            return
        # Reply from the address the client asked, or its resolver drops the answer.
        from netsetup.netns import socket_in_netns

        v6 = ":" in orig[0]
        family = socket.AF_INET6 if v6 else socket.AF_INET
        try:
            sock = socket_in_netns(self.netns, family, socket.SOCK_DGRAM)
        except OSError:
            return
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, PROXY_MARK)
            set_transparent(sock, family)
            sock.bind(orig)
            sock.sendto(reply, client)
        except OSError as exc:
            log.info("dns reply failed", client=str(client), error=str(exc))
        finally:
            sock.close()

    # ------------------------------------------------------------------ TCP

    async def _handle_tcp(self, conn: socket.socket, peer: Any) -> None:
        loop = asyncio.get_running_loop()
        orig = conn.getsockname()[:2]
        framer = TcpFramer()
        try:
            while True:
                async with asyncio.timeout(30):
                    data = await loop.sock_recv(conn, 65535)
                if not data:
                    return
                try:
                    messages = framer.feed(data)
                except DnsFormatError:
                    return
                for msg in messages:
                    try:
                        result = answer(self.ctx.snapshot, msg, client=self._client(), udp=False)
                    except DnsFormatError:
                        return
                    if isinstance(result, LocalAnswer):
                        self.answered += 1
                        reply: bytes | None = result.data
                    else:
                        self.forwarded += 1
                        reply = await self._forward_tcp(result, (orig[0], orig[1]))
                    if reply is None:
                        return
                    await loop.sock_sendall(conn, frame_tcp(reply))
        except (TimeoutError, OSError):
            return
        finally:
            conn.close()

    async def _forward_tcp(self, fwd: Forward, orig: tuple[str, int]) -> bytes | None:
        loop = asyncio.get_running_loop()
        try:
            sock = onward_socket(self.netns, orig[0])
            await connect(sock, orig, UPSTREAM_TIMEOUT)
        except (ConnectionError, OSError) as exc:
            log.info("dns forward failed", upstream=f"{orig[0]}:{orig[1]}", error=str(exc))
            return None
        framer = TcpFramer()
        try:
            await loop.sock_sendall(sock, frame_tcp(fwd.query))
            async with asyncio.timeout(UPSTREAM_TIMEOUT):
                while True:
                    data = await loop.sock_recv(sock, 65535)
                    if not data:
                        return None
                    msgs = framer.feed(data)
                    if msgs:
                        return msgs[0]
        except (TimeoutError, OSError, DnsFormatError):
            return None
        finally:
            sock.close()
