"""Process details for decisions: identity checked per lookup, the rest cached, the table
used when it knows the process, and a process gone before the lookup."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

from kport import identity
from kport.sources import procinfo
from kport.sources.proc import ProcessTable
from kport.sources.subjects import PENDING, Subjects


def table_of(entries: dict[int, dict[str, Any]], *, exited: bool = False) -> ProcessTable:
    """The proc source's table holding ``entries``, live or with their exits applied."""
    table = ProcessTable()
    table.procs.update(entries)
    if exited:
        for pid in entries:
            table.remove(pid)
    return table


def sleeper_gone() -> tuple[int, dict[str, Any]]:
    """A `sleep 60` seen whole, then killed and reaped: (its pid, what /proc said of it)."""
    child = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 10
    while procinfo.argv(child.pid) != ["sleep", "60"]:  # exec done? (exe changes first)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    described = {**(procinfo.describe(child.pid) or {}), "ppid": os.getpid()}
    child.kill()
    child.wait()
    return child.pid, described


def test_a_lookup_names_the_process_and_its_parents() -> None:
    subjects = Subjects()
    info = subjects.get(os.getpid())
    assert info is not None
    assert info["exe"] == os.path.realpath(sys.executable)
    assert info["start_time"] == identity.start_time(os.getpid())
    assert info["uid"] == os.geteuid() and info["argv"] and info["ppid"] == os.getppid()
    assert info["ancestors"][0] == procinfo.exe(os.getppid())
    assert subjects.get(os.getpid()) is info and (subjects.hits, subjects.misses) == (1, 1)


def test_an_exec_is_a_new_identity_read_once_the_exec_is_through() -> None:
    # Each child reads a line, then execs `cat`: same pid, same start time, another program.
    # The kernel names the new exe before the new argv is in place; lookups in a tight loop
    # land in that window now and then, and must neither report nor keep an empty argv.
    for _ in range(50):
        child = subprocess.Popen(
            [sys.executable, "-c", "import os; input(); os.execv('/bin/cat', ['cat'])"],
            stdin=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None
        try:
            subjects = Subjects()
            deadline = time.monotonic() + 10
            while (before := subjects.get(child.pid)) is None:
                assert time.monotonic() < deadline
            assert "python" in before["exe"]
            child.stdin.write("go\n")
            child.stdin.flush()
            while (after := subjects.get(child.pid)) is not None and after["exe"] == before["exe"]:
                if time.monotonic() > deadline:  # not an assert: a rewritten one slows the loop
                    raise AssertionError("the exec was not seen")
            assert after is not None and after["exe"] == os.path.realpath("/bin/cat")
            assert after["argv"] == ["cat"] and after["start_time"] == before["start_time"]
            assert subjects.get(child.pid) is after  # kept once complete
        finally:
            child.stdin.close()
            child.kill()
            child.wait()


def test_a_process_gone_is_none_or_what_the_table_knew() -> None:
    pid, described = sleeper_gone()
    assert Subjects().get(pid) is None
    info = Subjects(table_of({pid: described}, exited=True)).get(pid)
    assert info is not None and info["gone"] is True
    assert info["exe"] == os.path.realpath("/usr/bin/sleep") and info["argv"] == ["sleep", "60"]
    assert info["ancestors"][0] == procinfo.exe(os.getpid())


def test_a_gone_process_is_named_by_the_table_only_once_its_exit_is_applied() -> None:
    # The table still holds the fork's entry, the parent's program, when the lookup comes:
    # until the proc source has applied the exec and the exit, the answer is pending.
    pid, described = sleeper_gone()
    table = table_of({pid: {**described, "exe": "/the/parent", "argv": ["parent"]}})
    subjects = Subjects(table)
    assert subjects.get(pid, final=False) is PENDING
    table.procs[pid] = described
    table.remove(pid)
    info = subjects.get(pid, final=False)
    assert isinstance(info, dict) and info["gone"] is True
    assert info["exe"] == os.path.realpath("/usr/bin/sleep") and info["argv"] == ["sleep", "60"]
    assert subjects.unsettled == 0


def test_a_final_lookup_never_names_a_gone_process_by_a_table_behind() -> None:
    pid, described = sleeper_gone()
    table = table_of({pid: {**described, "exe": "/the/parent", "argv": ["parent"]}})
    subjects = Subjects(table)
    assert subjects.get(pid) is None  # never the parent's program
    assert subjects.unsettled == 1
    # What was seen of the process while it lived is still told.
    subjects._cache[pid] = described
    seen = subjects.get(pid)
    assert seen is not None and seen["gone"] is True and seen["argv"] == ["sleep", "60"]


def test_a_kernel_thread_is_not_pending() -> None:
    kthreadd = 2  # no exe to read, so looked up as gone: but it is not, nor will it be
    assert procinfo.read_stat(kthreadd) is not None
    table = table_of({kthreadd: {"exe": None, "argv": None, "start_time": 0, "ppid": 0}})
    subjects = Subjects(table)
    assert subjects.get(kthreadd, final=False) is None and subjects.unsettled == 0


def test_the_table_is_used_when_it_knows_the_identity() -> None:
    pid = os.getpid()
    described = procinfo.describe(pid)
    assert described is not None
    table = table_of({pid: {**described, "argv": ["from", "the", "table"]}})
    assert (Subjects(table).get(pid) or {})["argv"] == ["from", "the", "table"]
    # A table entry for another identity (a reused pid) is not used.
    table.procs[pid]["start_time"] -= 1
    assert (Subjects(table).get(pid) or {})["argv"] == described["argv"]


def test_a_pinned_process_that_exits_is_gone_and_its_fd_closed() -> None:
    child = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 10
    while procinfo.exe(child.pid) != os.path.realpath("/usr/bin/sleep"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    subjects = Subjects()
    fds = len(os.listdir("/proc/self/fd"))
    assert subjects.identity(child.pid) == (
        identity.start_time(child.pid),
        os.path.realpath("/usr/bin/sleep"),
    )
    assert len(os.listdir("/proc/self/fd")) == fds + 1  # its /proc directory, pinned
    child.kill()
    child.wait()
    assert subjects.identity(child.pid) is None
    assert len(os.listdir("/proc/self/fd")) == fds
    subjects.identity(os.getpid())
    subjects.close()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_process_seen_before_it_exited_is_still_named() -> None:
    child = subprocess.Popen(["sleep", "60"])
    deadline = time.monotonic() + 10
    while procinfo.argv(child.pid) != ["sleep", "60"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    subjects = Subjects()
    seen = subjects.get(child.pid)
    child.kill()
    child.wait()
    gone = subjects.get(child.pid)  # a notification read after the fact
    assert seen is not None and gone is not None and gone["gone"] is True
    assert gone["exe"] == seen["exe"] and gone["argv"] == ["sleep", "60"]
    assert subjects.get(child.pid) is None  # once: the pid may be another's later
    subjects.close()
