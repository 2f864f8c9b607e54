"""NFQUEUE over raw netlink: bind a queue, read queued packets, write verdicts.

Nothing else in kport opens ``NETLINK_NETFILTER``. The message layouts are a handful of
netlink attributes, parsed with ``struct`` here (``parse_packets`` and the builders are
pure, so they are tested on bytes). Raw netlink rather than NetfilterQueue (the binding
of libnetfilter_queue): that binding does not expose the packet's uid and gid, which
the firewall needs, and ``kport bench net`` measures both readers side by side.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
from dataclasses import dataclass
from typing import Final

from kport.errors import AccessDenied, KportError
from kport.sources.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, NLMSGHDR, SO_RCVBUFFORCE

NETLINK_NETFILTER: Final = 12
NFNL_SUBSYS_QUEUE: Final = 3
NFQNL_MSG_PACKET: Final = 0
NFQNL_MSG_VERDICT: Final = 1
NFQNL_MSG_CONFIG: Final = 2


# config attributes and commands
NFQA_CFG_CMD: Final = 1
NFQA_CFG_PARAMS: Final = 2
NFQA_CFG_QUEUE_MAXLEN: Final = 3
NFQA_CFG_MASK: Final = 4
NFQA_CFG_FLAGS: Final = 5
NFQNL_CFG_CMD_BIND: Final = 1
NFQNL_CFG_CMD_UNBIND: Final = 2
NFQNL_COPY_PACKET: Final = 2
NFQA_CFG_F_FAIL_OPEN: Final = 0x01
NFQA_CFG_F_UID_GID: Final = 0x08

# packet attributes
NFQA_PACKET_HDR: Final = 1
NFQA_VERDICT_HDR: Final = 2
NFQA_MARK: Final = 3
NFQA_IFINDEX_INDEV: Final = 5
NFQA_IFINDEX_OUTDEV: Final = 6
NFQA_PAYLOAD: Final = 10
NFQA_UID: Final = 16
NFQA_GID: Final = 17

NF_DROP: Final = 0
NF_ACCEPT: Final = 1
NF_REPEAT: Final = 4

#: the netfilter hooks a packet can be queued from
HOOKS: Final = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}

_NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, packed by hand)
_NLATTR = struct.Struct("=HH")
_PACKET_HDR = struct.Struct(">IHB")
_U32 = struct.Struct(">I")
_VERDICT_HDR = struct.Struct(">II")
_HEAD = NLMSGHDR.size + _NFGENMSG.size


class QueueBusy(KportError):
    """Another process holds the NFQUEUE number kport was configured to use."""


@dataclass(slots=True)
class QueuedPacket:
    """One packet the kernel holds until it gets a verdict."""

    queue: int
    id: int
    hook: str
    #: the IP header and what follows, up to the copy range
    payload: bytes
    indev: int = 0
    outdev: int = 0
    #: the owner of the sending socket (absent for packets with no local socket)
    uid: int | None = None
    gid: int | None = None
    mark: int = 0


def _attr(kind: int, value: bytes) -> bytes:
    length = _NLATTR.size + len(value)
    return _NLATTR.pack(length, kind) + value + b"\0" * (-length % 4)


def _message(msg: int, queue: int, attrs: bytes, flags: int = NLM_F_REQUEST, seq: int = 0) -> bytes:
    body = _NFGENMSG.pack(socket.AF_UNSPEC, 0, socket.htons(queue)) + attrs
    kind = (NFNL_SUBSYS_QUEUE << 8) | msg
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def config_message(
    queue: int,
    *,
    command: int | None = None,
    copy_range: int | None = None,
    maxlen: int | None = None,
    flags: int | None = None,
    seq: int = 0,
) -> bytes:
    """A config request: bind or unbind, the copy range, the queue length, flags."""
    attrs = b""
    if command is not None:
        attrs += _attr(NFQA_CFG_CMD, struct.pack(">BxH", command, 0))
    if copy_range is not None:
        attrs += _attr(NFQA_CFG_PARAMS, struct.pack(">IB", copy_range, NFQNL_COPY_PACKET))
    if maxlen is not None:
        attrs += _attr(NFQA_CFG_QUEUE_MAXLEN, _U32.pack(maxlen))
    if flags is not None:
        attrs += _attr(NFQA_CFG_MASK, _U32.pack(flags)) + _attr(NFQA_CFG_FLAGS, _U32.pack(flags))
    return _message(NFQNL_MSG_CONFIG, queue, attrs, NLM_F_REQUEST | NLM_F_ACK, seq)


def verdict_message(queue: int, packet_id: int, verdict: int, mark: int | None = None) -> bytes:
    """A verdict on one packet; with ``mark``, the packet's mark is set too."""
    attrs = _attr(NFQA_VERDICT_HDR, _VERDICT_HDR.pack(verdict, packet_id))
    if mark is not None:
        attrs += _attr(NFQA_MARK, _U32.pack(mark))
    return _message(NFQNL_MSG_VERDICT, queue, attrs)


def parse_packets(data: bytes) -> tuple[list[QueuedPacket], list[int]]:
    """The packets in one netlink datagram, and the errnos of any error messages
    (0 is an ack). A truncated or malformed message ends the parse: ValueError."""
    try:
        return _parse(data)
    except struct.error as err:
        raise ValueError(f"a netlink message cut short: {err}") from None


def _parse(data: bytes) -> tuple[list[QueuedPacket], list[int]]:
    packets: list[QueuedPacket] = []
    errors: list[int] = []
    offset = 0
    end = len(data)
    while offset + NLMSGHDR.size <= end:
        length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(data, offset)
        if length < NLMSGHDR.size or offset + length > end:
            raise ValueError(f"netlink message of length {length} at {offset} overruns {end}")
        if kind == NLMSG_ERROR:
            (code,) = struct.unpack_from("=i", data, offset + NLMSGHDR.size)
            errors.append(-code)
        elif kind == (NFNL_SUBSYS_QUEUE << 8) | NFQNL_MSG_PACKET:
            packets.append(_packet(data, offset + _HEAD, offset + length))
        offset += (length + 3) & ~3
    return packets, errors


def _packet(data: bytes, offset: int, end: int) -> QueuedPacket:
    queue = int.from_bytes(data[offset - 2 : offset], "big")
    packet_id = hook = -1
    payload = b""
    indev = outdev = 0
    uid = gid = None
    mark = 0
    while offset + _NLATTR.size <= end:
        length, kind = _NLATTR.unpack_from(data, offset)
        if length < _NLATTR.size or offset + length > end:
            raise ValueError(f"netlink attribute of length {length} at {offset} overruns {end}")
        start = offset + _NLATTR.size
        kind &= 0x3FFF  # drop NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if kind == NFQA_PACKET_HDR:
            packet_id, _proto, hook = _PACKET_HDR.unpack_from(data, start)
        elif kind == NFQA_PAYLOAD:
            payload = data[start : offset + length]
        elif kind == NFQA_IFINDEX_INDEV:
            (indev,) = _U32.unpack_from(data, start)
        elif kind == NFQA_IFINDEX_OUTDEV:
            (outdev,) = _U32.unpack_from(data, start)
        elif kind == NFQA_MARK:
            (mark,) = _U32.unpack_from(data, start)
        elif kind == NFQA_UID:
            (uid,) = _U32.unpack_from(data, start)
        elif kind == NFQA_GID:
            (gid,) = _U32.unpack_from(data, start)
        offset += (length + 3) & ~3
    if packet_id < 0:
        raise ValueError("a queued packet without its packet header")
    return QueuedPacket(
        queue, packet_id, HOOKS.get(hook, str(hook)), payload, indev, outdev, uid, gid, mark
    )


def _queue_line(number: int) -> list[str] | None:
    """Queue ``number``'s line of /proc/net/netfilter/nfnetlink_queue: number, peer port
    id, queued, copy mode, copy range, dropped (queue full), dropped (socket full), ..."""
    try:
        with open("/proc/net/netfilter/nfnetlink_queue") as lines:
            for line in lines:
                fields = line.split()
                if len(fields) >= 7 and fields[0] == str(number):
                    return fields
    except OSError:
        pass
    return None


def drop_counts(number: int) -> tuple[int, int] | None:
    """(dropped because the queue was full, dropped because our socket was full) for
    queue ``number``; None if it is not bound."""
    fields = _queue_line(number)
    return None if fields is None else (int(fields[5]), int(fields[6]))


def holder_of(number: int) -> int | None:
    """The netlink port id that holds queue ``number`` (a process's pid, usually)."""
    fields = _queue_line(number)
    return None if fields is None else int(fields[1])


class Queue:
    """One bound NFQUEUE: ``read()`` the packets, ``verdict()`` each, exactly once.

    ``fail_open``: when the queue is full the kernel accepts new packets instead of
    dropping them. A queue held by another process is :class:`QueueBusy`.
    """

    def __init__(
        self,
        number: int,
        *,
        copy_range: int = 128,
        maxlen: int = 4096,
        fail_open: bool = True,
        rcvbuf: int = 8 * 1024 * 1024,
    ) -> None:
        self.number = number
        #: packets that arrived while the queue was being configured (a killed kport's
        #: rules may still send packets here): read() hands them out first
        self._early: list[QueuedPacket] = []
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
        )
        try:
            self.sock.bind((0, 0))
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            flags = NFQA_CFG_F_UID_GID | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
            self._request(config_message(number, command=NFQNL_CFG_CMD_BIND, seq=1))
            self._request(config_message(number, copy_range=copy_range, seq=2))
            self._request(config_message(number, maxlen=maxlen, flags=flags, seq=3))
            self.sock.setblocking(False)
        except BaseException:
            self.sock.close()
            raise

    def _request(self, message: bytes) -> None:
        self.sock.send(message)
        while True:
            packets, errors = parse_packets(self.sock.recv(65536))
            self._early += packets  # each needs its verdict: kept for read()
            if not errors:
                continue
            code = errors[0]
            if code == errno.EPERM and os.geteuid() == 0:
                # the kernel's answer when another socket has bound this queue
                holder = holder_of(self.number)
                which = f" (netlink port {holder}, usually its pid)" if holder else ""
                raise QueueBusy(
                    f"NFQUEUE {self.number} is held by another process{which}, another "
                    "firewall perhaps; stop it, or choose another queue with [net] queue = N"
                )
            if code == errno.EPERM:
                raise AccessDenied(f"binding NFQUEUE {self.number} needs root (CAP_NET_ADMIN)")
            if code:
                raise OSError(code, f"NFQUEUE {self.number}: {os.strerror(code)}")
            return

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> list[QueuedPacket]:
        """The packets of the next datagram (none if nothing waits: one datagram per
        call, since a poll is cheaper than the failed read that would end a loop).
        ENOBUFS (the socket's buffer overflowed: the kernel applied its fail-open
        setting to what did not fit) is raised."""
        early, self._early = self._early, []
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return early
        return early + parse_packets(data)[0]

    def verdict(self, packet: QueuedPacket, verdict: int, mark: int | None = None) -> None:
        self.sock.send(verdict_message(self.number, packet.id, verdict, mark))

    def close(self) -> None:
        """Unbind and close; the kernel drops its pending packets' entries, and a rule
        with ``--queue-bypass`` lets new ones through."""
        with contextlib.suppress(OSError):
            self.sock.send(config_message(self.number, command=NFQNL_CFG_CMD_UNBIND))
        self.sock.close()
