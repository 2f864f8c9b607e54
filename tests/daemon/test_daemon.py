"""`kport serve` with the real kernel: every exec and exit of 1,000 processes, a fork storm."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

import kport
from bench.proc import tiny_program
from kport import cli
from kport.cli.tail import format_line
from kport.journal.chunks import SOURCES, chunk_items
from tests.conftest import SLACK_S, mount_tmpfs, spawn_client

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


def start_daemon(rundir: Path, *args: str, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """`kport serve` with its sockets and its journal under ``rundir``, once it is serving
    (``args`` added, the whole run by ``prefix``)."""
    proc = subprocess.Popen(
        [
            *prefix,
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", str(rundir / "state"), *args),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while True:  # a socket left by a killed daemon exists, but nobody answers on it
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "kport serve did not start"
        try:
            kport.connect("proc", runtime_dir=rundir).close()
            return proc
        except kport.PortNotFound:
            time.sleep(0.05)


def stop_daemon(proc: subprocess.Popen[str], rundir: Path) -> str:
    """Stop it as systemd would; what it logged."""
    proc.terminate()
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert not (rundir / "proc.sock").exists(), "the socket must be removed on SIGTERM"
    return err


@pytest.fixture
def daemon(rundir: Path) -> Iterator[subprocess.Popen[str]]:
    proc = start_daemon(rundir)
    yield proc
    stop_daemon(proc, rundir)


def wait_until(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_hang_up_stops_it_as_cleanly_as_sigterm(rundir: Path) -> None:
    proc = start_daemon(rundir)
    proc.send_signal(signal.SIGHUP)  # the terminal it was started at closed
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "stopped" in err or "stopping" in err, err
    assert not list(rundir.glob("*.sock"))


def storm_of_1000(tiny: str) -> dict[int, tuple[list[str], str, int]]:
    """1,000 processes that exit at once, from 8 spawners: half `sh -c 'exit N' MARKER`,
    half a static program that exits at once. pid → (argv, exe, exit code)."""
    spawned: dict[int, tuple[list[str], str, int]] = {}

    def spawn(i: int) -> None:
        marker = f"kport-test-marker-{os.getpid()}-{i}"
        if i % 2:
            argv, exe, code = [SH, "-c", f"exit {i % 50}", marker], SH, i % 50
        else:
            argv, exe, code = [tiny, marker], tiny, 0
        child = subprocess.Popen(argv)
        spawned[child.pid] = (argv, exe, code)
        child.wait()

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(spawn, range(1000)))
    return spawned


def test_every_exec_and_exit_of_1000_processes(
    daemon: subprocess.Popen[str], rundir: Path, tmp_path: Path
) -> None:
    tiny = os.path.realpath(tiny_program(str(tmp_path)))
    collector = Collector(rundir)
    try:
        spawned = storm_of_1000(tiny)
        wait_until(lambda: set(spawned) <= set(collector.by_pid("exit")))
        execs, exits = collector.by_pid("exec"), collector.by_pid("exit")
        assert collector.lost == 0
        whole = 0
        for pid, (argv, exe, code) in spawned.items():
            ex = execs[pid]
            assert ex["ppid"] == os.getpid() and ex["uid"] == 0 and ex["user"] == "root"
            assert ex["start_time"] is not None
            assert (ex["argv"], ex["exe"], ex.get("gone")) == (argv, exe, None), ex
            whole += 1
            assert exits[pid]["code"] == code
            assert exits[pid]["start_time"] == ex["start_time"]
            # the exit names the process that exited, by its own program
            assert (exits[pid]["argv"], exits[pid]["exe"]) == (argv, exe)
            assert exits[pid]["run_time_s"] >= 0
        assert whole == 1000
        seqs = [e["seq"] for e in collector.events]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        collector.close()
    assert kport_status(rundir)["sources"]["proc"]["backend"] == "bpf"


def test_the_connector_backend_reports_every_exec_and_never_a_wrong_argv(
    rundir: Path, tmp_path: Path
) -> None:
    # The proc connector says only "pid N exec'd": a process already gone when /proc is
    # read is reported gone, without its argv, but never with another's.
    with configured(rundir, tmp_path, '[proc]\nbackend = "connector"\n') as collector:
        spawned = storm_of_1000(os.path.realpath(tiny_program(str(tmp_path))))
        wait_until(lambda: set(spawned) <= set(collector.by_pid("exit")))
        execs, exits = collector.by_pid("exec"), collector.by_pid("exit")
        assert collector.lost == 0
        for pid, (argv, _exe, code) in spawned.items():
            assert execs[pid]["argv"] in (argv, None), execs[pid]
            assert execs[pid]["argv"] is not None or execs[pid]["gone"] is True
            assert exits[pid]["code"] == code
        assert kport_status(rundir)["sources"]["proc"]["backend"] == "connector"


@contextlib.contextmanager
def configured(rundir: Path, tmp_path: Path, toml: str) -> Iterator[Collector]:
    """A daemon with this configuration, and a client of its proc port."""
    config = tmp_path / "kport.toml"
    config.write_text(toml)
    proc = start_daemon(rundir, "--config", str(config))
    try:
        collector = Collector(rundir)
        try:
            yield collector
        finally:
            collector.close()
    finally:
        stop_daemon(proc, rundir)


#: what the eBPF backend needs (CAP_SYS_ADMIN would do for both), dropped from a daemon
NO_BPF = (
    *("setpriv", "--bounding-set", "-bpf,-perfmon,-sys_admin"),
    *("--inh-caps", "-bpf,-perfmon,-sys_admin"),
)


def test_auto_falls_back_to_the_connector_where_ebpf_is_refused_and_says_so(
    rundir: Path,
) -> None:
    proc = start_daemon(rundir, prefix=NO_BPF)
    try:
        status = kport_status(rundir)["sources"]["proc"]
        assert status["backend"] == "connector"
        assert "CAP_BPF" in status["fallback_reason"]
        collector = Collector(rundir)
        try:
            child = subprocess.Popen([SH, "-c", "read x", "kport-fallback"], stdin=subprocess.PIPE)
            wait_until(lambda: child.pid in collector.by_pid("exec"))
            assert collector.by_pid("exec")[child.pid]["argv"][-1] == "kport-fallback"
            child.communicate(b"")
        finally:
            collector.close()
        shown = subprocess.run(
            [sys.executable, "-m", "kport.cli", "status", "--runtime-dir", str(rundir)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "processes: the proc connector (eBPF cannot load:" in " ".join(shown.split())
    finally:
        err = stop_daemon(proc, rundir)
    assert "eBPF cannot load" in err and "using the proc connector" in err


def test_backend_bpf_where_ebpf_is_refused_is_one_line_and_a_non_zero_exit(
    rundir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "kport.toml"
    config.write_text('[proc]\nbackend = "bpf"\n')
    done = subprocess.run(
        [
            *NO_BPF,
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", str(rundir / "state"), "--config", str(config)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    said = [line for line in done.stderr.splitlines() if line.startswith("kport serve:")]
    assert len(said) == 1, done.stderr
    assert "proc.backend = bpf cannot load" in said[0] and "CAP_BPF" in said[0]
    assert "Traceback" not in done.stderr
    assert not (rundir / "proc.sock").exists()


def test_the_daemon_serves_processes_from_inside_a_network_namespace(rundir: Path) -> None:
    # The proc connector listens only in the initial network namespace; eBPF anywhere.
    name = f"kport-proc-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        proc = start_daemon(rundir, prefix=("ip", "netns", "exec", name))
        try:
            assert kport_status(rundir)["sources"]["proc"]["backend"] == "bpf"
            collector = Collector(rundir)
            try:
                child = subprocess.run(["/bin/true", "kport-in-netns"], check=True)
                del child
                wait_until(
                    lambda: any(
                        e["argv"] == ["/bin/true", "kport-in-netns"]
                        for e in collector.by_pid("exec").values()
                    )
                )
            finally:
                collector.close()
        finally:
            stop_daemon(proc, rundir)
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


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
    assert "journal" in readable.stdout and "durable" in readable.stdout


def kport_status(rundir: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "status", "--json", "--runtime-dir", str(rundir)],
        capture_output=True,
        text=True,
        check=True,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status


# --- the journal -----------------------------------------------------------------------


class Storm:
    """Processes spawned back to back in a thread until stopped: a steady stream of events."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.spawned = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stopping.is_set():
            pid = os.posix_spawn("/bin/true", ["true"], os.environ)
            os.waitpid(pid, 0)
            self.spawned += 1

    def __enter__(self) -> Storm:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(10)


def journal_seqs(rundir: Path, sources: tuple[str, ...] = (), upto: int = 2**62) -> list[int]:
    """The seqs the journal file holds now (of ``sources``, if given), read as a reader would."""
    codes = {SOURCES.index(name) for name in sources}
    db = sqlite3.connect(f"file:{rundir / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        chunks = db.execute("SELECT seqs, offsets, sources, data FROM chunks ORDER BY first")
        return [
            seq
            for chunk in chunks
            for seq, code, _ in chunk_items(*chunk)
            if seq <= upto and (not codes or code in codes)
        ]
    finally:
        db.close()


def read_from(rundir: Path, since: int, count: int) -> list[int]:
    """Connect with ``since``, take ``count`` notifications (a lost one fails), disconnect."""
    seqs: list[int] = []
    with kport.connect("proc", runtime_dir=rundir, since=since) as conn:
        for msg in conn:
            assert not msg.is_lost, msg
            seqs.append(msg.seq)
            if len(seqs) >= count:
                break
    return seqs


def test_replay_has_no_gap_and_no_repeat_across_reconnects_and_a_restart(rundir: Path) -> None:
    proc = start_daemon(rundir)
    got: list[int] = []
    try:
        with Storm():
            got += read_from(rundir, 0, 400)
            time.sleep(0.5)  # events go on while this client is away
            got += read_from(rundir, got[-1], 400)
            time.sleep(0.3)
            stop_daemon(proc, rundir)  # a clean restart in the middle of the storm
            proc = start_daemon(rundir)
            time.sleep(0.3)
            got += read_from(rundir, got[-1], 400)
            time.sleep(0.3)
        # The storm is over: catch up to the very end of the journal.
        end = kport_status(rundir)["seq"]
        got += read_from(rundir, got[-1], end - got[-1]) if end > got[-1] else []
    finally:
        stop_daemon(proc, rundir)
    assert got == sorted(set(got)), "a repeat or a reordering"
    expected = journal_seqs(rundir, ("proc", "kport"), upto=got[-1])
    assert got == expected
    assert len(got) > 1500


def test_sigkill_in_a_storm_keeps_what_was_durable(rundir: Path) -> None:
    proc = start_daemon(rundir)
    try:
        with Storm():
            wait_until(lambda: len(journal_seqs(rundir)) >= 1500)
            durable = journal_seqs(rundir)
            proc.kill()
            proc.wait(10)
        assert proc.stderr is not None
        proc.stderr.close()
        db = sqlite3.connect(rundir / "state" / "journal.db")
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        db.close()
        after_kill = journal_seqs(rundir)
        assert after_kill[: len(durable)] == durable, "a durable event was lost"
        last_durable = after_kill[-1]
        proc = start_daemon(rundir)
        marker = f"kport-crash-marker-{os.getpid()}"
        subprocess.run([SH, "-c", "sleep 0.05", marker], check=True)
        with kport.connect("proc", runtime_dir=rundir, since=last_durable) as conn:
            # Not "N lost": the seqs reserved ahead were mostly never used. One event says
            # what is known: the unwritten events are lost, at most that range.
            first = conn.get_message(timeout=10)
            assert not first.is_lost and first.seq == last_durable + 1, first
            said = first.data
            assert (said["source"], said["kind"], said["count"]) == ("kport", "lost", None)
            assert said["first_seq"] == last_durable + 1 and said["last_seq"] > last_durable
            assert said["at_most"] == said["last_seq"] - said["first_seq"] + 1
            assert "did not stop cleanly" in said["reason"]
            assert "LOST     up to" in format_line(said)
            skipped_to = said["last_seq"]
            for msg in conn:
                assert not msg.is_lost and msg.seq > skipped_to
                if msg.data.get("kind") == "exec" and marker in (msg.data.get("argv") or []):
                    break
        assert journal_seqs(rundir)[: len(after_kill)] == after_kill
    finally:
        stop_daemon(proc, rundir)


def test_query_command(daemon: subprocess.Popen[str], rundir: Path) -> None:
    marker = f"kport-query-marker-{os.getpid()}"
    subprocess.run([SH, "-c", "sleep 0.05", marker], check=True)

    def query(*args: str) -> str:
        result = subprocess.run(
            [sys.executable, "-m", "kport.cli", "query", "--runtime-dir", str(rundir), *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def found() -> list[dict[str, Any]]:
        out = query("--text", marker, "--kind", "exec", "--json", "--since", "5m")
        events = [json.loads(line) for line in out.splitlines()]
        # `kport query --text MARKER` itself matches too: keep the marked shell alone.
        return [e for e in events if (e.get("argv") or [None])[-1] == marker]

    wait_until(lambda: bool(found()))
    (event,) = found()
    assert event["argv"][-1] == marker and event["user"] == "root"
    lines = query("--pid", str(event["pid"]), "--user", "root", "--exe", "/*")
    assert marker in lines and str(event["seq"]) in lines
    assert kport.fetch(event["seq"], event["seq"], runtime_dir=rundir) == [event]
    bad = subprocess.run(
        [sys.executable, "-m", "kport.cli", "query", "--since", "yesterday-ish"],
        check=False,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "is not a duration ago" in bad.stderr


def test_the_journal_port_gives_the_process_tree(
    daemon: subprocess.Popen[str], rundir: Path
) -> None:
    with kport.connect("journal", runtime_dir=rundir) as conn:
        tree = {entry["pid"]: entry for entry in conn.send({"op": "processes"}, timeout=10)}
        with pytest.raises(kport.KportError, match="known ops: query, processes"):
            conn.send({"op": "tree"}, timeout=10)
    own = tree[daemon.pid]
    assert own["ppid"] == os.getpid() and own["user"] == "root"
    assert own["argv"][:4] == [sys.executable, "-m", "kport.cli", "serve"]


def test_durability_off_and_back_on_reaches_clients(rundir: Path, tmp_path: Path) -> None:
    with mount_tmpfs(tmp_path / "small", "4m") as small:
        config = tmp_path / "kport.toml"
        config.write_text(f'[journal]\npath = "{small}/journal.db"\n')
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
                *("--config", str(config)),
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            wait_until((rundir / "proc.sock").exists)
            with kport.connect("proc", runtime_dir=rundir) as conn:
                filler = small / "filler"
                with contextlib.suppress(OSError), open(filler, "wb") as f:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                with Storm():
                    off = next_journal_event(conn)
                assert off["durable"] is False and "full" in off["reason"], off
                assert kport_status(rundir)["journal"]["durable"] is False
                filler.unlink()
                on = next_journal_event(conn)
                assert on["durable"] is True and on["seq"] > off["seq"]
                assert kport_status(rundir)["journal"]["durable"] is True
        finally:
            proc.terminate()
            _, err = proc.communicate(timeout=20)
    assert "durability is off" in err and "durability is back on" in err


def next_journal_event(conn: kport.Connection) -> dict[str, Any]:
    deadline = time.monotonic() + 30
    while True:
        msg = conn.get_message(timeout=max(deadline - time.monotonic(), 0.01))
        if not msg.is_lost and msg.data.get("source") == "kport":
            data: dict[str, Any] = msg.data
            return data


def test_an_unusable_journal_leaves_delivery_running(rundir: Path) -> None:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", "/proc/kport-cannot-be-here"),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until((rundir / "proc.sock").exists)
        status = kport_status(rundir)["journal"]
        assert status["durable"] is False and "/proc/kport-cannot-be-here" in status["error"]
        marker = f"kport-nojournal-marker-{os.getpid()}"
        with kport.connect("proc", runtime_dir=rundir) as conn:
            subprocess.run([SH, "-c", "sleep 0.05", marker], check=True)
            while True:
                msg = conn.get_message(timeout=10)
                if marker in (msg.data.get("argv") or []):
                    break
        with pytest.raises(kport.NoHistory):
            kport.connect("proc", runtime_dir=rundir, since=0)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "serving without history" in err


def test_the_daemon_hosts_named_objects(daemon: subprocess.Popen[str], rundir: Path) -> None:
    ev = kport.Event.create_named("kport-test/ready", manual_reset=True, runtime_dir=rundir)
    try:
        listed = subprocess.run(
            [sys.executable, "-m", "kport.cli", "objects", "--json", "--runtime-dir", str(rundir)],
            capture_output=True,
            text=True,
            check=True,
        )
        (entry,) = json.loads(listed.stdout)
        assert entry["name"] == "kport-test/ready" and entry["references"] == 1
        assert entry["creator_pid"] == os.getpid() and not entry["set"]
        ev.set()
        assert kport_status(rundir)["objects"] == 1
    finally:
        ev.close()
    wait_until(lambda: kport_status(rundir)["objects"] == 0)


# --- file access -----------------------------------------------------------------------


@contextlib.contextmanager
def watched_mount(tmp_path: Path) -> Iterator[Path]:
    with mount_tmpfs(tmp_path / "watched") as point:
        (point / "data.txt").write_text("data\n")
        yield point


@contextlib.contextmanager
def file_daemon(rundir: Path, mount: Path, *extra: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", str(rundir / "state"), "--watch", str(mount), *extra),
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: (rundir / "control.sock").exists() or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        wait_until(lambda: kport_status(rundir)["sources"]["file"]["watching"])  # marks in place
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=20)


def cat(path: Path, timeout: float = 30) -> tuple[int, float]:
    """Open and read ``path`` from another process: (exit status, seconds it took)."""
    t0 = time.monotonic()
    result = subprocess.run(["cat", str(path)], capture_output=True, timeout=timeout, check=False)
    return result.returncode, time.monotonic() - t0


def decider(rundir: Path, code: str) -> subprocess.Popen[str]:
    """A decision client running ``code`` with ``conn`` connected to file-decide."""
    return spawn_client(
        "import sys, time, kport\n"
        "conn = kport.connect('file-decide', runtime_dir=sys.argv[1])\n"
        "print('connected', flush=True)\n" + code,
        str(rundir),
    )


def wait_connected(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "connected", proc.stderr.read() if proc.stderr else ""


def test_no_decider_means_the_default_at_once(rundir: Path, tmp_path: Path) -> None:
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--default-verdict", "deny", "--decision-deadline", "5"),
    ):
        status, took = cat(mount / "data.txt")
        assert status != 0 and took < 2  # denied, without waiting for the deadline


def test_rules_are_listed_and_edited_over_the_decision_port(rundir: Path, tmp_path: Path) -> None:
    with watched_mount(tmp_path) as mount, file_daemon(rundir, mount):
        with kport.connect("file-decide", runtime_dir=rundir) as conn:
            listing = conn.send({"op": "rules"})
            assert listing["domain"] == "file" and listing["editable"]["rules"] == []
            assert listing["editable"]["path"] == str(rundir / "state" / "file-remembered.toml")
            assert listing["others"] == [] and listing["default"] == "ask"  # --watch
            with pytest.raises(kport.BadRequest, match="rule 1: action must be one of"):
                conn.send({"op": "save", "rules": [{"action": "no"}], "version": "x"})
            deny = {"action": "deny", "path": str(mount / "data.txt"), "name": "from an editor"}
            saved = conn.send(
                {"op": "save", "rules": [deny], "version": listing["editable"]["version"]}
            )
            assert saved["editable"]["rules"] == [deny]
            status, _ = cat(mount / "data.txt")
            assert status != 0  # applied at once: denied by the new rule, nobody asked
            with pytest.raises(kport.BadRequest, match="changed since it was read"):
                conn.send({"op": "save", "rules": [], "version": listing["editable"]["version"]})
            with pytest.raises(kport.BadRequest, match="known ops: rules, save"):
                conn.send({"op": "drop"})


def test_deciders_policies_and_a_decider_that_opens_a_watched_file(
    rundir: Path, tmp_path: Path
) -> None:
    policy = tmp_path / "policy.py"
    with watched_mount(tmp_path) as mount:
        policy.write_text(
            "def decide(request):\n"
            f"    open({str(mount / 'data.txt')!r}).read()  # watched too: must not deadlock\n"
            "    return 'deny' if request['path'].endswith('secret') else 'allow'\n"
        )
        (mount / "secret").write_text("x\n")
        with file_daemon(rundir, mount, "--default-verdict", "deny", "--decision-deadline", "10"):
            client = subprocess.Popen(
                [
                    *(sys.executable, "-m", "kport.cli", "decide", "--policy", str(policy)),
                    *("--runtime-dir", str(rundir)),
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                wait_until(
                    lambda: len(kport_status(rundir)["ports"]["file-decide"]["connections"]) == 1
                )
                assert cat(mount / "data.txt")[0] == 0
                status, took = cat(mount / "secret")
                assert status != 0 and took < SLACK_S  # denied, not left to the deadline

                def verdicts() -> set[tuple[str, str]]:  # journaled within a commit interval
                    events = kport.history(sources=["file"], runtime_dir=rundir, limit=100)
                    return {(e["path"], e["verdict"]) for e in events if "verdict" in e}

                wait_until(lambda: (str(mount / "secret"), "deny") in verdicts())
                assert (str(mount / "data.txt"), "allow") in verdicts()
            finally:
                client.terminate()
                client.communicate(timeout=10)


def test_a_decider_stays_trusted_while_any_of_its_connections_is_open(
    rundir: Path, tmp_path: Path
) -> None:
    # A decision client that opens a short second connection (the UI does, for rules) and
    # closes it is still connected: its own opens must still be let through, not asked
    # of itself (it would wait on itself until the deadline, and be denied).
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--default-verdict", "deny", "--decision-deadline", "3"),
    ):
        client = decider(
            rundir,
            "second = kport.connect('file-decide', runtime_dir=sys.argv[1])\n"
            "second.close()\n"
            "control = kport.connect('control', runtime_dir=sys.argv[1])\n"
            "status = lambda: control.send({'op': 'status'})['ports']['file-decide']\n"
            "while len(status()['connections']) > 1:\n"
            "    time.sleep(0.02)  # until the daemon has seen it go\n"
            f"try:\n    open({str(mount / 'data.txt')!r}).read()\n    print('read', flush=True)\n"
            "except OSError as err:\n    print('refused', err, flush=True)\n"
            "time.sleep(60)\n",
        )
        try:
            wait_connected(client)
            assert client.stdout is not None
            assert client.stdout.readline().strip() == "read"
            assert kport_status(rundir)["sources"]["file"]["asked"] == 0
        finally:
            client.kill()
            client.communicate(timeout=10)


def test_a_stuck_decider_releases_the_opener_at_the_deadline(rundir: Path, tmp_path: Path) -> None:
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--default-verdict", "allow", "--decision-deadline", "1"),
    ):
        stuck = decider(rundir, "time.sleep(60)\n")  # connected, never answers
        try:
            wait_connected(stuck)
            status, took = cat(mount / "data.txt")
            assert status == 0 and 0.8 < took < 5  # the default, at the deadline
        finally:
            stuck.kill()
            stuck.communicate(timeout=10)


def test_a_decider_killed_mid_request_means_the_default_at_once(
    rundir: Path, tmp_path: Path
) -> None:
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--default-verdict", "allow", "--decision-deadline", "30"),
    ):
        victim = decider(
            rundir,
            "msg = conn.get_message(timeout=30)\nprint('asked', flush=True)\ntime.sleep(60)\n",
        )
        try:
            wait_connected(victim)
            opener = subprocess.Popen(["cat", str(mount / "data.txt")], stdout=subprocess.PIPE)
            assert victim.stdout is not None
            assert victim.stdout.readline().strip() == "asked"
            assert opener.poll() is None  # waiting for the answer
            t0 = time.monotonic()
            victim.kill()
            out, _ = opener.communicate(timeout=10)
            assert out == b"data\n" and time.monotonic() - t0 < SLACK_S  # not the deadline
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.communicate(timeout=10)


def test_a_killed_daemon_leaves_no_opener_hanging(rundir: Path, tmp_path: Path) -> None:
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(
            rundir, mount, "--default-verdict", "allow", "--decision-deadline", "60"
        ) as daemon_proc,
    ):
        stuck = decider(rundir, "time.sleep(60)\n")
        try:
            wait_connected(stuck)
            openers = [
                subprocess.Popen(["cat", str(mount / "data.txt")], stdout=subprocess.PIPE)
                for _ in range(5)
            ]
            time.sleep(0.5)
            assert all(o.poll() is None for o in openers)  # all waiting on the stuck decider
            t0 = time.monotonic()
            daemon_proc.kill()
            for opener in openers:
                out, _ = opener.communicate(timeout=10)
                assert out == b"data\n"
            assert time.monotonic() - t0 < SLACK_S  # not the 60 s deadline
        finally:
            stuck.kill()
            stuck.communicate(timeout=10)


def next_file_event(conn: kport.Connection, match: Any, timeout: float = 10) -> dict[str, Any]:
    """The first event on ``conn`` that ``match`` accepts (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, "no matching event in time"
        msg = conn.get_message(timeout=left)
        if not msg.is_lost and match(msg.data):
            return dict(msg.data)


def test_watches_change_while_running_and_notifications_reach_port_and_journal(
    rundir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    with watched_mount(tmp_path) as mount, file_daemon(rundir, mount):
        conn = kport.connect("file", runtime_dir=str(rundir))
        try:
            assert cli.main(["watch", str(other), "--runtime-dir", str(rundir)]) == 0
            assert f"path       {other}" in capsys.readouterr().out
            subprocess.run(["touch", str(other / "x")], check=True)
            event = next_file_event(conn, lambda e: e["kind"] == "create")
            assert event["path"] == str(other / "x") and event["exe"].endswith("touch")
            assert cli.main(["unwatch", str(other), "--runtime-dir", str(rundir)]) == 0
            subprocess.run(["touch", str(other / "y"), str(mount / "marker")], check=True)
            event = next_file_event(conn, lambda e: e["kind"] == "create")
            assert event["path"] == str(mount / "marker")  # nothing from other/ any more
            # Bad requests are refused by name, and the daemon goes on.
            assert cli.main(["watch", str(tmp_path / "nowhere"), "--runtime-dir", str(rundir)])
            assert "nowhere does not exist" in capsys.readouterr().err
            with kport.connect("control", runtime_dir=str(rundir)) as control:
                with pytest.raises(kport.BadRequest, match="absolute path"):
                    control.send({"op": "watch", "path": "relative"}, timeout=5)
                with pytest.raises(kport.BadRequest, match="is not watched"):
                    control.send({"op": "unwatch", "path": str(other)}, timeout=5)
            status = kport_status(rundir)["sources"]["file"]
            assert status["paths"] == [str(mount)]
            capsys.readouterr()
            assert cli.main(["status", "--runtime-dir", str(rundir)]) == 0
            shown = capsys.readouterr().out
            assert f"watching {mount} (path)" in shown and "file access:" in shown
        finally:
            conn.close()
        wait_until(
            lambda: any(
                e["path"] == str(other / "x")
                for e in kport.history(sources=["file"], runtime_dir=str(rundir), limit=1000)
                if e["kind"] == "create"
            )
        )


def test_a_short_lived_process_is_named_by_its_own_program(rundir: Path, tmp_path: Path) -> None:
    # Each `touch` is gone before its create event is read: it is named from the proc
    # source's table, which the eBPF backend fills at the exec itself, in the kernel.
    touches = 300
    with watched_mount(tmp_path) as mount, file_daemon(rundir, mount):
        conn = kport.connect("file", runtime_dir=str(rundir))
        try:
            for i in range(touches):
                subprocess.run(["touch", str(mount / f"f{i}")], check=True)
            named: Counter[str | None] = Counter()
            for _ in range(touches):
                event = next_file_event(conn, lambda e: e["kind"] == "create")
                named[event["exe"]] += 1
        finally:
            conn.close()
    assert named == {os.path.realpath("/usr/bin/touch"): touches}


def test_a_full_fanotify_queue_is_a_lost_event(rundir: Path, tmp_path: Path) -> None:
    limit_file = Path("/proc/sys/fs/fanotify/max_queued_events")
    limit = limit_file.read_text()
    with watched_mount(tmp_path) as mount:
        files = [mount / f"f{i}" for i in range(200)]
        for path in files:
            path.write_text("x")
        serving = contextlib.ExitStack()
        limit_file.write_text("64")  # read when a group is made: only the daemon's get it
        try:
            daemon = serving.enter_context(file_daemon(rundir, mount))
        finally:
            limit_file.write_text(limit)
        with serving:
            conn = kport.connect("file", runtime_dir=str(rundir))
            daemon.send_signal(signal.SIGSTOP)  # it reads nothing: the kernel's queue fills
            try:
                for path in files:
                    path.chmod(0o600)  # attrib events, and no permission event to wait on
            finally:
                daemon.send_signal(signal.SIGCONT)
            lost = next_file_event(conn, lambda e: e["kind"] == "lost")
            assert "overflowed" in lost["reason"]
            assert kport_status(rundir)["sources"]["file"]["lost"] >= 1
            conn.close()
            wait_until(  # and the journal keeps it
                lambda: any(
                    e["kind"] == "lost"
                    for e in kport.history(sources=["file"], runtime_dir=str(rundir), limit=1000)
                )
            )


def test_kport_decide_asks_at_the_terminal(rundir: Path, tmp_path: Path) -> None:
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--default-verdict", "allow", "--decision-deadline", "20"),
    ):
        (mount / "other.txt").write_text("other\n")
        person = subprocess.Popen(
            [sys.executable, "-m", "kport.cli", "decide", "--runtime-dir", str(rundir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert person.stdin is not None and person.stdout is not None
        try:
            banner = person.stdout.readline()
            assert "answering file-decide" in banner and "net-decide" not in banner
            wait_until(lambda: len(kport_status(rundir)["ports"]["file-decide"]["connections"]))
            with ThreadPoolExecutor(2) as pool:
                denied = pool.submit(cat, mount / "data.txt")
                shown = person.stdout.readline()
                assert shown.startswith("open_perm") and str(mount / "data.txt") in shown
                assert "cat" in person.stdout.readline()  # by pid ... (user): the command
                person.stdin.write("d\n")
                person.stdin.flush()
                assert denied.result(timeout=10)[0] != 0
                allowed = pool.submit(cat, mount / "other.txt")
                while str(mount / "other.txt") not in person.stdout.readline():
                    pass
                person.stdin.write("A\n")  # allow, and remember it
                person.stdin.flush()
                assert allowed.result(timeout=10)[0] == 0
            remembered = rundir / "state" / "file-remembered.toml"
            wait_until(remembered.exists)
            assert str(mount / "other.txt") in remembered.read_text()
            assert '"allow"' in remembered.read_text()
        finally:
            person.kill()
            person.communicate(timeout=10)


def test_daemon_side_filters_send_only_what_passes_them(rundir: Path, tmp_path: Path) -> None:
    toml = '[proc]\nkinds = ["exec"]\nexe = ["/usr/bin/tr*"]\n'
    with configured(rundir, tmp_path, toml) as collector:
        subprocess.run(["/bin/echo", "kport-filtered-out"], check=True, capture_output=True)
        subprocess.run(["/bin/true", "kport-filtered-in"], check=True)
        wait_until(lambda: any(e["argv"][-1] == "kport-filtered-in" for e in collector.events))
        assert kport_status(rundir)["filtered"] > 0
    assert {(e["kind"], e["exe"]) for e in collector.events} == {("exec", "/usr/bin/true")}
