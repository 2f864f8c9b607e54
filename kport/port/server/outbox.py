"""A connection's outbox, sans-IO: what is to be written, bounded, and what was lost.

Entries are notifications (droppable), frames that may not be dropped (requests,
replies, errors, history's LOST frames) and objects (a frame and its fds). When the
outbox is full — ``limit`` entries or ``max_bytes`` bytes — the oldest notifications
make room; a notification that still finds none is dropped itself. Every drop is
counted and reported to the client in one LOST frame (count and seq range) ahead of
whatever it receives next; a frame that finds no room raises ``QueueFull``.

It touches no socket and no loop: :meth:`Outbox.take_batch` hands back the bytes to
write, and ``wake`` (given by the connection) says there is something to write.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from kport import protocol
from kport.errors import QueueFull
from kport.replay import Gap, Page

#: bytes one writing step takes from the outbox, at most
BATCH_BYTES: Final = 256 * 1024

# Entries: (_NOTIFY, seq, packed item), (_FRAME, request id or None, frame bytes),
# or (_OBJECT, (object id, the fds, owned by the entry), frame bytes).
_NOTIFY: Final = 0
_FRAME: Final = 1
_OBJECT: Final = 2
Entry = tuple[int, Any, bytes]


class Tally:
    """Counts kept over all of a port's connections, those gone included."""

    __slots__ = ("lost",)

    def __init__(self) -> None:
        #: notifications dropped because a queue was full
        self.lost = 0


class Outbox:
    """One connection's bounded queue (see the module docstring)."""

    def __init__(
        self,
        proto: protocol.Connection,
        *,
        limit: int,
        max_bytes: int,
        wake: Callable[[], None],
        tally: Tally,
        owner: str,
    ) -> None:
        self._proto = proto
        self.limit = limit
        self.max_bytes = max_bytes
        self._wake = wake
        self._tally = tally
        #: who this outbox belongs to, for errors: "port 'x': connection 3 (pid 42)"
        self._owner = owner
        self._queue: deque[Entry] = deque()
        self.bytes = 0
        self._notifies = 0
        #: notifications this connection lost: dropped, or gaps in the history it replayed
        self.lost = 0
        #: frames written (a NOTIFY frame counts its items)
        self.sent = 0
        #: history notifications replayed
        self.replayed = 0
        self._lost_count = 0
        self._lost_first: int | None = None
        self._lost_last: int | None = None
        self._batch_limit = min(BATCH_BYTES, proto.max_frame - 64)

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def due(self) -> bool:
        """Whether anything waits to be written: an entry, or a loss to report."""
        return bool(self._queue) or self._lost_count > 0

    # --- putting in ------------------------------------------------------------------

    def notify(self, seq: int, item: bytes) -> bool:
        """Queue a notification; False when it was dropped (counted and reported)."""
        size = len(item)
        if size > self.max_bytes:
            self._record_lost(seq)
            return False
        queue = self._queue
        while len(queue) >= self.limit or self.bytes + size > self.max_bytes:
            if not self._drop_oldest_notify():
                self._record_lost(seq)
                return False
        queue.append((_NOTIFY, seq, item))
        self.bytes += size
        self._notifies += 1
        self._wake()
        return True

    def frame(self, frame: bytes, request_id: int | None = None) -> None:
        """Queue a frame that may not be dropped; ``QueueFull`` when even dropping every
        notification leaves no room."""
        size = len(frame)
        while len(self._queue) >= self.limit or self.bytes + size > self.max_bytes:
            if not self._drop_oldest_notify():
                raise QueueFull(
                    f"{self._owner}: the queue is full of requests and replies "
                    f"({len(self._queue)} messages, {self.bytes} bytes)"
                )
        self._queue.append((_FRAME, request_id, frame))
        self.bytes += size
        self._wake()

    def object(self, object_id: int, fds: list[int], frame: bytes) -> Entry:
        """Queue an object (never dropped: like a request, it waits its turn); the entry
        owns ``fds`` until it is written or withdrawn"""
        entry = (_OBJECT, (object_id, fds), frame)
        self._queue.append(entry)
        self.bytes += len(frame)
        self._wake()
        return entry

    def withdraw(self, entry: Entry) -> bool:
        """Take an object that never went out back out of the queue."""
        try:
            self._queue.remove(entry)
        except ValueError:
            return False
        self.bytes -= len(entry[2])
        return True

    def unqueue_request(self, request_id: int) -> None:
        """A request that ended (deadline, cancelled) before it went out goes no further."""
        for index, entry in enumerate(self._queue):
            if entry[0] == _FRAME and entry[1] == request_id:
                del self._queue[index]
                self.bytes -= len(entry[2])
                return

    def page(self, page: Page) -> None:
        """Queue history like live notifications (bounded, the oldest dropped and
        reported), each gap's LOST frame in its place."""
        for entry in in_seq_order(page.items, page.gaps):
            if isinstance(entry, Gap):
                frame = self._proto.send(protocol.Lost(entry.count, entry.first, entry.last))
                self._queue.append((_FRAME, None, frame))
                self.bytes += len(frame)
                self.lost += entry.count
            else:
                self.notify(*entry)
                self.replayed += 1
        self._wake()

    def page_frames(self, page: Page) -> bytes:
        """A page of history as frames to write at once: runs of items as NOTIFY frames,
        gaps as LOST frames in their place."""
        parts: list[bytes] = []
        run: list[tuple[int, bytes]] = []
        size = 0
        for entry in in_seq_order(page.items, page.gaps):
            ends_run = isinstance(entry, Gap) or size + len(entry[1]) > self._batch_limit
            if run and ends_run:
                parts.append(self._notify_frame(*_unzip(run)))
                self.replayed += len(run)
                run, size = [], 0
            if isinstance(entry, Gap):
                parts.append(self._proto.send(protocol.Lost(entry.count, entry.first, entry.last)))
                self.lost += entry.count
            else:
                run.append(entry)
                size += len(entry[1])
        if run:
            parts.append(self._notify_frame(*_unzip(run)))
            self.replayed += len(run)
        self.sent += len(page.items)
        return b"".join(parts)

    def lose_range(self, first: int, last: int, count: int) -> None:
        """``count`` notifications with seqs in ``first..last`` will never come (their
        history failed): report them lost."""
        self._lost_count += count
        self._lost_first = first if self._lost_first is None else min(self._lost_first, first)
        self._lost_last = last if self._lost_last is None else max(self._lost_last, last)
        self.lost += count
        self._tally.lost += count
        self._wake()

    # --- taking out ------------------------------------------------------------------

    def take_object(self) -> tuple[list[int], bytes] | None:
        """The head entry when it is an object and no loss is due before it: its fds
        (now the caller's to close) and its frame."""
        if self._lost_count or not self._queue or self._queue[0][0] != _OBJECT:
            return None
        _, (_, fds), frame = self._queue.popleft()
        self.bytes -= len(frame)
        return fds, frame

    def take_batch(self) -> bytes:
        """Pop up to ~256 KiB of queued messages as frame bytes, a LOST frame first if due;
        it stops before an object (that goes alone, with its fds: :meth:`take_object`)."""
        parts: list[bytes] = []
        total = 0
        if self._lost_count:
            lost = protocol.Lost(self._lost_count, self._lost_first, self._lost_last)
            parts.append(self._proto.send(lost))
            self._lost_count, self._lost_first, self._lost_last = 0, None, None
        queue = self._queue
        limit = self._batch_limit
        while queue and total < BATCH_BYTES:
            kind, _, payload = queue[0]
            if kind == _OBJECT:
                break
            if kind == _FRAME:
                queue.popleft()
                self.bytes -= len(payload)
                parts.append(payload)
                total += len(payload)
                self.sent += 1
                continue
            seqs: list[int] = []  # a run of notifications: one NOTIFY frame
            items: list[bytes] = []
            run_bytes = 0
            while queue and queue[0][0] == _NOTIFY:
                _, seq, item = queue[0]
                if items and run_bytes + len(item) > limit:
                    break
                queue.popleft()
                seqs.append(seq)
                items.append(item)
                run_bytes += len(item)
            self.bytes -= run_bytes
            self._notifies -= len(items)
            frame = self._notify_frame(seqs, items)
            parts.append(frame)
            total += len(frame)
            self.sent += len(items)
        return b"".join(parts)

    def release(self) -> list[int]:
        """Empty the outbox; the fds of objects that never went out, for the caller to close."""
        fds = [fd for kind, info, _ in self._queue if kind == _OBJECT for fd in info[1]]
        self._queue.clear()
        self.bytes = 0
        self._notifies = 0
        return fds

    # --- inside ----------------------------------------------------------------------

    def _notify_frame(self, seqs: list[int], items: list[bytes]) -> bytes:
        return self._proto.send(protocol.Notify(seq_run(seqs), items, packed=True))

    def _drop_oldest_notify(self) -> bool:
        if not self._notifies:
            return False
        queue = self._queue
        if queue[0][0] == _NOTIFY:
            _, seq, item = queue.popleft()
        else:  # rare: requests at the head; find the oldest notification behind them
            index = next(i for i, entry in enumerate(queue) if entry[0] == _NOTIFY)
            _, seq, item = queue[index]
            del queue[index]
        self.bytes -= len(item)
        self._notifies -= 1
        self._record_lost(seq)
        return True

    def _record_lost(self, seq: int) -> None:
        self.lost += 1
        self._tally.lost += 1
        self._lost_count += 1
        if self._lost_first is None or seq < self._lost_first:
            self._lost_first = seq
        if self._lost_last is None or seq > self._lost_last:
            self._lost_last = seq
        self._wake()


def in_seq_order(
    items: Iterable[tuple[int, bytes]], gaps: Iterable[Gap]
) -> Iterator[tuple[int, bytes] | Gap]:
    """History's items and gaps merged in seq order (a gap before the item after it)."""
    pending = sorted(gaps, key=lambda gap: gap.first)
    g = 0
    for item in items:
        while g < len(pending) and pending[g].first < item[0]:
            yield pending[g]
            g += 1
        yield item
    yield from pending[g:]


def seq_run(seqs: list[int]) -> int | list[int]:
    """A NOTIFY frame's seqs: the first of a contiguous run, else the list."""
    return seqs[0] if seqs[-1] - seqs[0] == len(seqs) - 1 else seqs


def _unzip(run: list[tuple[int, bytes]]) -> tuple[list[int], list[bytes]]:
    return [seq for seq, _ in run], [item for _, item in run]
