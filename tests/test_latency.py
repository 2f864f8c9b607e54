"""The latency histogram: each observation in the first bucket that holds it, cumulative
counts and a sum read back, from many threads without a count lost."""

from __future__ import annotations

import threading

from kport.latency import Latencies


def test_buckets_are_cumulative_and_a_bound_holds_its_own_value() -> None:
    latencies = Latencies((0.001, 0.01, 0.1))
    for seconds in (0.0005, 0.001, 0.005, 0.5):
        latencies.observe(("allow", "client"), seconds)
    latencies.observe(("deny", "default"), 0.05)
    snap = latencies.snapshot()
    assert snap[("allow", "client")] == ([2, 3, 3, 4], 0.5065)
    assert snap[("deny", "default")] == ([0, 0, 1, 1], 0.05)


def test_threads_lose_no_count() -> None:
    latencies = Latencies()

    def observe() -> None:
        for _ in range(10_000):
            latencies.observe((), 0.002)

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    counts, _ = latencies.snapshot()[()]
    assert counts[-1] == 40_000
