"""The journal's reader over a real SQLite file: every filter, and bounded pages that say
where to go on."""

from __future__ import annotations

import time
from typing import Any

import msgpack
import pytest

from kport.journal.chunks import row_of
from kport.journal.query import Query
from kport.journal.store import Journal
from tests.journal.conftest import append, event, wait_committed


def test_query_filters(journal: Journal) -> None:
    append(journal, 1, 100)
    own = event(101, source="kport", kind="journal")
    journal.append(row_of(101, own, msgpack.packb(own)))
    wait_committed(journal, 101)

    def seqs(**fields: Any) -> list[int]:
        return [e["seq"] for e in journal.reader.query(Query.from_mapping(fields)) if "seq" in e]

    assert seqs(first=10, last=12) == [10, 11, 12]
    assert seqs(pids=[1003], limit=3) == [3, 10, 17]
    assert seqs(uids=[2], last=10) == [2, 5, 8]
    assert seqs(exe="/usr/bin/tool[12]", last=10) == [1, 2, 6, 7]
    assert seqs(text="ARG-77") == [77]
    assert seqs(newest_first=True, limit=2, sources=["proc"]) == [100, 99]
    assert seqs(kinds=["exit"]) == []
    assert list(journal.reader.query(Query.from_mapping({"sources": ["kport"]}))) == [own]
    now = time.time_ns()
    assert len(seqs(since_ns=now - 60 * 10**9, until_ns=now + 10**9, limit=5000)) == 101
    assert seqs(until_ns=now - 60 * 10**9) == []
    with pytest.raises(ValueError, match="unknown query field 'colour'"):
        Query.from_mapping({"colour": "red"})
    with pytest.raises(ValueError, match="'pids' must be list"):
        Query.from_mapping({"pids": 5})


def test_scan_pages_by_bytes_and_time_and_says_where_to_go_on(journal: Journal) -> None:
    append(journal, 1, 300)
    wait_committed(journal, 300)
    for newest_first in (False, True):
        query: Query | None = Query(limit=250, newest_first=newest_first, pids=[1003])
        got: list[int] = []
        pages = 0
        while query is not None:
            events, query = journal.reader.scan(query, max_bytes=1, budget_s=10)  # one per page
            got += [e["seq"] for e in events]
            pages += 1
            if query is not None:
                query.limit -= len(events)
                if query.limit <= 0:
                    break
        expected = [s for s in range(1, 301) if 1000 + s % 7 == 1003]
        assert got == (expected[::-1] if newest_first else expected)
        assert pages >= len(expected)
    # No time to scan: a page may come back empty, but it always moves on.
    events, rest = journal.reader.scan(Query(kinds=["exit"]), max_bytes=1 << 20, budget_s=0)
    assert events == [] and rest is not None and rest.first == 2
