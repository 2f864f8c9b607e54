"""The event journal: every event the daemon emits, appended to SQLite off the delivery path.

The delivery path only calls :meth:`Journal.append`, which puts the event, already
msgpack-encoded for the ports, on a bounded in-memory queue. A writer thread commits the
queue in batches (WAL, ``synchronous=NORMAL``: a commit survives the process being
killed). Events stay in memory until committed, so a reader that looks at memory first
and the database second sees every event exactly once (:meth:`Journal.read`).

Events are stored in *chunks* of consecutive events (:mod:`kport.journal.chunks`),
indexed by seq and time. Queries over what is committed are the reader's
(:mod:`kport.journal.reader`); what is older than the limits goes
(:mod:`kport.journal.retention`).

Nothing is lost silently. A full queue drops the event from the journal (it was still
delivered live) and records a *gap*, a seq range with a count, which replay reports as a
``lost`` frame. A database that cannot be written (disk full, read-only) turns
durability off: the queue keeps filling, ``on_state`` tells the daemon, and the writer
retries until it can write again. Seq numbers handed out beyond the last commit are
covered by a durable *reservation*: after a crash the next seq starts past it and the
journal records the unwritten range as a gap, so no seq is ever reused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import sqlite3
import struct
import threading
import time
from array import array
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Final

from kport import paths, protocol
from kport.errors import NameCollision
from kport.journal.chunks import CHUNK_EVENTS, SOURCE_CODE, Row, chunk_items, chunk_of
from kport.journal.reader import JournalReader
from kport.journal.retention import Retention, size_bytes
from kport.latency import Latencies
from kport.replay import Gap, Page

log = logging.getLogger("kport.journal")

#: why a range of seqs after a crash has no events: kport reserved them ahead, and may
#: have delivered some of them live before it stopped, unwritten
UNWRITTEN: Final = "kport stopped before writing these to the journal (at most this many)"

SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS chunks (
    first INTEGER PRIMARY KEY,  -- the first seq in the chunk
    last INTEGER NOT NULL,
    ts_first INTEGER NOT NULL,
    ts_last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    seqs BLOB NOT NULL,  -- int64 array, native order
    offsets BLOB NOT NULL,  -- uint32 array, count + 1 entries into data
    sources BLOB NOT NULL,  -- one byte per event: its index in SOURCES
    data BLOB NOT NULL  -- the events, msgpack, back to back, zstd-compressed
);
CREATE INDEX IF NOT EXISTS chunks_ts ON chunks(ts_last);
CREATE TABLE IF NOT EXISTS gaps (
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_INSERT: Final = "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
#: events committed in one transaction at most
BATCH_MAX: Final = 20_000
#: events :meth:`Journal.tail` serves from memory at most
TAIL_MAX: Final = 4096
#: seqs reserved ahead of the last one handed out (see Journal._reserve)
RESERVE: Final = 4096
_SEQ: Final = struct.Struct("<Q")

#: how long the writer steps aside between its steps that hold the GIL
STEP_ASIDE_S: Final = 0.0001


def _step_aside() -> None:
    """Release the GIL for a moment, long enough for a waiting thread to take it.

    The writer's Python work holds the GIL, and a thread that wants it back waits until
    the holder drops it: up to the switch interval (0.5 ms in the daemon), and again
    after each of its own system calls. A thread of the delivery path that woke during
    a commit waited so, several times over: the commits, 0.7 % of the time at 1,000
    execs/s, were behind most deliveries slower than a millisecond (the same wait with
    the GIL released was behind almost none). A moment's sleep between short steps hands
    the GIL over at once; it costs the writer, which is in no hurry, a few hundred µs a
    commit.
    """
    time.sleep(STEP_ASIDE_S)


StateCallback = Callable[[bool, str], None]


class Journal:
    """An append-only event history in one SQLite file (see the module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_age_s: float = 30 * 86400,
        max_bytes: int = 1 << 30,
        queue_limit: int = 200_000,
        commit_interval_s: float = 0.2,
        retry_interval_s: float = 1.0,
        on_state: StateCallback | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"journal queue_limit must be positive, not {queue_limit}")
        self.path = Path(path)
        self.reader = JournalReader(self.path)
        self.retention = Retention(self.path, max_age_s=max_age_s, max_bytes=max_bytes)
        self.queue_limit = queue_limit
        self.commit_interval_s = commit_interval_s
        self.retry_interval_s = retry_interval_s
        self.on_state = on_state
        #: whether commits succeed; False while the database cannot be written
        self.durable = True
        self.error: str | None = None
        #: every seq up to this one is committed: as an event, or inside a gap
        self.committed = 0
        #: this journal file's identity (random, made with it; 0 until opened)
        self.identity = 0
        #: events dropped from the journal because its queue was full (still delivered)
        self.dropped = 0
        self.written = 0
        #: CPU time the writer thread has used
        self.writer_cpu_s = 0.0
        #: how long each successful commit took, for the daemon's metrics
        self.commit_latency = Latencies()
        # Appended, not yet committed, in seq order: the lists of rows the producer handed
        # over (kept whole, so neither side spends Python work per event), and a Gap for
        # each contiguous run of events the full queue turned away. Entries leave only
        # once committed, so a reader that looks here first and then at the database sees
        # every event and every gap.
        self._pending: deque[list[Row] | Gap] = deque()
        self._queued = 0  # rows in _pending
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._seq_fd: int | None = None
        self._reserved = 0
        #: rows per commit now: halved after a failed commit (a nearly full disk may take a
        #: small one), doubled again after each success
        self._batch_max = BATCH_MAX

    # --- lifecycle ---------------------------------------------------------------------

    def open(self) -> int:
        """Open (or create) the database; returns the seq the next event must follow.

        After an unclean stop that is the last reservation, not the last commit, and the
        range between them is recorded as a gap: those seqs may have been delivered.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._take_lock()
        try:
            db = self._connect()
            os.chmod(self.path, 0o600)  # it holds every command line: owner only
            self._db = db
            start = self._recover(db)
        except BaseException:
            self._close_files()
            raise
        self.committed = start
        self._reserve(start)  # before the first event: a crash from now on skips past it
        log.info("journal %s: opened, next seq %d", self.path, start + 1)
        return start

    def _recover(self, db: sqlite3.Connection) -> int:
        db.executescript(_SCHEMA)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema version {version}; this kport reads "
                f"version {SCHEMA_VERSION}"
            )
        last = db.execute("SELECT max(last) FROM chunks").fetchone()[0] or 0
        gap_last = db.execute("SELECT max(last) FROM gaps").fetchone()[0] or 0
        written = max(last, gap_last, meta.get("pruned_through", 0))
        start = max(written, self._read_reservation())
        db.execute("BEGIN")
        if not meta.get("clean", 1) and start > written:
            db.execute(
                "INSERT INTO gaps VALUES (?, ?, ?, ?, ?)",
                (
                    written + 1,
                    start,
                    start - written,
                    UNWRITTEN,
                    time.time_ns(),
                ),
            )
            log.warning(
                "journal %s: kport did not stop cleanly: the events after seq %d that it "
                "had not yet written are lost, at most %d (seqs %d..%d were reserved; "
                "most were never used)",
                self.path,
                written,
                start - written,
                written + 1,
                start,
            )
        db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 0)")
        # who this journal is: its seqs count from 1 again only in a new file, which gets a
        # new identity, so (identity, seq) names one event for good (the fleet's message id)
        self.identity = meta.get("identity") or secrets.randbits(62) + 1
        db.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (self.identity,))
        db.execute("COMMIT")
        return int(start)

    # The seq reservation lives in a small file beside the database, written by the
    # delivery path itself every RESERVE seqs: 8 bytes overwritten in place, which needs
    # no new disk block (a full disk takes it) and no commit (a stalled writer does not
    # hold it back). It survives the process being killed: after a crash the next seq
    # starts past it, so no seq the dead daemon may have handed out is used again.

    def _seq_path(self) -> Path:
        return self.path.with_name(f"{self.path.name}.seq")

    def _read_reservation(self) -> int:
        fd = os.open(self._seq_path(), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._seq_fd = fd
        data = os.pread(fd, 8, 0)
        if len(data) < 8:
            os.pwrite(fd, bytes(8), 0)  # the block exists from now on
            return 0
        return int(_SEQ.unpack(data)[0])

    def _reserve(self, upto: int) -> None:
        assert self._seq_fd is not None
        os.pwrite(self._seq_fd, _SEQ.pack(upto), 0)
        self._reserved = upto

    def _take_lock(self) -> None:
        """One writer per journal: a second daemon on the same file is refused, not mixed in."""
        lock_path = self.path.with_name(f".{self.path.name}.lock")
        self._lock_fd = paths.try_lock(lock_path)
        if self._lock_fd is None:
            raise NameCollision(
                f"journal {self.path} is in use by another process (lock {lock_path})"
            )

    def _close_files(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
        for name in ("_seq_fd", "_lock_fd"):
            fd = getattr(self, name)
            if fd is not None:
                os.close(fd)
                setattr(self, name, None)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=5)
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect on a new file
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA journal_size_limit = 67108864")
        return db

    def start(self) -> None:
        if self._db is None:
            self.open()
        self._thread = threading.Thread(target=self._run, name="kport-journal", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued (for up to ``timeout`` s), mark a clean stop, close."""
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.error("journal %s: the writer did not finish in %g s", self.path, timeout)
                return
        db = self._db
        if db is None:
            return
        if not self._pending and self.durable:
            with contextlib.suppress(sqlite3.Error):
                db.execute("BEGIN")
                db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 1)")
                db.execute("COMMIT")
                self._reserve(self.committed)  # all was written: nothing beyond it
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self._close_files()

    # --- appending (the delivery path) -------------------------------------------------

    def append(self, row: Row) -> None:
        """Queue one event; never blocks on the database. A full queue records a gap."""
        self.append_many([row])

    def append_many(self, rows: list[Row]) -> None:
        """Queue events in seq order, under one lock; see :meth:`append`.

        The list is kept as it is, not copied: the caller must not change it afterwards.
        """
        if not rows:
            return
        last = rows[-1][0]
        if last >= self._reserved - RESERVE // 2 and self._seq_fd is not None:
            self._reserve(last + RESERVE)
        with self._lock:
            room = self.queue_limit - self._queued
            pending = self._pending
            if len(rows) <= room:
                pending.append(rows)
                self._queued += len(rows)
                return
            if room > 0:
                pending.append(rows[:room])
                self._queued += room
            dropped = rows[max(room, 0) :]
            self.dropped += len(dropped)
            first = dropped[0][0]
            tail = pending[-1] if pending else None
            if isinstance(tail, Gap) and tail.last + 1 == first:
                tail.last = last
                tail.count += len(dropped)
            else:
                pending.append(Gap(first, last, len(dropped), "the journal's queue was full"))

    @property
    def queued(self) -> int:
        return self._queued

    def _pending_in(
        self, after: int, upto: int, max_rows: int
    ) -> tuple[list[Row], list[Gap], bool]:
        """Queued rows (at most ``max_rows``) and gaps in ``(after, upto]``; lock held.

        The bool says whether rows were left out for ``max_rows``.
        """
        rows: list[Row] = []
        gaps: list[Gap] = []
        for entry in self._pending:
            if isinstance(entry, Gap):
                if entry.last > after and entry.first <= upto:
                    gaps.append(Gap(entry.first, entry.last, entry.count, entry.reason))
                continue
            if entry[-1][0] <= after:
                continue
            if entry[0][0] > upto:
                break
            for row in entry:
                if after < row[0] <= upto:
                    if len(rows) >= max_rows:
                        return rows, gaps, True
                    rows.append(row)
        return rows, gaps, False

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._write_some():
                pass
        finally:
            self.writer_cpu_s = time.thread_time()

    def _write_some(self) -> bool:
        """One round of the writer: wait, commit what is queued; True when it is to stop."""
        self.writer_cpu_s = time.thread_time()
        with self._wake:
            if not self._stop:
                pause = self.commit_interval_s if self.durable else self.retry_interval_s
                self._wake.wait(pause)
            stopping = self._stop
        try:
            while True:
                with self._lock:
                    taken = self._take()
                if not taken:
                    break
                if not self._commit(taken):
                    return stopping
                self._release(taken)
                if self._queued < BATCH_MAX // 2 and not stopping:
                    break
            db = self._db
            assert db is not None
            self.retention.maybe_prune(db, self.committed)
        except Exception as err:  # never die quietly: durability is off, and said to be
            log.exception("journal %s: the writer failed", self.path)
            self._set_durable(False, f"the journal writer failed: {err!r}")
            return stopping
        return stopping and not self._pending

    def _take(self) -> list[list[Row] | Gap]:
        """The oldest queued entries, about a batch of rows; call with the lock held."""
        taken: list[list[Row] | Gap] = []
        rows = 0
        for entry in self._pending:
            if not isinstance(entry, Gap):
                if rows and rows + len(entry) > self._batch_max:
                    break
                rows += len(entry)
            taken.append(entry)
        return taken

    def _release(self, taken: list[list[Row] | Gap]) -> None:
        """Forget committed entries (the oldest ones, in order)."""
        with self._lock:
            for entry in taken:
                head = self._pending.popleft()
                assert head is entry
                if not isinstance(entry, Gap):
                    self._queued -= len(entry)

    def _commit(self, taken: list[list[Row] | Gap]) -> bool:
        db = self._db
        assert db is not None
        rows = [row for entry in taken if not isinstance(entry, Gap) for row in entry]
        gaps = [entry for entry in taken if isinstance(entry, Gap)]
        through = max(
            rows[-1][0] if rows else 0, max((g.last for g in gaps), default=0), self.committed
        )
        began = time.monotonic()
        try:
            db.execute("BEGIN")
            try:
                if rows:
                    db.executemany(
                        _INSERT,
                        [
                            chunk_of(rows[i : i + CHUNK_EVENTS], _step_aside)
                            for i in range(0, len(rows), CHUNK_EVENTS)
                        ],
                    )
                for gap in gaps:
                    db.execute(
                        "INSERT INTO gaps VALUES (?, ?, ?, ?, ?)",
                        (gap.first, gap.last, gap.count, gap.reason, time.time_ns()),
                    )
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            self._batch_max = max(64, self._batch_max // 2)
            self._set_durable(False, f"cannot write {self.path}: {err}")
            return False
        self.commit_latency.observe((), time.monotonic() - began)
        self._batch_max = min(BATCH_MAX, self._batch_max * 2)
        if not self.durable:
            # before the commit is published: whoever sees it committed sees it durable
            self._set_durable(True, f"writing {self.path} again")
        self.committed = through
        self.written += len(rows)
        return True

    def _set_durable(self, durable: bool, reason: str) -> None:
        if durable == self.durable and (durable or reason == self.error):
            return
        was = self.durable
        self.durable = durable
        self.error = None if durable else reason
        if durable:
            log.warning("journal: %s; durability is back on", reason)
        else:
            log.error(
                "journal: %s; durability is off until it can write again "
                "(events are still delivered; %d queued, at most %d)",
                reason,
                self._queued,
                self.queue_limit,
            )
        if self.on_state is not None and was != durable:
            try:
                self.on_state(durable, reason)
            except Exception:
                log.exception("journal: the durability callback failed")

    # --- reading (any thread) ----------------------------------------------------------

    def read(self, after: int, upto: int, limit: int, sources: Iterable[str] = ()) -> Page:
        """Events with ``after < seq <= upto`` (of ``sources``, if given) and the gaps there.

        At most ``limit`` events are looked at (before the source filter): the page says
        how far it got, and its gaps are clipped to the range it covers, so paging on
        reports each missing seq once. Looks at the queue before the database: whatever
        leaves the queue between the two looks was committed first, so every event and
        every gap is seen, and what is seen twice is counted once.
        """
        codes = {SOURCE_CODE.get(name, 0) for name in sources}
        names = frozenset(sources)
        with self._lock:
            queued, queued_gaps, cut = self._pending_in(after, upto, limit)
        db = self.reader.connection()
        items: list[tuple[int, bytes]] = []
        looked = 0
        through = after
        full = False
        db.execute("BEGIN")  # one read transaction: a consistent snapshot
        try:
            chunks = db.execute(
                "SELECT seqs, offsets, sources, data FROM chunks WHERE last > ? AND first <= ?"
                " ORDER BY first",
                (after, upto),
            )
            for chunk in chunks:
                for seq, code, item in chunk_items(*chunk):
                    if seq <= after or seq > upto:
                        continue
                    if looked >= limit:
                        full = True
                        break
                    looked += 1
                    through = seq
                    if not codes or code in codes:
                        items.append((seq, item))
                if full:
                    break
            gaps = []
            unwritten: list[tuple[Gap, int]] = []
            for *fields, ts in db.execute(
                "SELECT first, last, count, reason, ts FROM gaps WHERE last > ? AND first <= ?",
                (after, upto),
            ):
                gap = Gap(*fields)
                if gap.reason == UNWRITTEN:
                    unwritten.append((gap, ts))
                else:
                    gaps.append(gap)
            pruned = db.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()
        finally:
            db.execute("COMMIT")
        if pruned and pruned[0] > after:
            gaps.append(Gap(after + 1, pruned[0], pruned[0] - after, "removed by retention"))
        if not full:
            in_database = through
            # The queue was copied only so far: the page covers no further than that.
            through = max(queued[-1][0], in_database) if cut else upto
            for row in queued:
                if row[0] <= in_database:
                    continue  # committed before our snapshot: read from the database already
                if looked >= limit:
                    through = row[0] - 1
                    break
                looked += 1
                if not names or row[2] in names:
                    items.append((row[0], row[3]))
        said = [
            (g.first, _unwritten_event(g, ts)) for g, ts in unwritten if after < g.first <= through
        ]
        if said:  # said once, where the range begins; its seqs need no LOST frame
            items = sorted(items + said, key=lambda item: item[0])
        return Page(items, _clip(gaps + queued_gaps, after, through), through)

    def last_seq(self) -> int:
        """The last seq it holds: committed, or queued to be."""
        with self._lock:
            if not self._pending:
                return self.committed
            newest = self._pending[-1]
            return max(newest.last if isinstance(newest, Gap) else newest[-1][0], self.committed)

    def count(self, after: int, upto: int, sources: Iterable[str] = ()) -> int:
        """How many events (of ``sources``, if given) have ``after < seq <= upto``,
        committed or queued; reads the chunks' seqs and sources, never their events."""
        codes = {SOURCE_CODE.get(name, 0) for name in sources}
        names = frozenset(sources)
        with self._lock:
            queued, _, _ = self._pending_in(after, upto, self.queue_limit + CHUNK_EVENTS)
        db = self.reader.connection()
        found = 0
        in_database = after
        db.execute("BEGIN")
        try:
            for seqs, kinds in db.execute(
                "SELECT seqs, sources FROM chunks WHERE last > ? AND first <= ? ORDER BY first",
                (after, upto),
            ):
                for seq, code in zip(array("q", seqs), kinds, strict=True):
                    if after < seq <= upto:
                        in_database = seq
                        found += not codes or code in codes
        finally:
            db.execute("COMMIT")
        for row in queued:
            if row[0] > in_database and (not names or row[2] in names):
                found += 1
        return found

    def tail(self, after: int, upto: int, sources: Iterable[str] = ()) -> Page | None:
        """Like :meth:`read`, from memory alone, or None if memory does not reach back
        (something after ``after`` is committed) or holds more than ``TAIL_MAX`` events.

        Runs on the delivery thread: it gives up before copying anything large.
        """
        if upto - after > TAIL_MAX * 4 or after < self.committed:
            return None
        wanted = frozenset(sources)
        with self._lock:
            if after < self.committed:
                return None
            rows, gaps, more = self._pending_in(after, upto, TAIL_MAX)
        if more:
            return None
        items = [(r[0], r[3]) for r in rows if not wanted or r[2] in wanted]
        return Page(items, _clip(gaps, after, upto), upto)

    def size_bytes(self) -> int:
        """Bytes the chunks and gaps take in the database (free pages not counted)."""
        db = self._db
        assert db is not None
        return size_bytes(db)

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "identity": f"{self.identity:x}",
            "durable": self.durable,
            "error": self.error,
            "committed": self.committed,
            "queued": self._queued,
            "queue_limit": self.queue_limit,
            "written": self.written,
            "dropped": self.dropped,
            "pruned": self.retention.pruned,
            "writer_cpu_s": round(self.writer_cpu_s, 3),
        }


def _clip(gaps: list[Gap], after: int, through: int) -> list[Gap]:
    """Gaps cut to ``(after, through]``, each seq once, in order; a count is at most the
    width that is left (every gap is a contiguous range of seqs)."""
    out: list[Gap] = []
    covered = after
    for gap in sorted(gaps, key=lambda g: (g.first, -g.last)):
        first = max(gap.first, covered + 1)
        last = min(gap.last, through)
        if first > last:
            continue
        width = last - first + 1
        out.append(
            Gap(
                first,
                last,
                min(gap.count, width) if first == gap.first and last == gap.last else width,
                gap.reason,
            )
        )
        covered = last
    return out


class SourceHistory:
    """The journal as a port's :class:`~kport.replay.History`: the events of some sources."""

    def __init__(self, journal: Journal, sources: Iterable[str]) -> None:
        self.journal = journal
        self.sources = frozenset(sources)

    def read(self, after: int, upto: int, limit: int) -> Page:
        return self.journal.read(after, upto, limit, self.sources)

    def tail(self, after: int, upto: int) -> Page | None:
        return self.journal.tail(after, upto, self.sources)

    def last_seq(self) -> int:
        return self.journal.last_seq()

    def count(self, after: int, upto: int) -> int:
        return self.journal.count(after, upto, self.sources)


def _unwritten_event(gap: Gap, ts: int) -> bytes:
    """What a replay says of the seqs reserved before a crash and never written: that the
    events kport had not yet written when it stopped are lost, ``at_most`` of them (most
    of the range was never used), rather than a loss of the whole range."""
    return protocol.pack_new(
        {
            "seq": gap.first,
            "ts": ts,
            "source": "kport",
            "kind": "lost",
            "count": None,
            "at_most": gap.count,
            "first_seq": gap.first,
            "last_seq": gap.last,
            "reason": (
                "kport did not stop cleanly: the events it had delivered but not yet "
                "written to the journal are lost (at most this range; most of its seqs "
                "were reserved and never used)"
            ),
        }
    )
