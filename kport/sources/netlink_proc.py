"""The netlink proc connector: its socket, its subscription, and its fixed structs.

Nothing else in kport opens ``NETLINK_CONNECTOR``. Parsing is struct-based on purpose:
the proc connector's messages are a handful of fixed layouts, and ``bench proc`` measures
this parser against pyroute2's ``ProcEventMarshal`` (see the README for the figures).
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from typing import Any, Final

from kport.errors import AccessDenied, KportError
from kport.sources.netlink import NLMSG_DONE, NLMSGHDR, SO_RCVBUFFORCE

NETLINK_CONNECTOR: Final = 11
CN_IDX_PROC: Final = 1
CN_VAL_PROC: Final = 1
PROC_CN_MCAST_LISTEN: Final = 1
PROC_CN_MCAST_IGNORE: Final = 2

_CN_MSG = struct.Struct("=IIIIHH")
_EVENT_HEAD = struct.Struct("=IIQ")  # what, cpu, timestamp_ns
HEADER_SIZE: Final = NLMSGHDR.size + _CN_MSG.size + _EVENT_HEAD.size  # 52

EV_NONE: Final = 0
EV_FORK: Final = 0x00000001
EV_EXEC: Final = 0x00000002
EV_UID: Final = 0x00000004
EV_GID: Final = 0x00000040
EV_SID: Final = 0x00000080
EV_PTRACE: Final = 0x00000100
EV_COMM: Final = 0x00000200
EV_NONZERO_EXIT: Final = 0x20000000
EV_COREDUMP: Final = 0x40000000
EV_EXIT: Final = 0x80000000

_FORK = struct.Struct("=IIII")
_TWO = struct.Struct("=II")
_FOUR = struct.Struct("=IIII")
_COMM = struct.Struct("=II16s")
_EXIT = struct.Struct("=IIIIII")

#: what → (kind, layout, field names). EV_NONE (a subscription's ack) and kinds a later
#: kernel may add are not listed: they parse as "none" / "unknown".
_LAYOUTS: Final[dict[int, tuple[str, struct.Struct, tuple[str, ...]]]] = {
    EV_FORK: ("fork", _FORK, ("parent_pid", "parent_tgid", "pid", "tgid")),
    EV_EXEC: ("exec", _TWO, ("pid", "tgid")),
    EV_EXIT: (
        "exit",
        _EXIT,
        ("pid", "tgid", "exit_code", "exit_signal", "parent_pid", "parent_tgid"),
    ),
    EV_UID: ("uid", _FOUR, ("pid", "tgid", "ruid", "euid")),
    EV_GID: ("gid", _FOUR, ("pid", "tgid", "rgid", "egid")),
    EV_SID: ("sid", _TWO, ("pid", "tgid")),
    EV_COMM: ("comm", _COMM, ("pid", "tgid", "comm")),
    EV_PTRACE: ("ptrace", _FOUR, ("pid", "tgid", "tracer_pid", "tracer_tgid")),
    EV_COREDUMP: ("coredump", _FOUR, ("pid", "tgid", "parent_pid", "parent_tgid")),
}

#: A parsed event: (kind, cpu, seq, ktime_ns, fields). Plain tuples: the reader thread makes
#: one per kernel message, so they must be cheap.
RawEvent = tuple[str, int, int, int, dict[str, Any]]


class ProcConnectorUnavailable(KportError):
    """The kernel has no proc connector, or this process may not listen to it."""


#: the kinds a subscription may be limited to (Linux 6.6+: struct proc_input)
FILTERS_FROM: Final = (6, 6)


def can_filter() -> bool:
    """Does this kernel take a subscription to some kinds only (and drop the rest)?"""
    release = os.uname().release.split(".")
    try:
        return (int(release[0]), int(release[1].split("-")[0])) >= FILTERS_FROM
    except (IndexError, ValueError):
        return False


def open_socket(rcvbuf: int = 64 * 1024 * 1024, events: int | None = None) -> socket.socket:
    """A netlink socket subscribed to process events, with a large receive buffer.

    ``events``: only these (EV_* bits; see :func:`can_filter`), the others dropped by the
    kernel. A filtered socket's per-CPU sequence has gaps: the dropped events used seqs."""
    try:
        sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_CONNECTOR
        )
    except OSError as err:
        raise ProcConnectorUnavailable(
            f"the kernel has no netlink connector (CONFIG_CONNECTOR): {err.strerror}"
        ) from err
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, CN_IDX_PROC))
        _subscribe(sock, PROC_CN_MCAST_LISTEN, events)
    except PermissionError as err:
        sock.close()
        raise AccessDenied(
            f"listening to the proc connector needs root (CAP_NET_ADMIN): {err.strerror}"
        ) from err
    except OSError as err:
        sock.close()
        if err.errno == errno.ECONNREFUSED:
            raise ProcConnectorUnavailable(
                "the proc connector answers only in the first network namespace, and kport "
                "runs in another: run it outside, or set [proc] enabled = false"
            ) from err
        if err.errno in (errno.ENOENT, errno.EPROTONOSUPPORT, errno.EINVAL):
            raise ProcConnectorUnavailable(
                f"the kernel has no proc connector (CONFIG_PROC_EVENTS): {err.strerror}"
            ) from err
        raise
    return sock


def drops(sock: socket.socket) -> int | None:
    """How many messages the kernel has dropped for ``sock`` because its buffer was full
    (the Drops column of /proc/net/netlink), or None where that cannot be read."""
    inode = str(os.fstat(sock.fileno()).st_ino)
    try:
        with open("/proc/net/netlink") as table:
            next(table)  # the header
            for line in table:
                fields = line.split()
                if len(fields) >= 10 and fields[9] == inode:
                    return int(fields[8])
    except (OSError, ValueError, StopIteration):
        return None
    return None


def _subscribe(sock: socket.socket, op: int, events: int | None = None) -> None:
    payload = struct.pack("=I", op) if events is None else struct.pack("=II", op, events)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
    msg = NLMSGHDR.pack(NLMSGHDR.size + len(cn), NLMSG_DONE, 0, 0, os.getpid()) + cn
    sock.send(msg)


def unsubscribe(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        _subscribe(sock, PROC_CN_MCAST_IGNORE)


def parse(data: bytes | memoryview) -> list[RawEvent]:
    """Every proc event in one datagram (usually one). Malformed parts are skipped."""
    out: list[RawEvent] = []
    offset = 0
    end = len(data)
    while end - offset >= HEADER_SIZE:
        length = NLMSGHDR.unpack_from(data, offset)[0]
        if length < HEADER_SIZE or offset + length > end:
            break
        event = parse_one(data, offset)
        if event is not None:
            out.append(event)
        offset += (length + 3) & ~3
    return out


def parse_one(data: bytes | memoryview, offset: int = 0) -> RawEvent | None:
    """One netlink message at ``offset`` → a RawEvent, or None if it is not a proc event."""
    idx, val, seq, _ack, _len, _flags = _CN_MSG.unpack_from(data, offset + NLMSGHDR.size)
    if idx != CN_IDX_PROC or val != CN_VAL_PROC:
        return None
    base = offset + NLMSGHDR.size + _CN_MSG.size
    what, cpu, ktime = _EVENT_HEAD.unpack_from(data, base)
    body = base + _EVENT_HEAD.size
    if len(data) < body + 8:
        return None
    what &= ~EV_NONZERO_EXIT
    layout = _LAYOUTS.get(what)
    if layout is None:
        # A subscription ack (ours or another listener's) or a kind a later kernel adds:
        # not an event to report, but it used a per-CPU seq, so the reader must see it.
        return ("none" if what == EV_NONE else "unknown", cpu, seq, ktime, {"what": what})
    kind, layout_struct, names = layout
    try:
        fields: dict[str, Any] = dict(
            zip(names, layout_struct.unpack_from(data, body), strict=True)
        )
    except struct.error:
        return None
    if kind == "comm":
        fields["comm"] = fields["comm"].split(b"\0", 1)[0].decode(errors="replace")
    return (kind, cpu, seq, ktime, fields)
