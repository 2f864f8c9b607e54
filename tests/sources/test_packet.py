"""Packet headers and DNS answers, parsed from bytes built here."""

from __future__ import annotations

import contextlib
import re
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kport.sources import packet


def ipv4(proto: int, payload: bytes, src: str = "10.0.0.1", dst: str = "10.0.0.2") -> bytes:
    header = struct.pack(
        ">BBHHHBBH4s4s",
        0x45,
        0,
        20 + len(payload),
        0,
        0,
        64,
        proto,
        0,
        socket.inet_aton(src),
        socket.inet_aton(dst),
    )
    return header + payload


def ipv6(
    next_header: int, payload: bytes, src: str = "2001:db8::1", dst: str = "2001:db8::2"
) -> bytes:
    header = struct.pack(">IHBB", 6 << 28, len(payload), next_header, 64)
    return (
        header
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + payload
    )


def test_ipv4_tcp_udp_and_icmp() -> None:
    tcp = packet.parse(ipv4(6, struct.pack(">HH", 40000, 443) + b"\0" * 16))
    assert (tcp.protocol, tcp.src, tcp.sport, tcp.dst, tcp.dport) == (
        "tcp",
        "10.0.0.1",
        40000,
        "10.0.0.2",
        443,
    )
    assert tcp.family == socket.AF_INET and tcp.src_raw == socket.inet_aton("10.0.0.1")
    udp = packet.parse(ipv4(17, struct.pack(">HHHH", 5353, 53, 8, 0)))
    assert (udp.protocol, udp.dport) == ("udp", 53)
    ping = packet.parse(ipv4(1, b"\x08\x00\x00\x00"))
    assert (ping.protocol, ping.dport) == ("icmp", 8)  # the type where a port would be


def test_ipv6_past_extension_headers() -> None:
    hop_by_hop = bytes([6, 0]) + b"\0" * 6  # next: tcp, 8 bytes long
    flow = packet.parse(ipv6(0, hop_by_hop + struct.pack(">HH", 1234, 80) + b"\0" * 16))
    assert (flow.family, flow.protocol, flow.dst, flow.dport) == (
        socket.AF_INET6,
        "tcp",
        "2001:db8::2",
        80,
    )


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", "empty"),
        (b"\x45" + b"\0" * 10, "IPv4 header of 11 bytes"),
        (b"\x60" + b"\0" * 10, "IPv6 header of 11 bytes"),
        (b"\x20" + b"\0" * 30, "not an IP packet (version 2)"),
        (ipv4(6, b"\x01"), "tcp header cut short"),
    ],
)
def test_short_or_odd_packets_say_what_is_wrong(data: bytes, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        packet.parse(data)


@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_nothing_but_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        packet.parse(data)


def dns_response(name: str, *answers: tuple[int, bytes]) -> bytes:
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    out = struct.pack(">HHHHHH", 7, 0x8180, 1, len(answers), 0, 0) + qname + b"\0\x01\0\x01"
    for kind, data in answers:
        out += b"\xc0\x0c" + struct.pack(">HHIH", kind, 1, 60, len(data)) + data
    return out


@given(st.binary(max_size=120))
def test_arbitrary_dns_bytes_raise_nothing_but_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        packet.dns_answers(data)


def test_dns_answers_map_addresses_to_the_name_asked_for() -> None:
    message = dns_response(
        "www.example.test",
        (5, b"\x03cdn\xc0\x10"),  # a CNAME first: skipped, the question's name stays
        (1, socket.inet_aton("192.0.2.7")),
        (28, socket.inet_pton(socket.AF_INET6, "2001:db8::7")),
    )
    assert packet.dns_answers(message) == [
        ("192.0.2.7", "www.example.test"),
        ("2001:db8::7", "www.example.test"),
    ]
    query = bytearray(message)
    query[2] &= 0x7F  # a question, not an answer
    assert packet.dns_answers(bytes(query)) == []


def test_udp_payload_skips_the_headers() -> None:
    data = ipv4(17, struct.pack(">HHHH", 53, 5353, 12, 0) + b"abcd")
    assert packet.udp_payload(data) == b"abcd"
