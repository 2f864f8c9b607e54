"""`kport bench journal`: what journaling costs delivery, and how many appends/s it sustains.

Delivery runs the daemon's own path (``Delivery.deliver``: seq, encode once, journal, port)
from one process to a kport client in another, with the journal on and off, interleaved
so that both see the same machine. Appends run the journal alone: rows queued as fast as
it takes them, timed until every one is committed.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from bench.common import Table, count_notifications, drained, flow_control, save_results

BATCH = 256


def proc_event(i: int) -> dict[str, Any]:
    """An exec event as the proc source emits it (~400 bytes packed)."""
    return {
        "source": "proc",
        "kind": "exec",
        "pid": 100_000 + i % 50_000,
        "tid": 100_000 + i % 50_000,
        "start_time": 1_234_567 + i,
        "ppid": 4242,
        "thread": False,
        "ktime": 9_000_000_000 + i,
        "cpu": i % 2,
        "exe": "/usr/bin/python3.11",
        "argv": ["python3", "-m", "some.module", "--flag", f"value-{i}"],
        "cwd": "/home/user/project",
        "uid": 1000,
        "gid": 1000,
        "user": "user",
        "cgroup": "/user.slice/user-1000.slice/session-2.scope",
        "tty": "pts/0",
        "parent_exe": "/usr/bin/bash",
        "ancestry": [{"pid": 4242, "start_time": 100, "exe": "/usr/bin/bash"}],
    }


def _producer(rundir: str, state: str | None, count: int, ready: Any, out: Pipe) -> None:
    """The daemon's delivery path; ``state`` is where the journal goes (None: no journal)."""
    from kport.daemon import Daemon
    from kport.daemon.config import Config
    from kport.daemon.delivery import Rate
    from kport.port.server import ServerPort

    config = Config()
    config.proc.enabled = False
    config.journal.enabled = state is not None
    config.journal.path = str(Path(state or ".") / "journal.db")

    async def main() -> dict[str, Any]:
        daemon = Daemon(config)
        delivery = daemon.delivery
        journal = delivery.journal
        if journal is not None:
            delivery.seq = journal.open()
            journal.start()
        port = ServerPort("proc", runtime_dir=rundir, one_way=True)
        daemon.ports["proc"] = port
        delivery.rates["proc"] = Rate()
        await port.start()
        ready.set()
        while not port.connections:
            await asyncio.sleep(0.001)
        conn = port.connections[0]
        cpu0 = time.process_time()
        for start in range(0, count, BATCH):
            delivery.deliver([proc_event(i) for i in range(start, min(start + BATCH, count))])
            await flow_control(port, conn)
        delivered_at = time.perf_counter()
        await drained(conn)
        cpu = time.process_time() - cpu0
        durable_lag = 0.0
        status: dict[str, Any] = {}
        if journal is not None:
            while journal.committed < delivery.seq:
                await asyncio.sleep(0.001)
            durable_lag = time.perf_counter() - delivered_at
            status = journal.status()
            await asyncio.to_thread(journal.close)
        while not conn.closed:
            await asyncio.sleep(0.005)
        await port.shutdown()
        return {"cpu_s": cpu, "durable_lag_s": durable_lag, "journal": status}

    out.send(asyncio.run(main()))


def _consumer(rundir: str, count: int, out: Pipe) -> None:
    out.send(count_notifications("proc", rundir, count, timeout=60))


def delivery(count: int, with_journal: bool) -> dict[str, Any]:
    ctx = mp.get_context("fork")
    with tempfile.TemporaryDirectory() as rundir, tempfile.TemporaryDirectory() as state:
        ready = ctx.Event()
        prod_recv, prod_send = ctx.Pipe(False)
        cons_recv, cons_send = ctx.Pipe(False)
        producer = ctx.Process(
            target=_producer,
            args=(rundir, state if with_journal else None, count, ready, prod_send),
        )
        producer.start()
        if not ready.wait(30):
            raise RuntimeError("the producer did not start")
        consumer = ctx.Process(target=_consumer, args=(rundir, count, cons_send))
        consumer.start()
        if not cons_recv.poll(300):
            raise RuntimeError("the consumer did not finish within 300 s")
        got = cons_recv.recv()
        prod = prod_recv.recv() if prod_recv.poll(60) else {}
        consumer.join(10)
        producer.join(30)
    rate = got["received"] / got["seconds"] if got["seconds"] else 0.0
    return {**got, **prod, "rate": rate}


def appends(count: int) -> dict[str, Any]:
    """Rows queued as fast as the journal takes them (never past half its queue)."""
    from kport import protocol
    from kport.journal.chunks import row_of
    from kport.journal.store import Journal

    with tempfile.TemporaryDirectory() as state:
        journal = Journal(Path(state) / "journal.db")
        journal.open()
        journal.start()
        rows = []
        for i in range(count):
            ev = proc_event(i)
            ev["seq"] = i + 1
            ev["ts"] = time.time_ns()
            rows.append(row_of(i + 1, ev, protocol.pack(ev)))
        high = journal.queue_limit // 2

        def feed() -> None:
            for start in range(0, count, BATCH):
                while journal.queued >= high:
                    time.sleep(0.0005)
                journal.append_many(rows[start : start + BATCH])

        t0 = time.perf_counter()
        feeder = threading.Thread(target=feed)
        feeder.start()
        while journal.committed < count:
            time.sleep(0.001)
        seconds = time.perf_counter() - t0
        feeder.join()
        status = journal.status()
        size = os.path.getsize(journal.path)
        journal.close()
    return {
        "appended": count,
        "seconds": seconds,
        "rate": count / seconds,
        "dropped": status["dropped"],
        "db_bytes": size,
    }


def run(count: int = 200_000, rounds: int = 5, json_dir: str | None = None) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"without journal": [], "with journal": []}
    for _ in range(rounds):  # interleaved, so drift on the machine hits both alike
        runs["without journal"].append(delivery(count, with_journal=False))
        runs["with journal"].append(delivery(count, with_journal=True))
    median = {name: statistics.median(r["rate"] for r in rs) for name, rs in runs.items()}
    sustained = appends(count * 2)
    cost = 1 - median["with journal"] / median["without journal"]
    targets = {
        "journaling cost (share of delivery throughput)": (cost, "<=", 0.15),
        "sustained appends/s": (sustained["rate"], ">=", 100_000),
    }

    table = Table(
        f"Delivery through Delivery.deliver, {count:,} exec events of ~400 bytes, {rounds} rounds",
        [
            "run",
            "events/s (median)",
            "each round",
            "lost",
            "producer CPU s",
            "of it journal writer",
            "durable lag ms",
        ],
    )
    for name, rs in runs.items():
        table.row(
            name,
            f"{median[name]:,.0f}",
            " / ".join(f"{r['rate']:,.0f}" for r in rs),
            f"{sum(r['lost'] for r in rs):,}",
            " / ".join(f"{r.get('cpu_s', 0):.2f}" for r in rs),
            " / ".join(f"{r['journal'].get('writer_cpu_s', 0):.2f}" for r in rs),
            " / ".join(f"{r.get('durable_lag_s', 0) * 1000:.0f}" for r in rs),
        )
    table.show()
    table = Table("Journal alone", ["appended", "seconds", "appends/s", "dropped", "db MiB"])
    table.row(
        f"{sustained['appended']:,}",
        f"{sustained['seconds']:.2f}",
        f"{sustained['rate']:,.0f}",
        f"{sustained['dropped']:,}",
        f"{sustained['db_bytes'] / 2**20:.1f}",
    )
    table.show()
    table = Table("Targets", ["measure", "measured", "target", "met"])
    met_all = True
    for name, (value, op, bound) in targets.items():
        met = value >= bound if op == ">=" else value <= bound
        met_all &= met
        shown = f"{value:.3f}" if value < 10 else f"{value:,.0f}"
        table.row(name, shown, f"{op} {bound:,}", "yes" if met else "NO")
    table.show()
    result = {
        "bench": "journal",
        "count": count,
        "rounds": rounds,
        "delivery": runs,
        "median_rate": median,
        "journaling_cost": cost,
        "appends": sustained,
        "targets": {k: [op, bound] for k, (_, op, bound) in targets.items()},
        "all_targets_met": met_all,
    }
    save_results("journal", result, json_dir)
    return result
