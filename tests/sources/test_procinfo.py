"""Reads of /proc for a live process, and the identity check that refuses a reused pid."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from kport import identity
from kport.sources import procinfo


def test_describe_a_live_process() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        # Popen returns while the child is still inside execve (vfork): its exe is set,
        # but its command line can read empty for a moment. Wait for exec to finish.
        deadline = time.monotonic() + 5
        while procinfo.argv(child.pid) != ["sleep", "5"] and time.monotonic() < deadline:
            time.sleep(0.001)
        info = procinfo.describe(child.pid)
        assert info is not None
        assert info["argv"] == ["sleep", "5"]
        assert info["exe"] == os.path.realpath("/usr/bin/sleep")
        assert info["ppid"] == os.getpid()
        assert info["uid"] == os.geteuid()
        assert info["start_time"] == identity.start_time(child.pid)
    finally:
        child.kill()
        child.wait()


def test_a_different_start_time_is_another_process() -> None:
    child = subprocess.Popen(["sleep", "5"])
    try:
        real = identity.start_time(child.pid)
        assert real is not None
        assert procinfo.describe(child.pid, expect_start=real + 1) is None
    finally:
        child.kill()
        child.wait()
    assert procinfo.describe(child.pid) is None


def test_tty_names() -> None:
    assert procinfo.tty_name(0) is None
    assert procinfo.tty_name((136 << 8) | 3) == "pts/3"
    assert procinfo.tty_name((4 << 8) | 1) == "tty1"


def test_owner_and_cgroup_from_a_pidfd_match_proc(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pidfd's answer (PIDFD_GET_INFO) and /proc's status and cgroup files agree."""
    child = subprocess.Popen(["sleep", "5"])
    try:
        deadline = time.monotonic() + 5
        while procinfo.argv(child.pid) != ["sleep", "5"] and time.monotonic() < deadline:
            time.sleep(0.001)
        procinfo._cgroup_paths.clear()
        by_pidfd = procinfo.describe(child.pid)
        assert by_pidfd is not None
        if procinfo._pidfd_info:  # Linux 6.13+: the cgroup id's path is remembered
            assert by_pidfd["cgroup"] in procinfo._cgroup_paths.values()
        monkeypatch.setattr(procinfo, "_pidfd_info", False)
        by_proc = procinfo.describe(child.pid)
        assert by_pidfd == by_proc
        assert by_proc is not None and by_proc["cgroup"] == procinfo.cgroup(child.pid)
        assert (by_proc["uid"], by_proc["gid"]) == procinfo.ids(child.pid)
    finally:
        child.kill()
        child.wait()
    assert procinfo.describe(child.pid) is None  # reaped: gone by either road


def test_a_kernel_thread_is_told_by_its_flags() -> None:
    kthreadd, me = procinfo.read_stat(2), procinfo.read_stat(os.getpid())
    assert kthreadd is not None and kthreadd.kernel_thread
    assert me is not None and not me.kernel_thread
