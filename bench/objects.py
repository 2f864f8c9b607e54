"""`kport bench objects`: how fast kport's shared objects are between two processes.

Two measurements, in one run, each against what a program would otherwise use:

* **Event ping-pong** — round-trip latency of two auto-reset ``kport.Event`` objects,
  against two raw blocking eventfds, two ``multiprocessing.Event`` objects and a pipe pair.
  Process A sets X and waits on Y; process B waits on X and sets Y. Only A reads the clock.
* **Ring throughput** — 100-byte records through a ``kport.Ring`` (``put_many`` in batches
  of 256, ``get_many(1024)``), against a port's notifications (with flow control) and a
  ``multiprocessing.shared_memory.SharedMemory`` block of batch slots signalled through
  ``multiprocessing.Queue``. Rates are timed in the consumer, from the end of its first
  batch to the end of its last, over the records in between.

Every process is forked (``multiprocessing`` "fork" context) and pinned nowhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import multiprocessing as mp
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection as Pipe
from multiprocessing.context import ForkProcess
from multiprocessing.queues import Queue
from multiprocessing.shared_memory import SharedMemory
from multiprocessing.synchronize import Event as MpEvent
from typing import Any

import kport
from bench.common import Table, drained, flow_control, percentile, save_results

FORK = mp.get_context("fork")

WARMUP = 1_000
RECORD_SIZE = 100
PUT_BATCH = 256
GET_MAX = 1024
POOL_BATCHES = 64  # distinct records: POOL_BATCHES * PUT_BATCH, reused in turn
PORT_COUNT = 300_000  # at most this many records through the port: it is the slow one
RING_CAPACITY = 256 * 1024
SHM_SLOTS = 8  # 8 slots of one 256-record batch: 200 KiB, about the ring's capacity
SHM_SLOT_BYTES = PUT_BATCH * RECORD_SIZE
WAIT_S = 30.0  # longest any side waits for its peer before giving up
RESULT_S = 120.0  # longest the parent waits for a measurement

TARGETS: dict[str, tuple[str, float]] = {
    "Event p50 / raw eventfd p50": ("<=", 1.5),
    "Event p50 / multiprocessing.Event p50": ("<=", 0.5),
    "Ring records/s / port notify records/s": (">=", 2.0),
}


# --- processes -------------------------------------------------------------------------


@contextlib.contextmanager
def _children() -> Iterator[Callable[..., ForkProcess]]:
    """Start forked children with the yielded function; on leaving, reap every one of them.

    On an error the live ones are terminated at once; otherwise each is given time to exit,
    then terminated, then killed (always by its own pid).
    """
    procs: list[ForkProcess] = []

    def start(target: Callable[..., None], *args: object) -> ForkProcess:
        proc = FORK.Process(target=target, args=args, daemon=True)
        proc.start()
        procs.append(proc)
        return proc

    failed = False
    try:
        yield start
    except BaseException:
        failed = True
        raise
    finally:
        for proc in procs:
            if failed and proc.exitcode is None:
                proc.terminate()
            proc.join(5 if failed else WAIT_S)
            if proc.exitcode is None:
                proc.terminate()
                proc.join(5)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            proc.close()


def _result(pipe: Pipe, name: str, sender: ForkProcess, *peers: ForkProcess) -> Any:
    """What ``sender`` sends on ``pipe``; an error at once if it exits without, if a peer
    fails, or after RESULT_S seconds (a hang)."""
    deadline = time.monotonic() + RESULT_S
    while not pipe.poll(0.5):
        if sender.exitcode is not None and not pipe.poll(0):
            raise RuntimeError(
                f"{name}: the measuring process exited with code {sender.exitcode} "
                "before sending its result"
            )
        for peer in peers:
            if peer.exitcode not in (None, 0):
                raise RuntimeError(f"{name}: its other process failed (exit code {peer.exitcode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name}: no result within {RESULT_S:g} s (a hang?)")
    return pipe.recv()


# --- event ping-pong -------------------------------------------------------------------


def _pinger(
    signal: Callable[[], object], wait: Callable[[], object], rounds: int, out: Pipe
) -> None:
    """Process A: signal X, wait for Y; the time of each round trip in µs."""
    for _ in range(WARMUP):
        signal()
        wait()
    clock = time.perf_counter_ns
    times: list[int] = []
    append = times.append
    for _ in range(rounds):
        t0 = clock()
        signal()
        wait()
        append(clock() - t0)
    out.send([t / 1000 for t in times])


def _ponger(wait: Callable[[], object], signal: Callable[[], object], rounds: int) -> None:
    """Process B: wait for X, signal Y."""
    for _ in range(WARMUP + rounds):
        wait()
        signal()


def _ping_pong(
    name: str,
    rounds: int,
    *,
    a_signal: Callable[[], object],
    a_wait: Callable[[], object],
    b_wait: Callable[[], object],
    b_signal: Callable[[], object],
) -> dict[str, float]:
    recv_end, send_end = FORK.Pipe(duplex=False)
    try:
        with _children() as start:
            ponger = start(_ponger, b_wait, b_signal, rounds)
            pinger = start(_pinger, a_signal, a_wait, rounds, send_end)
            send_end.close()
            times: list[float] = _result(recv_end, name, pinger, ponger)
    finally:
        send_end.close()
        recv_end.close()
    return {
        "p50_us": percentile(times, 50),
        "p99_us": percentile(times, 99),
        "mean_us": statistics.fmean(times),
        "rounds": len(times),
    }


def ping_pong(rounds: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}

    # (a) kport.Event, two auto-reset events
    with kport.Event() as x, kport.Event() as y:
        out["kport.Event"] = _ping_pong(
            "kport.Event", rounds, a_signal=x.set, a_wait=y.wait, b_wait=x.wait, b_signal=y.set
        )

    # (b) raw eventfd, blocking
    fds = [os.eventfd(0, os.EFD_CLOEXEC), os.eventfd(0, os.EFD_CLOEXEC)]
    try:
        x_fd, y_fd = fds
        out["raw eventfd"] = _ping_pong(
            "raw eventfd",
            rounds,
            a_signal=functools.partial(os.eventfd_write, x_fd, 1),
            a_wait=functools.partial(os.eventfd_read, y_fd),
            b_wait=functools.partial(os.eventfd_read, x_fd),
            b_signal=functools.partial(os.eventfd_write, y_fd, 1),
        )
    finally:
        for fd in fds:
            os.close(fd)

    # (c) multiprocessing.Event: each waiter clears what woke it before answering, so a
    # set is never lost and never seen twice.
    mp_x, mp_y = FORK.Event(), FORK.Event()

    def take(event: MpEvent) -> Callable[[], None]:
        def wait_then_clear() -> None:
            event.wait()
            event.clear()

        return wait_then_clear

    out["multiprocessing.Event"] = _ping_pong(
        "multiprocessing.Event",
        rounds,
        a_signal=mp_x.set,
        a_wait=take(mp_y),
        b_wait=take(mp_x),
        b_signal=mp_y.set,
    )

    # (d) a pipe each way: one byte written, one byte read (blocking)
    x_read, x_write = os.pipe()
    try:
        y_read, y_write = os.pipe()
        try:
            out["pipe pair"] = _ping_pong(
                "pipe pair",
                rounds,
                a_signal=functools.partial(os.write, x_write, b"x"),
                a_wait=functools.partial(os.read, y_read, 1),
                b_wait=functools.partial(os.read, x_read, 1),
                b_signal=functools.partial(os.write, y_write, b"y"),
            )
        finally:
            os.close(y_read)
            os.close(y_write)
    finally:
        os.close(x_read)
        os.close(x_write)
    return out


# --- records ---------------------------------------------------------------------------


def _record(index: int) -> bytes:
    """Record ``index`` of the stream: 100 bytes that say which one it is."""
    return (index % (POOL_BATCHES * PUT_BATCH)).to_bytes(4, "little") * (RECORD_SIZE // 4)


@functools.cache
def _pool() -> list[list[bytes]]:
    """The batches, made once before any fork so that no transport times making them."""
    return [[_record(b * PUT_BATCH + i) for i in range(PUT_BATCH)] for b in range(POOL_BATCHES)]


def _batches(count: int) -> Iterator[list[bytes]]:
    """The first ``count`` records of the stream in batches of 256."""
    pool = _pool()
    for first in range(0, count, PUT_BATCH):
        batch = pool[(first // PUT_BATCH) % POOL_BATCHES]
        yield batch if count - first >= PUT_BATCH else batch[: count - first]


class _Meter:
    """The consumer's clock: from the end of its first batch to the end of its last."""

    def __init__(self) -> None:
        self.received = self.lost = self.untimed = 0
        self.first = self.last = 0.0
        self.tail = b""

    def batch(self, records: list[bytes], lost: int = 0) -> None:
        now = time.perf_counter()
        if records:
            self.tail = records[-1]
        self.received += len(records)
        self.lost += lost
        if not self.first:
            self.first = now
            self.untimed = self.received + self.lost
        self.last = now

    def done(self, count: int) -> bool:
        return self.received + self.lost >= count

    def result(self, count: int) -> dict[str, Any]:
        timed = self.received + self.lost - self.untimed
        seconds = self.last - self.first
        rate = timed / seconds if seconds > 0 else 0.0
        return {
            "records": self.received,
            "lost": self.lost,
            "timed_records": timed,
            "seconds": seconds,
            "records_per_s": rate,
            "mb_per_s": rate * RECORD_SIZE / 1e6,
            "intact": self.tail == _record(count - 1),
        }


# --- ring throughput -------------------------------------------------------------------


def _ring_consumer(ring: kport.Ring, count: int, out: Pipe) -> None:
    end = kport.Ring.from_fds([os.dup(fd) for fd in ring.fds()], ring.meta())
    ring.close()  # the creator's end, inherited: in this process that only releases its fds
    meter = _Meter()
    with end:
        while not meter.done(count):
            meter.batch(end.get_many(GET_MAX, timeout=WAIT_S))
    out.send(meter.result(count))


def _ring(count: int) -> dict[str, Any]:
    recv_end, send_end = FORK.Pipe(duplex=False)
    try:
        with kport.Ring(RING_CAPACITY) as ring, _children() as start:
            consumer = start(_ring_consumer, ring, count, send_end)
            send_end.close()
            for batch in _batches(count):  # this process is the producer
                ring.put_many(batch, timeout=WAIT_S)
            result: dict[str, Any] = _result(recv_end, "kport.Ring", consumer)
    finally:
        send_end.close()
        recv_end.close()
    return result


# --- port notify throughput ------------------------------------------------------------


def _port_producer(rundir: str, count: int, ready: MpEvent) -> None:
    """bench.port's notify producer (flow control included), sending 100-byte records."""

    async def main() -> None:
        port = kport.ServerPort("objects", runtime_dir=rundir, one_way=True)
        await port.start()
        ready.set()
        deadline = time.monotonic() + WAIT_S
        while not port.connections:
            if time.monotonic() > deadline:
                raise RuntimeError("port notify: no consumer connected")
            await asyncio.sleep(0.001)
        conn = port.connections[0]
        for batch in _batches(count):
            for record in batch:
                port.notify(conn, record)
                await flow_control(port, conn)
        await drained(conn)
        while not conn.closed:
            await asyncio.sleep(0.005)
        await port.shutdown()

    asyncio.run(main())


def _port_consumer(rundir: str, count: int, out: Pipe) -> None:
    meter = _Meter()
    with kport.connect("objects", runtime_dir=rundir) as conn:
        while not meter.done(count):
            records: list[bytes] = []
            lost = 0
            for msg in conn.get_messages(4096, timeout=WAIT_S):
                if msg.is_lost:
                    lost += msg.data["count"]
                else:
                    records.append(msg.data)
            meter.batch(records, lost)
    out.send(meter.result(count))


def _port(count: int) -> dict[str, Any]:
    recv_end, send_end = FORK.Pipe(duplex=False)
    try:
        with tempfile.TemporaryDirectory() as rundir, _children() as start:
            ready = FORK.Event()
            producer = start(_port_producer, rundir, count, ready)
            if not ready.wait(WAIT_S):
                raise RuntimeError("port notify: the port did not start")
            consumer = start(_port_consumer, rundir, count, send_end)
            send_end.close()
            result: dict[str, Any] = _result(recv_end, "port notify", consumer, producer)
    finally:
        send_end.close()
        recv_end.close()
    return result


# --- SharedMemory + multiprocessing.Queue ----------------------------------------------


def _shm_producer(shm: SharedMemory, data: Queue[Any], acks: Queue[Any], count: int) -> None:
    """Write each batch into a free slot, then say (slot, n) on ``data``.

    Acknowledgements come back in order, one per batch, so the k-th one frees the slot
    of batch k: before reusing a slot, take one.
    """
    buf = shm.buf
    assert buf is not None
    for k, batch in enumerate(_batches(count)):
        if k >= SHM_SLOTS:
            acks.get(timeout=WAIT_S)
        slot = k % SHM_SLOTS
        blob = b"".join(batch)
        offset = slot * SHM_SLOT_BYTES
        buf[offset : offset + len(blob)] = blob
        data.put((slot, len(batch)))
    data.close()
    data.join_thread()
    del buf
    shm.close()


def _shm_consumer(
    shm: SharedMemory, data: Queue[Any], acks: Queue[Any], count: int, out: Pipe
) -> None:
    """Copy each announced batch out of its slot, acknowledge it, then split it."""
    buf = shm.buf
    assert buf is not None
    meter = _Meter()
    size = RECORD_SIZE
    while not meter.done(count):
        slot, n = data.get(timeout=WAIT_S)
        offset = slot * SHM_SLOT_BYTES
        blob = bytes(buf[offset : offset + n * size])
        acks.put(slot)
        meter.batch([blob[i : i + size] for i in range(0, n * size, size)])
    acks.close()
    acks.join_thread()
    del buf
    shm.close()
    out.send(meter.result(count))


def _shm(count: int) -> dict[str, Any]:
    tracker: Any = resource_tracker._resource_tracker
    tracker_running = tracker._fd is not None
    shm = SharedMemory(create=True, size=SHM_SLOTS * SHM_SLOT_BYTES)
    recv_end, send_end = FORK.Pipe(duplex=False)
    try:
        data: Queue[Any] = FORK.Queue()
        acks: Queue[Any] = FORK.Queue()
        with _children() as start:
            consumer = start(_shm_consumer, shm, data, acks, count, send_end)
            producer = start(_shm_producer, shm, data, acks, count)
            send_end.close()
            result: dict[str, Any] = _result(
                recv_end, "SharedMemory + mp.Queue", consumer, producer
            )
        del data, acks  # never used here: their pipes close as they go
    finally:
        send_end.close()
        recv_end.close()
        shm.close()
        shm.unlink()
        if not tracker_running:  # SharedMemory started multiprocessing's tracker: stop it
            tracker._stop()
    return result


def throughput(count: int) -> dict[str, dict[str, Any]]:
    results = {
        "kport.Ring": _ring(count),
        "kport port notify": _port(min(count, PORT_COUNT)),
        "SharedMemory + mp.Queue": _shm(count),
    }
    for name, r in results.items():
        if not r["intact"]:
            raise RuntimeError(f"{name}: the last record received is not the last one sent")
    return results


# --- the run ---------------------------------------------------------------------------


def run(
    count: int = 2_000_000, rounds: int = 20_000, json_dir: str | None = None
) -> dict[str, Any]:
    _pool()  # before any fork
    lat = ping_pong(rounds)
    tput = throughput(count)

    event_p50 = lat["kport.Event"]["p50_us"]
    ring_rate = tput["kport.Ring"]["records_per_s"]
    port_rate = tput["kport port notify"]["records_per_s"]
    ratios = {
        "Event p50 / raw eventfd p50": event_p50 / lat["raw eventfd"]["p50_us"],
        "Event p50 / multiprocessing.Event p50": event_p50 / lat["multiprocessing.Event"]["p50_us"],
        "Ring records/s / port notify records/s": ring_rate / port_rate if port_rate else 0.0,
    }

    raw_p50 = lat["raw eventfd"]["p50_us"]
    table = Table(
        f"Event ping-pong, {rounds:,} round trips after {WARMUP:,} warm-up",
        ["object", "p50 µs", "p99 µs", "mean µs", "p50 × raw eventfd"],
    )
    for name, r in lat.items():
        table.row(
            name,
            f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['mean_us']:.1f}",
            f"{r['p50_us'] / raw_p50:.2f}",
        )
    table.show()
    table = Table(
        f"Throughput, {RECORD_SIZE}-byte records, one process to another",
        ["transport", "records", "records/s", "MB/s", "× port notify", "lost"],
    )
    for name, r in tput.items():
        table.row(
            name,
            f"{r['records']:,}",
            f"{r['records_per_s']:,.0f}",
            f"{r['mb_per_s']:.1f}",
            f"{r['records_per_s'] / port_rate:.2f}" if port_rate else "-",
            f"{r['lost']:,}",
        )
    table.show()
    table = Table("Targets", ["ratio", "measured", "target", "met"])
    met_all = True
    for name, value in ratios.items():
        op, bound = TARGETS[name]
        met = _met(value, op, bound)
        met_all &= met
        table.row(name, f"{value:.2f}", f"{op} {bound}", "yes" if met else "NO")
    table.show()
    result: dict[str, Any] = {
        "bench": "objects",
        "count": count,
        "port_count": min(count, PORT_COUNT),
        "rounds": rounds,
        "warmup": WARMUP,
        "record_size": RECORD_SIZE,
        "put_batch": PUT_BATCH,
        "get_max": GET_MAX,
        "ring_capacity": RING_CAPACITY,
        "shm_slots": SHM_SLOTS,
        "ping_pong": lat,
        "throughput": tput,
        "ratios": ratios,
        "targets": {
            name: {"op": op, "bound": bound, "met": _met(ratios[name], op, bound)}
            for name, (op, bound) in TARGETS.items()
        },
        "all_targets_met": met_all,
        "cpus": os.cpu_count(),
    }
    save_results("objects", result, json_dir)
    return result


def _met(value: float, op: str, bound: float) -> bool:
    return value >= bound if op == ">=" else value <= bound
