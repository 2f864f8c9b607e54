"""Replay whose history fails: what it could not give is reported lost, counted as this
port's events alone, and nothing published meanwhile slips between replay and live."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import pytest

import kport
from kport import protocol
from kport.journal.chunks import row_of
from kport.journal.store import Journal, SourceHistory
from kport.replay import Page
from tests.conftest import run, spawn_client

pytestmark = pytest.mark.timeout(120)

#: follows port "h" from ``since`` until it has accounted for seq ``until``: prints the
#: seqs it got and the LOST frames' (count, first, last)
CLIENT = """
import json, sys, kport
since, until = int(sys.argv[2]), int(sys.argv[3])
seqs, lost = [], []
with kport.connect("h", runtime_dir=sys.argv[1], since=since) as conn:
    for msg in conn:
        if msg.is_lost:
            lost.append([msg.data["count"], msg.data["first_seq"], msg.data["last_seq"]])
            top = msg.data["last_seq"]
        else:
            seqs.append(msg.seq)
            top = msg.seq
        if top >= until:
            break
print(json.dumps({"seqs": seqs, "lost": lost}))
"""


class FailingHistory(SourceHistory):
    """The journal, as a port's history, with every read failing (a disk gone bad)."""

    def read(self, after: int, upto: int, limit: int) -> Page:
        raise OSError(5, "Input/output error")

    def tail(self, after: int, upto: int) -> Page | None:
        return None


def event(seq: int, source: str) -> tuple[dict[str, object], bytes]:
    data = {"seq": seq, "ts": time.time_ns(), "source": source, "kind": "exec", "pid": seq}
    return data, protocol.pack_new(data)


def test_a_failed_replay_reports_only_this_ports_events_lost(rundir: Path, tmp_path: Path) -> None:
    """Seqs are shared by every source: port "h" carries proc's (odd seqs), the journal
    also holds file's (even). A replay of 1..99 that fails has lost 50 of h's events,
    not 99."""

    async def main() -> None:
        journal = Journal(tmp_path / "j.db", commit_interval_s=0.02)
        journal.open()
        journal.start()
        try:
            history = FailingHistory(journal, ["proc"])
            async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:
                for seq in range(1, 100):
                    data, item = event(seq, "proc" if seq % 2 else "file")
                    journal.append(row_of(seq, data, item))
                    if seq % 2:
                        port.broadcast(item, seq=seq, packed=True)
                child = spawn_client(CLIENT, str(rundir), "0", "99")
                out, err = await asyncio.to_thread(child.communicate, timeout=60)
                assert child.returncode == 0, err
                assert json.loads(out) == {"seqs": [], "lost": [[50, 1, 99]]}
        finally:
            journal.close()

    run(main())


def test_nothing_published_while_replays_fail_slips_through(rundir: Path, tmp_path: Path) -> None:
    """A thread publishes without pause while clients connect with ``since`` and their
    replays fail: each accounts for every event after its ``since``, received or
    reported lost, exactly once."""
    clients = 12
    total = 40_000

    async def main() -> None:
        journal = Journal(tmp_path / "j.db", commit_interval_s=0.02)
        journal.open()
        journal.start()
        try:
            history = FailingHistory(journal, ["proc"])
            async with kport.ServerPort("h", runtime_dir=rundir, history=history) as port:
                started = threading.Event()

                def produce() -> None:
                    for seq in range(1, total + 1):
                        data, item = event(seq, "proc")
                        journal.append(row_of(seq, data, item))
                        port.publish([(seq, item)])
                        if seq == 100:
                            started.set()
                        if seq % 500 == 0:
                            time.sleep(0.001)

                producer = threading.Thread(target=produce)
                producer.start()
                await asyncio.to_thread(started.wait, 30)
                children = []
                for _ in range(clients):
                    since = max(0, port.seq - 50)
                    children.append(
                        (since, spawn_client(CLIENT, str(rundir), str(since), str(total)))
                    )
                    await asyncio.sleep(0.02)
                await asyncio.to_thread(producer.join, 60)
                for since, child in children:
                    out, err = await asyncio.to_thread(child.communicate, timeout=60)
                    assert child.returncode == 0, err
                    got = json.loads(out)
                    seqs = got["seqs"]
                    assert seqs == sorted(set(seqs)), "a repeat, or out of order"
                    lost = sum(count for count, _, _ in got["lost"])
                    assert len(seqs) + lost == total - since, (since, got["lost"])
                    covered = set(seqs)
                    for _, first, last in got["lost"]:
                        covered.update(range(first, last + 1))
                    assert covered == set(range(since + 1, total + 1))
        finally:
            journal.close()

    run(main())
