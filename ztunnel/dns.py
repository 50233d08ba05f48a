"""Sans-IO DNS for ztunnel's DNS proxy: RFC 1035 wire format, local answers for services.

`answer(snapshot, query_bytes, client=...)` decides, for one query, between a local
answer (A/AAAA for service hostnames with their VIPs, NXDOMAIN/NODATA for names of
the mesh domain's `svc` zone that do not exist) and forwarding to the node's
upstream resolvers. Parsing never raises anything but DnsFormatError. TCP framing
helpers (2-byte length prefix) are here too; sockets and upstream forwarding live
in the runtime.

Names are tuples of raw labels (`bytes`, case preserved); comparisons are
case-insensitive (ASCII). Record data is kept raw: names inside rdata are not
decompressed (ztunnel only builds A/AAAA/SOA/OPT records itself).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from ztunnel.snapshot import Service, Snapshot, Workload

__all__ = [
    "CLASS_ANY",
    "CLASS_IN",
    "DEFAULT_TTL",
    "MAX_UDP_PAYLOAD",
    "RCODE_FORMERR",
    "RCODE_NOERROR",
    "RCODE_NOTIMP",
    "RCODE_NXDOMAIN",
    "RCODE_REFUSED",
    "RCODE_SERVFAIL",
    "TYPE_A",
    "TYPE_AAAA",
    "TYPE_OPT",
    "TYPE_SOA",
    "DnsFormatError",
    "Edns",
    "Forward",
    "LocalAnswer",
    "Message",
    "Name",
    "Question",
    "ResourceRecord",
    "TcpFramer",
    "answer",
    "encode_message",
    "encode_query",
    "error_response",
    "frame_tcp",
    "make_response",
    "name_from_text",
    "name_to_text",
    "parse_message",
]

Name = tuple[bytes, ...]

TYPE_A: Final = 1
TYPE_NS: Final = 2
TYPE_CNAME: Final = 5
TYPE_SOA: Final = 6
TYPE_AAAA: Final = 28
TYPE_OPT: Final = 41
CLASS_IN: Final = 1
CLASS_ANY: Final = 255

RCODE_NOERROR: Final = 0
RCODE_FORMERR: Final = 1
RCODE_SERVFAIL: Final = 2
RCODE_NXDOMAIN: Final = 3
RCODE_NOTIMP: Final = 4
RCODE_REFUSED: Final = 5
RCODE_BADVERS: Final = 16  # extended rcode (needs OPT)

DEFAULT_TTL: Final = 30
#: Our EDNS UDP payload size (DNS flag day 2020 recommendation).
MAX_UDP_PAYLOAD: Final = 1232
_MIN_UDP: Final = 512
_MAX_NAME_WIRE: Final = 255
_MAX_POINTER_JUMPS: Final = 64

_FLAG_QR: Final = 0x8000
_FLAG_AA: Final = 0x0400
_FLAG_TC: Final = 0x0200
_FLAG_RD: Final = 0x0100
_FLAG_RA: Final = 0x0080
_FLAG_DO: Final = 0x8000  # in the OPT TTL field


class DnsFormatError(ValueError):
    """The bytes are not a well-formed DNS message; the message says where."""


# ----------------------------------------------------------------------------- model


@dataclass(frozen=True, slots=True)
class Question:
    """One question: name (raw labels), type, class."""

    name: Name
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True, slots=True)
class ResourceRecord:
    """A resource record with raw rdata (OPT records appear as TYPE_OPT records)."""

    name: Name
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes


@dataclass(frozen=True, slots=True)
class Edns:
    """The EDNS(0) OPT pseudo-record of a message."""

    udp_payload: int
    version: int = 0
    dnssec_ok: bool = False
    ext_rcode: int = 0
    options: bytes = b""


@dataclass(frozen=True, slots=True)
class Message:
    """A DNS message; `flags` is the raw 16-bit flags word (rcode in the low 4 bits)."""

    id: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[ResourceRecord, ...] = ()
    authorities: tuple[ResourceRecord, ...] = ()
    additionals: tuple[ResourceRecord, ...] = ()

    @property
    def is_response(self) -> bool:
        """QR bit."""
        return bool(self.flags & _FLAG_QR)

    @property
    def opcode(self) -> int:
        """OPCODE (0 = QUERY)."""
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        """RCODE from the header (low 4 bits; see `edns` for the extended part)."""
        return self.flags & 0xF

    @property
    def recursion_desired(self) -> bool:
        """RD bit."""
        return bool(self.flags & _FLAG_RD)

    @property
    def truncated(self) -> bool:
        """TC bit."""
        return bool(self.flags & _FLAG_TC)

    @property
    def authoritative(self) -> bool:
        """AA bit."""
        return bool(self.flags & _FLAG_AA)

    @property
    def edns(self) -> Edns | None:
        """The OPT record of the additional section, decoded, if present."""
        for rr in self.additionals:
            if rr.rtype == TYPE_OPT:
                return Edns(
                    udp_payload=rr.rclass,
                    version=(rr.ttl >> 16) & 0xFF,
                    dnssec_ok=bool(rr.ttl & _FLAG_DO),
                    ext_rcode=(rr.ttl >> 24) & 0xFF,
                    options=rr.rdata,
                )
        return None


def name_to_text(name: Name) -> str:
    """Presentation form (`a.b.c.`); special bytes escaped as in RFC 1035 (`\\.`, `\\DDD`)."""
    if not name:
        return "."
    out = []
    for label in name:
        parts = []
        for b in label:
            if b in b".\\":
                parts.append("\\" + chr(b))
            elif 0x21 <= b <= 0x7E:
                parts.append(chr(b))
            else:
                parts.append(f"\\{b:03d}")
        out.append("".join(parts))
    return ".".join(out) + "."


def name_from_text(text: str) -> Name:
    """Labels of a plain dotted name (no escapes); trailing dot optional."""
    text = text.rstrip(".")
    if not text:
        return ()
    labels = tuple(part.encode("ascii") for part in text.split("."))
    if any(not label or len(label) > 63 for label in labels):
        raise ValueError(f"{text!r} is not a valid DNS name (empty or >63-octet label)")
    if sum(len(label) + 1 for label in labels) + 1 > _MAX_NAME_WIRE:
        raise ValueError(f"{text!r} is longer than 255 octets")
    return labels


def _lower(name: Name) -> Name:
    return tuple(label.lower() for label in name)


# ----------------------------------------------------------------------------- parsing


def _read_name(data: bytes, offset: int) -> tuple[Name, int]:
    """Read a possibly compressed name at `offset`; return (labels, offset after it)."""
    labels: list[bytes] = []
    wire_len = 1
    end: int | None = None
    jumps = 0
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsFormatError(f"name at offset {offset} runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError(f"truncated compression pointer at offset {pos}")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if end is None:
                end = pos + 2
            jumps += 1
            if jumps > _MAX_POINTER_JUMPS:
                raise DnsFormatError(f"compression pointer loop in name at offset {offset}")
            if target >= len(data):
                raise DnsFormatError(f"compression pointer at offset {pos} points past the end")
            pos = target
            continue
        if kind != 0:
            raise DnsFormatError(f"unsupported label type 0x{kind:02x} at offset {pos}")
        if length == 0:
            if end is None:
                end = pos + 1
            return tuple(labels), end
        if pos + 1 + length > len(data):
            raise DnsFormatError(f"label at offset {pos} runs past the end of the message")
        wire_len += length + 1
        if wire_len > _MAX_NAME_WIRE:
            raise DnsFormatError(f"name at offset {offset} is longer than 255 octets")
        labels.append(data[pos + 1 : pos + 1 + length])
        pos += 1 + length


def _read_rr(data: bytes, offset: int) -> tuple[ResourceRecord, int]:
    name, pos = _read_name(data, offset)
    if pos + 10 > len(data):
        raise DnsFormatError(f"resource record at offset {offset} is truncated")
    rtype, rclass, ttl, rdlen = struct.unpack_from("!HHIH", data, pos)
    pos += 10
    if pos + rdlen > len(data):
        raise DnsFormatError(f"rdata of record at offset {offset} runs past the end")
    return ResourceRecord(name, rtype, rclass, ttl, data[pos : pos + rdlen]), pos + rdlen


def parse_message(data: bytes) -> Message:
    """Parse a whole DNS message (RFC 1035, compression followed); DnsFormatError if malformed."""
    if len(data) < 12:
        raise DnsFormatError(f"message is {len(data)} bytes: shorter than the 12-byte header")
    msg_id, flags, qd, an, ns, ar = struct.unpack_from("!HHHHHH", data, 0)
    pos = 12
    questions = []
    for _ in range(qd):
        name, pos = _read_name(data, pos)
        if pos + 4 > len(data):
            raise DnsFormatError(f"question at offset {pos} is truncated")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    sections: list[list[ResourceRecord]] = [[], [], []]
    for section, count in zip(sections, (an, ns, ar), strict=True):
        for _ in range(count):
            rr, pos = _read_rr(data, pos)
            section.append(rr)
    if pos != len(data):
        raise DnsFormatError(f"{len(data) - pos} unexpected bytes after the message")
    opts = [rr for rr in sections[2] if rr.rtype == TYPE_OPT]
    if len(opts) > 1:
        raise DnsFormatError("more than one OPT record")
    if opts and opts[0].name:
        raise DnsFormatError("OPT record with a non-root owner name")
    if any(rr.rtype == TYPE_OPT for rr in (*sections[0], *sections[1])):
        raise DnsFormatError("OPT record outside the additional section")
    return Message(
        msg_id, flags, tuple(questions), tuple(sections[0]), tuple(sections[1]), tuple(sections[2])
    )


# ----------------------------------------------------------------------------- encoding


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.names: dict[Name, int] = {}

    def name(self, name: Name) -> None:
        for i in range(len(name)):
            suffix = _lower(name[i:])
            ptr = self.names.get(suffix)
            if ptr is not None:
                self.buf += struct.pack("!H", 0xC000 | ptr)
                return
            if len(self.buf) < 0x4000:
                self.names[suffix] = len(self.buf)
            label = name[i]
            if not 0 < len(label) <= 63:
                raise DnsFormatError(f"label {label!r} must be 1..63 octets")
            self.buf.append(len(label))
            self.buf += label
        self.buf.append(0)

    def rr(self, rr: ResourceRecord) -> None:
        self.name(rr.name)
        if len(rr.rdata) > 0xFFFF:
            raise DnsFormatError("rdata longer than 65535 octets")
        self.buf += struct.pack("!HHIH", rr.rtype, rr.rclass, rr.ttl, len(rr.rdata))
        self.buf += rr.rdata


def _check_name(name: Name) -> None:
    if sum(len(label) + 1 for label in name) + 1 > _MAX_NAME_WIRE:
        raise DnsFormatError(f"name {name_to_text(name)} is longer than 255 octets")


def encode_message(msg: Message) -> bytes:
    """Wire form of `msg`, compressing owner and question names."""
    counts = (len(msg.questions), len(msg.answers), len(msg.authorities), len(msg.additionals))
    if any(c > 0xFFFF for c in counts):
        raise DnsFormatError("too many records for one message")
    w = _Writer()
    w.buf += struct.pack("!HHHHHH", msg.id & 0xFFFF, msg.flags & 0xFFFF, *counts)
    for q in msg.questions:
        _check_name(q.name)
        w.name(q.name)
        w.buf += struct.pack("!HH", q.qtype, q.qclass)
    for rr in (*msg.answers, *msg.authorities, *msg.additionals):
        _check_name(rr.name)
        w.rr(rr)
    return bytes(w.buf)


# ----------------------------------------------------------------------------- responses


def _opt_record(query_edns: Edns, ext_rcode: int = 0) -> ResourceRecord:
    ttl = (ext_rcode & 0xFF) << 24 | (_FLAG_DO if query_edns.dnssec_ok else 0)
    return ResourceRecord((), TYPE_OPT, MAX_UDP_PAYLOAD, ttl, b"")


def make_response(
    query: Message,
    *,
    rcode: int = RCODE_NOERROR,
    answers: Sequence[ResourceRecord] = (),
    authorities: Sequence[ResourceRecord] = (),
    authoritative: bool = False,
    max_size: int | None = None,
) -> bytes:
    """A response to `query`: same id/opcode/RD/question, RA set, OPT echoed when present.

    Extended rcodes (> 15) need EDNS in the query; without it they become SERVFAIL.
    With `max_size` (UDP), an oversized response is truncated (TC set, records dropped).
    """
    edns = query.edns
    if rcode > 15 and edns is None:
        rcode = RCODE_SERVFAIL
    flags = _FLAG_QR | (query.flags & (0x7800 | _FLAG_RD)) | _FLAG_RA | (rcode & 0xF)
    if authoritative:
        flags |= _FLAG_AA
    additionals: tuple[ResourceRecord, ...] = ()
    if edns is not None:
        additionals = (_opt_record(edns, rcode >> 4),)
    msg = Message(
        query.id, flags, query.questions[:1], tuple(answers), tuple(authorities), additionals
    )
    wire = encode_message(msg)
    if max_size is not None and len(wire) > max_size:
        wire = encode_message(replace(msg, flags=flags | _FLAG_TC, answers=(), authorities=()))
    return wire


def error_response(query_bytes: bytes, rcode: int = RCODE_FORMERR) -> bytes | None:
    """A bare error response (FORMERR by default) echoing the id; None if not even a header.

    Never answers a message that is itself a response (QR set), to avoid loops.
    """
    if len(query_bytes) < 12:
        return None
    msg_id, flags = struct.unpack_from("!HH", query_bytes, 0)
    if flags & _FLAG_QR:
        return None
    out_flags = _FLAG_QR | (flags & (0x7800 | _FLAG_RD)) | _FLAG_RA | (rcode & 0xF)
    return struct.pack("!HHHHHH", msg_id, out_flags, 0, 0, 0, 0)


@dataclass(frozen=True, slots=True)
class LocalAnswer:
    """Send `data` back to the client; `rcode` for logs and metrics."""

    data: bytes
    rcode: int


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ours: forward `query` (bytes as received) to the upstream resolvers.

    `question` is the single question (for resolver APIs that take name + type).
    """

    query: bytes
    question: Question
    message: Message = field(repr=False)


def _soa(snapshot: Snapshot, domain: Name, ttl: int) -> ResourceRecord:
    def wire_name(name: Name) -> bytes:
        return b"".join(bytes([len(label)]) + label for label in name) + b"\x00"

    rdata = (
        wire_name((b"ns", b"dns", *domain))
        + wire_name((b"hostmaster", *domain))
        + struct.pack("!IIIII", snapshot.version & 0xFFFFFFFF, 7200, 1800, 86400, ttl)
    )
    return ResourceRecord(domain, TYPE_SOA, CLASS_IN, ttl, rdata)


def _service_addresses(snapshot: Snapshot, svc: Service, qtype: int) -> list[bytes]:
    want = 4 if qtype == TYPE_A else 6
    addrs: list[str] = [v for v in svc.vips if (":" in v) == (want == 6)]
    if not svc.vips:  # headless service: the endpoints' addresses
        for ep in svc.endpoints:
            if not ep.healthy:
                continue
            w = snapshot.workload_by_uid(ep.workload_uid)
            if w is None:
                continue
            for a in w.addresses:
                if (":" in a) == (want == 6):
                    addrs.append(a)
    return [ipaddress.ip_address(a).packed for a in addrs]


def _lookup(
    snapshot: Snapshot, qname: Name, svc_zone: Name, client: Workload | None
) -> tuple[Service | None, bool]:
    """(service, in_our_zone): which service the name means, and whether we own the name."""
    lname = _lower(qname)
    n = len(svc_zone)
    if len(lname) > n and lname[-n:] == svc_zone:
        rel = lname[:-n]
        if len(rel) >= 2:
            host = b".".join(lname[len(rel) - 2 :]).decode("ascii", "replace")
            svc = snapshot.service_by_hostname(host)
            if len(rel) == 2:
                return svc, True
            # Below an existing service (SRV `_port._proto`, pod names): ask upstream.
            # Below a service that does not exist, nothing exists.
            return None, svc is None
        return None, True
    if lname == svc_zone:
        return None, True
    suffix = b".".join(svc_zone).decode("ascii", "replace")
    if len(lname) == 3 and lname[2] == b"svc":
        host = b".".join(lname[:2]).decode("ascii", "replace")
        return snapshot.service_by_hostname(f"{host}.{suffix}"), False
    if len(lname) == 2:
        host = b".".join(lname).decode("ascii", "replace")
        return snapshot.service_by_hostname(f"{host}.{suffix}"), False
    if len(lname) == 1 and client is not None:
        host = lname[0].decode("ascii", "replace")
        return snapshot.service_by_hostname(f"{host}.{client.namespace}.{suffix}"), False
    return None, False


def _namespace_exists(snapshot: Snapshot, qname: Name, svc_zone: Name) -> bool:
    ns = _lower(qname)[0].decode("ascii", "replace")
    return any(s.namespace == ns for s in snapshot.services) and len(qname) == len(svc_zone) + 1


def answer(
    snapshot: Snapshot,
    query: bytes,
    *,
    client: Workload | None = None,
    udp: bool = True,
    ttl: int = DEFAULT_TTL,
) -> LocalAnswer | Forward:
    """Answer `query` from the snapshot or say it must be forwarded.

    * `<svc>.<ns>.svc.<domain>`, `<svc>.<ns>.svc`, `<svc>.<ns>` and (for `client`'s namespace)
      `<svc>`: A/AAAA with the service VIPs (headless: endpoint addresses);
      other types or no address of the family -> NODATA (NOERROR, SOA in authority).
    * Other names under `svc.<domain>` -> NXDOMAIN (with SOA), except
      `<ns>.svc.<domain>` of a known namespace and `svc.<domain>` (NODATA) and
      names below an existing service (SRV `_port._proto...`: forwarded).
    * Everything else -> Forward.
    * Not a standard query -> NOTIMP; malformed but with a header -> FORMERR.

    Raises DnsFormatError only when nothing should be sent back (shorter than a
    header, or the message is itself a response).
    """
    try:
        msg = parse_message(query)
    except DnsFormatError:
        err = error_response(query)
        if err is None:
            raise
        return LocalAnswer(err, RCODE_FORMERR)
    if msg.is_response:
        raise DnsFormatError("message is a response (QR set): not answering it")
    if msg.opcode != 0:
        return LocalAnswer(make_response(msg, rcode=RCODE_NOTIMP), RCODE_NOTIMP)
    if len(msg.questions) != 1:
        return LocalAnswer(make_response(msg, rcode=RCODE_FORMERR), RCODE_FORMERR)
    edns = msg.edns
    if edns is not None and edns.version > 0:
        return LocalAnswer(make_response(msg, rcode=RCODE_BADVERS), RCODE_BADVERS)
    max_size: int | None = None
    if udp:
        max_size = max(_MIN_UDP, min(edns.udp_payload, MAX_UDP_PAYLOAD)) if edns else _MIN_UDP

    q = msg.questions[0]
    if q.qclass not in (CLASS_IN, CLASS_ANY):
        return Forward(query, q, msg)
    try:
        domain = name_from_text(snapshot.dns_domain)
    except ValueError:  # pragma: no cover - validated in the snapshot
        return Forward(query, q, msg)
    svc_zone = (b"svc", *domain)
    svc, ours = _lookup(snapshot, q.name, svc_zone, client)
    soa = _soa(snapshot, domain, ttl)
    if svc is not None:
        if q.qtype in (TYPE_A, TYPE_AAAA):
            rrs = [
                ResourceRecord(q.name, q.qtype, CLASS_IN, ttl, packed)
                for packed in _service_addresses(snapshot, svc, q.qtype)
            ]
            if rrs:
                data = make_response(msg, answers=rrs, authoritative=True, max_size=max_size)
                return LocalAnswer(data, RCODE_NOERROR)
        data = make_response(msg, authorities=[soa], authoritative=True, max_size=max_size)
        return LocalAnswer(data, RCODE_NOERROR)
    if not ours:
        return Forward(query, q, msg)
    lname = _lower(q.name)
    if lname == svc_zone or _namespace_exists(snapshot, q.name, svc_zone):
        data = make_response(msg, authorities=[soa], authoritative=True, max_size=max_size)
        return LocalAnswer(data, RCODE_NOERROR)
    data = make_response(
        msg, rcode=RCODE_NXDOMAIN, authorities=[soa], authoritative=True, max_size=max_size
    )
    return LocalAnswer(data, RCODE_NXDOMAIN)


# ----------------------------------------------------------------------------- TCP framing


def frame_tcp(message: bytes) -> bytes:
    """Prefix `message` with its 2-byte length for DNS over TCP (RFC 1035 4.2.2)."""
    if not 0 < len(message) <= 0xFFFF:
        raise DnsFormatError(f"a DNS message over TCP must be 1..65535 bytes, not {len(message)}")
    return struct.pack("!H", len(message)) + message


class TcpFramer:
    """Split a DNS-over-TCP byte stream into messages (buffer bounded by one message)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return the complete messages now available."""
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= 2:
            length = (self._buf[0] << 8) | self._buf[1]
            if length == 0:
                raise DnsFormatError("zero-length DNS message on TCP stream: close the connection")
            if len(self._buf) < 2 + length:
                break
            out.append(bytes(self._buf[2 : 2 + length]))
            del self._buf[: 2 + length]
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole message."""
        return len(self._buf)


def encode_query(
    name: str | Name, qtype: int, *, msg_id: int = 0, rd: bool = True, edns: int | None = None
) -> bytes:
    """Build a query (for tests and health checks); `edns` = UDP payload size to advertise."""
    labels = name_from_text(name) if isinstance(name, str) else name
    additionals: Iterable[ResourceRecord] = ()
    if edns is not None:
        additionals = (ResourceRecord((), TYPE_OPT, edns, 0, b""),)
    return encode_message(
        Message(
            msg_id,
            _FLAG_RD if rd else 0,
            (Question(labels, qtype, CLASS_IN),),
            additionals=tuple(additionals),
        )
    )
