"""Reading a journal file: the committed events that match a :class:`Query`, oldest or
newest first, whole or a bounded page at a time.

Queries decode the chunks their seq and time bounds select, and filter the events in
Python. A reader needs only the file: ``kport query --db`` reads one with no daemon, and
the daemon's journal port answers with one beside its writer.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import threading
import time
import urllib.parse
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import msgpack

from kport.journal.chunks import chunk_items
from kport.journal.query import Query


class JournalReader:
    """Read-only queries over a journal file's committed events; for any thread (each has
    its own read-only connection)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._connections = threading.local()

    def connection(self) -> sqlite3.Connection:
        """The calling thread's read-only connection (made on its first use)."""
        db: sqlite3.Connection | None = getattr(self._connections, "db", None)
        if db is None:
            db = sqlite3.connect(
                f"file:{urllib.parse.quote(str(self.path))}?mode=ro",
                uri=True,
                isolation_level=None,
                timeout=5,
            )
            db.execute("PRAGMA query_only = 1")
            self._connections.db = db
        return db

    def query(self, query: Query) -> Iterator[dict[str, Any]]:
        """Events matching ``query``, oldest first (or newest first), at most ``query.limit``.

        Committed events only: what is still queued shows up within a commit interval.
        """
        found = 0
        for _, event in self._walk(query):
            if event is not None:
                found += 1
                yield event
                if found >= query.limit:
                    return

    def scan(
        self, query: Query, *, max_bytes: int, budget_s: float
    ) -> tuple[list[dict[str, Any]], Query | None]:
        """One bounded page of :meth:`query`: at most ``query.limit`` events, about
        ``max_bytes`` of them encoded, ``budget_s`` seconds of scanning. Returns the events
        and the query that goes on from where this page stopped (same limit; None when
        the journal has nothing further in its bounds).
        """
        deadline = time.monotonic() + budget_s
        out: list[dict[str, Any]] = []
        size = 0
        # Walk one event at a time so that the page can stop anywhere and say where.
        walker = self._walk(query)
        for seq, event in walker:
            if event is not None:
                out.append(event)
                size += len(msgpack.packb(event))
            full = len(out) >= query.limit or size >= max_bytes
            if full or time.monotonic() >= deadline:
                walker.close()
                rest = dataclasses.replace(query)
                if query.newest_first:
                    rest.last = seq - 1
                else:
                    rest.first = seq + 1
                return out, rest
        return out, None

    def _walk(self, query: Query) -> Generator[tuple[int, dict[str, Any] | None]]:
        """(seq, event if it matches else None) for every event in the query's bounds."""
        where, args = query.chunk_sql()
        order = "DESC" if query.newest_first else "ASC"
        db = self.connection()
        bound: int | None = None
        while True:
            page_where, page_args = where, list(args)
            if bound is not None:
                page_where += " AND first < ?" if query.newest_first else " AND first > ?"
                page_args.append(bound)
            rows = db.execute(
                f"SELECT first, seqs, offsets, sources, data FROM chunks WHERE {page_where}"
                f" ORDER BY first {order} LIMIT 16",
                page_args,
            ).fetchall()
            if not rows:
                return
            for first, *chunk in rows:
                events = list(chunk_items(*chunk))
                if query.newest_first:
                    events.reverse()
                for seq, _, item in events:
                    if query.first is not None and seq < query.first:
                        continue
                    if query.last is not None and seq > query.last:
                        continue
                    event = msgpack.unpackb(item, raw=False, strict_map_key=False)
                    yield seq, (event if query.matches(event) else None)
                bound = first
