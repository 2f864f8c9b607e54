"""`kport bench export` (root): the fleet's exporter against a real nats-server on 127.0.0.1.

One run measures:

* the rate one host exports at, sustained: a backlog of process events built in the
  journal with the exporter stopped, then the time the exporter takes to have the stream
  acknowledge all of it (target: at least 20,000 events/s);
* the end-to-end lag at about 1,000 events/s, from the kernel's timestamp of an exec to a
  fleet consumer receiving it from the stream (target: p99 at most 1 s);
* the local delivery p99 (kernel to a client of the proc port) with and without the
  exporter running, interleaved (target: with at most 1.2 x without);
* beside it, the same kind of stream published as falcosidekick publishes to NATS: core
  publish, no acknowledgement — its rate, and how many messages it lost across one
  broker kill, against the exporter's count across the same kill.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kport
from bench.common import Table, free_port, percentile, save_results
from bench.proc import tiny_program

ROOT = Path(__file__).resolve().parent.parent
#: paced rounds without and with the exporter, interleaved: one slow round (the machine
#: is shared) moves a median of two by half; of four, hardly
PAIRS = 4

#: a fleet consumer: prints "ready" once subscribed, then, on SIGTERM, the µs from each
#: marked exec's kernel timestamp to its arrival from the stream, as a JSON list
FLEET_CONSUMER = """
import asyncio, json, signal, sys, time
import nats
from nats.js.api import DeliverPolicy

async def main():
    url, marker = sys.argv[1], sys.argv[2]
    nc = await nats.connect(url)
    js = nc.jetstream()
    sub = await js.subscribe(
        "kport.bench.proc.exec", ordered_consumer=True, deliver_policy=DeliverPolicy.NEW
    )
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    lags = []
    while not stop.is_set():
        try:
            msg = await sub.next_msg(timeout=0.2)
        except (TimeoutError, asyncio.TimeoutError, nats.errors.TimeoutError):
            continue
        data = json.loads(msg.data)
        if marker in (data.get("argv") or []):
            lags.append((time.monotonic_ns() - data["ktime"]) / 1e3)
    print(json.dumps(lags), flush=True)
    await nc.close()

asyncio.run(main())
"""


class Broker:
    """A nats-server with JetStream on 127.0.0.1, its store and log in ``where``; killed
    (or stopped) and started again on the same port and store."""

    def __init__(self, where: Path, *, user: str = "", password: str = "") -> None:
        self.where = where
        #: the one user the server admits, if given
        self.user, self.password = user, password
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        server = shutil.which("nats-server")
        if server is None:
            raise RuntimeError("nats-server is not installed (scripts/setup-system.sh --tests)")
        with open(self.where / "nats.log", "ab") as log:  # the child keeps its own copy
            signing = ["--user", self.user, "--pass", self.password] if self.user else []
            self.proc = subprocess.Popen(
                [
                    *(server, "-js", "-a", "127.0.0.1", "-p", str(self.port)),
                    *("-sd", str(self.where), *signing),
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nats-server did not listen on {self.port}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)


@contextlib.contextmanager
def _setup() -> Iterator[tuple[Broker, Path]]:
    with tempfile.TemporaryDirectory(prefix="kport-bench-export-") as tmp:
        where = Path(tmp)
        (where / "broker").mkdir()
        broker = Broker(where / "broker")
        broker.start()
        daemon = subprocess.Popen(
            [
                *(sys.executable, "-m", "kport.cli", "serve"),
                *("--runtime-dir", str(where / "run"), "--state-dir", str(where / "state")),
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 30
            while not (where / "run" / "journal.sock").exists():
                if time.monotonic() > deadline or daemon.poll() is not None:
                    raise SystemExit("kport bench export: the daemon did not start")
                time.sleep(0.05)
            time.sleep(0.5)
            yield broker, where
        finally:
            daemon.terminate()
            daemon.wait(30)
            broker.kill()


def _exporter(broker: Broker, where: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "export", "--nats", broker.url, "--host", "bench"),
            *("--runtime-dir", str(where / "run"), "--state-dir", str(where / "export")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _stop(exporter: subprocess.Popen[bytes]) -> None:
    exporter.terminate()
    try:
        exporter.wait(30)
    except subprocess.TimeoutExpired:
        exporter.kill()
        exporter.wait()
        raise SystemExit("kport bench export: the exporter did not stop on SIGTERM") from None


def _status(where: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return dict(json.loads((where / "export" / "bench.status.json").read_text()))
    return {}


def _daemon_seq(where: Path) -> int:
    with kport.connect("control", runtime_dir=where / "run") as conn:
        return int(conn.send({"op": "status"}, timeout=5)["seq"])


def _caught_up(where: Path, timeout: float = 300) -> float:
    """Wait until the exporter's acknowledged cursor reaches the daemon's seq; when."""
    target = _daemon_seq(where)
    deadline = time.monotonic() + timeout
    while True:
        acked = _status(where).get("sources", {}).get("proc", {}).get("acked", 0)
        if acked >= target:
            return time.monotonic()
        if time.monotonic() > deadline:
            raise SystemExit(f"kport bench export: the exporter stalled at {acked} of {target}")
        time.sleep(0.01)


def _storm(program: str, execs: int, spawners: int = 2) -> None:
    def spawn(n: int) -> None:
        for _ in range(n):
            os.waitpid(os.posix_spawn(program, [program], os.environ), 0)

    threads = [threading.Thread(target=spawn, args=(execs // spawners,)) for _ in range(spawners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


class StreamWatch:
    """The stream's message count, sampled every 20 ms from a thread of its own: the
    rate it grows at is the broker's word for how fast the exporter delivers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._watch()))

    async def _watch(self) -> None:
        import nats
        import nats.js.errors

        nc = await nats.connect(self.url)
        try:
            js = nc.jetstream()
            while not self._stop.is_set():
                with contextlib.suppress(nats.js.errors.NotFoundError, TimeoutError):
                    info = await js.stream_info("KPORT")
                    self.samples.append((time.monotonic(), info.state.messages))
                await asyncio.sleep(0.02)
        finally:
            await nc.close()

    def __enter__(self) -> StreamWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def reached(self, count: int) -> float:
        """When the stream first held ``count`` messages."""
        return next(t for t, n in self.samples if n >= count)

    def rate(self, base: int, events: int, low: float = 0.1, high: float = 0.9) -> float:
        """Events/s between the stream holding ``low`` and ``high`` of ``events`` more
        than ``base``: the sustained rate, without the start and the tail."""
        begin = next((t, n) for t, n in self.samples if n - base >= events * low)
        end = next((t, n) for t, n in self.samples if n - base >= events * high)
        return (end[1] - begin[1]) / (end[0] - begin[0]) if end[0] > begin[0] else 0.0


def _stream_messages(url: str) -> int:
    import nats
    import nats.js.errors

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info("KPORT")).state.messages)
        except nats.js.errors.NotFoundError:
            return 0
        finally:
            await nc.close()

    return asyncio.run(count())


def sustained(broker: Broker, where: Path, program: str, execs: int) -> dict[str, Any]:
    """A backlog in the journal with no exporter, then the exporter started: the rate
    the stream grows at from a tenth to nine tenths of the backlog (sustained), and the
    time from starting the exporter to all of it acknowledged (with its start)."""
    first = _daemon_seq(where)
    _storm(program, execs)
    time.sleep(1.0)  # the last events reach the journal
    backlog = _daemon_seq(where) - first
    base = _stream_messages(broker.url)
    with StreamWatch(broker.url) as watch:
        started = time.monotonic()
        exporter = _exporter(broker, where)
        try:
            _caught_up(where)
        finally:
            _stop(exporter)
    took = watch.reached(base + backlog) - started
    return {
        "events": backlog,
        "rate": round(watch.rate(base, backlog), 1),
        "seconds_with_start": round(took, 3),
        "rate_with_start": round(backlog / took, 1),
    }


def paced(
    broker: Broker, where: Path, program: str, seconds: float, with_exporter: bool
) -> dict[str, Any]:
    """About 1,000 events/s (333 execs, each a fork, an exec and an exit): the latency
    from each exec's kernel timestamp to a local client, and to a fleet consumer."""
    marker = f"kport-bench-export-{time.monotonic_ns()}"
    local: list[float] = []
    fleet: list[float] = []
    stop = threading.Event()
    ready = threading.Barrier(2)

    def follow_local() -> None:
        with kport.connect("proc", runtime_dir=where / "run") as conn:
            ready.wait()
            while not stop.is_set():
                with contextlib.suppress(kport.Timeout):
                    for msg in conn.get_messages(timeout=0.2):
                        data = msg.data
                        if isinstance(data, dict) and marker in (data.get("argv") or []):
                            local.append((time.monotonic_ns() - data["ktime"]) / 1e3)

    exporter = _exporter(broker, where) if with_exporter else None
    consumer: subprocess.Popen[str] | None = None
    try:
        if exporter is not None:
            _caught_up(where)
            # the fleet's consumer in a process of its own: not sharing a GIL with the
            # local client whose latency is measured
            consumer = subprocess.Popen(
                [sys.executable, "-c", FLEET_CONSUMER, broker.url, marker],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert consumer.stdout is not None
            assert consumer.stdout.readline().strip() == "ready"
        threads = [threading.Thread(target=follow_local)]
        for t in threads:
            t.start()
        ready.wait()
        execs = int(seconds * 333)
        started = time.monotonic()
        for i in range(execs):
            os.waitpid(os.posix_spawn(program, [program, marker], os.environ), 0)
            delay = started + (i + 1) / 333 - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        time.sleep(2.0)  # the last ones arrive
        stop.set()
        for t in threads:
            t.join(30)
        if consumer is not None:
            consumer.terminate()
            fleet.extend(json.loads(consumer.communicate(timeout=30)[0]))
    finally:
        if exporter is not None:
            _stop(exporter)
    return {
        "execs": execs,
        "local_received": len(local),
        "local_p50_us": round(percentile(local, 50), 1),
        "local_p99_us": round(percentile(local, 99), 1),
        "fleet_received": len(fleet),
        "fleet_p50_us": round(percentile(fleet, 50), 1),
        "fleet_p99_us": round(percentile(fleet, 99), 1),
    }


def core_publish(broker: Broker, count: int, kill: bool) -> dict[str, Any]:
    """falcosidekick's way: core publish, no acknowledgement, one connection (kept, and
    reconnecting, which is kinder than one connection per event). With ``kill``, the broker
    is killed a third of the way and started again."""
    import nats

    async def publish() -> dict[str, Any]:
        nc = await nats.connect(
            broker.url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, error_cb=_quiet
        )
        js = nc.jetstream()
        with contextlib.suppress(Exception):
            await js.delete_stream("SIDEKICK")
        from nats.js.api import StreamConfig

        await js.add_stream(StreamConfig(name="SIDEKICK", subjects=["sidekick.>"]))
        body = json.dumps({"source": "proc", "kind": "exec", "argv": ["/bin/true"] * 4}).encode()
        started = time.monotonic()
        sent = 0
        for i in range(count):
            try:
                await nc.publish("sidekick.h1.proc.exec", body)
                sent += 1
            except Exception:  # noqa: BLE001  # it drops on error, as falcosidekick does
                pass
            if kill and i == count // 3:
                await nc.flush()
                broker.kill()
                await asyncio.sleep(1.0)
                broker.start()
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await nc.flush(timeout=30)
        took = time.monotonic() - started
        await asyncio.sleep(1.0)
        js = nc.jetstream()
        stored = (await js.stream_info("SIDEKICK")).state.messages
        await nc.close()
        return {
            "published": count,
            "sent_without_error": sent,
            "stored": stored,
            "lost": count - stored,
            "rate": round(count / took, 1),
        }

    return asyncio.run(publish())


async def _quiet(err: Exception) -> None:
    pass


def exporter_across_a_kill(broker: Broker, where: Path, program: str, execs: int) -> dict[str, Any]:
    """The exporter exporting a storm while the broker is killed and started again: how
    many events the stream lacks afterwards, and how many it has twice."""
    import nats

    exporter = _exporter(broker, where)
    try:
        _caught_up(where)
        first = _daemon_seq(where)
        storm = threading.Thread(target=_storm, args=(program, execs))
        storm.start()
        time.sleep(0.5)
        broker.kill()
        time.sleep(1.0)
        broker.start()
        storm.join()
        time.sleep(1.0)
        _caught_up(where)
        last = _daemon_seq(where)
    finally:
        _stop(exporter)

    async def count() -> tuple[int, int]:
        nc = await nats.connect(broker.url)
        js = nc.jetstream()
        sub = await js.pull_subscribe("kport.bench.>", stream="KPORT")
        seqs: dict[int, int] = {}
        while True:
            try:
                msgs = await sub.fetch(2000, timeout=2)
            except TimeoutError:
                break
            for msg in msgs:
                seq = int((msg.headers or {})["Nats-Msg-Id"].rsplit(":", 1)[1])
                seqs[seq] = seqs.get(seq, 0) + 1
                await msg.ack()
        await nc.close()
        wanted = set(range(first + 1, last + 1))
        got = {s for s in seqs if s in wanted}
        return len(wanted - got), sum(1 for n in seqs.values() if n > 1)

    missing, twice = asyncio.run(count())
    # (kport's journal holds every seq of the proc port here: no other source runs)
    return {"events": last - first, "missing": missing, "twice": twice}


def run(
    json_dir: str | None = None, count: int | None = None, rounds: int | None = None
) -> dict[str, Any]:
    execs = count or 20_000
    seconds = float(rounds or 10)
    with tempfile.TemporaryDirectory() as tmp, _setup() as (broker, where):
        program = tiny_program(tmp)
        rates = [sustained(broker, where, program, execs) for _ in range(2)]
        pacing: dict[str, list[dict[str, Any]]] = {"without exporter": [], "with exporter": []}
        for _ in range(PAIRS):  # interleaved: drift on the machine falls on both alike
            pacing["without exporter"].append(paced(broker, where, program, seconds, False))
            pacing["with exporter"].append(paced(broker, where, program, seconds, True))
        across = exporter_across_a_kill(broker, where, program, execs // 2)
        sidekick = core_publish(broker, 100_000, kill=False)
        sidekick_kill = core_publish(broker, 100_000, kill=True)

    table = Table("kport export: one host to a local nats-server", ["figure", "value"])
    for r in rates:
        table.row(
            "sustained export (backlog)",
            f"{r['events']:,} events: {r['rate']:,.0f}/s sustained; all acknowledged "
            f"{r['seconds_with_start']} s after starting the exporter "
            f"({r['rate_with_start']:,.0f}/s)",
        )
    for name, runs in pacing.items():
        for r in runs:
            table.row(
                f"~1,000 events/s, {name}",
                f"local p50/p99 {r['local_p50_us']:,.0f}/{r['local_p99_us']:,.0f} µs"
                + (
                    f"; fleet p50/p99 {r['fleet_p50_us']:,.0f}/{r['fleet_p99_us']:,.0f} µs "
                    f"({r['fleet_received']}/{r['execs']})"
                    if name == "with exporter"
                    else ""
                ),
            )
    table.row(
        "exporter across a broker kill",
        f"{across['events']:,} events: {across['missing']} missing, {across['twice']} twice",
    )
    table.row(
        "core publish (falcosidekick's way)",
        f"{sidekick['rate']:,.0f} msgs/s, lost {sidekick['lost']}",
    )
    table.row(
        "core publish across a broker kill",
        f"{sidekick_kill['rate']:,.0f} msgs/s, "
        f"lost {sidekick_kill['lost']:,} of {sidekick_kill['published']:,}",
    )
    table.show()

    rate = statistics.median(r["rate"] for r in rates)
    fleet_p99 = max(r["fleet_p99_us"] for r in pacing["with exporter"])
    local_with = statistics.median(r["local_p99_us"] for r in pacing["with exporter"])
    local_without = statistics.median(r["local_p99_us"] for r in pacing["without exporter"])
    ratio = local_with / local_without if local_without else 0.0
    targets = {
        "sustained export >= 20,000 events/s": (
            rate >= 20_000,
            f"{rate:,.0f}/s (median of {len(rates)})",
        ),
        "end-to-end lag p99 <= 1 s at 1,000 events/s": (
            fleet_p99 <= 1e6,
            f"{fleet_p99 / 1e3:,.1f} ms (worst of {PAIRS})",
        ),
        "local p99 with exporter <= 1.2 x without": (
            ratio <= 1.2,
            f"{local_with:,.0f} vs {local_without:,.0f} µs ({ratio:.2f} x, medians of {PAIRS})",
        ),
        "nothing lost or twice across a broker kill": (
            across["missing"] == 0 and across["twice"] == 0,
            f"missing {across['missing']}, twice {across['twice']} "
            f"(core publish lost {sidekick_kill['lost']:,})",
        ),
    }
    table = Table("Targets", ["target", "met", "figures"])
    for name, (met, figures) in targets.items():
        table.row(name, "yes" if met else "NO", figures)
    table.show()
    result = {
        "sustained": rates,
        "paced": pacing,
        "exporter_across_kill": across,
        "core_publish": sidekick,
        "core_publish_across_kill": sidekick_kill,
        "targets": {k: {"met": m, "figures": f} for k, (m, f) in targets.items()},
    }
    save_results("export", result, json_dir)
    return result
