"""What a packet's headers say: addresses, protocol, ports (IPv4 and IPv6), and the names
in a DNS answer. Pure functions over bytes; a short or odd header is a ValueError."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Final

PROTOCOLS: Final = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp"}
#: IPv6 extension headers that may come before the transport header
_IPV6_EXTENSIONS: Final = frozenset({0, 43, 60})
_PORTS = struct.Struct(">HH")


@dataclass(frozen=True, slots=True)
class Flow:
    family: int  # socket.AF_INET or AF_INET6
    protocol: str
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    #: raw addresses, for sock_diag
    src_raw: bytes = b""
    dst_raw: bytes = b""


def parse(payload: bytes) -> Flow:
    """The flow of an IP packet (its header and at least 4 bytes of the next one)."""
    if not payload:
        raise ValueError("empty packet")
    version = payload[0] >> 4
    if version == 4:
        if len(payload) < 20:
            raise ValueError(f"IPv4 header of {len(payload)} bytes (at least 20)")
        header = (payload[0] & 0x0F) * 4
        number = payload[9]
        family = socket.AF_INET
        src_raw, dst_raw = payload[12:16], payload[16:20]
    elif version == 6:
        if len(payload) < 40:
            raise ValueError(f"IPv6 header of {len(payload)} bytes (at least 40)")
        number = payload[6]
        header = 40
        while number in _IPV6_EXTENSIONS and len(payload) >= header + 8:
            number, size = payload[header], (payload[header + 1] + 1) * 8
            header += size
        family = socket.AF_INET6
        src_raw, dst_raw = payload[8:24], payload[24:40]
    else:
        raise ValueError(f"not an IP packet (version {version})")
    protocol = PROTOCOLS.get(number, str(number))
    sport = dport = 0
    if protocol in ("tcp", "udp", "sctp"):
        if len(payload) < header + 4:
            raise ValueError(f"{protocol} header cut short at {len(payload)} bytes")
        sport, dport = _PORTS.unpack_from(payload, header)
    elif protocol in ("icmp", "icmpv6") and len(payload) > header:
        dport = payload[header]  # the ICMP type stands where a port would
    return Flow(
        family,
        protocol,
        socket.inet_ntop(family, src_raw),
        socket.inet_ntop(family, dst_raw),
        sport,
        dport,
        src_raw,
        dst_raw,
    )


def udp_payload(payload: bytes) -> bytes:
    """What a UDP packet carries (IPv4 or IPv6 without extension headers)."""
    header = (payload[0] & 0x0F) * 4 if payload[0] >> 4 == 4 else 40
    return payload[header + 8 :]


def _name(message: bytes, offset: int, depth: int = 0) -> tuple[str, int]:
    """A DNS name at ``offset`` (following compression pointers) and the offset after it."""
    labels: list[str] = []
    while True:
        if offset >= len(message) or depth > 16:
            raise ValueError("DNS name runs off the message")
        length = message[offset]
        if length & 0xC0 == 0xC0:
            pointer = ((length & 0x3F) << 8) | message[offset + 1]
            rest, _ = _name(message, pointer, depth + 1)
            labels.append(rest)
            return ".".join(x for x in labels if x), offset + 2
        offset += 1
        if length == 0:
            return ".".join(labels), offset
        labels.append(message[offset : offset + length].decode("ascii", "replace"))
        offset += length


def dns_answers(message: bytes) -> list[tuple[str, str]]:
    """(address, name) for each A and AAAA answer of a DNS response; the name is the one
    asked for (the question), so a CNAME chain still maps to what the program looked up.
    A message cut short or malformed is a ValueError."""
    try:
        return _answers(message)
    except (struct.error, IndexError) as err:
        raise ValueError(f"a DNS message cut short: {err}") from None


def _answers(message: bytes) -> list[tuple[str, str]]:
    if len(message) < 12 or not message[2] & 0x80:
        return []
    questions, answers = struct.unpack_from(">HH", message, 4)
    offset = 12
    asked = ""
    for _ in range(questions):
        asked, offset = _name(message, offset)
        offset += 4
    out: list[tuple[str, str]] = []
    for _ in range(answers):
        name, offset = _name(message, offset)
        kind, _cls, _ttl, size = struct.unpack_from(">HHIH", message, offset)
        offset += 10
        data = message[offset : offset + size]
        offset += size
        if kind == 1 and size == 4:
            out.append((str(ipaddress.IPv4Address(data)), asked or name))
        elif kind == 28 and size == 16:
            out.append((str(ipaddress.IPv6Address(data)), asked or name))
    return out
