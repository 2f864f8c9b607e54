"""Who may connect to a port: the socket file's owner, group and mode, and peer credentials."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_UCRED = struct.Struct("3i")


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What the kernel says about the process at the other end of a Unix socket."""

    pid: int
    uid: int
    gid: int
    groups: frozenset[int]


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED and SO_PEERGROUPS of a connected Unix socket."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    try:
        # Python's getsockopt takes at most 1024 bytes: 256 groups. A peer in more
        # groups gets ERANGE, and its groups are read from /proc instead.
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 1024)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw))
    except OSError:
        groups = _proc_groups(pid)
    return PeerCredentials(pid, uid, gid, groups)


def _proc_groups(pid: int) -> frozenset[int]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return frozenset()


def _uid(value: int | str) -> int:
    if isinstance(value, int):
        return value
    try:
        return pwd.getpwnam(value).pw_uid
    except KeyError:
        raise ValueError(f"security names user {value!r}, which does not exist") from None


def _gid(value: int | str) -> int:
    if isinstance(value, int):
        return value
    try:
        return grp.getgrnam(value).gr_gid
    except KeyError:
        raise ValueError(f"security names group {value!r}, which does not exist") from None


@dataclass(frozen=True)
class Security:
    """A port's security: who may connect, and the socket file's owner, group and mode.

    ``uids`` / ``gids`` (numbers or names) are checked against the peer's credentials at
    connect time; a peer matches on its uid, its primary gid or any supplementary group.
    The default admits the port's owner alone. ``mode`` defaults to the narrowest mode
    that lets the admitted peers reach the socket: 0o600 for the owner alone, 0o660 with a
    group, 0o666 when other users are admitted one by one (the credential check still
    refuses everyone else before a single frame is exchanged).
    """

    uids: Iterable[int | str] | None = None
    gids: Iterable[int | str] = field(default_factory=tuple)
    mode: int | None = None
    owner: int | str | None = None
    group: int | str | None = None

    def resolve(self) -> ResolvedSecurity:
        owner = os.geteuid() if self.owner is None else _uid(self.owner)
        uids = frozenset({owner} if self.uids is None else {_uid(u) for u in self.uids})
        gids = frozenset(_gid(g) for g in self.gids)
        if self.group is not None:
            group = _gid(self.group)
        elif gids:
            group = min(gids)
        else:
            group = os.getegid()
        if self.mode is not None:
            if not 0 <= self.mode <= 0o777:
                raise ValueError(f"socket mode {self.mode:o} is not a permission mode")
            mode = self.mode
        elif uids - {owner}:
            mode = 0o666
        elif gids:
            mode = 0o660
        else:
            mode = 0o600
        return ResolvedSecurity(uids, gids, mode, owner, group)


@dataclass(frozen=True, slots=True)
class ResolvedSecurity:
    """A :class:`Security` with names turned into numbers and the mode decided."""

    uids: frozenset[int]
    gids: frozenset[int]
    mode: int
    owner: int
    group: int

    def admits(self, peer: PeerCredentials) -> bool:
        if peer.uid in self.uids:
            return True
        return bool(self.gids & (peer.groups | {peer.gid}))

    def describe(self) -> str:
        users = ",".join(str(u) for u in sorted(self.uids)) or "-"
        groups = ",".join(str(g) for g in sorted(self.gids)) or "-"
        return f"uids {users}, gids {groups}, mode {self.mode:o}"
