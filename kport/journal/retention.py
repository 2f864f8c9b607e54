"""What the journal keeps: events younger than ``max_age_s``, and at most ``max_bytes``
of them, the oldest going first. Whole chunks go, in one transaction with the record of
how far retention has reached, so a replay says what was removed instead of skipping it.

It runs in the journal's writer thread, on the writer's connection, at most once a second.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from pathlib import Path

log = logging.getLogger("kport.journal")


def size_bytes(db: sqlite3.Connection) -> int:
    """Bytes the chunks and gaps take in the database (free pages not counted)."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    return int((pages - free) * page_size)


class Retention:
    """The age and size limits of one journal file, and what they removed."""

    def __init__(self, path: Path, *, max_age_s: float, max_bytes: int) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        #: events removed so far
        self.pruned = 0
        #: when it last ran (monotonic s)
        self.last_run = 0.0

    def maybe_prune(self, db: sqlite3.Connection, committed: int) -> None:
        """:meth:`prune`, unless it ran less than a second ago; a failure is logged."""
        now = time.monotonic()
        if now - self.last_run < 1.0:
            return
        self.last_run = now
        try:
            self.prune(db, committed)
        except sqlite3.Error as err:
            log.error("journal %s: retention failed: %s", self.path, err)

    def prune(self, db: sqlite3.Connection, committed: int) -> int:
        """Delete events older than ``max_age_s`` and the oldest beyond ``max_bytes``,
        never past ``committed``.

        Whole chunks go: a chunk is removed once its newest event is too old.
        """
        cutoff = time.time_ns() - int(self.max_age_s * 1e9)
        row = db.execute(
            "SELECT max(last) FROM chunks WHERE ts_last < ? AND last <= ?",
            (cutoff, committed),
        ).fetchone()
        deleted = self._delete_through(db, row[0]) if row[0] else 0
        # Size: delete the oldest share of what is over, until under the limit.
        for _ in range(50):
            size = size_bytes(db)
            if size <= self.max_bytes:
                break
            chunks = db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            if chunks <= 1:
                break
            share = min(1.0, (size - self.max_bytes) / size + 0.05)
            drop = max(1, min(chunks - 1, int(chunks * share)))
            through = db.execute(
                "SELECT last FROM chunks ORDER BY first LIMIT 1 OFFSET ?", (drop - 1,)
            ).fetchone()[0]
            deleted += self._delete_through(db, through)
        if deleted:
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA incremental_vacuum")
            log.info("journal %s: retention removed %d events", self.path, deleted)
        return deleted

    def _delete_through(self, db: sqlite3.Connection, seq: int) -> int:
        db.execute("BEGIN")  # one transaction: no reader sees events gone and no gap said
        try:
            count = db.execute(
                "SELECT coalesce(sum(count), 0) FROM chunks WHERE last <= ?", (seq,)
            ).fetchone()[0]
            db.execute("DELETE FROM chunks WHERE last <= ?", (seq,))
            db.execute("DELETE FROM gaps WHERE last <= ?", (seq,))
            old = db.execute("SELECT value FROM meta WHERE key = 'pruned_through'").fetchone()
            db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('pruned_through', ?)",
                (max(seq, old[0] if old else 0),),
            )
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.pruned += count
        return int(count)
