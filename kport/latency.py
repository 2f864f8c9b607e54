"""A latency histogram with fixed buckets: cheap to add to where something completes (a
decision, a journal commit), read whole by the metrics at scrape time."""

from __future__ import annotations

import bisect
import threading
from typing import Final

#: upper bounds in seconds, from half a millisecond (a decision by a client on this
#: machine) to half a minute (a decision deadline); beyond the last is +Inf
BUCKETS_S: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


class Latencies:
    """Observations by label (a tuple of strings), each a count per bucket and a sum.

    Any thread observes; one lock keeps a count from being lost between two of them.
    """

    def __init__(self, buckets_s: tuple[float, ...] = BUCKETS_S) -> None:
        self.buckets_s = buckets_s
        #: label → [count in each bucket, then beyond the last], and the sum of seconds
        self._counts: dict[tuple[str, ...], list[int]] = {}
        self._sums: dict[tuple[str, ...], float] = {}
        self._lock = threading.Lock()

    def observe(self, labels: tuple[str, ...], seconds: float) -> None:
        at = bisect.bisect_left(self.buckets_s, seconds)
        with self._lock:
            counts = self._counts.get(labels)
            if counts is None:
                counts = self._counts[labels] = [0] * (len(self.buckets_s) + 1)
                self._sums[labels] = 0.0
            counts[at] += 1
            self._sums[labels] += seconds

    def snapshot(self) -> dict[tuple[str, ...], tuple[list[int], float]]:
        """label → (cumulative count at each bucket's bound, +Inf last), sum of seconds."""
        with self._lock:
            raw = {labels: (list(c), self._sums[labels]) for labels, c in self._counts.items()}
        out = {}
        for labels, (counts, total) in raw.items():
            cumulative, running = [], 0
            for count in counts:
                running += count
                cumulative.append(running)
            out[labels] = (cumulative, total)
        return out
