"""A shared-memory ring of byte records from one process to another, woken by eventfds.

One end puts, the other end gets (single producer, single consumer). The records live in a
sealed memfd; two eventfds carry everything that changes: ``data`` counts entries
published, ``space`` counts bytes freed. Each side keeps its own position and free count
and never reads the other's from shared memory: the eventfd syscalls are full memory
barriers, so bytes written before an ``eventfd_write`` are visible after the peer's
``eventfd_read``, and Python needs no atomics. The header names both ends by
(pid, start time), so a side that waits notices through a pidfd that its peer died.

Layout of the memfd::

    0    magic "kportRNG", u32 version, u32 reserved, u64 capacity
    64   creator end:  u64 pid, u64 start time, u64 pid namespace inode, u64 closed
    96   attacher end: the same
    128  data area of ``capacity`` bytes

An entry is a u32 little-endian length and its payload, padded to 8 bytes. A record that
does not fit before the end of the area is preceded by a wrap entry (length 0xFFFFFFFF):
the rest of the area counts as used until the consumer passes it. ``closed`` is 0 while
an end is open, then 1 + the number of entries that end published, so the consumer knows
exactly how many are left to drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import math
import mmap
import os
import select
import struct
import time
import warnings
from collections.abc import Sequence
from itertools import islice
from types import TracebackType
from typing import Any, Final, Self

from kport import identity
from kport.errors import PortClosed, QueueFull, RemoteProtocolError, Timeout

MIN_CAPACITY: Final = 4096
MAX_CAPACITY: Final = 1 << 30

_MAGIC: Final = b"kportRNG"
_VERSION: Final = 1
_PREFIX: Final = struct.Struct("<8sIIQ")  # magic, version, reserved, capacity
_END: Final = struct.Struct("<QQQQ")  # pid, start time, pid namespace inode, closed
_END_OFFSETS: Final = (64, 96)  # creator, attacher
_CLOSED_FIELD: Final = 24  # offset of ``closed`` within an end
_HEADER_SIZE: Final = 128
_U64: Final = struct.Struct("<Q")
_LENGTH: Final = struct.Struct("<I")
_WRAP: Final = 0xFFFFFFFF
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
# Until the other end attaches there is no pid to watch: look at the header this often.
_UNKNOWN_PEER_RECHECK_S: Final = 0.2


class Ring:
    """One end of a single-producer single-consumer ring of byte records.

    ``Ring(capacity)`` creates the ring and is its first end; another process rebuilds
    the second end with :meth:`from_fds` from :meth:`fds` and :meth:`meta`. Either end
    may be the producer; each object keeps its own positions, so a ring has exactly these
    two ends and cannot be handed on again.
    """

    def __init__(self, capacity: int) -> None:
        """Create a ring of ``capacity`` data bytes (rounded up to a multiple of 8)."""
        capacity = _checked_capacity(capacity)
        fds = [os.memfd_create("kport-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)]
        try:
            os.ftruncate(fds[0], _HEADER_SIZE + capacity)
            # Sealed against shrinking, so the peer can never make our mapping SIGBUS.
            fcntl.fcntl(fds[0], fcntl.F_ADD_SEALS, _SEALS)
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            fds.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            shared = mmap.mmap(fds[0], _HEADER_SIZE + capacity)
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        _PREFIX.pack_into(shared, 0, _MAGIC, _VERSION, 0, capacity)
        self._setup(shared, fds, capacity, end=0)

    @classmethod
    def from_fds(cls, fds: list[int], meta: dict[str, Any]) -> Ring:
        """The second end of a ring, from its received [memfd, data, space] fds and meta.

        Takes ownership of ``fds``: they are closed by :meth:`close`, or at once when they
        do not make a ring (ValueError).
        """
        try:
            if len(fds) != 3:
                raise ValueError(f"a ring is 3 fds (memfd, data, space), got {len(fds)}")
            capacity, shared = _map_received(fds, meta)
        except BaseException:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        ring = cls.__new__(cls)
        ring._setup(shared, fds, capacity, end=1)
        return ring

    def _setup(self, shared: mmap.mmap, fds: list[int], capacity: int, end: int) -> None:
        self._mm = shared
        self._memfd, self._data_fd, self._space_fd = fds
        self._capacity = capacity
        self._max_record = capacity - _LENGTH.size
        self._end = end
        self._own_offset = _END_OFFSETS[end]
        self._peer_offset = _END_OFFSETS[1 - end]
        self._peer_closed_at = self._peer_offset + _CLOSED_FIELD
        self._owner_pid = os.getpid()
        self._pidns = _pid_namespace()
        self._closed = False
        # Producer state: absolute write offset into the mapping, bytes free, entries put.
        self._wpos = _HEADER_SIZE
        self._free = capacity
        self._published = 0
        # Consumer state: absolute read offset, entries announced but not yet read.
        self._rpos = _HEADER_SIZE
        self._unread = 0
        self._consumed = 0
        self._producer_closed = False
        # The other end's process, once it is known.
        self._peer_pid = 0
        self._pidfd: int | None = None
        self._peer_gone: str | None = None
        start_time = identity.start_time(self._owner_pid) or 0
        _END.pack_into(shared, self._own_offset, self._owner_pid, start_time, self._pidns, 0)

    # -- passing -----------------------------------------------------------------------

    def fds(self) -> list[int]:
        """[memfd, data eventfd, space eventfd], still owned by this ring, to pass on."""
        self._check_open()
        return [self._memfd, self._data_fd, self._space_fd]

    def meta(self) -> dict[str, Any]:
        """What :meth:`from_fds` needs besides the fds."""
        self._check_open()
        return {"capacity": self._capacity}

    @property
    def capacity(self) -> int:
        """Bytes in the data area; a record takes 4 + its length, padded to 8."""
        return self._capacity

    @property
    def max_record(self) -> int:
        """The largest record this ring can hold."""
        return self._max_record

    # -- producing ---------------------------------------------------------------------

    def put(self, data: bytes, timeout: float | None = None) -> None:
        """Append one record, waiting up to ``timeout`` s (None: forever) for room.

        Raises QueueFull at the timeout, PortClosed when the consumer closed or died.
        """
        self.put_many((data,), timeout)

    def put_many(self, records: Sequence[bytes], timeout: float | None = None) -> None:
        """Append records in order, each batch that fits published with one wakeup.

        Waits up to ``timeout`` s in all for room; at the timeout the records that fit
        are in the ring and QueueFull says how many did not. Never overwrites unread data.
        """
        self._check_records(records)
        deadline = _deadline(timeout)
        written = self._put_now(records, 0)
        while written < len(records):
            if not self._wait(self._space_fd, deadline):
                raise self._full_error(records, written, timeout)
            written = self._put_now(records, written)

    async def put_async(self, data: bytes, timeout: float | None = None) -> None:
        """:meth:`put` for asyncio: waits on the event loop, not in a thread."""
        await self.put_many_async((data,), timeout)

    async def put_many_async(self, records: Sequence[bytes], timeout: float | None = None) -> None:
        """:meth:`put_many` for asyncio."""
        self._check_records(records)
        deadline = _deadline(timeout)
        written = self._put_now(records, 0)
        while written < len(records):
            if not await self._wait_async(self._space_fd, deadline):
                raise self._full_error(records, written, timeout)
            written = self._put_now(records, written)

    def _check_records(self, records: Sequence[bytes]) -> None:
        self._check_open()
        if records:
            largest = max(map(len, records))
            if largest > self._max_record:
                raise ValueError(
                    f"a record of {largest} bytes can never fit in this ring: at most "
                    f"{self._max_record} bytes for capacity {self._capacity}"
                )

    def _put_now(self, records: Sequence[bytes], start: int) -> int:
        """Write records[start:] while they fit, publish them; the index of the first left."""
        self._check_open()
        if self._peer_gone is not None:
            raise PortClosed(f"{self._peer_gone}; nothing more can be put")
        if _U64.unpack_from(self._mm, self._peer_closed_at)[0]:
            raise PortClosed("the consumer closed the ring; nothing more can be put")
        shared = self._mm
        area_end = _HEADER_SIZE + self._capacity
        wpos = self._wpos
        free = self._free
        pack_length = _LENGTH.pack_into
        entries = 0
        written = start
        try:
            for record in islice(records, start, None):
                size = len(record)
                need = (size + 11) & -8
                if need > free or wpos + need > area_end:
                    free += _read_counter(self._space_fd)
                    if wpos + need > area_end:
                        skip = area_end - wpos
                        if skip > free:
                            break
                        if skip:
                            pack_length(shared, wpos, _WRAP)
                            entries += 1
                            free -= skip
                        wpos = _HEADER_SIZE
                    if need > free:
                        break
                pack_length(shared, wpos, size)
                shared[wpos + 4 : wpos + 4 + size] = record
                wpos += need
                free -= need
                entries += 1
                written += 1
        finally:
            # Also when a record is not bytes: what was written is whole, and freed room
            # read from the eventfd must not be lost.
            self._wpos = wpos
            self._free = free
            if entries:
                os.eventfd_write(self._data_fd, entries)
                self._published += entries
        return written

    def _full_error(
        self, records: Sequence[bytes], written: int, timeout: float | None
    ) -> QueueFull:
        left = len(records) - written
        size = sum(map(len, islice(records, written, None)))
        after = f", after the first {written}" if written else ""
        return QueueFull(
            f"ring full: {left} record(s) of {size} bytes waited {timeout or 0:g} s and were "
            f"not put{after}; the consumer is not reading"
        )

    # -- consuming ---------------------------------------------------------------------

    def get(self, timeout: float | None = None) -> bytes:
        """The next record, waiting up to ``timeout`` s (None: forever).

        Raises Timeout when none came, PortClosed once the producer closed or died and
        every record it put has been read.
        """
        records = self._get_now(1)
        deadline = _deadline(timeout)
        while not records:
            if not self._wait(self._data_fd, deadline):
                raise _empty_error(timeout)
            records = self._get_now(1)
        return records[0]

    def get_many(self, max_count: int = 1024, timeout: float | None = None) -> list[bytes]:
        """At least one record (waiting as :meth:`get`), then up to ``max_count`` ready now."""
        _check_max_count(max_count)
        records = self._get_now(max_count)
        deadline = _deadline(timeout)
        while not records:
            if not self._wait(self._data_fd, deadline):
                raise _empty_error(timeout)
            records = self._get_now(max_count)
        return records

    async def get_async(self, timeout: float | None = None) -> bytes:
        """:meth:`get` for asyncio: waits on the event loop, not in a thread."""
        return (await self.get_many_async(1, timeout))[0]

    async def get_many_async(
        self, max_count: int = 1024, timeout: float | None = None
    ) -> list[bytes]:
        """:meth:`get_many` for asyncio."""
        _check_max_count(max_count)
        records = self._get_now(max_count)
        deadline = _deadline(timeout)
        while not records:
            if not await self._wait_async(self._data_fd, deadline):
                raise _empty_error(timeout)
            records = self._get_now(max_count)
        return records

    def _get_now(self, max_count: int) -> list[bytes]:
        """Up to ``max_count`` records that are ready, without waiting; [] when none."""
        self._check_open()
        if self._unread < max_count and not self._producer_closed:
            self._fetch()
        records: list[bytes] = []
        shared = self._mm
        area_end = _HEADER_SIZE + self._capacity
        start = rpos = self._rpos
        unread = self._unread
        wanted = max_count
        append = records.append
        unpack_length = _LENGTH.unpack_from
        while unread and wanted:
            unread -= 1
            (size,) = unpack_length(shared, rpos)
            if size == _WRAP:
                rpos = _HEADER_SIZE
                continue
            need = (size + 11) & -8
            if rpos + need > area_end:
                raise RemoteProtocolError(
                    f"ring record at offset {rpos - _HEADER_SIZE} claims {size} bytes, past "
                    f"the end of the {self._capacity}-byte ring; the producer broke the ring"
                )
            append(shared[rpos + 4 : rpos + 4 + size])
            wanted -= 1
            rpos += need
            if rpos == area_end:
                rpos = _HEADER_SIZE
        taken = self._unread - unread
        self._consumed += taken
        self._unread = unread
        self._rpos = rpos
        # Bytes passed, wrap entries' skipped ends included; a full lap returns to ``start``.
        freed = (rpos - start) % self._capacity or (self._capacity if taken else 0)
        if freed:
            os.eventfd_write(self._space_fd, freed)
        if not records and not unread:
            if self._producer_closed:
                raise PortClosed("the producer closed the ring and every record has been read")
            if self._peer_gone is not None:
                self._fetch()  # records it published just before dying
                if not self._unread:
                    raise PortClosed(f"{self._peer_gone}; every record it put has been read")
        return records

    def _fetch(self) -> None:
        """Learn how many entries were published since the last look, and if that is all."""
        self._unread += _read_counter(self._data_fd)
        closed = _U64.unpack_from(self._mm, self._peer_closed_at)[0]
        if closed:
            # Counts from the eventfd include close()'s wakeup; the header's total is exact.
            self._producer_closed = True
            self._unread = max(0, closed - 1 - self._consumed)

    # -- waiting -----------------------------------------------------------------------

    def _wait(self, fd: int, deadline: float | None) -> bool:
        """Sleep until ``fd`` is readable or the peer dies; False if past the deadline."""
        pidfd = self._watch_peer()
        if self._peer_gone is not None:
            return True
        delay = self._delay(deadline, pidfd)
        if delay is not None and delay <= 0:
            return False
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if pidfd is not None:
            poller.register(pidfd, select.POLLIN)
        for ready, _ in poller.poll(None if delay is None else math.ceil(delay * 1000)):
            if ready == pidfd:
                self._peer_died()
        return True

    async def _wait_async(self, fd: int, deadline: float | None) -> bool:
        """:meth:`_wait` on the running event loop."""
        pidfd = self._watch_peer()
        if self._peer_gone is not None:
            return True
        delay = self._delay(deadline, pidfd)
        if delay is not None and delay <= 0:
            return False
        loop = asyncio.get_running_loop()
        woken: asyncio.Future[int] = loop.create_future()

        def wake(ready: int) -> None:
            if not woken.done():
                woken.set_result(ready)

        watched = [fd] if pidfd is None else [fd, pidfd]
        try:
            for each in watched:
                loop.add_reader(each, wake, each)
            await asyncio.wait([woken], timeout=delay)
        finally:
            for each in watched:
                loop.remove_reader(each)
            woken.cancel()
        if woken.done() and not woken.cancelled() and woken.result() == pidfd:
            self._peer_died()
        return True

    def _delay(self, deadline: float | None, pidfd: int | None) -> float | None:
        """Seconds to sleep: until the deadline, but briefly while the peer is unknown."""
        delay = None if deadline is None else deadline - time.monotonic()
        if pidfd is None and (delay is None or delay > _UNKNOWN_PEER_RECHECK_S):
            # Nobody to watch yet (not attached, or in another pid namespace): look again.
            return _UNKNOWN_PEER_RECHECK_S
        return delay

    def _watch_peer(self) -> int | None:
        """A pidfd on the other end's process once it is known, or None."""
        if self._pidfd is not None or self._peer_gone is not None:
            return self._pidfd
        pid, start_time, pidns, _ = _END.unpack_from(self._mm, self._peer_offset)
        if not pid or not pidns or pidns != self._pidns:
            return None  # not attached yet, or its pid means nothing here
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            self._peer_gone = f"the other end of the ring (pid {pid}) died"
            return None
        except OSError:
            return None  # no pidfds here: the timeout is the only way out
        now = identity.start_time(pid)
        if start_time and now is not None and now != start_time:
            os.close(pidfd)
            self._peer_gone = f"the other end of the ring (pid {pid}) died; the pid was reused"
            return None
        self._peer_pid = pid
        self._pidfd = pidfd
        return pidfd

    def _peer_died(self) -> None:
        self._peer_gone = f"the other end of the ring (pid {self._peer_pid}) died"

    # -- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Mark this end closed, wake the peer, and release the fds and mapping.

        The peer's consumer drains what is left, then gets PortClosed; its producer gets
        PortClosed. A copy inherited through fork only releases its own fds and mapping.
        """
        if self._closed:
            return
        self._closed = True
        if os.getpid() == self._owner_pid:
            _U64.pack_into(self._mm, self._own_offset + _CLOSED_FIELD, 1 + self._published)
            for fd in (self._data_fd, self._space_fd):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_write(fd, 1)
        self._mm.close()
        for owned in (self._memfd, self._data_fd, self._space_fd, self._pidfd):
            if owned is not None:
                os.close(owned)
        self._pidfd = None

    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("ring is closed")

    def __enter__(self) -> Self:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            warnings.warn(f"unclosed {self!r}", ResourceWarning, stacklevel=1, source=self)
            self.close()

    def __repr__(self) -> str:
        state = "closed" if getattr(self, "_closed", True) else "open"
        end = "creator" if getattr(self, "_end", 0) == 0 else "attacher"
        return f"<Ring {end} end, capacity {getattr(self, '_capacity', '?')}, {state}>"


def _checked_capacity(capacity: int) -> int:
    if (
        isinstance(capacity, bool)
        or not isinstance(capacity, int)
        or not MIN_CAPACITY <= capacity <= MAX_CAPACITY
    ):
        raise ValueError(
            f"ring capacity must be an int from {MIN_CAPACITY} to {MAX_CAPACITY} bytes "
            f"(1 GiB), got {capacity!r}"
        )
    return (capacity + 7) & -8


def _map_received(fds: list[int], meta: dict[str, Any]) -> tuple[int, mmap.mmap]:
    """Check that received fds make a ring; its capacity and the mapping of its memfd."""
    memfd, data_fd, space_fd = fds
    size = os.fstat(memfd).st_size
    head = os.pread(memfd, _HEADER_SIZE, 0)
    if len(head) < _HEADER_SIZE:
        raise ValueError(
            f"not a kport ring: {size} bytes, less than its {_HEADER_SIZE}-byte header"
        )
    magic, version, _, capacity = _PREFIX.unpack_from(head)
    if magic != _MAGIC:
        raise ValueError(f"not a kport ring: magic {magic!r}, expected {_MAGIC!r}")
    if version != _VERSION:
        raise ValueError(
            f"kport ring version {version} is not supported (this end reads {_VERSION})"
        )
    if meta.get("capacity") != capacity:
        raise ValueError(
            f"ring capacity {capacity} in its header, but {meta.get('capacity')!r} in meta"
        )
    if capacity % 8 or not MIN_CAPACITY <= capacity <= MAX_CAPACITY:
        raise ValueError(f"not a kport ring: capacity {capacity} breaks the ring's rules")
    if size != _HEADER_SIZE + capacity:
        raise ValueError(
            f"ring memfd is {size} bytes; capacity {capacity} needs {_HEADER_SIZE + capacity}"
        )
    try:
        seals = fcntl.fcntl(memfd, fcntl.F_GET_SEALS)
    except OSError as err:
        raise ValueError("not a kport ring: the first fd is not a memfd") from err
    if seals & fcntl.F_SEAL_SHRINK == 0:
        raise ValueError("ring memfd is not sealed against shrinking; its peer could truncate it")
    for name, fd in (("data", data_fd), ("space", space_fd)):
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventfd]":
            raise ValueError(f"not a kport ring: its {name} fd is not an eventfd")
    second_pid = _END.unpack_from(head, _END_OFFSETS[1])[0]
    if second_pid:
        raise ValueError(f"ring already has its second end (pid {second_pid}); pass a new ring")
    return capacity, mmap.mmap(memfd, size)


def _read_counter(fd: int) -> int:
    """An eventfd's count, reset to 0; 0 if nothing was written since."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def _pid_namespace() -> int:
    """The inode of our pid namespace (0 if unknown): pids mean nothing across them."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + max(0.0, timeout)


def _check_max_count(max_count: int) -> None:
    if max_count < 1:
        raise ValueError(f"max_count must be at least 1, got {max_count}")


def _empty_error(timeout: float | None) -> Timeout:
    return Timeout(
        f"ring empty: no record arrived within {timeout or 0:g} s; the producer is not writing"
    )


__all__ = ["MAX_CAPACITY", "MIN_CAPACITY", "Ring"]
