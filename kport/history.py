"""Reading history from Python: `kport.history(...)` and `kport.fetch(...)`, over the
daemon's journal port.

A client of the journal port and nothing more: the journal's storage stays in the
daemon, so importing this loads neither SQLite nor zstd.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from kport.journal.query import Query
from kport.port.client import connect


def history(
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    **filters: Any,
) -> Iterator[dict[str, Any]]:
    """Events from the daemon's journal, oldest first, paging as it goes.

    ``filters`` are :class:`~kport.journal.query.Query` fields: ``first``/``last`` (seq
    range, inclusive: the range a ``lost`` message names), ``since_ns``/``until_ns``,
    ``sources``, ``kinds``, ``pids``, ``uids``, ``exe`` (a glob), ``text``, ``limit``,
    ``newest_first``. A bad filter raises ``ValueError`` before anything is sent.
    """
    Query.from_mapping(filters)  # a bad filter fails here, before anything is sent
    request: dict[str, Any] | None = dict(filters)
    with connect("journal", runtime_dir=runtime_dir) as conn:
        while request is not None:
            reply = conn.send({"op": "query", **request}, timeout=timeout)
            yield from reply["events"]
            request = reply["next"]


def fetch(
    first: int, last: int, *, runtime_dir: str | os.PathLike[str] | None = None, **filters: Any
) -> list[dict[str, Any]]:
    """The events with ``first <= seq <= last`` still in the journal (after a ``lost``)."""
    filters.setdefault("limit", max(1, last - first + 1))
    return list(history(first=first, last=last, runtime_dir=runtime_dir, **filters))
