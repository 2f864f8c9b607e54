"""The shared-memory ring between real processes: order, flow control, dead peers, close.

Children are forked after the ring is created and become its second end with
``Ring.from_fds`` on duplicates of the inherited fds; passing fds over a socket is
tested with the ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing
import os
import random
import signal
import time
from array import array
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event

import pytest

from kport.errors import PortClosed, QueueFull, Timeout
from kport.objects.ring import MAX_CAPACITY, Ring
from tests.conftest import SLACK_S

pytestmark = pytest.mark.timeout(300)

FORK = multiprocessing.get_context("fork")
RECORD_COUNT = 10_000_000
MAX_SIZE = 300
#: a dead peer is noticed long before the 60 s the waits are given
DEAD_PEER_NOTICED_S = SLACK_S


@pytest.fixture(autouse=True)
def no_fd_left_open() -> Iterator[None]:
    """Every test closes what it opened: rings, their fds, pidfds, children's sentinels."""
    before = set(os.listdir("/proc/self/fd"))
    yield
    # Only new fds count: garbage from earlier tests may close some of the old ones.
    left = set(os.listdir("/proc/self/fd")) - before
    assert not left, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in left if fd.isdigit()}


def attach(ring: Ring) -> Ring:
    """The second end of ``ring``, from duplicates of its fds (in a child, or in-process)."""
    return Ring.from_fds([os.dup(fd) for fd in ring.fds()], ring.meta())


@contextlib.contextmanager
def forked(target: Callable[..., None], *args: object) -> Iterator[BaseProcess]:
    """Run ``target(*args)`` in a forked child; on leaving, reap it (killed if it hangs)."""
    child = FORK.Process(target=target, args=args)
    child.start()
    try:
        yield child
    finally:
        child.join(30)
        if child.exitcode is None:
            child.kill()
            child.join()
        child.close()


def exit_code(child: BaseProcess) -> int | None:
    child.join(30)
    return child.exitcode


def fill(producer: Ring, size: int = 100) -> int:
    """Put records of ``size`` bytes until the ring is full; how many went in."""
    count = 0
    with contextlib.suppress(QueueFull):
        while True:
            producer.put(bytes(size), timeout=0)
            count += 1
    return count


# -- order and integrity ----------------------------------------------------------------


@functools.cache
def reference() -> tuple[bytes, array[int], array[int]]:
    """A pool of random bytes, and each record's offset into it and size (seeded)."""
    rng = random.Random(20240611)
    pool = rng.randbytes(65536 + MAX_SIZE)
    offsets = array("H", rng.randbytes(2 * RECORD_COUNT))
    sizes = array("H", rng.randbytes(2 * RECORD_COUNT))
    return pool, offsets, sizes


def reference_records(first: int, count: int) -> list[bytes]:
    """Records ``first`` .. ``first + count - 1``: random sizes 0..300, content by index."""
    pool, offsets, sizes = reference()
    end = first + count
    return [
        pool[offset : offset + size % (MAX_SIZE + 1)]
        for offset, size in zip(offsets[first:end], sizes[first:end], strict=True)
    ]


def _put_reference_records(ring: Ring) -> None:
    with attach(ring) as producer:
        for first in range(0, RECORD_COUNT, 512):
            producer.put_many(reference_records(first, min(512, RECORD_COUNT - first)), 60)


def test_ten_million_records_arrive_in_order_and_intact() -> None:
    reference()  # before the fork, so both sides share it
    with Ring(64 * 1024) as ring, forked(_put_reference_records, ring) as child:
        received = 0
        while received < RECORD_COUNT:
            got = ring.get_many(4096, timeout=60)
            want = reference_records(received, len(got))
            if got != want:
                bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b)
                pytest.fail(
                    f"record {received + bad}: got {len(got[bad])} bytes {got[bad][:16]!r}, "
                    f"expected {len(want[bad])} bytes {want[bad][:16]!r}"
                )
            received += len(got)
        with pytest.raises(PortClosed, match="producer closed"):
            ring.get(timeout=60)
        assert exit_code(child) == 0
    assert received == RECORD_COUNT
    reference.cache_clear()


# -- flow control -----------------------------------------------------------------------


def test_a_full_ring_times_out_and_never_overwrites() -> None:
    records = [bytes([i]) * 100 for i in range(100)]
    with Ring(4096) as producer, attach(producer) as consumer:
        with pytest.raises(QueueFull, match=r"61 record\(s\) of 6100 bytes .* after the first 39;"):
            producer.put_many(records, timeout=0)
        written = 4096 // 104
        started = time.monotonic()
        with pytest.raises(QueueFull, match=r"waited 0.3 s and were not put; the consumer is not"):
            producer.put(records[written], timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK_S
        with pytest.raises(
            QueueFull, match=r"61 record\(s\) of 6100 bytes waited 0.1 s and were not put;"
        ):
            producer.put_many(records[written:], timeout=0.1)

        assert consumer.get_many(1000, timeout=0) == records[:written]
        with pytest.raises(Timeout):
            consumer.get(timeout=0)
        # The freed room takes as many again, across the end of the area.
        producer.put_many(records[written : 2 * written], timeout=0)
        assert consumer.get_many(1000, timeout=0) == records[written : 2 * written]


def test_put_many_puts_what_fits_before_the_timeout() -> None:
    with Ring(4096) as producer, attach(producer) as consumer:
        producer.put_many([b"a" * 1000] * 3)
        records = [bytes([i]) * 200 for i in range(20)]
        with pytest.raises(QueueFull, match=r"15 record\(s\) of 3000 bytes .* after the first 5;"):
            producer.put_many(records, timeout=0.1)
        assert consumer.get_many(timeout=0) == [b"a" * 1000] * 3 + records[:5]


def test_an_empty_ring_times_out() -> None:
    with Ring(4096) as ring:
        started = time.monotonic()
        with pytest.raises(Timeout, match=r"ring empty: no record arrived within 0.3 s"):
            ring.get(timeout=0.3)
        assert 0.3 <= time.monotonic() - started < 0.3 + SLACK_S
        with attach(ring) as consumer, pytest.raises(Timeout):
            consumer.get_many(timeout=0.1)


# -- sizes ------------------------------------------------------------------------------


def test_a_record_the_ring_can_never_hold_is_refused_at_once() -> None:
    with Ring(4096) as producer, attach(producer) as consumer:
        assert producer.max_record == 4092
        started = time.monotonic()
        with pytest.raises(ValueError, match=r"4093 bytes can never fit.*at most 4092"):
            producer.put(bytes(4093), timeout=60)
        with pytest.raises(ValueError, match="can never fit"):
            producer.put_many([b"first", bytes(5000)], timeout=60)
        assert time.monotonic() - started < SLACK_S  # not after the 60 s it was given
        with pytest.raises(Timeout):
            consumer.get(timeout=0)  # the refused batch put nothing

        # The largest record fits, even when it has to wrap past the end of the area.
        largest = bytes(range(256)) * 15 + bytes(252)
        producer.put(b"x")
        assert consumer.get() == b"x"
        with pytest.raises(QueueFull):
            producer.put(largest, timeout=0)
        with pytest.raises(Timeout):
            consumer.get(timeout=0)  # passes the wrap entry, freeing the end of the area
        producer.put(largest, timeout=0)
        assert consumer.get() == largest


@pytest.mark.parametrize("capacity", [0, -1, 4095, MAX_CAPACITY + 1, 4096.0, True])
def test_a_bad_capacity_is_refused(capacity: int) -> None:
    with pytest.raises(ValueError, match="capacity must be an int from 4096 to 1073741824"):
        Ring(capacity)


def test_capacity_is_rounded_up_to_8() -> None:
    with Ring(4097) as ring:
        assert ring.meta() == {"capacity": 4104}
        with pytest.raises(ValueError, match="max_count must be at least 1"):
            ring.get_many(0)


# -- dead peers -------------------------------------------------------------------------


def _attach_then_die(ring: Ring, attached: Event, records: int, delay: float) -> None:
    end = attach(ring)
    if records:
        end.put_many([b"%d" % i for i in range(records)])
    attached.set()
    time.sleep(delay)
    os.kill(os.getpid(), signal.SIGKILL)


def test_a_producer_waiting_for_room_sees_its_consumer_die() -> None:
    attached = FORK.Event()
    with Ring(4096) as ring, forked(_attach_then_die, ring, attached, 0, 0.5) as child:
        assert attached.wait(10)
        assert fill(ring) == 4096 // 104
        started = time.monotonic()
        with pytest.raises(PortClosed, match=rf"other end of the ring \(pid {child.pid}\) died"):
            ring.put(bytes(100), timeout=60)
        assert time.monotonic() - started < DEAD_PEER_NOTICED_S
        assert exit_code(child) == -signal.SIGKILL


def test_a_consumer_waiting_for_records_sees_its_producer_die() -> None:
    attached = FORK.Event()
    with Ring(4096) as ring, forked(_attach_then_die, ring, attached, 3, 0.5) as child:
        assert attached.wait(10)
        started = time.monotonic()
        assert [ring.get(timeout=60) for _ in range(3)] == [b"0", b"1", b"2"]
        with pytest.raises(PortClosed, match="died; every record it put has been read"):
            ring.get(timeout=60)
        assert time.monotonic() - started < DEAD_PEER_NOTICED_S
        assert exit_code(child) == -signal.SIGKILL


# -- close ------------------------------------------------------------------------------


def _put_then_close(ring: Ring, count: int, delay: float, done: Event) -> None:
    with attach(ring) as producer:
        producer.put_many([b"record %d" % i for i in range(count)])
        time.sleep(delay)
    done.wait(30)  # alive until the parent has seen the close: a wakeup, not a death


def test_a_consumer_drains_a_closed_ring_then_gets_port_closed() -> None:
    done = FORK.Event()
    with Ring(8192) as ring, forked(_put_then_close, ring, 100, 0.5, done) as child:
        received = [ring.get(timeout=10) for _ in range(100)]
        started = time.monotonic()
        with pytest.raises(PortClosed, match="producer closed the ring"):
            ring.get(timeout=60)
        assert time.monotonic() - started < DEAD_PEER_NOTICED_S
        assert child.is_alive()
        done.set()
        assert exit_code(child) == 0
    assert received == [b"record %d" % i for i in range(100)]


def _attach_then_close(ring: Ring, delay: float, done: Event) -> None:
    end = attach(ring)
    time.sleep(delay)
    end.close()
    done.wait(30)


def test_a_producer_gets_port_closed_once_its_consumer_closed() -> None:
    done = FORK.Event()
    with Ring(4096) as ring, forked(_attach_then_close, ring, 0.5, done) as child:
        fill(ring)
        started = time.monotonic()
        with pytest.raises(PortClosed, match="consumer closed the ring"):
            ring.put(b"waiting for room", timeout=60)
        assert time.monotonic() - started < DEAD_PEER_NOTICED_S
        assert child.is_alive()
        with pytest.raises(PortClosed, match="consumer closed the ring"):
            ring.put(b"")  # and every put after it
        done.set()
        assert exit_code(child) == 0


def test_a_closed_ring_refuses_every_call() -> None:
    with Ring(4096) as ring:
        pass
    assert ring.closed
    ring.close()  # again: nothing happens
    calls: list[Callable[[], object]] = [
        ring.fds,
        ring.meta,
        lambda: ring.put(b"x"),
        lambda: ring.put_many([b"x"]),
        lambda: ring.get(timeout=0),
        lambda: ring.get_many(timeout=0),
        lambda: asyncio.run(ring.put_async(b"x")),
        lambda: asyncio.run(ring.get_async(timeout=0)),
        lambda: asyncio.run(ring.get_many_async(timeout=0)),
        ring.__enter__,
    ]
    for call in calls:
        with pytest.raises(ValueError, match="ring is closed"):
            call()


# -- asyncio ----------------------------------------------------------------------------


async def _consume_async(ring: Ring, count: int) -> list[bytes]:
    received = [await ring.get_async(timeout=10)]
    while len(received) < count:
        received += await ring.get_many_async(64, timeout=10)
    with pytest.raises(PortClosed):
        await ring.get_async(timeout=10)
    return received


def test_an_asyncio_consumer_reads_a_process_producer() -> None:
    done = FORK.Event()
    done.set()
    with Ring(4096) as ring, forked(_put_then_close, ring, 5000, 0.0, done) as child:
        received = asyncio.run(_consume_async(ring, 5000))
        assert exit_code(child) == 0
    assert received == [b"record %d" % i for i in range(5000)]


def _get_and_check(ring: Ring, count: int) -> None:
    with attach(ring) as consumer:
        received: list[bytes] = []
        with contextlib.suppress(PortClosed):
            while True:
                received += consumer.get_many(timeout=10)
    assert received == [b"async %d" % i for i in range(count)]


async def _produce_async(ring: Ring, count: int) -> None:
    for i in range(count // 2):
        await ring.put_async(b"async %d" % i, timeout=10)
    await ring.put_many_async([b"async %d" % i for i in range(count // 2, count)], timeout=10)


def test_an_asyncio_producer_feeds_a_process_consumer() -> None:
    with Ring(4096) as ring, forked(_get_and_check, ring, 5000) as child:
        asyncio.run(_produce_async(ring, 5000))
        ring.close()
        assert exit_code(child) == 0


def test_asyncio_waits_time_out_and_see_a_dead_peer() -> None:
    attached = FORK.Event()

    async def main(ring: Ring) -> None:
        with pytest.raises(Timeout, match="ring empty"):
            await ring.get_async(timeout=0.2)
        fill(ring)
        with pytest.raises(QueueFull, match="ring full"):
            await ring.put_async(b"x", timeout=0.2)
        started = time.monotonic()
        with pytest.raises(PortClosed, match="died"):
            await ring.put_async(b"x", timeout=60)
        assert time.monotonic() - started < DEAD_PEER_NOTICED_S

    with Ring(4096) as ring, forked(_attach_then_die, ring, attached, 0, 1.5) as child:
        assert attached.wait(10)
        asyncio.run(main(ring))
        assert exit_code(child) == -signal.SIGKILL


# -- rebuilding from fds ----------------------------------------------------------------


def _foreign_fds(size: int) -> list[int]:
    memfd = os.memfd_create("not-a-ring", os.MFD_CLOEXEC)
    os.ftruncate(memfd, size)
    return [memfd, os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)]


def assert_closed(fds: list[int]) -> None:
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


def test_from_fds_refuses_a_memfd_that_is_not_a_ring() -> None:
    fds = _foreign_fds(128 + 4096)
    with pytest.raises(ValueError, match="not a kport ring: magic"):
        Ring.from_fds(fds, {"capacity": 4096})
    assert_closed(fds)  # they were handed over, so they are gone

    fds = _foreign_fds(16)
    with pytest.raises(ValueError, match="not a kport ring: 16 bytes"):
        Ring.from_fds(fds, {"capacity": 4096})
    assert_closed(fds)


def test_from_fds_refuses_another_version_size_or_a_second_attach() -> None:
    with Ring(4096) as ring:
        with pytest.raises(ValueError, match=r"header, but 8192 in meta"):
            Ring.from_fds([os.dup(fd) for fd in ring.fds()], {"capacity": 8192})
        with pytest.raises(ValueError, match="a ring is 3 fds"):
            Ring.from_fds([os.dup(ring.fds()[0])], ring.meta())
        with attach(ring), pytest.raises(ValueError, match="already has its second end"):
            attach(ring)

    with Ring(4096) as ring:
        os.pwrite(ring.fds()[0], (2).to_bytes(4, "little"), 8)
        with pytest.raises(ValueError, match="version 2 is not supported"):
            attach(ring)
