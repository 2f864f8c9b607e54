"""The executables' hash cache: keyed by file, invalidated by any change, bounded; large
files finished off the caller's thread."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kport.sources.hashes import Hasher
from tests.conftest import SLACK_S, mount_tmpfs
from tests.daemon.test_daemon import Collector, start_daemon, stop_daemon


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _rewrite_in_place(path: Path, data: bytes) -> None:
    """New content in the same inode (r+, write, truncate)."""
    with path.open("r+b") as f:
        f.write(data)
        f.truncate()


def test_a_running_process_is_hashed_through_its_own_exe(tmp_path: Path) -> None:
    program = tmp_path / "sleeper"
    shutil.copy("/bin/sleep", program)
    proc = subprocess.Popen([program, "30"])
    try:
        hasher = Hasher()
        first = hasher.of_process(proc.pid, str(program))
        assert first == {"exe_sha256": _sha(program)}
        assert hasher.of_process(proc.pid, str(program)) == first
        assert (hasher.hits, hasher.misses) == (1, 1)
        # its file renamed and its path given to another: it still runs the old one (its
        # exe now reads as the new name, as the process's lookups see it)
        os.rename(program, tmp_path / "old")
        shutil.copy("/bin/true", program)
        now = hasher.of_process(proc.pid, str(tmp_path / "old"))
        assert now == first
        # an exe that is not the process's any more (it exec'd again, say): by the path
        assert hasher.of_process(proc.pid, str(program)) == {
            "exe_sha256": _sha(program),
            "exe_sha256_by": "path",
        }
    finally:
        proc.kill()
        proc.wait()


def test_a_gone_process_is_hashed_by_its_path_and_says_so(tmp_path: Path) -> None:
    program = tmp_path / "t"
    shutil.copy("/bin/true", program)
    proc = subprocess.run([program], check=True)
    del proc
    hasher = Hasher()
    gone_pid = 2**22 + 1  # above any pid_max: no such process
    assert hasher.of_process(gone_pid, str(program)) == {
        "exe_sha256": _sha(program),
        "exe_sha256_by": "path",
    }
    missing = hasher.of_process(gone_pid, str(tmp_path / "nothing"))
    assert "exe_sha256" not in missing and "exe_sha256_error" in missing
    assert "exe_sha256" not in hasher.of_process(gone_pid, None)


def test_a_binary_rewritten_in_place_is_hashed_again(tmp_path: Path) -> None:
    program = tmp_path / "prog"
    program.write_bytes(b"A" * 4096)
    inode = program.stat().st_ino
    hasher = Hasher()
    old = hasher.of_process(2**22 + 1, str(program))["exe_sha256"]
    # the same size, other content, the mtime set back: ctime still changes
    st = program.stat()
    _rewrite_in_place(program, b"B" * 4096)
    os.utime(program, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert program.stat().st_ino == inode and program.stat().st_size == 4096
    new = hasher.of_process(2**22 + 1, str(program))["exe_sha256"]
    assert new == _sha(program) != old
    # a touch alone is hashed again too (the key changed), to the same hash
    os.utime(program)
    assert hasher.of_process(2**22 + 1, str(program))["exe_sha256"] == new
    assert hasher.misses == 3


def test_the_cache_is_bounded_and_counts_evictions(tmp_path: Path) -> None:
    hasher = Hasher(cache_entries=3)
    for i in range(5):
        path = tmp_path / f"f{i}"
        path.write_bytes(bytes([i]) * 100)
        hasher.of_process(2**22 + 1, str(path))
    assert hasher.status()["cache"]["entries"] == 3
    assert hasher.evictions == 2


def test_a_large_file_is_finished_by_the_worker_as_a_late_hash_event(tmp_path: Path) -> None:
    big = tmp_path / "big"
    big.write_bytes(os.urandom(3 << 20))
    got: list[dict[str, Any]] = []
    arrived = threading.Event()

    def late(events: list[dict[str, Any]]) -> None:
        got.extend(events)
        arrived.set()

    hasher = Hasher(inline_max_bytes=1 << 20, late=late)
    hasher.start()
    try:
        event = {"source": "proc", "kind": "exec", "seq": 41, "pid": 7, "exe": str(big)}
        fields = hasher.of_process(2**22 + 1, str(big), event)
        assert fields == {"exe_sha256_pending": True, "exe_sha256_by": "path"}
        assert arrived.wait(60)
        assert got == [
            {
                "source": "proc",
                "kind": "hash",
                "of_seq": 41,
                "pid": 7,
                "start_time": None,
                "exe": str(big),
                "ktime": got[0]["ktime"],
                "exe_sha256": _sha(big),
            }
        ]
        # cached now: the next lookup has it inline
        assert hasher.of_process(2**22 + 1, str(big))["exe_sha256"] == _sha(big)
    finally:
        hasher.stop()


def test_a_full_worker_queue_says_so(tmp_path: Path) -> None:
    hasher = Hasher(inline_max_bytes=10, queue_limit=1)  # not started: nothing is taken
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"f{i}")
        paths[-1].write_bytes(bytes([i]) * 100)
    assert hasher.of_process(2**22 + 1, str(paths[0]))["exe_sha256_pending"]
    refused = hasher.of_process(2**22 + 1, str(paths[1]))
    assert "exe_sha256" not in refused and "full" in refused["exe_sha256_error"]
    assert hasher.refused == 1


def test_hash_changed_compares_with_the_last_decision_about_that_path() -> None:
    hasher = Hasher()
    assert not hasher.decided("/usr/bin/x", "a" * 64)
    assert not hasher.decided("/usr/bin/x", "a" * 64)
    assert hasher.decided("/usr/bin/x", "b" * 64)
    assert not hasher.decided("/usr/bin/y", "b" * 64)


@pytest.mark.timeout(120)
@pytest.mark.skipif(os.geteuid() != 0, reason="kport serve needs root")
def test_a_binary_replaced_in_place_gets_its_new_hash_and_the_old_hash_rule_no_longer_matches(
    rundir: Path, tmp_path: Path
) -> None:
    """End to end: the exec event's hash is the file's, a file rule by that hash denies,
    and the same inode rewritten with another program is another program to both."""
    program = tmp_path / "reader"
    shutil.copy("/bin/cat", program)
    inode = program.stat().st_ino
    old = _sha(program)
    with mount_tmpfs(tmp_path / "watched") as mount:
        (mount / "secret.txt").write_text("s3cret\n")
        rules = tmp_path / "rules.toml"
        rules.write_text(
            f'[[rule]]\nname = "known reader"\naction = "deny"\npath = ["{mount}/**"]\n'
            f'sha256 = ["{old}"]\n'
        )
        config = tmp_path / "kport.toml"
        config.write_text(
            f'[file]\nenabled = true\npaths = ["{mount}"]\nrules = ["{rules}"]\n'
            'default_action = "allow"\n'
        )
        daemon = start_daemon(rundir, "--config", str(config))
        try:
            collector = Collector(rundir)
            try:

                def run() -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
                    done = subprocess.Popen(
                        [program, str(mount / "secret.txt")],
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                    )
                    out, err = done.communicate(timeout=SLACK_S)
                    deadline = time.monotonic() + SLACK_S
                    while done.pid not in collector.by_pid("exec"):
                        assert time.monotonic() < deadline, "no exec event"
                        time.sleep(0.02)
                    result = subprocess.CompletedProcess(done.args, done.returncode, out, err)
                    return result, collector.by_pid("exec")[done.pid]

                denied, exec_event = run()
                assert denied.returncode != 0 and "Operation not permitted" in denied.stderr
                assert exec_event["exe"] == str(program)
                assert exec_event["exe_sha256"] == old

                # the same inode, another program (nothing runs it now: no ETXTBSY)
                _rewrite_in_place(program, Path("/usr/bin/head").read_bytes())
                assert program.stat().st_ino == inode
                new = _sha(program)
                assert new != old

                allowed, exec_event = run()
                assert exec_event["exe_sha256"] == new
                assert allowed.returncode == 0 and allowed.stdout == "s3cret\n"
            finally:
                collector.close()
        finally:
            stop_daemon(daemon, rundir)
