"""What a port needs from an event history to replay it: the `History` protocol and its pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(slots=True)
class Gap:
    """Seqs ``first..last`` that the history does not hold: ``count`` events at most."""

    first: int
    last: int
    count: int
    reason: str


@dataclass(slots=True)
class Page:
    """Events (seq, msgpack bytes) and gaps in seq order, accounting for seqs up to ``through``."""

    items: list[tuple[int, bytes]]
    gaps: list[Gap]
    through: int


class History(Protocol):
    """A store of the notifications a port sent, by seq, that it can replay from."""

    def read(self, after: int, upto: int, limit: int) -> Page:
        """Up to ``limit`` events with ``after < seq <= upto``; may block (runs in a thread)."""
        ...

    def tail(self, after: int, upto: int) -> Page | None:
        """The whole range from memory without blocking, or None if memory does not reach."""
        ...

    def count(self, after: int, upto: int) -> int:
        """How many of its events have ``after < seq <= upto``; may block."""
        ...

    def last_seq(self) -> int:
        """The last seq it holds (0 when empty): a port that replays it starts from there."""
        ...
