"""The proc connector's byte layouts, parsed from hand-built messages."""

from __future__ import annotations

import struct

from kport.sources import netlink_proc as n
from kport.sources.netlink import NLMSG_DONE


def message(what: int, body: bytes, *, seq: int = 7, cpu: int = 1, ktime: int = 99) -> bytes:
    event = struct.pack("=IIQ", what, cpu, ktime) + body
    cn = struct.pack("=IIIIHH", n.CN_IDX_PROC, n.CN_VAL_PROC, seq, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), NLMSG_DONE, 0, 0, 0) + cn


def test_fork_exec_exit() -> None:
    fork = message(n.EV_FORK, struct.pack("=IIII", 10, 10, 11, 11))
    assert n.parse(fork) == [
        ("fork", 1, 7, 99, {"parent_pid": 10, "parent_tgid": 10, "pid": 11, "tgid": 11})
    ]
    assert n.parse(message(n.EV_EXEC, struct.pack("=II", 11, 11)))[0][4] == {"pid": 11, "tgid": 11}
    exit_ = n.parse(
        message(n.EV_EXIT | n.EV_NONZERO_EXIT, struct.pack("=IIIIII", 11, 11, 768, 17, 10, 10))
    )
    assert exit_[0][0] == "exit" and exit_[0][4]["exit_code"] == 768


def test_comm_and_ids() -> None:
    comm = n.parse(message(n.EV_COMM, struct.pack("=II16s", 5, 6, b"worker\0junk")))
    assert comm[0][4] == {"pid": 5, "tgid": 6, "comm": "worker"}
    uid = n.parse(message(n.EV_UID, struct.pack("=IIII", 5, 5, 1000, 0)))
    assert uid[0][4]["euid"] == 0 and uid[0][4]["ruid"] == 1000


def test_truncated_and_foreign_messages_are_skipped() -> None:
    good = message(n.EV_EXEC, struct.pack("=II", 1, 1))
    assert n.parse(good[:-9]) == []
    # A subscription ack is no event, but it used a per-CPU seq: it must reach the reader,
    # or the next event looks like a loss.
    ack = n.parse(message(n.EV_NONE, struct.pack("=I", 0) + b"\0" * 4, seq=8))
    assert ack == [("none", 1, 8, 99, {"what": 0})]
    assert n.parse(message(0x1000, b"\0" * 8))[0][0] == "unknown"
    other = bytearray(good)
    struct.pack_into("=I", other, 16, 99)  # another connector index
    assert n.parse(bytes(other)) == []
