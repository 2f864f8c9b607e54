"""One source's messages published to JetStream and not yet acknowledged: the broker's
answers (matched by their reply subject's seq) settled in publish order, at most
``limit`` outstanding, and an answer that refuses, or none in time, named.

The exporter publishes with a plain NATS publish and a reply subject per message instead
of nats-py's ``publish_async`` (a future, an inbox id and a parsed dataclass per
message): half the CPU per message, measured (see README, the export bench).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque

import orjson


class Refused(Exception):
    """The broker answered a message with an error, or no one answered it (the stream
    has no leader, or is not there), or no answer came within the timeout."""


class Window:
    """See the module docstring. ``answer`` is called as answers arrive; the exporter
    calls ``sent`` for each message and ``settle``/``drain_to`` to move its cursor."""

    def __init__(self, limit: int, timeout_s: float) -> None:
        self.limit = limit
        self.timeout_s = timeout_s
        #: (seq, ts, sent at (monotonic s)) in publish order
        self._pending: deque[tuple[int, int, float]] = deque()
        self._answered: set[int] = set()
        self._trouble = ""
        #: messages the broker stored before (same message id): it kept one copy
        self.duplicates = 0
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def sent(self, seq: int, ts: int) -> None:
        self._pending.append((seq, ts, time.monotonic()))

    def answer(self, seq: int, data: bytes, status: str | None = None) -> None:
        """The broker's answer to the message ``seq``: an acknowledgement (perhaps of a
        duplicate), an error, or a "no responders" status."""
        if not self._pending or not self._pending[0][0] <= seq <= self._pending[-1][0]:
            return  # not ours (any more): answered after a trouble was already named
        if status or not data:
            self._trouble = f"no one answered message {seq} (status {status or 'none'}): " + (
                "the stream has no leader, or is not there"
            )
        elif b'"error"' in data:
            try:
                error = orjson.loads(data).get("error") or {}
                text = str(error.get("description") or error)
            except (orjson.JSONDecodeError, AttributeError):
                text = data[:200].decode(errors="replace")
            self._trouble = f"the broker refused message {seq}: {text}"
        else:
            if b'"duplicate":true' in data:
                self.duplicates += 1
            self._answered.add(seq)
        self._changed.set()

    def settle(self) -> tuple[int, int] | None:
        """Drop the acknowledged prefix; the newest (seq, ts) of it, if any. Raises
        :class:`Refused` for a refusal, or for the oldest message unanswered too long."""
        if self._trouble:
            raise Refused(self._trouble)
        newest = None
        pending, answered = self._pending, self._answered
        while pending and pending[0][0] in answered:
            seq, ts, _ = pending.popleft()
            answered.discard(seq)
            newest = (seq, ts)
        if pending and time.monotonic() - pending[0][2] > self.timeout_s:
            raise Refused(f"no acknowledgement within {self.timeout_s:g} s")
        return newest

    async def drain_to(self, size: int) -> tuple[int, int] | None:
        """Wait until at most ``size`` messages are unacknowledged; the newest (seq, ts)
        settled meanwhile, if any."""
        newest = self.settle()
        while len(self._pending) > size:
            left = self._pending[0][2] + self.timeout_s - time.monotonic()
            self._changed.clear()
            with contextlib.suppress(TimeoutError):  # settle() names it
                await asyncio.wait_for(self._changed.wait(), max(left, 0.0) + 0.01)
            newest = self.settle() or newest
        return newest
