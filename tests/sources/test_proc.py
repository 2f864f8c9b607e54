"""The proc source's process table and its resync after loss, against the real /proc."""

from __future__ import annotations

import itertools
import os
import subprocess
import threading
import time
from typing import Any

import pytest

from kport.sources import netlink_proc, proc, proc_bpf, procinfo
from kport.sources.proc import EXITED, ProcessTable, ProcSource


def test_lost_then_resync_repairs_the_table() -> None:
    emitted: list[list[dict[str, Any]]] = []
    source = ProcSource(emitted.append)
    seeded = source._seed()
    assert any(e["pid"] == os.getpid() and e["snapshot"] for e in seeded)
    for pid, entry in source.table.procs.items():  # the seed read each one fully
        assert entry["start_time"] is not None, pid
    # The table now misses a live process and holds a dead one.
    child = subprocess.Popen(["sleep", "5"])
    deadline = time.monotonic() + 10
    while procinfo.argv(child.pid) != ["sleep", "5"]:  # Popen returns before argv is in place
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ghost = max(source.table.procs) + 1_000_000
    source.table.procs[ghost] = {"start_time": 1, "exe": "/ghost", "ppid": 1}
    try:
        events = source._lost(7, "test")
    finally:
        child.kill()
        child.wait()
    assert events[0]["kind"] == "lost" and events[0]["count"] == 7
    exits = [e for e in events if e["kind"] == "exit"]
    assert [(e["pid"], e["exe"], e["synthetic"]) for e in exits] == [(ghost, "/ghost", True)]
    snaps = {e["pid"]: e for e in events if e["kind"] == "snapshot"}
    assert snaps[child.pid]["argv"] == ["sleep", "5"] and snaps[child.pid]["synthetic"]
    assert ghost not in source.table.procs and child.pid in source.table.procs
    assert source.lost == 7 and source.resyncs == 1


def test_ancestry_walks_the_parent_chain() -> None:
    source = ProcSource(lambda batch: None)
    source._seed()
    chain = source.table.ancestry(os.getpid())
    assert chain[0]["pid"] == os.getppid()
    assert chain[-1]["pid"] in (1, 0) or len(chain) == 64


def test_the_table_remembers_the_last_exited_processes() -> None:
    table = ProcessTable()
    for pid in range(1, EXITED + 3):
        table.procs[pid] = {"pid": pid, "exe": f"/bin/p{pid}"}
        assert table.remove(pid) == {"pid": pid, "exe": f"/bin/p{pid}"}
    assert table.get(EXITED + 2) is None  # not live
    assert table.lookup(EXITED + 2) == {"pid": EXITED + 2, "exe": f"/bin/p{EXITED + 2}"}
    assert table.lookup(1) is None and table.lookup(2) is None  # the oldest are let go
    assert len(table.exited) == EXITED
    table.procs[3] = {"pid": 3, "exe": "/bin/live"}
    assert table.lookup(3) == {"pid": 3, "exe": "/bin/live"}  # the live one first
    assert table.exited_entry(3) is None  # its exit has not been applied yet
    assert table.exited_entry(EXITED + 2) == {"pid": EXITED + 2, "exe": f"/bin/p{EXITED + 2}"}
    assert table.remove(99_999) is None


def test_an_exec_read_too_late_leaves_no_inherited_program_in_the_table() -> None:
    # A fork's entry holds what the child inherited, its parent's program. When the
    # process is gone before its exec is handled, that is not its program any more.
    source = ProcSource(lambda batch: None)
    child = subprocess.Popen(["true"])
    child.wait()
    parent = {"exe": "/the/parent", "argv": ["parent"], "start_time": 1, "uid": 0}
    source.table.procs[child.pid] = dict(parent)
    ids = {"pid": child.pid, "tgid": child.pid}
    (event,) = source._handle(("exec", 0, 1, time.monotonic_ns(), ids))
    assert event["gone"] is True and event["exe"] is None and event["missing"] == ["exe", "argv"]
    entry = source.table.get(child.pid)
    assert entry is not None and entry["exe"] is None and entry["argv"] is None
    assert entry["start_time"] == 1  # what it still is: the same process


def test_a_full_hand_off_is_counted_as_lost_never_dropped_silently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(proc, "HANDOFF_LIMIT", 5)
    emitted: list[list[dict[str, Any]]] = []
    source = ProcSource(emitted.append)
    # pids above the kernel's pid_max: execs of processes that cannot be read
    raws = [("exec", 0, i, 0, {"pid": 2**22 + i, "tgid": 2**22 + i}) for i in range(8)]
    source._hand_off(raws)  # four fit, and a marker for the other four
    gap = ("lost", -1, 0, 0, {"count": 3, "reason": "sequence gap on cpu 0"})
    source._hand_off([*raws[:2], gap])  # no room at all: counted for the processor to report
    assert source.status()["backlog"] == 5
    worker = threading.Thread(target=source._process_loop)
    worker.start()
    try:
        deadline = time.monotonic() + 30
        while sum(e["kind"] == "lost" for batch in emitted for e in batch) < 2:
            assert time.monotonic() < deadline, emitted
            time.sleep(0.01)
    finally:
        source._stop.set()
        worker.join(5)
    events = [e for batch in emitted for e in batch]
    assert [e["pid"] for e in events if e["kind"] == "exec"] == [2**22 + i for i in range(4)]
    assert [e["count"] for e in events if e["kind"] == "lost"] == [4, 5]
    assert source.lost == 9 and source.status()["backlog"] == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs root")
def test_below_batch_above_the_reader_does_not_wait() -> None:
    """Under the rate threshold every wake-up's events go on at once: a long window is
    never slept, so a storm is read in many small batches, each exec as it comes."""
    emitted: list[dict[str, Any]] = []
    source = ProcSource(emitted.extend, batch_window_s=0.5, batch_above=10**9)
    source.start()

    def storm(count: int) -> set[int]:
        pids = set()
        for _ in range(count):
            pid = os.posix_spawn("/bin/true", ["true", "kport-unbatched-test"], os.environ)
            pids.add(pid)
            os.waitpid(pid, 0)
        return pids

    try:
        time.sleep(0.3)
        storm(100)  # past the reader's first rate slice: batching would have begun
        before = source.batches
        ours = storm(200)
        deadline = time.monotonic() + 30
        while not {e["pid"] for e in list(emitted) if e["kind"] == "exit"} >= ours:
            assert time.monotonic() < deadline, "exits missing"
            time.sleep(0.05)
    finally:
        source.stop()
    # had the 0.5 s window been slept, these 200 runs would have been a few batches
    assert source.batches - before > 50, source.batches - before


def test_under_load_the_reader_takes_events_in_batches() -> None:
    """Above batch_above events/s the reader waits a window between reads: a storm costs
    a wake-up per batch, not per event, and every exec still arrives."""
    emitted: list[dict[str, Any]] = []
    # any storm this machine makes is load
    source = ProcSource(emitted.extend, batch_window_s=0.01, batch_above=50)
    source.start()
    try:
        time.sleep(0.3)  # let the reader's first rate slice pass
        pids = []
        for _ in range(300):
            pid = os.posix_spawn("/bin/true", ["true", "kport-batch-test"], os.environ)
            pids.append(pid)
            os.waitpid(pid, 0)
        ours = set(pids)

        def seen(kind: str) -> set[int]:
            return {e["pid"] for e in list(emitted) if e["kind"] == kind} & ours

        deadline = time.monotonic() + 30
        while not (seen("fork") == seen("exec") == seen("exit") == ours):
            assert time.monotonic() < deadline, "events missing"
            time.sleep(0.05)
    finally:
        source.stop()
    kernel_events = sum(1 for e in emitted if e["kind"] in ("fork", "exec", "exit"))
    assert kernel_events >= 900  # fork, exec and exit of each of ours, and others'
    assert source.batches * 3 < kernel_events, (source.batches, kernel_events)


def test_a_tiny_ring_loses_records_and_lost_events_count_every_one() -> None:
    """The eBPF ring made a page on purpose, drained every 50 ms: the kernel refuses what
    does not fit, and the lost events' counts are exactly what it refused, which covers
    every event of ours that is missing."""
    emitted: list[dict[str, Any]] = []
    source = ProcSource(
        emitted.extend,
        backend="bpf",
        ring_bytes=proc_bpf.RING_MIN,
        batch_window_s=0.05,
        batch_above=0,  # any event makes a storm: drained once per window
    )
    source.start()
    try:
        time.sleep(0.3)  # past the reader's first rate slice
        pids: list[int] = []

        def storm() -> None:
            for _ in range(100):
                pid = os.posix_spawn("/bin/true", ["true", "kport-tiny-ring"], os.environ)
                pids.append(pid)
                os.waitpid(pid, 0)

        spawners = [threading.Thread(target=storm) for _ in range(4)]
        for spawner in spawners:
            spawner.start()
        for spawner in spawners:
            spawner.join()
        deadline = time.monotonic() + 30
        while True:  # until every record the kernel made is taken or counted
            status = source.status()
            reported = sum(e["count"] for e in list(emitted) if e["kind"] == "lost")
            if status["records"] + reported == status["kernel_records"]:
                break
            assert time.monotonic() < deadline, (status, reported)
            time.sleep(0.05)
    finally:
        source.stop()
    assert status["kernel_dropped"] == reported == source.lost > 0
    ours = set(pids)
    got = sum(
        1
        for e in emitted
        if e["kind"] in ("fork", "exec", "exit") and e["pid"] in ours and not e.get("synthetic")
    )
    missing = 3 * len(ours) - got
    assert 0 < missing <= reported
    assert source.resyncs == sum(1 for e in emitted if e["kind"] == "lost")


def test_with_ebpf_uid_and_comm_changes_still_come_from_the_connector_once_each() -> None:
    emitted: list[dict[str, Any]] = []
    source = ProcSource(emitted.extend, backend="bpf")
    source.start()
    try:
        assert source.status()["side_events"] == "yes"
        script = (
            "printf renamed > /proc/$$/comm; "
            "exec setpriv --reuid=65534 --regid=65534 --clear-groups true"
        )
        child = subprocess.run(["/bin/sh", "-c", script], check=True)
        del child
        deadline = time.monotonic() + 10
        while not any(e["kind"] == "exit" and e.get("uid") == 65534 for e in list(emitted)):
            assert time.monotonic() < deadline, "the exit missing"
            time.sleep(0.05)
    finally:
        source.stop()
    (exit_,) = [e for e in emitted if e["kind"] == "exit" and e.get("uid") == 65534]
    pid = exit_["pid"]
    kinds = [e["kind"] for e in emitted if e["pid"] == pid]
    # in the order they happened, each once: the two streams merged by kernel time
    # (sh, then setpriv, which changes its ids, then true)
    assert kinds[:4] == ["fork", "exec", "comm", "exec"], kinds
    assert sorted(kinds[4:6]) == ["gid", "uid"] and kinds[6:] == ["exec", "exit"], kinds
    assert any(e["kind"] == "comm" and e["comm"] == "renamed" for e in emitted if e["pid"] == pid)
    (uid,) = [e for e in emitted if e["kind"] == "uid" and e["pid"] == pid]
    assert uid["euid"] == 65534
    assert any(e["kind"] == "gid" and e["egid"] == 65534 for e in emitted if e["pid"] == pid)


def test_with_ebpf_an_argv_with_empty_and_non_utf8_arguments_is_exact() -> None:
    emitted: list[dict[str, Any]] = []
    source = ProcSource(emitted.extend, backend="bpf")
    source.start()
    argv = [b"/bin/true", b"", b"x\xff\xfe y", b"", b"kport-odd-argv"]
    try:
        subprocess.run(argv, check=True)
        deadline = time.monotonic() + 10
        while not (found := [e for e in list(emitted) if e.get("argv_bytes") == argv]):
            assert time.monotonic() < deadline, "the exec is missing"
            time.sleep(0.05)
    finally:
        source.stop()
    (exec_,) = found
    assert exec_["argv"] == ["/bin/true", "", "x\ufffd\ufffd y", "", "kport-odd-argv"]
    assert exec_["exe"] == os.path.realpath("/bin/true") and "truncated" not in exec_


@pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs root")
def test_one_connector_overflow_is_one_lost_event_with_its_count_and_one_resync() -> None:
    """A socket buffer made tiny on purpose overflows in a storm. The kernel says so
    twice — ENOBUFS, then a sequence gap on each CPU — but it is one loss: one lost
    event with the count the kernel dropped, and one resync, never two back to back."""
    emitted: list[dict[str, Any]] = []
    source = ProcSource(
        emitted.extend,
        backend="connector",
        rcvbuf=4096,
        batch_window_s=0.05,
        batch_above=0,  # drained once per window: the buffer fills between drains
    )
    source.start()
    try:
        time.sleep(0.3)  # past the reader's first rate slice

        def storm() -> None:
            for _ in range(150):
                os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)

        spawners = [threading.Thread(target=storm) for _ in range(4)]
        for spawner in spawners:
            spawner.start()
        for spawner in spawners:
            spawner.join()
        assert source._sock is not None
        deadline = time.monotonic() + 30
        while True:  # until every drop the kernel counted is reported
            dropped = netlink_proc.drops(source._sock)
            reported = sum(e["count"] or 0 for e in list(emitted) if e["kind"] == "lost")
            if dropped == reported:
                break
            assert time.monotonic() < deadline, (dropped, reported)
            os.waitpid(os.posix_spawn("/bin/true", ["true"], os.environ), 0)  # a sign
            time.sleep(0.1)
    finally:
        source.stop()
    lost = [i for i, e in enumerate(emitted) if e["kind"] == "lost"]
    assert dropped and lost, "the tiny buffer never overflowed"
    assert all(emitted[i]["count"] for i in lost), [emitted[i] for i in lost]
    for before, after in itertools.pairwise(lost):
        between = emitted[before + 1 : after]
        assert any(not e.get("synthetic") for e in between), (emitted[before], emitted[after])
    assert source.resyncs == len(lost)
