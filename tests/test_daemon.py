"""`kport serve` with the real kernel: every exec and exit of 1,000 processes, a fork storm."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import kport
from kport import cli

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="the proc connector needs root"),
]
SH = os.path.realpath("/bin/sh")


class Collector:
    """A client of the proc port, collecting events in a thread."""

    def __init__(self, rundir: Path) -> None:
        self.conn = kport.connect("proc", runtime_dir=rundir)
        self.events: list[dict[str, Any]] = []
        self.lost = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for msg in self.conn:
            if msg.is_lost:
                self.lost += msg.data["count"]
            else:
                self.events.append(msg.data)
                if msg.data.get("kind") == "lost":
                    self.lost += msg.data.get("count") or 1

    def by_pid(self, kind: str) -> dict[int, dict[str, Any]]:
        return {e["pid"]: e for e in list(self.events) if e.get("kind") == kind}

    def close(self) -> None:
        self.conn.close()
        self.thread.join(5)


@pytest.fixture
def daemon(rundir: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", str(rundir / "state")),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not (rundir / "proc.sock").exists():
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "kport serve did not start"
        time.sleep(0.05)
    yield proc
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not (rundir / "proc.sock").exists(), "the socket must be removed on SIGTERM"


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_every_exec_and_exit_of_1000_processes(daemon: subprocess.Popen[str], rundir: Path) -> None:
    collector = Collector(rundir)
    try:
        time.sleep(0.2)
        spawned: dict[int, tuple[str, int, bool]] = {}

        def spawn(i: int) -> None:
            marker = f"kport-test-marker-{os.getpid()}-{i}"
            at_once = i % 4 == 0  # a quarter exit at once
            script = f"exit {i % 50}" if at_once else f"sleep 0.05; exit {i % 50}"
            child = subprocess.Popen([SH, "-c", script, marker])
            spawned[child.pid] = (marker, i % 50, at_once)
            child.wait()

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(spawn, range(1000)))
        wait_until(lambda: set(spawned) <= set(collector.by_pid("exit")))
        execs, exits = collector.by_pid("exec"), collector.by_pid("exit")
        assert collector.lost == 0
        with_argv = 0
        for pid, (marker, code, at_once) in spawned.items():
            ex = execs[pid]
            assert ex["ppid"] == os.getpid() and ex["uid"] == 0 and ex["user"] == "root"
            assert ex["start_time"] is not None
            if ex.get("gone"):
                assert at_once, f"a process that slept was reported gone: {ex}"
                assert ex["argv"] is None  # never someone else's argv
            else:
                assert len(ex["argv"]) == 4, ex
                assert ex["argv"] == [SH, "-c", ex["argv"][2], marker]
                assert ex["exe"] == SH
                with_argv += 1
            assert exits[pid]["code"] == code
            assert exits[pid]["start_time"] == ex["start_time"]
            assert exits[pid]["run_time_s"] >= 0
        assert with_argv >= 750  # every one that slept, and the quick ones caught in time
        seqs = [e["seq"] for e in collector.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        collector.close()


def test_fork_storm_does_not_crash_it(daemon: subprocess.Popen[str], rundir: Path) -> None:
    collector = Collector(rundir)
    try:
        time.sleep(0.2)
        pids: list[int] = []

        def storm(n: int) -> None:
            for _ in range(n):
                pid = os.posix_spawn("/bin/true", ["true"], os.environ)
                pids.append(pid)
                os.waitpid(pid, 0)

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(storm, [750] * 4))
        wait_until(lambda: collector.lost > 0 or set(pids) <= set(collector.by_pid("exit")))
        assert daemon.poll() is None
        with kport.connect("control", runtime_dir=rundir) as control:
            status = control.send({"op": "status"})
        assert status["sources"]["proc"]["events"] >= 3000 or status["sources"]["proc"]["lost"]
        if collector.lost == 0:
            assert set(pids) <= set(collector.by_pid("exec"))
    finally:
        collector.close()


def test_print_config_and_refusals(
    rundir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert cli.main(["serve", "--print-config"]) == 0
    assert "[proc]" in capsys.readouterr().out
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert cli.main(["serve", "--runtime-dir", str(rundir)]) == 1
    assert "must run as root" in capsys.readouterr().err


def test_tail_and_status_commands(daemon: subprocess.Popen[str], rundir: Path) -> None:
    marker = f"kport-tail-marker-{os.getpid()}"
    tail = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kport.cli",
            "tail",
            "proc",
            "--runtime-dir",
            str(rundir),
            "--json",
            "--filter",
            "kind=exec",
            "--filter",
            f"argv=*{marker}*",
            "--count",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: len(kport_status(rundir)["ports"]["proc"]["connections"]) == 1)
    subprocess.run([SH, "-c", "sleep 0.1", marker], check=True)
    out, err = tail.communicate(timeout=30)
    assert tail.returncode == 0, err
    event = json.loads(out)
    assert event["kind"] == "exec" and event["argv"][-1] == marker
    assert event["seq"] > 0 and event["ts"] > 0 and event["start_time"] > 0
    readable = subprocess.run(
        [sys.executable, "-m", "kport.cli", "status", "--runtime-dir", str(rundir)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "Sources" in readable.stdout and "proc" in readable.stdout


def kport_status(rundir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "status", "--json", "--runtime-dir", str(rundir)],
        capture_output=True,
        text=True,
        check=True,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status
