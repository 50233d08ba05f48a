"""DNS proxy on 15053 (UDP and TCP) in a workload's netns: mesh names locally, the rest upstream.

Queries captured by TPROXY keep their original destination (the resolver the client
asked). Service names are answered from the snapshot (`ztunnel.dns.answer`).
Everything else goes to the node's upstream resolvers, as Istio's ztunnel does: the
`nameserver`s of ztunnel's own /etc/resolv.conf (re-read when the file changes) or
the servers given with `ztunnel --dns-upstream IP[:PORT],...`. They are asked through
aiodns (c-ares) from ztunnel's own netns, one `UpstreamResolver` per process shared by
every workload: UDP clients over UDP (c-ares retries over TCP when the answer is
truncated), TCP clients over TCP. aiodns resolves a name and type, so its answer is
re-encoded into a response to the client's own question (id, case of the name, RD,
EDNS echoed; truncated to the client's UDP size); NXDOMAIN, NODATA, SERVFAIL, REFUSED
keep their rcodes, and an upstream that does not answer becomes SERVFAIL. Query types
or classes aiodns cannot ask (e.g. HTTPS, or class CH) are relayed as received to the
same upstream servers.

Fallback, kept on purpose: when ztunnel knows no upstream at all (no --dns-upstream
and no `nameserver` in its resolv.conf), the query is forwarded, as received, to the
resolver the client originally asked, from inside the workload's netns (SO_MARK 0x539,
so it is not captured again). That is the only resolver such a node can have, and
refusing every external name instead would break the workloads for no gain.

UDP replies are sent from a transparent socket bound to the original resolver
address, so the client's resolver library accepts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import aiodns
import aiodns.error
import pycares

from ztunnel.dns import (
    CLASS_IN,
    MAX_UDP_PAYLOAD,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NOTIMP,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    Forward,
    LocalAnswer,
    Message,
    Name,
    ResourceRecord,
    TcpFramer,
    answer,
    frame_tcp,
    make_response,
    name_to_text,
)
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

__all__ = [
    "DNS_PORT",
    "RESOLV_CONF",
    "DnsListener",
    "UpstreamResolver",
    "UpstreamServer",
    "default_upstream",
    "parse_upstreams",
    "rcode_for_error",
    "rdata_of",
    "resolv_conf_nameservers",
    "response_from_result",
    "set_default_upstream",
]

DNS_PORT = 15053
UPSTREAM_TIMEOUT = 5.0
MAX_INFLIGHT = 256
RESOLV_CONF = "/etc/resolv.conf"
_MIN_UDP = 512
#: How often (at most) the resolv.conf of the default upstream is checked for changes.
_RESOLV_CONF_CHECK = 1.0

# The query types aiodns asks by name (`DNSResolver.query_dns`).
_QTYPE_NAMES: dict[int, str] = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 15: "MX", 16: "TXT", 28: "AAAA",
    33: "SRV", 35: "NAPTR", 255: "ANY", 257: "CAA",
}


# ----------------------------------------------------------------------------- upstreams


@dataclass(frozen=True, slots=True)
class UpstreamServer:
    """One upstream resolver address."""

    host: str
    port: int = 53

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _server(text: str) -> UpstreamServer:
    text = text.strip()
    host, port = text, "53"
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 upstream as [ADDR] or [ADDR]:PORT")
        port = rest[1:] or "53"
    elif text.count(":") == 1:
        host, port = text.split(":")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not IP[:PORT] (an address, not a name)") from None
    if not port.isdigit() or not 0 < int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be 1..65535")
    return UpstreamServer(str(addr), int(port))


def parse_upstreams(text: str) -> tuple[UpstreamServer, ...]:
    """`IP[:PORT],...` (IPv6 as `[ADDR]:PORT` or bare) -> servers; ValueError says what is wrong."""
    servers = tuple(_server(part) for part in text.split(",") if part.strip())
    if not servers:
        raise ValueError(f"{text!r} names no upstream resolver: give IP[:PORT],...")
    return servers


def resolv_conf_nameservers(path: str = RESOLV_CONF) -> tuple[UpstreamServer, ...]:
    """The `nameserver` lines of a resolv.conf (port 53); () if the file is missing or has none."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    out: list[UpstreamServer] = []
    for line in lines:
        fields = line.split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        addr = fields[1].split("%", 1)[0]  # fe80::1%eth0: the zone is not ours to use
        with contextlib.suppress(ValueError):
            out.append(UpstreamServer(str(ipaddress.ip_address(addr))))
    return tuple(out)


# ----------------------------------------------------------------------------- re-encoding


def _labels(text: str) -> Name:
    """Labels of a presentation-form name (`\\.` and `\\DDD` escapes understood)."""
    if text in ("", "."):
        return ()
    labels: list[bytes] = []
    cur = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            if text[i + 1 : i + 4].isdigit() and len(text[i + 1 : i + 4]) == 3:
                cur.append(int(text[i + 1 : i + 4]) & 0xFF)
                i += 4
                continue
            cur += text[i + 1].encode("utf-8")
            i += 2
            continue
        if c == ".":
            labels.append(bytes(cur))
            cur.clear()
        else:
            cur += c.encode("utf-8")
        i += 1
    if cur:
        labels.append(bytes(cur))
    if any(not 0 < len(label) <= 63 for label in labels):
        raise DnsFormatError(f"name {text!r} has an empty or >63-octet label")
    return tuple(labels)


def _wire(text: str) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in _labels(text)) + b"\x00"


def _char_string(value: str | bytes) -> bytes:
    raw = value.encode("utf-8") if isinstance(value, str) else value
    return bytes([len(raw[:255])]) + raw[:255]


def rdata_of(rtype: int, data: Any) -> bytes | None:
    """Wire rdata of one record as aiodns/pycares decoded it; None for a type it cannot carry.

    Names inside rdata are written uncompressed (always valid). TXT strings arrive
    joined, so they are re-split into 255-octet strings.
    """
    if rtype == 1:
        return socket.inet_pton(socket.AF_INET, data.addr)
    if rtype == 28:
        return socket.inet_pton(socket.AF_INET6, data.addr)
    if rtype == 5:
        return _wire(data.cname)
    if rtype == 2:
        return _wire(data.nsdname)
    if rtype == 12:
        return _wire(data.dname)
    if rtype == 15:
        return struct.pack("!H", data.priority) + _wire(data.exchange)
    if rtype == 16:
        raw: bytes = data.data
        return b"".join(_char_string(raw[i : i + 255]) for i in range(0, len(raw), 255)) or b"\0"
    if rtype == 6:
        return (_wire(data.mname) + _wire(data.rname) + struct.pack(
            "!IIIII", data.serial, data.refresh, data.retry, data.expire, data.minimum))
    if rtype == 33:
        return struct.pack("!HHH", data.priority, data.weight, data.port) + _wire(data.target)
    if rtype == 35:
        return (struct.pack("!HH", data.order, data.preference) + _char_string(data.flags)
                + _char_string(data.service) + _char_string(data.regexp)
                + _wire(data.replacement))
    if rtype == 257:
        return bytes([data.critical]) + _char_string(data.tag) + str(data.value).encode("utf-8")
    if rtype == 52:
        return (bytes([data.cert_usage, data.selector, data.matching_type])
                + bytes(data.cert_association_data))
    if rtype == 65:
        params = b"".join(struct.pack("!HH", k, len(v)) + bytes(v) for k, v in sorted(data.params))
        return struct.pack("!H", data.priority) + _wire(data.target) + params
    if rtype == 256:
        return struct.pack("!HH", data.priority, data.weight) + str(data.target).encode("utf-8")
    return None


def _records(query: Message, records: Sequence[Any]) -> list[ResourceRecord]:
    qname = query.questions[0].name
    qtext = name_to_text(qname).lower()
    out: list[ResourceRecord] = []
    for rec in records:
        try:
            rdata = rdata_of(rec.type, rec.data)
            if rdata is None:
                continue
            text = rec.name if rec.name.endswith(".") else rec.name + "."
            # the client's own spelling of its name (0x20 case randomization checks it)
            owner = qname if text.lower() == qtext else _labels(text)
        except (DnsFormatError, OSError, ValueError, AttributeError, TypeError):
            continue  # a record we cannot re-encode faithfully is left out, not mangled
        out.append(ResourceRecord(owner, rec.type, rec.record_class, rec.ttl, rdata))
    return out


def udp_limit(query: Message) -> int:
    """The largest UDP response the client of `query` accepts (512, or its EDNS size, <= 1232)."""
    edns = query.edns
    return max(_MIN_UDP, min(edns.udp_payload, MAX_UDP_PAYLOAD)) if edns else _MIN_UDP


def response_from_result(query: Message, result: Any, *, max_size: int | None) -> bytes:
    """A NOERROR response to `query` carrying an aiodns `query_dns` result's records."""
    return make_response(query, answers=_records(query, result.answer),
                         authorities=_records(query, result.authority), max_size=max_size)


def rcode_for_error(code: int) -> int:
    """The DNS rcode for an aiodns/c-ares error code (NXDOMAIN, NODATA = NOERROR, ...)."""
    return {
        aiodns.error.ARES_ENOTFOUND: RCODE_NXDOMAIN,
        aiodns.error.ARES_ENODATA: RCODE_NOERROR,
        aiodns.error.ARES_EREFUSED: RCODE_REFUSED,
        aiodns.error.ARES_ENOTIMP: RCODE_NOTIMP,
        aiodns.error.ARES_EFORMERR: RCODE_FORMERR,
    }.get(code, RCODE_SERVFAIL)


# ----------------------------------------------------------------------------- wire relay


async def exchange(
    netns: str | None,
    server: tuple[str, int],
    query: bytes,
    *,
    tcp: bool,
    timeout: float,  # noqa: ASYNC109 - one bound for connect and answer
) -> bytes | None:
    """Send `query` as received to `server` (from `netns`, mark 0x539); its reply or None."""
    loop = asyncio.get_running_loop()
    where = f"{server[0]}:{server[1]}"
    try:
        if not tcp:
            sock = onward_socket(netns, server[0], kind=socket.SOCK_DGRAM)
            try:
                await loop.sock_connect(sock, server)
                await loop.sock_sendall(sock, query)
                async with asyncio.timeout(timeout):
                    while True:  # a reply to another query (id) is not ours
                        reply = await loop.sock_recv(sock, 65535)
                        if reply[:2] == query[:2]:
                            return reply
            finally:
                sock.close()
        sock = onward_socket(netns, server[0])
        await connect(sock, server, timeout)
        try:
            framer = TcpFramer()
            await loop.sock_sendall(sock, frame_tcp(query))
            async with asyncio.timeout(timeout):
                while True:
                    data = await loop.sock_recv(sock, 65535)
                    if not data:
                        raise ConnectionError(f"{where} closed the connection without an answer")
                    msgs = framer.feed(data)
                    if msgs:
                        return msgs[0]
        finally:
            sock.close()
    except (TimeoutError, OSError, DnsFormatError) as exc:
        log.info("dns forward failed", upstream=where, tcp=tcp,
                 error=str(exc) or "no answer in time: is the resolver up and reachable?")
        return None


# ----------------------------------------------------------------------------- resolver


class UpstreamResolver:
    """The node's upstream resolvers, asked through aiodns; one per process, every workload's.

    `servers` given (--dns-upstream) are used as they are; without them the
    `nameserver`s of `resolv_conf` are, re-read when that file changes. With neither,
    `available` is False and the listeners fall back to the original resolver.
    """

    def __init__(
        self,
        servers: Sequence[UpstreamServer] = (),
        *,
        resolv_conf: str = RESOLV_CONF,
        timeout: float = UPSTREAM_TIMEOUT,
    ) -> None:
        self.explicit = tuple(servers)
        self.resolv_conf = resolv_conf
        self.timeout = timeout
        self._mtime: float | None = None
        self._checked = float("-inf")
        self.servers: tuple[UpstreamServer, ...] = self.explicit
        self._resolvers: dict[bool, aiodns.DNSResolver] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._refresh(force=True)

    @property
    def available(self) -> bool:
        """Whether any upstream is known (re-reads resolv.conf at most once a second)."""
        self._refresh()
        return bool(self.servers)

    def _refresh(self, *, force: bool = False) -> None:
        if self.explicit:
            return
        now = time.monotonic()
        if not force and now - self._checked < _RESOLV_CONF_CHECK:
            return
        self._checked = now
        try:
            mtime: float | None = os.stat(self.resolv_conf).st_mtime
        except OSError:
            mtime = None
        if not force and mtime == self._mtime:
            return
        self._mtime = mtime
        servers = resolv_conf_nameservers(self.resolv_conf)
        if servers != self.servers:
            if not force:
                log.info("dns upstreams changed", resolv_conf=self.resolv_conf,
                         upstreams=[str(s) for s in servers])
            self.servers = servers
            if not servers:  # not asked until some come back (`available` is False)
                self._resolvers.clear()
            for resolver in self._resolvers.values():
                resolver.nameservers = [str(s) for s in servers]

    def _resolver(self, tcp: bool) -> aiodns.DNSResolver:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # channels belong to one event loop
            self._drop()
            self._loop = loop
        resolver = self._resolvers.get(tcp)
        if resolver is None:
            # c-ares tries each server in turn; the whole query is bounded by `timeout`
            per_try = max(0.5, self.timeout / (2 * max(1, len(self.servers))))
            resolver = aiodns.DNSResolver(
                nameservers=[str(s) for s in self.servers], loop=loop, timeout=per_try,
                tries=2, flags=pycares.ARES_FLAG_USEVC if tcp else 0,
            )
            self._resolvers[tcp] = resolver
        return resolver

    def _drop(self) -> None:
        # Channels of a loop that is gone: dropped, not cancelled (a cancel would call
        # back into that loop); the garbage collector closes them.
        self._resolvers.clear()

    async def close(self) -> None:
        """Cancel outstanding queries and release the c-ares channels."""
        resolvers = list(self._resolvers.values())
        self._resolvers.clear()
        for resolver in resolvers:
            await resolver.close()

    async def resolve(self, fwd: Forward, *, tcp: bool) -> bytes:
        """The response to send the client for a query `answer` said to forward.

        Always a response: an upstream failure is SERVFAIL (and logged with a hint).
        """
        msg = fwd.message
        q = fwd.question
        max_size = None if tcp else udp_limit(msg)
        qtype = _QTYPE_NAMES.get(q.qtype)
        if qtype is None or q.qclass != CLASS_IN:
            return await self._relay(fwd, tcp=tcp, max_size=max_size)
        name = name_to_text(q.name)
        try:
            async with asyncio.timeout(self.timeout):
                result = await self._resolver(tcp).query_dns(name, qtype)
        except aiodns.error.DNSError as exc:
            code = int(exc.args[0]) if exc.args else aiodns.error.ARES_ESERVFAIL
            if code == aiodns.error.ARES_EBADNAME:  # a name c-ares cannot spell: relay it
                return await self._relay(fwd, tcp=tcp, max_size=max_size)
            rcode = rcode_for_error(code)
            if rcode == RCODE_SERVFAIL:
                log.info("dns upstream failed", name=name, type=qtype, tcp=tcp,
                         upstreams=[str(s) for s in self.servers],
                         error=str(exc.args[1]) if len(exc.args) > 1 else str(code),
                         hint="are the node's resolvers (resolv.conf or --dns-upstream) "
                              "reachable from ztunnel's netns?")
            return make_response(msg, rcode=rcode, max_size=max_size)
        except TimeoutError:
            log.info("dns upstream timed out", name=name, type=qtype, tcp=tcp,
                     upstreams=[str(s) for s in self.servers], timeout=self.timeout,
                     hint="are the node's resolvers reachable from ztunnel's netns?")
            return make_response(msg, rcode=RCODE_SERVFAIL, max_size=max_size)
        return response_from_result(msg, result, max_size=max_size)

    async def _relay(self, fwd: Forward, *, tcp: bool, max_size: int | None) -> bytes:
        """Types and classes aiodns cannot ask: the query as received, server by server."""
        per_server = self.timeout / max(1, len(self.servers))
        for server in self.servers:
            reply = await exchange(None, (server.host, server.port), fwd.query, tcp=tcp,
                                   timeout=per_server)
            if reply is not None:
                return reply
        return make_response(fwd.message, rcode=RCODE_SERVFAIL, max_size=max_size)


_default: UpstreamResolver | None = None


def set_default_upstream(resolver: UpstreamResolver | None) -> None:
    """Make `resolver` the one listeners use when not given one (ztunnel's process start)."""
    global _default
    _default = resolver


def default_upstream() -> UpstreamResolver:
    """The process's upstream resolver (from /etc/resolv.conf unless set at start)."""
    global _default
    if _default is None:
        _default = UpstreamResolver()
    return _default


# ----------------------------------------------------------------------------- listener


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


def _bind_pair(netns: str | None, host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """UDP and TCP sockets on one port; with port 0, a number free for both."""
    for attempt in range(32 if port == 0 else 1):
        udp = listener_socket(netns, host, port, kind=socket.SOCK_DGRAM)
        try:
            return udp, listener_socket(netns, host, udp.getsockname()[1])
        except OSError as exc:
            udp.close()
            if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 31:
                raise
        except BaseException:
            udp.close()
            raise
    raise AssertionError("unreachable")  # pragma: no cover


class DnsListener:
    """UDP + TCP DNS proxy for one workload.

    `upstream` is the node's resolver set; by default the process's
    (`default_upstream()`, which ztunnel's start configures from --dns-upstream).
    """

    def __init__(
        self,
        ctx: ProxyContext,
        workload: Workload,
        netns: str | None,
        *,
        host: str = "127.0.0.1",
        port: int = DNS_PORT,
        upstream: UpstreamResolver | None = None,
    ) -> None:
        self.ctx = ctx
        self.workload_uid = workload.uid
        self.netns = netns
        self._workload = workload
        self.upstream = upstream
        self.udp, tcp = _bind_pair(netns, host, port)
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

    async def _forward(self, fwd: Forward, orig: tuple[str, int] | None, *,
                       tcp: bool) -> bytes | None:
        """The node's upstreams through aiodns; the original resolver if none is known."""
        self.forwarded += 1
        upstream = self.upstream or default_upstream()
        if upstream.available:
            return await upstream.resolve(fwd, tcp=tcp)
        if orig is None or orig == self.address:
            return make_response(fwd.message, rcode=RCODE_SERVFAIL,
                                 max_size=None if tcp else udp_limit(fwd.message))
        return await exchange(self.netns, orig, fwd.query, tcp=tcp, timeout=UPSTREAM_TIMEOUT)

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
            reply = await self._forward(result, orig, tcp=False)
        if reply is not None:
            self._send_udp(reply, client, orig)

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
                        reply = await self._forward(result, (orig[0], orig[1]), tcp=True)
                    if reply is None:
                        return
                    await loop.sock_sendall(conn, frame_tcp(reply))
        except (TimeoutError, OSError):
            return
        finally:
            conn.close()
