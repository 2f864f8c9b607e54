"""Replay through a ServerPort backed by a real journal: no gap, no repeat, gaps reported."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

import kport
from kport import protocol
from kport.journal.chunks import row_of
from kport.journal.store import Journal, SourceHistory
from tests.conftest import run, spawn_client

pytestmark = pytest.mark.timeout(120)

CLIENT = """
import json, sys, kport
since, until = int(sys.argv[2]), int(sys.argv[3])
out = []
with kport.connect("h", runtime_dir=sys.argv[1], since=since) as conn:
    for msg in conn:
        if msg.is_lost:
            out.append(["lost", msg.data["count"], msg.data["first_seq"], msg.data["last_seq"]])
        else:
            out.append(msg.seq)
            if msg.seq >= until:
                break
print(json.dumps(out))
"""


def journaled(journal: Journal, seq: int) -> bytes:
    """An event as the daemon makes it: journaled, and its bytes to send."""
    event = {"seq": seq, "ts": time.time_ns(), "source": "proc", "kind": "exec", "pid": seq}
    item = protocol.pack_new(event)
    journal.append(row_of(seq, event, item))
    return item


def emit(port: kport.ServerPort, journal: Journal, seq: int) -> None:
    """What the daemon does per event: journal it, then broadcast the same bytes."""
    port.broadcast(journaled(journal, seq), seq=seq, packed=True)


def running_journal(tmp_path: Path) -> Journal:
    """A journal open and writing, committing often: history a replay can read at once."""
    journal = Journal(tmp_path / "j.db", commit_interval_s=0.02)
    journal.open()
    journal.start()
    return journal


async def finish(child: Any) -> Any:
    out, err = await asyncio.to_thread(child.communicate, timeout=60)
    assert child.returncode == 0, err
    return json.loads(out)


def test_replay_then_live_during_a_stream_has_no_gap_and_no_repeat(
    rundir: Path, tmp_path: Path
) -> None:
    total = 30_000

    async def main() -> None:
        journal = running_journal(tmp_path)
        history = SourceHistory(journal, ["proc"])
        async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:
            clients = []
            for seq in range(1, total + 1):
                emit(port, journal, seq)
                if seq % 200 == 0:
                    await asyncio.sleep(0.002)  # a steady stream, not one burst
                if seq in (1, 9_000, 21_000):  # connect mid-stream, asking for the past
                    since = {1: 0, 9_000: 100, 21_000: 20_000}[seq]
                    clients.append(
                        (since, spawn_client(CLIENT, str(rundir), str(since), str(total)))
                    )
            for since, child in clients:
                assert await finish(child) == list(range(since + 1, total + 1)), since
        journal.close()

    run(main())


def test_replay_then_live_while_a_thread_publishes_has_no_gap_and_no_repeat(
    rundir: Path, tmp_path: Path
) -> None:
    """As the daemon's sources do: another thread journals and publishes while clients
    connect asking for the past; the switch from replay to live loses and repeats nothing."""
    total = 50_000

    async def main() -> None:
        journal = running_journal(tmp_path)
        history = SourceHistory(journal, ["proc"])
        async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:

            def produce() -> None:
                seq = 0
                while seq < total:
                    last = min(seq + 1 + seq % 4, total)
                    batch = [(s, journaled(journal, s)) for s in range(seq + 1, last + 1)]
                    port.publish(batch)
                    seq = batch[-1][0]
                    if seq % 200 < 4:
                        time.sleep(0.002)  # a steady stream, not one burst

            producing = asyncio.ensure_future(asyncio.to_thread(produce))
            clients = []
            marks = ((1, 0), (5_000, 100), (12_000, 11_000), (20_000, 19_990), (30_000, 0))
            for at, since in (*marks, (40_000, 39_000)):
                while port.seq < at:  # connect mid-stream, asking for the past
                    await asyncio.sleep(0.001)
                clients.append((since, spawn_client(CLIENT, str(rundir), str(since), str(total))))
            await producing
            for since, child in clients:
                assert await finish(child) == list(range(since + 1, total + 1)), since
        journal.close()

    run(main())


def test_gaps_in_history_arrive_as_lost_with_their_range(rundir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        journal = Journal(tmp_path / "j.db", queue_limit=30)
        journal.open()  # the writer is not started: the queue fills at 30
        history = SourceHistory(journal, ["proc"])
        async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:
            for seq in range(1, 51):
                emit(port, journal, seq)
            child = spawn_client(CLIENT, str(rundir), "0", "52")
            await asyncio.sleep(0.5)
            journal.start()  # room again: live events are journaled and sent
            deadline = time.monotonic() + 20
            while not port.connections or port.connections[0].info()["replaying"]:
                assert child.poll() is None, child.communicate()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            emit(port, journal, 51)
            emit(port, journal, 52)
            assert await finish(child) == [*range(1, 31), ["lost", 20, 31, 50], 51, 52]
        journal.close()

    run(main())


def test_since_on_a_port_without_history_is_refused(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("plain", runtime_dir=rundir):
            with pytest.raises(kport.NoHistory, match="keeps no history"):
                await asyncio.to_thread(kport.connect, "plain", runtime_dir=rundir, since=0)
            with pytest.raises(ValueError, match="since must be a seq >= 0"):
                kport.connect("plain", runtime_dir=rundir, since=-1)

    run(main())


def test_async_client_replays_too(rundir: Path, tmp_path: Path) -> None:
    async def main() -> None:
        journal = Journal(tmp_path / "j.db")
        journal.open()
        journal.start()
        history = SourceHistory(journal, ["proc"])
        async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:
            for seq in range(1, 101):
                emit(port, journal, seq)
            async with kport.aconnect("h", runtime_dir=rundir, since=90) as conn:
                got = [(await conn.get_message(timeout=5)).seq for _ in range(10)]
                emit(port, journal, 101)
                got.append((await conn.get_message(timeout=5)).seq)
            assert got == list(range(91, 102))
        journal.close()

    run(main())
