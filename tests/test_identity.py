"""A process's identity, (pid, start time), with real processes: a comm that looks like
the stat line's own syntax, a zombie, a reaped process."""

from __future__ import annotations

import os
import subprocess
import sys

from kport import identity
from kport.sources import procinfo


def test_start_time_is_the_one_proc_stat_gives() -> None:
    stat = procinfo.read_stat(os.getpid())
    assert stat is not None
    assert identity.start_time(os.getpid()) == stat.start_time


def test_a_comm_with_spaces_and_parentheses_does_not_shift_the_fields() -> None:
    # a process may name itself what /proc/<pid>/stat puts its name between
    rename = "open('/proc/self/comm', 'w').write('a) b (c'); print(flush=True); input()"
    command = [sys.executable, "-c", rename]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE) as child:
        try:
            assert child.stdout is not None and child.stdout.readline() == b"\n"
            stat = procinfo.read_stat(child.pid)
            assert stat is not None and stat.comm == "a) b (c"
            assert identity.start_time(child.pid) == stat.start_time
        finally:
            child.kill()


def test_alive_until_reaped_and_never_for_another_start_time() -> None:
    child = subprocess.Popen(["sleep", "5"])
    started = identity.start_time(child.pid)
    assert started is not None
    assert identity.alive(child.pid, started)
    assert not identity.alive(child.pid, started + 1)  # the pid, but not that process
    child.kill()
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert identity.alive(child.pid, started)  # a zombie is still that process
    child.wait()
    assert identity.start_time(child.pid) is None
    assert not identity.alive(child.pid, started)
