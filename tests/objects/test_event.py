"""`kport.Event` across real processes: one wake per set, all for manual-reset, no lost wake."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import struct
import threading
import time
from typing import Any

import pytest

import kport
from tests.conftest import SLACK_S

pytestmark = pytest.mark.timeout(300)
CTX = mp.get_context("fork")


def _waiter(event: kport.Event, woke: Any, ready: Any, timeout: float | None) -> None:
    ready.release()
    if event.wait(timeout=timeout):
        woke.put(os.getpid())


def _start_waiters(
    event: kport.Event, count: int, timeout: float | None = 30
) -> tuple[list[Any], Any]:
    woke = CTX.SimpleQueue()
    ready = CTX.Semaphore(0)
    procs = [CTX.Process(target=_waiter, args=(event, woke, ready, timeout)) for _ in range(count)]
    for proc in procs:
        proc.start()
    for _ in range(count):
        assert ready.acquire(timeout=10)
    time.sleep(0.3)  # every waiter is now blocked in wait()
    return procs, woke


def _drain(woke: Any) -> list[int]:
    out = []
    while not woke.empty():
        out.append(woke.get())
    return out


@pytest.mark.parametrize("timeout", [None, 30.0])  # a blocking read, or poll and read
def test_auto_reset_releases_exactly_one_waiter_per_set(timeout: float | None) -> None:
    with kport.Event() as event:
        procs, woke = _start_waiters(event, 8, timeout)
        seen: list[int] = []
        for round_ in range(1, 9):
            event.set()
            deadline = time.monotonic() + 10
            while len(seen) < round_ and time.monotonic() < deadline:
                seen += _drain(woke)
                time.sleep(0.01)
            time.sleep(0.3)  # room for a wrong second wake to show up
            seen += _drain(woke)
            assert len(seen) == round_, f"set {round_} woke {len(seen) - round_ + 1}"
            assert not event.is_set()  # the one waiter consumed it
        try:
            assert sorted(seen) == sorted(p.pid for p in procs)
            for proc in procs:
                proc.join(10)
                assert proc.exitcode == 0
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def test_setting_a_set_auto_reset_event_changes_nothing() -> None:
    with kport.Event() as event:
        event.set()
        event.set()
        assert event.wait(0) and not event.wait(0)


@pytest.mark.parametrize("timeout", [None, 30.0])
def test_manual_reset_releases_every_waiter_and_stays_set(timeout: float | None) -> None:
    with kport.Event(manual_reset=True) as event:
        procs, woke = _start_waiters(event, 8, timeout)
        event.set()
        for proc in procs:
            proc.join(10)
            assert proc.exitcode == 0
        assert sorted(_drain(woke)) == sorted(p.pid for p in procs)
        assert event.is_set() and event.wait(0) and event.wait(0)
        event.reset()
        assert not event.is_set() and not event.wait(0.05)


def _consumer(event: kport.Event, read_fd: int, count: int, out: Any) -> None:
    """Wait, then drain everything queued: the pattern the docs show instead of pulse()."""
    os.set_blocking(read_fd, False)
    expected = 0
    buf = b""
    waits = 0
    while expected < count:
        if not event.wait(timeout=10):
            out.put(("hang", expected, waits))
            return
        waits += 1
        while True:
            try:
                chunk = os.read(read_fd, 65536)
            except BlockingIOError:
                break
            buf += chunk
        usable = len(buf) - len(buf) % 4
        for (item,) in struct.iter_unpack("<I", buf[:usable]):
            if item != expected:
                out.put(("order", expected, item))
                return
            expected += 1
        buf = buf[usable:]
    out.put(("ok", expected, waits))


def test_a_million_set_wait_cycles_lose_nothing_and_never_hang() -> None:
    count = 1_000_000
    read_fd, write_fd = os.pipe()
    with kport.Event() as event:
        out = CTX.SimpleQueue()
        consumer = CTX.Process(target=_consumer, args=(event, read_fd, count, out))
        consumer.start()
        os.close(read_fd)
        pack = struct.Struct("<I").pack
        for item in range(count):
            os.write(write_fd, pack(item))
            event.set()
        consumer.join(120)
        os.close(write_fd)
        status, got, waits = out.get()
        assert (status, got) == ("ok", count), (status, got, waits)
        assert 0 < waits <= count


def test_wait_any_and_wait_all() -> None:
    a, b, m = kport.Event(), kport.Event(), kport.Event(manual_reset=True)
    try:
        assert kport.wait_any([a, b], timeout=0.05) is None
        b.set()
        assert kport.wait_any([a, b], timeout=1) == 1 and not b.is_set()  # consumed
        a.set()
        b.set()
        assert kport.wait_any([a, b], timeout=1) == 0 and b.is_set()  # lowest; b left
        b.reset()
        m.set()
        assert not kport.wait_all([a, m], timeout=0.05) and m.is_set()
        threading.Timer(0.1, a.set).start()
        assert kport.wait_all([a, m], timeout=5)
        assert not a.is_set() and m.is_set()  # the auto-reset one consumed, manual stays
        with pytest.raises(ValueError, match="same event is passed twice"):
            kport.wait_all([a, a])
        with pytest.raises(ValueError, match="at least one"):
            kport.wait_any([])
    finally:
        for event in (a, b, m):
            event.close()


def test_wait_all_gives_back_what_it_took_when_another_waiter_wins() -> None:
    a, b = kport.Event(), kport.Event()
    try:
        a.set()
        stop = threading.Event()

        def thief() -> None:  # keeps taking b the moment it is set
            while not stop.is_set():
                b.wait(0.01)

        thread = threading.Thread(target=thief)
        thread.start()
        setter_stop = threading.Event()

        def setter() -> None:
            while not setter_stop.is_set():
                b.set()
                time.sleep(0.0005)

        setter_thread = threading.Thread(target=setter)
        setter_thread.start()
        results = [kport.wait_all([a, b], timeout=0.05) for _ in range(20)]
        setter_stop.set()
        stop.set()
        setter_thread.join()
        thread.join()
        # Each success consumed a; each failure must have left it set (given back).
        assert a.is_set() == (not any(results))
    finally:
        a.close()
        b.close()


def test_wait_async_and_timeouts() -> None:
    async def main() -> None:
        with kport.Event() as event:
            assert not await event.wait_async(timeout=0.05)
            asyncio.get_running_loop().call_later(0.05, event.set)
            assert await event.wait_async(timeout=5)
            assert not event.is_set()
            t0 = time.monotonic()
            assert not event.wait(timeout=0.2)
            assert 0.19 <= time.monotonic() - t0 < 0.2 + SLACK_S

    asyncio.run(main())


def test_initial_state_repr_and_closed_use() -> None:
    event = kport.Event(manual_reset=True, initial=True)
    assert event.is_set() and "manual-reset set" in repr(event)
    event.close()
    assert "closed" in repr(event)
    with pytest.raises(ValueError, match="closed"):
        event.set()
    with pytest.raises(ValueError, match="not an eventfd"):
        r, w = os.pipe()
        try:
            kport.Event.from_fd(r, manual_reset=False)
        finally:
            os.close(r)
            os.close(w)
    assert not hasattr(kport.Event, "pulse")


def test_several_async_waiters_on_one_event_in_one_loop() -> None:
    async def main() -> None:
        with kport.Event(manual_reset=True) as manual, kport.Event() as auto:
            waiters = [asyncio.create_task(manual.wait_async(timeout=5)) for _ in range(3)]
            await asyncio.sleep(0.05)
            manual.set()
            assert await asyncio.gather(*waiters) == [True, True, True]
            takers = [asyncio.create_task(auto.wait_async(timeout=0.5)) for _ in range(3)]
            await asyncio.sleep(0.05)
            auto.set()
            assert sorted(await asyncio.gather(*takers)) == [False, False, True]
            assert await manual.wait_async(timeout=0)  # the shared reader was cleaned up

    asyncio.run(main())
