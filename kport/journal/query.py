"""What a history query filters on: :class:`Query`, checked as it is built from a request.

Both sides use it: a client checks its filters before it sends them (``kport.history``),
and the journal's reader applies them. It reads nothing and imports no storage.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any


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

    def chunk_sql(self) -> tuple[str, list[Any]]:
        """A WHERE condition on ``chunks`` selecting every chunk that may hold a match."""
        terms = ["1"]
        args: list[Any] = []
        for term, value in (
            ("last >= ?", self.first),
            ("first <= ?", self.last),
            ("ts_last >= ?", self.since_ns),
            ("ts_first < ?", self.until_ns),
        ):
            if value is not None:
                terms.append(term)
                args.append(value)
        return " AND ".join(terms), args

    def matches(self, event: Any) -> bool:
        """Whether a decoded event passes every filter."""
        if not isinstance(event, dict):
            return False
        get = event.get
        seq = get("seq")
        ts = get("ts")
        if self.first is not None and not (type(seq) is int and seq >= self.first):
            return False
        if self.last is not None and not (type(seq) is int and seq <= self.last):
            return False
        if self.since_ns is not None and not (type(ts) is int and ts >= self.since_ns):
            return False
        if self.until_ns is not None and not (type(ts) is int and ts < self.until_ns):
            return False
        for key, values in (
            ("source", self.sources),
            ("kind", self.kinds),
            ("pid", self.pids),
            ("uid", self.uids),
        ):
            if values and get(key) not in values:
                return False
        if self.exe and not fnmatch.fnmatchcase(str(get("exe") or ""), self.exe):
            return False
        return not self.text or self.text.casefold() in _flatten(event).casefold()


def _flatten(value: Any) -> str:
    if isinstance(value, dict):
        return " ".join(f"{k}={_flatten(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return " ".join(_flatten(v) for v in value)
    return str(value)
