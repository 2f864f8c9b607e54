"""The journal's store with real SQLite files: commits, reads without gaps or repeats,
loss, durability, crashes."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kport.errors import NameCollision
from kport.journal import store
from kport.journal.store import Journal, SourceHistory
from tests.conftest import mount_tmpfs
from tests.journal.conftest import append, read_all, wait_committed


def test_reads_while_writing_see_every_event_once(journal: Journal) -> None:
    total = 30_000
    done = threading.Event()

    def writer() -> None:
        for start in range(1, total + 1, 500):
            append(journal, start, start + 499)
            time.sleep(0.002)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[int] = []
    after = 0
    while not (done.is_set() and after >= total):
        upto = journal.last_seq()
        page = journal.read(after, upto, 700)
        seen += [seq for seq, _ in page.items]
        assert not page.gaps
        after = max(after, page.through)
    thread.join()
    assert seen == list(range(1, total + 1))
    wait_committed(journal, total)
    items = journal.read(0, total, total).items
    assert [seq for seq, _ in items] == seen
    assert msgpack.unpackb(items[41][1])["argv"] == ["tool", "arg-42"]


def test_a_full_queue_records_a_gap_that_reads_report(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", queue_limit=100)
    j.open()
    append(j, 1, 250)  # the writer is not running: 150 do not fit
    assert j.dropped == 150
    page = j.read(0, 250, 1000)
    assert [s for s, _ in page.items] == list(range(1, 101))
    assert [(g.first, g.last, g.count) for g in page.gaps] == [(101, 250, 150)]
    j.start()
    wait_committed(j, 100)
    j.close()
    j2 = Journal(tmp_path / "j.db")
    assert j2.open() == 250
    seqs, gaps = read_all(j2, 0, 250)
    assert seqs == list(range(1, 101))
    assert [(g.first, g.last, g.count, g.reason) for g in gaps] == [
        (101, 250, 150, "the journal's queue was full")
    ]
    j2.close()


def test_clean_stop_resumes_after_the_last_seq(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    j.open()
    j.start()
    append(j, 1, 500)
    j.close()
    j2 = Journal(tmp_path / "j.db")
    assert j2.open() == 500
    j2.start()
    append(j2, 501, 600)
    j2.close()
    j3 = Journal(tmp_path / "j.db")
    assert j3.open() == 600
    assert read_all(j3, 0, 600) == (list(range(1, 601)), [])
    j3.close()


def test_unclean_stop_skips_past_the_reservation_and_says_so(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", commit_interval_s=0.01)
    j.open()
    j.start()
    append(j, 1, 1000)
    wait_committed(j, 1000)
    reserved = j._reserved
    assert reserved >= 1000 + 1  # seqs past the commit are covered
    with pytest.raises(NameCollision, match="in use by another process"):
        Journal(tmp_path / "j.db").open()  # one writer per journal
    # The process "dies": its writer stops and its lock goes, with no close().
    with j._wake:
        j._stop = True
        j._wake.notify()
    assert j._thread is not None
    j._thread.join(10)
    j._close_files()  # what the kernel does for a process that dies
    j2 = Journal(tmp_path / "j.db")
    start = j2.open()
    assert start == reserved
    # Not a loss of the whole reservation (most of it was never used): one event, where
    # the range begins, that says what is known
    seqs, gaps = read_all(j2, 0, start)
    assert seqs == [*range(1, 1001), 1001] and gaps == []
    ((_, item),) = j2.read(1000, start, 10).items
    said = msgpack.unpackb(item)
    assert (said["source"], said["kind"], said["count"]) == ("kport", "lost", None)
    assert (said["first_seq"], said["last_seq"], said["at_most"]) == (
        1001,
        reserved,
        reserved - 1000,
    )
    assert "did not stop cleanly" in said["reason"]
    assert j2.read(1001, start, 10).items == []  # said once, where the range begins
    db = sqlite3.connect(tmp_path / "j.db")
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    j2.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_turns_durability_off_and_back_on(tmp_path: Path) -> None:
    with mount_tmpfs(tmp_path / "small", "2m") as mnt:
        states: list[tuple[bool, str]] = []
        j = Journal(
            mnt / "j.db",
            commit_interval_s=0.01,
            retry_interval_s=0.05,
            on_state=lambda durable, why: states.append((durable, why)),
        )
        j.open()
        j.start()
        filler = mnt / "filler"
        with open(filler, "wb") as f:  # fill the disk to the last block
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass
        append(j, 1, 3000, pad="y" * 300)
        deadline = time.monotonic() + 10
        while not states:
            assert time.monotonic() < deadline, j.status()
            time.sleep(0.02)
        assert states[0][0] is False and "full" in states[0][1]
        assert j.durable is False and j.queued > 0
        filler.unlink()
        deadline = time.monotonic() + 10
        while j.committed < 3000:
            assert time.monotonic() < deadline, j.status()
            time.sleep(0.02)
        assert states[-1][0] is True and j.durable
        assert read_all(j, 0, 3000) == (list(range(1, 3001)), [])
        j.close()


def test_an_unwritable_journal_reports_durability_off(tmp_path: Path) -> None:
    states: list[tuple[bool, str]] = []
    j = Journal(tmp_path / "j.db", on_state=lambda d, why: states.append((d, why)))
    j.open()
    j.start()
    # Another connection holds the write lock past the writer's 5 s busy timeout.
    other = sqlite3.connect(tmp_path / "j.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    append(j, 1, 10)
    deadline = time.monotonic() + 20
    while not states:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert states[0][0] is False and "locked" in states[0][1]
    other.execute("ROLLBACK")
    other.close()
    wait_committed(j, 10)
    assert states[-1][0] is True
    j.close()


def test_source_history_filters_by_source(journal: Journal) -> None:
    append(journal, 1, 10)
    append(journal, 11, 20, source="file")
    append(journal, 21, 30)
    history = SourceHistory(journal, ["proc"])
    tail = history.tail(0, 30)
    assert tail is not None and [s for s, _ in tail.items] == [*range(1, 11), *range(21, 31)]
    wait_committed(journal, 30)
    assert history.tail(0, 30) is None  # committed: memory no longer reaches back
    page = history.read(0, 30, 100)
    assert [s for s, _ in page.items] == [*range(1, 11), *range(21, 31)]


def test_a_committed_drop_gap_is_reported_by_tail_and_read_once(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", queue_limit=100, commit_interval_s=0.01)
    j.open()
    append(j, 1, 150)  # 101..150 turned away by the full queue
    j.start()
    wait_committed(j, 150)  # the gap is committed too
    append(j, 151, 160)
    assert j.tail(100, 160) is None  # memory no longer holds 101..150's story
    first = j.read(100, 160, 5)
    second = j.read(first.through, 160, 5)
    assert first.through == 155 and second.through == 160
    gaps = [(g.first, g.last, g.count) for p in (first, second) for g in p.gaps]
    assert gaps == [(101, 150, 50)]  # once, on the page that reaches it
    assert [s for s, _ in first.items + second.items] == list(range(151, 161))
    j.close()


def test_a_gap_still_in_memory_is_reported_once_across_pages(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", queue_limit=10)
    j.open()  # no writer: everything stays in memory
    append(j, 1, 60)
    seqs, gaps = read_all(j, 0, 60, limit=4)
    assert seqs == list(range(1, 11))
    assert [(g.first, g.last, g.count) for g in gaps] == [(11, 60, 50)]
    tail = j.tail(0, 60)
    assert tail is not None and [(g.first, g.last, g.count) for g in tail.gaps] == [(11, 60, 50)]
    j._close_files()


def test_a_crash_before_the_first_commit_reuses_no_seq(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db")
    assert j.open() == 0  # the writer has not committed anything yet
    append(j, 1, 100)
    j._close_files()  # the process dies
    j2 = Journal(tmp_path / "j.db")
    start = j2.open()
    assert start >= 100
    page = j2.read(0, start, 1000)
    ((seq, item),) = page.items  # what is known: the unwritten events are lost, at most 1..start
    said = msgpack.unpackb(item)
    assert seq == 1 and page.gaps == []
    assert (said["kind"], said["first_seq"], said["last_seq"]) == ("lost", 1, start)
    j2._close_files()


def test_a_burst_moves_the_reservation_with_it(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", queue_limit=1000)
    j.open()  # the writer is stalled (not started): a burst well past the reservation
    append(j, 1, 10_000)
    j._close_files()  # the process dies
    j2 = Journal(tmp_path / "j.db")
    assert j2.open() >= 10_000
    j2._close_files()


def test_the_writer_survives_a_failure_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    states: list[bool] = []
    j = Journal(
        tmp_path / "j.db",
        commit_interval_s=0.01,
        retry_interval_s=0.05,
        on_state=lambda d, why: states.append(d),
    )
    j.open()
    real = store.chunk_of

    def broken(rows: Any, pause: Any = None) -> Any:
        raise MemoryError("injected")

    monkeypatch.setattr(store, "chunk_of", broken)
    j.start()
    append(j, 1, 10)
    deadline = time.monotonic() + 10
    while not states:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert states == [False] and not j.durable and "injected" in (j.error or "")
    monkeypatch.setattr(store, "chunk_of", real)
    wait_committed(j, 10)
    assert states == [False, True] and j._thread is not None and j._thread.is_alive()
    j.close()
