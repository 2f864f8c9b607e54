"""Who is asking: the process behind a file access or a packet, cached per identity.

A decision must name the right process, and must be quick. Each lookup reads the two
things that tell one program run from another under the same pid: the start time (pid
reuse) and the executable (an ``exec`` keeps pid and start time). Everything else —
argv, uid, gid, user, the parent chain — is read once per identity: from the proc
source's table when it runs (it is filled at exec time, before the process could open
anything), from /proc otherwise. A process that changes its uid without an exec keeps
the uid it was first seen with until its next exec. Given a hasher, the sha256 of the
executable is read once per identity too (the proc source's, from its exec, where the
table has it); one still being hashed is asked for again at each lookup until it is known.

A process gone before its lookup (a notification is read after the fact) is named from
the table only once the proc source has applied its exit, and so every exec before it:
until then the table may still hold what the process inherited at fork, its parent's
program. A lookup never waits for that: it says the answer is :data:`PENDING`, to a
caller that can ask again shortly (the file source holds such a notification back), or
names the process from what was seen of it while it lived, or not at all: never with
another's name.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from typing import Any, Final, Protocol, overload

from kport.sources import procinfo
from kport.sources.hashes import Hasher

Info = dict[str, Any]


class ProcessTableView(Protocol):
    """What is read of the proc source's table (``kport.sources.proc.ProcessTable``):
    entries by pid, each with exe, argv, uid, start_time, ppid..."""

    def lookup(self, pid: int) -> Info | None:
        """The live process ``pid``, else the last one that exited with that pid."""

    def exited_entry(self, pid: int) -> Info | None:
        """The last process ``pid`` named, once its exit has been applied."""


#: identities kept at once; the least recently seen goes first
CACHE_SIZE: Final = 4096
#: processes pinned by an open /proc/<pid> fd at once (one fd each)
PINNED: Final = 256
#: how far up the parent chain ancestry goes
ANCESTRY_LIMIT: Final = 32
#: pauses (s) before each read of a process caught mid-exec (no argv yet): 1.1 ms in all
MID_EXEC_WAITS: Final = (0.0, 0.0001, 0.0002, 0.0003, 0.0005)


class Pending:
    """The answer for a gone process whose exit the table has not applied yet: ask again
    shortly (the proc source is a few ms behind at worst, unless it is overwhelmed)."""

    def __repr__(self) -> str:
        return "PENDING"


PENDING: Final = Pending()


class Subjects:
    """Process details by pid, checked against the process's identity on every lookup."""

    def __init__(self, table: ProcessTableView | None = None, hasher: Hasher | None = None) -> None:
        self.table = table
        self.hasher = hasher
        self._cache: OrderedDict[int, Info] = OrderedDict()
        #: pid → (its /proc directory fd, its start time), the oldest first
        self._pinned: dict[int, tuple[int, int]] = {}
        self.hits = 0
        self.misses = 0
        #: final lookups of gone processes that the table had not caught up with
        self.unsettled = 0

    def identity(self, pid: int) -> tuple[int, str] | None:
        """(start_time, exe) of ``pid`` now, or None if it is gone (or a kernel thread).

        A /proc/<pid> directory fd pins its process: a read through it fails once that
        process is gone, even if the pid names another by then. So a pinned pid costs one
        readlink (has it exec'd?) instead of reading its start time again."""
        pinned = self._pinned.get(pid)
        if pinned is not None:
            dirfd, start = pinned
            try:
                return start, os.readlink("exe", dir_fd=dirfd)
            except OSError:
                self._unpin(pid)  # gone: the pid may name another process now
        try:
            dirfd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            stat = procinfo.read_stat_at(dirfd)
            exe = os.readlink("exe", dir_fd=dirfd)
        except OSError:
            stat = None
        if stat is None:
            os.close(dirfd)
            return None
        self._pinned[pid] = (dirfd, stat.start_time)
        if len(self._pinned) > PINNED:
            self._unpin(next(iter(self._pinned)))
        return stat.start_time, exe

    def _unpin(self, pid: int) -> None:
        pinned = self._pinned.pop(pid, None)
        if pinned is not None:
            os.close(pinned[0])

    def close(self) -> None:
        """Close the pinned /proc fds."""
        for pid in list(self._pinned):
            self._unpin(pid)

    @overload
    def get(self, pid: int) -> Info | None: ...

    @overload
    def get(self, pid: int, *, final: bool) -> Info | Pending | None: ...

    def get(self, pid: int, *, final: bool = True) -> Info | Pending | None:
        """What kport reports about ``pid``: start_time, exe, argv, uid, gid, user,
        ppid and ancestors (executables up the parent chain, nearest first); None if the
        process is gone. The identity is checked, the rest comes from cache when it may.
        A gone process is named as :meth:`_gone` says; with ``final`` False, PENDING
        while the table may still learn its name."""
        identity = self.identity(pid)
        if identity is None:
            return self._gone(pid, final)
        cached = self._cache.get(pid)
        if cached is not None and (cached["start_time"], cached["exe"]) == identity:
            self.hits += 1
            self._cache.move_to_end(pid)
            if "exe_sha256_pending" in cached and self.hasher is not None:
                self._hash(pid, cached)  # the worker may have finished it since
            return cached
        self.misses += 1
        info = self._read(pid, identity)
        if info is None:
            return self._gone(pid, final)
        if not info["argv"]:
            return info  # still mid-exec: the next lookup reads it again
        self._cache[pid] = info
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return info

    def _gone(self, pid: int, final: bool) -> Info | Pending | None:
        """A process that exited before it could be read: the table's account once it has
        applied the exit (it saw every exec), else what was last seen of that pid here;
        PENDING instead, unless ``final``, while the table may still catch up."""
        entry = self.table.exited_entry(pid) if self.table is not None else None
        if entry is None and self._table_behind(pid):
            if not final:
                return PENDING
            self.unsettled += 1
        seen = self._cache.pop(pid, None)
        if entry is not None and (entry.get("exe") or seen is None):
            info = {k: entry.get(k) for k in ("start_time", "exe", "argv", "uid", "gid", "user")}
            info["ppid"] = entry.get("ppid")
            info["ancestors"] = self._ancestors(entry.get("ppid"))
        elif seen is not None:
            info = seen
        else:
            return None
        return {**info, "gone": True}

    def _table_behind(self, pid: int) -> bool:
        """Can the table still learn of ``pid``'s exit? Not without a table, nor for a
        kernel thread (it has no exe to read, and never exits). A process whose exe cannot
        be read is exiting: a zombie, or not yet one but with its memory already gone."""
        if self.table is None:
            return False
        stat = procinfo.read_stat(pid)
        return stat is None or not stat.kernel_thread

    def _read(self, pid: int, identity: tuple[int, str]) -> Info | None:
        start, exe = identity
        entry = self.table.lookup(pid) if self.table is not None else None
        if (
            entry is not None
            and entry.get("start_time") == start
            and entry.get("exe") == exe
            and entry.get("uid") is not None
        ):
            info = {k: entry.get(k) for k in ("argv", "uid", "gid", "user", "ppid")}
            if entry.get("exe_sha256") and not entry.get("exe_sha256_by"):
                info["exe_sha256"] = entry["exe_sha256"]  # hashed through its own exe
        else:
            described = self._describe(pid, start)
            if described is None:
                return None
            info = {k: described.get(k) for k in ("argv", "uid", "gid", "user", "ppid")}
        info["start_time"] = start
        info["exe"] = exe
        info["ancestors"] = self._ancestors(info.get("ppid"))
        if self.hasher is not None and "exe_sha256" not in info:
            self._hash(pid, info)
        return info

    def _hash(self, pid: int, info: Info) -> None:
        """Put the executable's sha256 (or why not, or that it is pending) on ``info``."""
        assert self.hasher is not None
        for key in ("exe_sha256", "exe_sha256_by", "exe_sha256_pending", "exe_sha256_error"):
            info.pop(key, None)
        info.update(self.hasher.of_process(pid, info["exe"]))

    def _describe(self, pid: int, start: int) -> Info | None:
        """/proc's account of ``pid``, once its exec is through. The kernel names the new
        executable before it puts the new program's arguments in place, so a user process
        (its exe was readable) with no argv is mid-exec: read again, a few times, briefly."""
        described = None
        for wait in MID_EXEC_WAITS:
            if wait:
                time.sleep(wait)
            pinned = self._pinned.get(pid)  # identity() has just pinned it, unless gone
            described = (
                procinfo.describe_at(pinned[0], start, pid)
                if pinned is not None
                else procinfo.describe(pid, start)
            )
            if described is None or described.get("argv"):
                break
        return described

    def _ancestors(self, ppid: int | None) -> list[str]:
        """The executables of the parent chain, nearest first (unreadable ones left out)."""
        chain: list[str] = []
        seen: set[int] = set()
        pid = ppid
        while pid and pid not in seen and len(seen) < ANCESTRY_LIMIT:
            seen.add(pid)
            entry = self.table.lookup(pid) if self.table is not None else None
            if entry is not None and entry.get("exe"):
                chain.append(entry["exe"])
                pid = entry.get("ppid")
                continue
            stat = procinfo.read_stat(pid)
            if stat is None:
                break
            exe = procinfo.exe(pid)
            if exe is not None:
                chain.append(exe)
            pid = stat.ppid
        return chain
