"""The event journal: every event the daemon emits, appended to SQLite off the delivery path.

The delivery path only calls :meth:`Journal.append`, which puts the event, already
msgpack-encoded for the ports, on a bounded in-memory queue. A writer thread commits the
queue in batches (WAL, ``synchronous=NORMAL``: a commit survives the process being
killed). Events stay in memory until committed, so a reader that looks at memory first
and the database second sees every event exactly once (:meth:`Journal.read`).

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
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import msgpack

from kport.port.history import Gap, Page

log = logging.getLogger("kport.journal")

SCHEMA_VERSION: Final = 1
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    ts INTEGER NOT NULL,
    source TEXT NOT NULL,
    kind TEXT NOT NULL,
    pid INTEGER,
    uid INTEGER,
    exe TEXT,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_ts ON events(ts);
CREATE TABLE IF NOT EXISTS gaps (
    first INTEGER NOT NULL,
    last INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    ts INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_INSERT: Final = "INSERT OR IGNORE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
#: rows committed in one transaction at most
BATCH_MAX: Final = 20_000
#: events :meth:`Journal.tail` serves from memory at most
TAIL_MAX: Final = 4096
#: seqs reserved past the last commit at least (more when events come faster)
RESERVE_MIN: Final = 4096

#: (seq, ts, source, kind, pid, uid, exe, packed event)
Row = tuple[int, int, str, str, int | None, int | None, str | None, bytes]


@dataclass
class Query:
    """What ``kport query`` and the journal port filter on; empty fields match everything."""

    first: int | None = None  # seq, inclusive
    last: int | None = None  # seq, inclusive
    since_ns: int | None = None  # ts, inclusive
    until_ns: int | None = None  # ts, exclusive
    sources: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    exe: str | None = None  # glob
    text: str | None = None  # substring of any value, case-insensitive
    limit: int = 1000
    newest_first: bool = False

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> Query:
        """A Query from a request mapping; an unknown or mistyped key is a ValueError."""
        known = cls.__dataclass_fields__
        query = cls()
        for key, value in data.items():
            if key not in known:
                raise ValueError(f"unknown query field {key!r} (known: {', '.join(known)})")
            expected = known[key].type
            ok = {
                "int | None": value is None or type(value) is int,
                "int": type(value) is int,
                "str | None": value is None or type(value) is str,
                "bool": type(value) is bool,
                "list[str]": type(value) is list and all(type(v) is str for v in value),
                "list[int]": type(value) is list and all(type(v) is int for v in value),
            }[str(expected)]
            if not ok:
                raise ValueError(f"query field {key!r} must be {expected}, not {value!r:.60}")
            setattr(query, key, value)
        if query.limit < 1:
            raise ValueError(f"query limit must be positive, not {query.limit}")
        return query

    def sql(self) -> tuple[str, list[Any]]:
        """The WHERE clause (or "") and its parameters, for everything SQL can filter."""
        terms: list[str] = []
        args: list[Any] = []
        for column, op, value in (
            ("seq", ">=", self.first),
            ("seq", "<=", self.last),
            ("ts", ">=", self.since_ns),
            ("ts", "<", self.until_ns),
        ):
            if value is not None:
                terms.append(f"{column} {op} ?")
                args.append(value)
        for column, values in (
            ("source", self.sources),
            ("kind", self.kinds),
            ("pid", self.pids),
            ("uid", self.uids),
        ):
            if values:
                terms.append(f"{column} IN ({', '.join('?' * len(values))})")
                args.extend(values)
        if self.exe:
            terms.append("exe GLOB ?")
            args.append(self.exe)
        return (" WHERE " + " AND ".join(terms) if terms else ""), args

    def matches_text(self, event: Any) -> bool:
        if not self.text:
            return True
        return self.text.casefold() in _flatten(event).casefold()


def _flatten(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_flatten(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(_flatten(v) for v in value)
    return str(value)


def row_of(seq: int, event: dict[str, Any], packed: bytes) -> Row:
    exe = event.get("exe")
    pid = event.get("pid")
    uid = event.get("uid")
    return (
        seq,
        event.get("ts") or time.time_ns(),
        str(event.get("source", "")),
        str(event.get("kind", "")),
        pid if type(pid) is int else None,
        uid if type(uid) is int else None,
        exe if type(exe) is str else None,
        packed,
    )


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
        commit_interval_s: float = 0.05,
        retry_interval_s: float = 1.0,
        on_state: StateCallback | None = None,
    ) -> None:
        if queue_limit < 1:
            raise ValueError(f"journal queue_limit must be positive, not {queue_limit}")
        self.path = Path(path)
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self.queue_limit = queue_limit
        self.commit_interval_s = commit_interval_s
        self.retry_interval_s = retry_interval_s
        self.on_state = on_state
        #: whether commits succeed; False while the database cannot be written
        self.durable = True
        self.error: str | None = None
        #: the highest committed seq
        self.committed = 0
        #: events dropped from the journal because its queue was full (still delivered)
        self.dropped = 0
        self.written = 0
        self.pruned = 0
        self._pending: deque[Row] = deque()  # appended, not yet committed; seq order
        self._drop_gap: Gap | None = None  # dropped since the last commit
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._stop = False
        self._thread: threading.Thread | None = None
        self._db: sqlite3.Connection | None = None
        self._readers = threading.local()
        self._last_seq = 0
        self._rate_seq = 0
        self._rate_at = time.monotonic()
        self._rate = 0.0
        self._reserved = 0
        self._last_prune = 0.0
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
        db = self._connect()
        self._db = db
        with db:
            db.executescript(_SCHEMA)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        version = meta.get("schema", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise RuntimeError(
                f"journal {self.path} has schema version {version}; this kport reads "
                f"version {SCHEMA_VERSION}"
            )
        last = db.execute("SELECT max(seq) FROM events").fetchone()[0] or 0
        gap_last = db.execute("SELECT max(last) FROM gaps").fetchone()[0] or 0
        reserved = meta.get("reserved", 0)
        start = max(last, gap_last, reserved, meta.get("pruned_through", 0))
        with db:
            if not meta.get("clean", 1) and start > max(last, gap_last):
                first = max(last, gap_last) + 1
                db.execute(
                    "INSERT INTO gaps VALUES (?, ?, ?, ?, ?)",
                    (
                        first,
                        start,
                        start - first + 1,
                        "kport stopped before writing these to the journal",
                        time.time_ns(),
                    ),
                )
                log.warning(
                    "journal %s: kport did not stop cleanly; seqs %d..%d were not written",
                    self.path,
                    first,
                    start,
                )
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 0)")
        self.committed = self._last_seq = self._rate_seq = start
        self._reserved = start
        log.info("journal %s: opened, next seq %d", self.path, start + 1)
        return int(start)

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
            with contextlib.suppress(sqlite3.Error), db:
                db.execute("INSERT OR REPLACE INTO meta VALUES ('reserved', ?)", (self._last_seq,))
                db.execute("INSERT OR REPLACE INTO meta VALUES ('clean', 1)")
        with contextlib.suppress(sqlite3.Error):
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        db.close()
        self._db = None

    # --- appending (the delivery path) -------------------------------------------------

    def append(self, row: Row) -> None:
        """Queue one event; never blocks on the database. A full queue records a gap."""
        seq = row[0]
        self._last_seq = seq
        with self._lock:
            if len(self._pending) < self.queue_limit:
                self._pending.append(row)
            else:
                self.dropped += 1
                gap = self._drop_gap
                if gap is None:
                    self._drop_gap = Gap(seq, seq, 1, "the journal's queue was full")
                else:
                    gap.last = seq
                    gap.count += 1

    def append_many(self, rows: Iterable[Row]) -> None:
        for row in rows:
            self.append(row)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # --- the writer thread -------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                if not self._stop:
                    pause = self.commit_interval_s if self.durable else self.retry_interval_s
                    self._wake.wait(pause)
                stopping = self._stop
                batch = list(self._pending)[: self._batch_max] if self._pending else []
                gap, self._drop_gap = self._drop_gap, None
            ok = self._commit(batch, gap)
            if ok:
                with self._lock:
                    for _ in range(len(batch)):
                        self._pending.popleft()
                self._maybe_prune()
                if stopping and not self._pending:
                    return
                while ok and len(self._pending) >= BATCH_MAX // 2 and not stopping:
                    with self._lock:
                        batch = list(self._pending)[: self._batch_max]
                    ok = self._commit(batch, None)
                    if ok:
                        with self._lock:
                            for _ in range(len(batch)):
                                self._pending.popleft()
            else:
                if gap is not None:  # keep it for the next try
                    with self._lock:
                        self._merge_gap(gap)
                if stopping:
                    return

    def _merge_gap(self, gap: Gap) -> None:
        current = self._drop_gap
        if current is None:
            self._drop_gap = gap
        else:
            current.first = min(current.first, gap.first)
            current.last = max(current.last, gap.last)
            current.count += gap.count

    def _reservation(self, upto: int) -> int:
        now = time.monotonic()
        if now - self._rate_at >= 1.0:
            self._rate = (self._last_seq - self._rate_seq) / (now - self._rate_at)
            self._rate_seq, self._rate_at = self._last_seq, now
        return max(self._last_seq, upto) + max(RESERVE_MIN, int(self._rate * 2))

    def _commit(self, batch: list[Row], gap: Gap | None) -> bool:
        db = self._db
        assert db is not None
        upto = batch[-1][0] if batch else self.committed
        need_reserve = self._last_seq + RESERVE_MIN // 2 > self._reserved
        if not batch and gap is None and not need_reserve and self.durable:
            return True
        try:
            db.execute("BEGIN")
            try:
                if batch:
                    db.executemany(_INSERT, batch)
                if gap is not None:
                    db.execute(
                        "INSERT INTO gaps VALUES (?, ?, ?, ?, ?)",
                        (gap.first, gap.last, gap.count, gap.reason, time.time_ns()),
                    )
                reserved = self._reservation(upto)
                db.execute("INSERT OR REPLACE INTO meta VALUES ('reserved', ?)", (reserved,))
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as err:
            self._batch_max = max(64, self._batch_max // 2)
            self._set_durable(False, f"cannot write {self.path}: {err}")
            return False
        self._batch_max = min(BATCH_MAX, self._batch_max * 2)
        self._reserved = reserved
        self.committed = max(self.committed, upto)
        self.written += len(batch)
        if not self.durable:
            self._set_durable(True, f"writing {self.path} again")
        return True

    def _set_durable(self, durable: bool, reason: str) -> None:
        if durable == self.durable and (durable or reason == self.error):
            return
        self.durable = durable
        self.error = None if durable else reason
        if durable:
            log.warning("journal: %s; durability is back on", reason)
        else:
            log.error(
                "journal: %s; durability is off until it can write again "
                "(events are still delivered; %d queued, at most %d)",
                reason,
                len(self._pending),
                self.queue_limit,
            )
        if self.on_state is not None:
            try:
                self.on_state(durable, reason)
            except Exception:
                log.exception("journal: the durability callback failed")

    # --- retention ---------------------------------------------------------------------

    def _maybe_prune(self) -> None:
        now = time.monotonic()
        if now - self._last_prune < 1.0:
            return
        self._last_prune = now
        try:
            self.prune()
        except sqlite3.Error as err:
            log.error("journal %s: retention failed: %s", self.path, err)

    def size_bytes(self) -> int:
        """Bytes the events and gaps take in the database (free pages not counted)."""
        db = self._db
        assert db is not None
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
        return int((pages - free) * page_size)

    def prune(self) -> int:
        """Delete events older than ``max_age_s`` and the oldest beyond ``max_bytes``."""
        db = self._db
        assert db is not None
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        through = 0
        row = db.execute(
            "SELECT max(seq) FROM events WHERE ts < ? AND seq <= ?", (cutoff, self.committed)
        ).fetchone()
        if row[0]:
            through = row[0]
        deleted = self._delete_through(through) if through else 0
        # Size: delete the oldest fifth of what is over, until under the limit.
        for _ in range(50):
            size = self.size_bytes()
            if size <= self.max_bytes:
                break
            lo, hi, count = db.execute("SELECT min(seq), max(seq), count(*) FROM events").fetchone()
            if not count:
                break
            share = min(1.0, (size - self.max_bytes) / size + 0.05)
            through = lo + max(1, int((hi - lo + 1) * share))
            deleted += self._delete_through(min(through, hi))
        if deleted:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA incremental_vacuum")
            log.info("journal %s: retention removed %d events", self.path, deleted)
        return deleted

    def _delete_through(self, seq: int) -> int:
        db = self._db
        assert db is not None
        with db:
            cursor = db.execute("DELETE FROM events WHERE seq <= ?", (seq,))
            db.execute("DELETE FROM gaps WHERE last <= ?", (seq,))
            old = db.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('pruned_through', ?)",
                (max(seq, old[0] if old else 0),),
            )
        self.pruned += cursor.rowcount
        return cursor.rowcount

    # --- reading (any thread) ----------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._readers, "db", None)
        if db is None:
            db = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, timeout=5
            )
            db.execute("PRAGMA query_only = 1")
            self._readers.db = db
        return db

    def read(self, after: int, upto: int, limit: int, sources: Iterable[str] = ()) -> Page:
        """Events with ``after < seq <= upto`` (of ``sources``, if given) and the gaps there.

        Looks at the queue before the database: whatever leaves the queue between the two
        looks was committed first, so every event is seen once.
        """
        wanted = frozenset(sources)
        with self._lock:
            queued = [r for r in self._pending if after < r[0] <= upto] if self._pending else []
            gap = self._drop_gap
            dropped = Gap(gap.first, gap.last, gap.count, gap.reason) if gap else None
        db = self._reader()
        with db:  # one read transaction: a consistent snapshot of events and gaps
            db.execute("BEGIN")
            sql = "SELECT seq, data, source FROM events WHERE seq > ? AND seq <= ?"
            rows = db.execute(sql + " ORDER BY seq LIMIT ?", (after, upto, limit)).fetchall()
            gaps = [
                Gap(*g)
                for g in db.execute(
                    "SELECT first, last, count, reason FROM gaps WHERE last > ? AND first <= ?"
                    " ORDER BY first",
                    (after, upto),
                )
            ]
            pruned = db.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()
        if pruned and pruned[0] > after:
            gaps.insert(0, Gap(after + 1, pruned[0], pruned[0] - after, "removed by retention"))
        if dropped is not None and dropped.last > after and dropped.first <= upto:
            gaps.append(dropped)
        items = [(seq, data) for seq, data, source in rows if not wanted or source in wanted]
        if len(rows) >= limit:
            through = rows[-1][0]
        else:
            last_row = rows[-1][0] if rows else after
            extra = [r for r in queued if r[0] > last_row]
            through = upto
            if len(extra) > limit - len(rows):
                extra = extra[: limit - len(rows)]
                through = extra[-1][0]
            items.extend((r[0], r[7]) for r in extra if not wanted or r[2] in wanted)
        return Page(items, [g for g in gaps if g.first <= through], through)

    def tail(self, after: int, upto: int, sources: Iterable[str] = ()) -> Page | None:
        """Like :meth:`read`, from memory alone, or None if memory does not reach back."""
        wanted = frozenset(sources)
        with self._lock:
            if after < self.committed or self._drop_gap is not None:
                return None
            items = [
                (r[0], r[7])
                for r in self._pending
                if after < r[0] <= upto and (not wanted or r[2] in wanted)
            ]
        if len(items) > TAIL_MAX:
            return None
        return Page(items, [], upto)

    def query(self, query: Query) -> Iterator[dict[str, Any]]:
        """Events matching ``query``, oldest first (or newest first), at most ``query.limit``."""
        where, args = query.sql()
        order = "DESC" if query.newest_first else "ASC"
        db = self._reader()
        found = 0
        offset_seq: int | None = None
        while found < query.limit:
            page_where, page_args = where, list(args)
            if offset_seq is not None:
                op = "<" if query.newest_first else ">"
                page_where += (" AND " if page_where else " WHERE ") + f"seq {op} ?"
                page_args.append(offset_seq)
            rows = db.execute(
                f"SELECT seq, data FROM events{page_where} ORDER BY seq {order} LIMIT 2000",
                page_args,
            ).fetchall()
            if not rows:
                return
            for _, data in rows:
                event = msgpack.unpackb(data, raw=False, strict_map_key=False)
                if query.matches_text(event):
                    found += 1
                    yield event
                    if found >= query.limit:
                        return
            offset_seq = rows[-1][0]

    def status(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "durable": self.durable,
            "error": self.error,
            "committed": self.committed,
            "queued": len(self._pending),
            "queue_limit": self.queue_limit,
            "written": self.written,
            "dropped": self.dropped,
            "pruned": self.pruned,
        }


class SourceHistory:
    """The journal as a port's :class:`~kport.port.history.History`: the events of some sources."""

    def __init__(self, journal: Journal, sources: Iterable[str]) -> None:
        self.journal = journal
        self.sources = frozenset(sources)

    def read(self, after: int, upto: int, limit: int) -> Page:
        return self.journal.read(after, upto, limit, self.sources)

    def tail(self, after: int, upto: int) -> Page | None:
        return self.journal.tail(after, upto, self.sources)
