"""Reading history: `kport.history(...)` over the daemon's journal port, and `kport query`."""

from __future__ import annotations

import datetime as dt
import json
import os
import pwd
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kport.journal.query import Query
from kport.journal.reader import JournalReader
from kport.port.client import connect
from kport.tail import format_line

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now_ns: int | None = None) -> int:
    """``10m``/``2h``/``3d`` ago, an ISO 8601 date or time, or epoch seconds → ns."""
    now = dt.datetime.now().timestamp() if now_ns is None else now_ns / 1e9
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        return int((now - float(match[1]) * _UNIT_S[match[2]]) * 1e9)
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        return int(dt.datetime.fromisoformat(text).timestamp() * 1e9)
    except ValueError:
        raise ValueError(
            f"time {text!r} is not a duration ago (10m, 2h, 3d), an ISO date/time "
            f"(2026-11-21T10:00) or epoch seconds"
        ) from None


def uid_of(user: str) -> int:
    """A user name or a numeric uid → uid."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no user named {user!r} on this machine") from None


def history(
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
    **filters: Any,
) -> Iterator[dict[str, Any]]:
    """Events from the daemon's journal, oldest first, paging as it goes.

    ``filters`` are :class:`~kport.journal.query.Query` fields: ``first``/``last`` (seq range,
    inclusive: the range a ``lost`` message names), ``since_ns``/``until_ns``, ``sources``,
    ``kinds``, ``pids``, ``uids``, ``exe`` (a glob), ``text``, ``limit``, ``newest_first``.
    A bad filter raises ``ValueError`` before anything is sent.
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


_COLUMNS = ("seq", "time", "source", "kind", "pid", "user", "command")


def _row(event: dict[str, Any]) -> list[str]:
    ts = event.get("ts")
    when = dt.datetime.fromtimestamp(ts / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ts else ""
    argv = event.get("argv")
    command = " ".join(argv) if argv else (event.get("exe") or event.get("comm") or "")
    if event.get("source") == "kport":
        command = event.get("reason", "")
    user = event.get("user") or event.get("uid")
    return [
        str(event.get("seq", "")),
        when,
        str(event.get("source", "")),
        str(event.get("kind", "")),
        str(event.get("pid", "")),
        "" if user is None else str(user),
        command,
    ]


def run(
    filters: dict[str, Any],
    *,
    as_json: bool,
    db: str | None,
    runtime_dir: str | None,
) -> int:
    """`kport query`: print matching history as a table (a terminal), lines, or JSON lines."""
    if db is not None:
        path = Path(db)
        if not path.exists():
            print(f"kport query: no journal at {path}", file=sys.stderr)
            return 1
        events: Iterator[dict[str, Any]] = JournalReader(path).query(Query.from_mapping(filters))
    else:
        events = history(runtime_dir=runtime_dir, **filters)
    out = sys.stdout
    shown = 0
    if as_json:
        for event in events:
            out.write(json.dumps(event, default=repr) + "\n")
            shown += 1
    elif out.isatty():
        table = Table(*_COLUMNS, box=None, header_style="bold")
        for event in events:
            table.add_row(*_row(event))
            shown += 1
        Console().print(table)
    else:
        for event in events:
            out.write(f"{event.get('seq', ''):>8} {format_line(event)}\n")
            shown += 1
    if not shown:
        print("kport query: no events match", file=sys.stderr)
    return 0
