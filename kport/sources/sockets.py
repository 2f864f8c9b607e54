"""Which process owns a packet's socket: sock_diag netlink for the socket, then its pid.

``sock_diag`` (``NETLINK_SOCK_DIAG``) looks a TCP or UDP socket up by its addresses and
ports and gives its inode and uid. No kernel interface maps an inode to a pid, so the
owner is found in ``/proc/<pid>/fd``: first the processes that owned the last sockets
(a program that connects once usually connects again), then the processes of the
socket's uid, newest first, then every other process. Each process scanned leaves all
its socket inodes in a cache, so a second socket of a known process costs one scan of
that one process, and an inode seen before costs nothing.
"""

from __future__ import annotations

import os
import socket
import struct
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from kport.sources.netlink import NLM_F_REQUEST, NLMSG_ERROR, NLMSGHDR
from kport.sources.packet import Flow

NETLINK_SOCK_DIAG: Final = 4
SOCK_DIAG_BY_FAMILY: Final = 20
# inet_diag_req_v2: family, protocol, ext, pad, states; then inet_diag_sockid
_REQ = struct.Struct("=BBBxI")
_SOCKID = struct.Struct(">HH16s16s")
_SOCKID_TAIL = struct.Struct("=III")  # if, cookie[2]
# inet_diag_msg: family, state, timer, retrans, sockid (48), expires, rqueue, wqueue, uid, inode
_MSG_TAIL = struct.Struct("=IIIII")
_MSG_TAIL_AT: Final = 4 + 48
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
#: any interface, no cookie: the same for every request
_SOCKID_TAIL_BYTES: Final = _SOCKID_TAIL.pack(0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE)
_REQUEST_SIZE: Final = NLMSGHDR.size + _REQ.size + _SOCKID.size + _SOCKID_TAIL.size
_PROTOCOLS: Final = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}

#: inodes remembered, at most; and the processes tried first
INODE_CACHE: Final = 16384
RECENT_OWNERS: Final = 8


class SocketDiag:
    """Look sockets up through ``NETLINK_SOCK_DIAG``: one request, one answer."""

    def __init__(self) -> None:
        self.sock = socket.socket(
            socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, NETLINK_SOCK_DIAG
        )
        self.sock.settimeout(1.0)
        self._seq = 0

    def close(self) -> None:
        self.sock.close()

    def lookup(self, flow: Flow, *, inbound: bool = False) -> tuple[int, int] | None:
        """(inode, uid) of the local socket of ``flow``, or None if there is none (it
        closed, or the packet has no local socket). ``inbound``: ``flow`` arrived here."""
        number = _PROTOCOLS.get(flow.protocol)
        if number is None:
            return None
        if inbound:
            local, lport, remote, rport = flow.dst_raw, flow.dport, flow.src_raw, flow.sport
        else:
            local, lport, remote, rport = flow.src_raw, flow.sport, flow.dst_raw, flow.dport
        # The kernel looks TCP up as (src = local) but UDP as a receiver would: src is the
        # remote end. Found either way for the first that matches.
        if number == socket.IPPROTO_UDP:
            sockid = _SOCKID.pack(rport, lport, remote.ljust(16, b"\0"), local.ljust(16, b"\0"))
        else:
            sockid = _SOCKID.pack(lport, rport, local.ljust(16, b"\0"), remote.ljust(16, b"\0"))
        found = self._ask(flow.family, number, sockid)
        if found is None and number == socket.IPPROTO_UDP and flow.family == socket.AF_INET:
            # An IPv6 socket sending IPv4 (dual stack) is found with mapped addresses.
            mapped = b"\0" * 10 + b"\xff\xff"
            sockid = _SOCKID.pack(rport, lport, mapped + remote, mapped + local)
            found = self._ask(socket.AF_INET6, number, sockid)
        return found

    def _ask(self, family: int, protocol: int, sockid: bytes) -> tuple[int, int] | None:
        self._seq += 1
        header = NLMSGHDR.pack(_REQUEST_SIZE, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, self._seq, 0)
        try:
            self.sock.send(
                header + _REQ.pack(family, protocol, 0, 0xFFFFFFFF) + sockid + _SOCKID_TAIL_BYTES
            )
            while True:
                data = self.sock.recv(8192)
                _length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data)
                if seq == self._seq:
                    break  # an answer to an earlier request that timed out is skipped
        except OSError:
            return None
        if kind == NLMSG_ERROR or len(data) < NLMSGHDR.size + _MSG_TAIL_AT + _MSG_TAIL.size:
            return None  # ENOENT: no such socket (any more)
        _expires, _rq, _wq, uid, inode = _MSG_TAIL.unpack_from(data, NLMSGHDR.size + _MSG_TAIL_AT)
        return (inode, uid) if inode else None


def _socket_inode(fd_path: str) -> int | None:
    """The socket inode behind a /proc/<pid>/fd/<n> link, if it is a socket."""
    try:
        target = os.readlink(fd_path)
    except OSError:
        return None
    return int(target[8:-1]) if target.startswith("socket:[") else None


def socket_fds(pid: int) -> dict[int, int] | None:
    """fd → inode of every socket ``pid`` has open; None if it is gone or unreadable."""
    base = f"/proc/{pid}/fd"
    try:
        names = os.listdir(base)
    except OSError:
        return None
    out: dict[int, int] = {}
    for name in names:
        inode = _socket_inode(f"{base}/{name}")
        if inode is not None:
            out[int(name)] = inode
    return out


def fd_inode(pid: int, fd: int) -> int | None:
    """The socket inode behind one fd of ``pid``, if it is a socket."""
    return _socket_inode(f"/proc/{pid}/fd/{fd}")


#: uid → the pids to scan, most likely owners first: from the proc table, else /proc
Candidates = Callable[[int | None], Iterable[int]]


def all_processes(uid: int | None) -> list[int]:
    """Every process, those of ``uid`` first and the newest (highest pid) first among
    them: the owner of a new connection is most likely a recent process of that user."""
    mine: list[int] = []
    others: list[int] = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if uid is not None:
            try:
                owner = os.stat(f"/proc/{name}").st_uid
            except OSError:
                continue
            (mine if owner == uid else others).append(pid)
        else:
            others.append(pid)
    mine.sort(reverse=True)
    others.sort(reverse=True)
    return mine + others


class Owners:
    """Socket inode → pid, by scanning /proc/<pid>/fd; remembered (see the module doc)."""

    def __init__(self, candidates: Candidates = all_processes) -> None:
        self.candidates = candidates
        self._inodes: OrderedDict[int, int] = OrderedDict()
        #: the processes that owned the last sockets, with the fds their sockets had
        self._recent: OrderedDict[int, set[int]] = OrderedDict()
        self.own_pid = os.getpid()
        self.hits = 0
        self.scans = 0

    def pid_of(self, inode: int, uid: int | None = None) -> int | None:
        pid = self._inodes.get(inode)
        if pid is not None:
            self.hits += 1
            return pid
        tried: set[int] = {self.own_pid}
        # A program that opens sockets again mostly gets the fd numbers it had before:
        # one readlink each, before listing every fd of anyone.
        for pid, fds in reversed(self._recent.items()):
            for fd in fds:
                if fd_inode(pid, fd) == inode:
                    self.hits += 1
                    self._recent.move_to_end(pid)
                    return pid
        for pid in reversed(self._recent):
            tried.add(pid)
            if self._scan(pid, inode):
                return pid
        # The table may not know a process (one started before it was filled): every
        # process, last, and only when needed.
        sources = [self.candidates]
        if self.candidates is not all_processes:
            sources.append(all_processes)
        for candidates in sources:
            for pid in candidates(uid):
                if pid in tried:
                    continue
                tried.add(pid)
                if self._scan(pid, inode):
                    return pid
        return None

    def _scan(self, pid: int, inode: int) -> bool:
        self.scans += 1
        fds = socket_fds(pid)
        if fds is None:
            self._recent.pop(pid, None)
            return False
        for found in fds.values():
            self._inodes[found] = pid
            self._inodes.move_to_end(found)
        while len(self._inodes) > INODE_CACHE:
            self._inodes.popitem(last=False)
        if inode not in fds.values():
            return False
        self._recent[pid] = {fd for fd, found in fds.items() if found == inode}
        self._recent.move_to_end(pid)
        if len(self._recent) > RECENT_OWNERS:
            self._recent.popitem(last=False)
        return True

    def forget(self, inode: int) -> None:
        self._inodes.pop(inode, None)
