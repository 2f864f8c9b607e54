"""NFQUEUE messages as bytes: the verdicts and config requests kport writes, and the
packet messages it reads."""

from __future__ import annotations

import contextlib
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kport.sources import nfqueue as nfq


def attr(kind: int, value: bytes) -> bytes:
    length = 4 + len(value)
    return struct.pack("=HH", length, kind) + value + b"\0" * (-length % 4)


def packet_message(queue: int, packet_id: int, *attrs: bytes, hook: int = 3) -> bytes:
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(queue))
    body += attr(nfq.NFQA_PACKET_HDR, struct.pack(">IHB", packet_id, 0x0800, hook)) + b"".join(
        attrs
    )
    return struct.pack("=IHHII", 16 + len(body), nfq.NFNL_SUBSYS_QUEUE << 8, 0, 0, 0) + body


def test_packets_are_read_with_their_metadata() -> None:
    two = packet_message(
        5,
        42,
        attr(nfq.NFQA_IFINDEX_OUTDEV, struct.pack(">I", 3)),
        attr(nfq.NFQA_UID, struct.pack(">I", 1000)),
        attr(nfq.NFQA_GID, struct.pack(">I", 100)),
        attr(nfq.NFQA_MARK, struct.pack(">I", 0x10)),
        attr(nfq.NFQA_PAYLOAD, b"\x45payload"),
    ) + packet_message(5, 43, hook=1)
    packets, errors = nfq.parse_packets(two)
    assert errors == []
    first, second = packets
    assert (first.queue, first.id, first.hook, first.outdev) == (5, 42, "output", 3)
    assert (first.uid, first.gid, first.mark, first.payload) == (1000, 100, 0x10, b"\x45payload")
    assert (second.id, second.hook, second.uid) == (43, "input", None)


def test_errors_and_acks_are_reported() -> None:
    ack = struct.pack("=IHHIIi", 20, nfq.NLMSG_ERROR, 0, 1, 0, 0)
    busy = struct.pack("=IHHIIi", 20, nfq.NLMSG_ERROR, 0, 1, 0, -1)
    assert nfq.parse_packets(ack + busy) == ([], [0, 1])


@pytest.mark.parametrize(
    "data",
    [
        struct.pack("=IHHII", 200, nfq.NFNL_SUBSYS_QUEUE << 8, 0, 0, 0),  # longer than given
        packet_message(1, 1, struct.pack("=HH", 200, nfq.NFQA_PAYLOAD)),  # attribute overruns
        struct.pack("=IHHII", 24, nfq.NFNL_SUBSYS_QUEUE << 8, 0, 0, 0) + b"\0" * 8,  # no header
    ],
)
def test_malformed_messages_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError):
        nfq.parse_packets(data)


@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_nothing_but_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        nfq.parse_packets(data)


def test_a_verdict_names_the_packet_and_the_mark() -> None:
    message = nfq.verdict_message(7, 99, nfq.NF_REPEAT, mark=0x10000000)
    length, kind, flags, _, _ = struct.unpack_from("=IHHII", message)
    assert length == len(message) and kind == (nfq.NFNL_SUBSYS_QUEUE << 8) | nfq.NFQNL_MSG_VERDICT
    assert flags == nfq.NLM_F_REQUEST
    assert struct.unpack_from(">H", message, 18) == (7,)  # the queue, big-endian
    assert struct.unpack_from(">II", message, 24) == (nfq.NF_REPEAT, 99)
    assert struct.unpack_from(">I", message, 36) == (0x10000000,)


def test_config_asks_for_an_ack_and_carries_every_setting() -> None:
    message = nfq.config_message(
        3, command=nfq.NFQNL_CFG_CMD_BIND, copy_range=128, maxlen=64, flags=9
    )
    _, _, flags, _, _ = struct.unpack_from("=IHHII", message)
    assert flags & nfq.NLM_F_ACK
    kinds = []
    offset = 20
    while offset < len(message):
        length, kind = struct.unpack_from("=HH", message, offset)
        kinds.append(kind)
        offset += (length + 3) & ~3
    assert kinds == [
        nfq.NFQA_CFG_CMD,
        nfq.NFQA_CFG_PARAMS,
        nfq.NFQA_CFG_QUEUE_MAXLEN,
        nfq.NFQA_CFG_MASK,
        nfq.NFQA_CFG_FLAGS,
    ]
