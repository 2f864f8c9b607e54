"""The file source with the real kernel on a private tmpfs: rules, asks, trust, release."""

from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kport.rules import RuleSet
from kport.sources import file as file_source
from kport.sources.ask import Done
from kport.sources.file import FileSource, Watch
from kport.sources.proc import ProcessTable
from tests.conftest import SLACK_S, mount_tmpfs, mounted

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
]
#: asks in flight a source is given (the daemon gives its decisions module's bound)
ASKS = 16


@pytest.fixture
def mount(tmp_path: Path) -> Iterator[Path]:
    with mount_tmpfs(tmp_path / "watched") as point:
        (point / "plain.txt").write_text("hello\n")
        (point / "secret.txt").write_text("s3cret\n")
        yield point


def cat(path: Path, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    """Open ``path`` from another process (this one is the source's own: always allowed)."""
    return subprocess.run(
        ["cat", str(path)], capture_output=True, text=True, timeout=timeout, check=False
    )


class Collected:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def __call__(self, batch: list[dict[str, Any]]) -> None:
        with self.lock:
            self.events += batch

    def verdicts(self, path: Path) -> list[str]:
        with self.lock:
            return [e["verdict"] for e in self.events if "verdict" in e and e["path"] == str(path)]


def rules_file(tmp_path: Path, text: str) -> RuleSet:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    return RuleSet([path], kinds=("open_perm", "open_exec_perm", "access_perm"))


def test_rules_decide_and_the_verdict_comes_with_the_event(tmp_path: Path, mount: Path) -> None:
    rules = rules_file(
        tmp_path,
        f'default = "allow"\n[[rule]]\nname = "no secrets"\naction = "deny"\n'
        f'path = "{mount}/secret*"\n'
        f'[[rule]]\nname = "plain, on the record"\naction = "log"\npath = "{mount}/plain*"\n',
    )
    (mount / "quiet.txt").write_text("q\n")
    got = Collected()
    source = FileSource(
        got, paths=[str(mount)], rules=rules, ask=None, max_asks=ASKS, default_verdict=True
    )
    source.start()
    try:
        assert cat(mount / "plain.txt").stdout == "hello\n"
        denied = cat(mount / "secret.txt")
        assert denied.returncode != 0 and "Operation not permitted" in denied.stderr  # EPERM
        # Python's open() in another process raises PermissionError.
        opener = subprocess.run(
            ["python3", "-c", f"open({str(mount / 'secret.txt')!r})"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "PermissionError" in opener.stderr
        deadline = time.monotonic() + 5
        while "deny" not in got.verdicts(mount / "secret.txt") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "deny" in got.verdicts(mount / "secret.txt")
        assert "allow" in got.verdicts(mount / "plain.txt")  # "log": allowed, and reported
        assert cat(mount / "quiet.txt").stdout == "q\n"  # "allow" (the default): silent
        time.sleep(0.2)
        assert got.verdicts(mount / "quiet.txt") == []
        event = next(e for e in got.events if e.get("verdict") == "deny")
        assert event["rule"] == "no secrets" and event["exe"] and event["start_time"]
        # The same process asking again is answered from the cache.
        hits = source.rules.hits
        twice = subprocess.run(
            [
                "python3",
                "-c",
                "import sys\nfor _ in range(2):\n    try:\n        open(sys.argv[1])\n"
                "    except PermissionError:\n        print('denied')",
                str(mount / "secret.txt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert twice.stdout.split() == ["denied", "denied"]
        assert source.rules.hits > hits
    finally:
        source.stop()


def test_each_question_is_decided_for_its_own_process_path_and_kind(
    tmp_path: Path, mount: Path
) -> None:
    """Questions in a row, from one process and from others, for different paths: each is
    decided on its own process and path, not on the one before it."""
    rules = rules_file(
        tmp_path,
        f'default = "allow"\n[[rule]]\naction = "deny"\npath = "{mount}/secret*"\n'
        f'[[rule]]\naction = "deny"\nexe = "/usr/bin/cat"\npath = "{mount}/plain*"\n',
    )
    (mount / "other.txt").write_text("o\n")
    source = FileSource(
        Collected(), paths=[str(mount)], rules=rules, ask=None, max_asks=ASKS, default_verdict=True
    )
    source.start()
    script = (
        "import sys\nfor p in sys.argv[1:]:\n    try:\n        open(p).close()\n"
        "        print('allowed')\n    except PermissionError:\n        print('denied')"
    )
    files = [str(mount / n) for n in ("plain.txt", "secret.txt", "other.txt", "plain.txt")]
    try:
        for _ in range(2):
            run = subprocess.run(
                ["python3", "-c", script, *files], capture_output=True, text=True, check=False
            )
            assert run.stdout.split() == ["allowed", "denied", "allowed", "allowed"]
            assert cat(mount / "plain.txt").returncode != 0  # cat may not read it
            assert cat(mount / "other.txt").stdout == "o\n"
    finally:
        source.stop()


def test_asks_are_answered_by_the_callback_or_by_the_default(tmp_path: Path, mount: Path) -> None:
    rules = rules_file(tmp_path, 'default = "ask"\n')
    asked: list[dict[str, Any]] = []

    def ask(request: dict[str, Any], done: Done) -> None:
        asked.append(request)
        verdict = "deny" if request["path"].endswith("secret.txt") else "allow"
        threading.Timer(0.05, done, (verdict, "decided")).start()  # from another thread

    got = Collected()
    source = FileSource(
        got, paths=[str(mount)], rules=rules, ask=ask, max_asks=ASKS, default_verdict=True
    )
    source.start()
    try:
        assert cat(mount / "plain.txt").returncode == 0
        assert cat(mount / "secret.txt").returncode != 0
        assert {a["path"] for a in asked} >= {str(mount / "plain.txt"), str(mount / "secret.txt")}
        assert all(a["pid"] and a["exe"] for a in asked)
    finally:
        source.stop()
    # No decision callback at all: the default verdict, at once.
    source = FileSource(
        got, paths=[str(mount)], rules=rules, ask=None, max_asks=ASKS, default_verdict=False
    )
    source.start()
    try:
        t0 = time.monotonic()
        assert cat(mount / "plain.txt").returncode != 0
        assert time.monotonic() - t0 < SLACK_S
        assert source.asking.defaulted >= 1
    finally:
        source.stop()


def test_trusted_processes_are_allowed_at_once(tmp_path: Path, mount: Path) -> None:
    rules = rules_file(tmp_path, 'default = "deny"\n')
    trusted: set[int] = set()
    source = FileSource(
        Collected(),
        paths=[str(mount)],
        rules=rules,
        ask=None,
        max_asks=ASKS,
        default_verdict=False,
        trusted=lambda: frozenset(trusted),
    )
    source.start()
    try:
        assert cat(mount / "plain.txt").returncode != 0
        child = subprocess.Popen(  # opens the file itself, once it is trusted
            [
                "python3",
                "-c",
                "import sys; input(); print(open(sys.argv[1]).read(), end='')",
                str(mount / "plain.txt"),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        trusted.add(child.pid)
        out, _ = child.communicate("go\n", timeout=20)
        assert child.returncode == 0 and out == "hello\n"  # despite the default deny
        assert (mount / "plain.txt").read_text() == "hello\n"  # our own: allowed at once
    finally:
        source.stop()


def test_stopping_releases_an_opener_that_waits_for_an_answer(tmp_path: Path, mount: Path) -> None:
    rules = rules_file(tmp_path, 'default = "ask"\n')
    pending: list[Done] = []
    source = FileSource(
        Collected(),
        paths=[str(mount)],
        rules=rules,
        ask=lambda request, done: pending.append(done),  # never answers
        max_asks=ASKS,
        default_verdict=True,
    )
    source.start()
    opener = subprocess.Popen(["cat", str(mount / "plain.txt")], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pending and opener.poll() is None  # it waits for the answer
    finally:
        t0 = time.monotonic()
        source.stop()
    out, _ = opener.communicate(timeout=5)
    assert time.monotonic() - t0 < SLACK_S and out == b"hello\n"
    for done in pending:
        done(True, "late")  # an answer after the stop harms nothing


def test_asks_beyond_max_asks_get_the_default_at_once(tmp_path: Path, mount: Path) -> None:
    rules = rules_file(tmp_path, 'default = "ask"\n')
    pending: list[Done] = []
    got = Collected()
    source = FileSource(
        got,
        paths=[str(mount)],
        rules=rules,
        ask=lambda request, done: pending.append(done),  # never answers
        max_asks=1,
        default_verdict=True,
    )
    source.start()
    waiting = subprocess.Popen(["cat", str(mount / "plain.txt")], stdout=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not pending and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(pending) == 1 and waiting.poll() is None  # the one ask in flight
        assert cat(mount / "secret.txt").stdout == "s3cret\n"  # no room: the default
        assert len(pending) == 1 and source.asking.defaulted == 1
    finally:
        source.stop()
        waiting.communicate(timeout=5)
    assert got.verdicts(mount / "secret.txt") == ["allow"]


# --- notifications, watches, ancestry --------------------------------------------------

CHANGES = """
import os, sys, time
base = sys.argv[1]
with open(os.path.join(base, "new.txt"), "w") as f:
    f.write("x")
time.sleep(0.5)  # an fd event's path is read when the event is: before the rename
os.chmod(os.path.join(base, "new.txt"), 0o600)
os.rename(os.path.join(base, "new.txt"), os.path.join(base, "moved.txt"))
os.unlink(os.path.join(base, "moved.txt"))
os.mkdir(os.path.join(base, "newdir"))
"""


@contextlib.contextmanager
def running(tmp_path: Path, rules: str, **options: Any) -> Iterator[tuple[FileSource, Collected]]:
    """A started file source with ``rules`` (TOML text), collecting what it emits."""
    got = Collected()
    source = FileSource(
        got,
        rules=rules_file(tmp_path, rules),
        ask=None,
        max_asks=ASKS,
        default_verdict=True,
        **options,
    )
    source.start()
    try:
        yield source, got
    finally:
        source.stop()


def wait_for_events(got: Collected, done: Any, timeout: float = 5) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with got.lock:
            events = list(got.events)
        if done(events):
            return events
        time.sleep(0.02)
    return events


@pytest.mark.parametrize("where", ["mount", "directory"])
def test_notifications_name_the_entry_and_the_process(
    tmp_path: Path, mount: Path, where: str
) -> None:
    base = mount if where == "mount" else mount / "sub"
    base.mkdir(exist_ok=True)
    kinds = ["create", "delete", "move", "attrib", "modify", "close_write"]
    with running(tmp_path, 'default = "allow"\n', paths=[str(base)], events=kinds) as (_, got):
        child = subprocess.run(["python3", "-c", CHANGES, str(base)], check=True)
        assert child.returncode == 0
        events = wait_for_events(got, lambda evs: any(e.get("dir") for e in evs))
    # Events on one file still queued together arrive as one, with every kind.
    seen = [(k, e["path"], e.get("from")) for e in events for k in e.get("kinds", [e["kind"]])]
    for expected in [
        ("create", str(base / "new.txt"), None),
        ("modify", str(base / "new.txt"), None),
        ("close_write", str(base / "new.txt"), None),
        ("attrib", str(base / "new.txt"), None),
        ("move", str(base / "moved.txt"), str(base / "new.txt")),
        ("delete", str(base / "moved.txt"), None),
        ("create", str(base / "newdir"), None),
    ]:
        assert expected in seen, f"{expected} not in {seen}"
    # Every one names the process that did it: the child, not this test.
    assert {e["pid"] for e in events} == {e["pid"] for e in events if e["pid"] != os.getpid()}
    assert all(e["exe"] and "python" in e["exe"] and e["start_time"] for e in events)
    assert not any(e["kind"] == "lost" for e in events)


def creates(got: Collected) -> list[dict[str, Any]]:
    with got.lock:
        return [e for e in got.events if e["kind"] == "create"]


@contextlib.contextmanager
def made_and_gone(
    source: FileSource, monkeypatch: pytest.MonkeyPatch, mount: Path, names: list[str]
) -> Iterator[dict[str, int]]:
    """Directories made by `mkdir`s (no open: no permission event) that have exited before
    the source reads their create events; yields {name: the pid that made it}."""
    gate = threading.Event()  # the reader waits here before it reads
    monkeypatch.setattr(source.rules, "reload_if_due", lambda: gate.wait(30))
    made = {}
    for name in names:
        mkdir = subprocess.Popen(["mkdir", str(mount / name)])
        assert mkdir.wait() == 0
        made[name] = mkdir.pid
    gate.set()
    yield made


def test_a_notification_is_held_until_its_process_is_named_and_opens_go_on(
    tmp_path: Path, mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each `mkdir` is gone when its create is read, and the proc source's table has not
    # handled it yet: the create is held back (the one after it too, to stay in order)
    # until the table names it. Opens are decided meanwhile.
    monkeypatch.setattr(file_source, "SETTLE_S", 60.0)  # held until the table names it
    table = ProcessTable()
    options = {"paths": [str(mount)], "events": ["create"], "processes": table}
    with (
        running(tmp_path, 'default = "allow"\n', **options) as (source, got),
        made_and_gone(source, monkeypatch, mount, ["first", "second"]) as made,
    ):
        t0 = time.monotonic()
        assert cat(mount / "plain.txt").returncode == 0
        assert time.monotonic() - t0 < SLACK_S  # not held behind the notifications (60 s)
        time.sleep(0.1)
        assert creates(got) == []

        def named_by_the_table(name: str) -> None:
            entry = {"exe": f"/named/{name}", "argv": ["mkdir", name], "start_time": 1}
            table.procs[made[name]] = entry
            table.remove(made[name])

        named_by_the_table("second")
        time.sleep(0.1)
        assert creates(got) == []  # the second waits behind the first, in order
        named_by_the_table("first")
        both = wait_for_events(got, lambda evs: len(evs) >= 2)
        assert [e["path"] for e in both] == [str(mount / "first"), str(mount / "second")]
        assert [(e["exe"], e["gone"]) for e in both] == [
            ("/named/first", True),
            ("/named/second", True),
        ]
        assert source.subjects.unsettled == 0


def test_a_process_the_table_never_names_is_reported_in_time_without_a_name(
    tmp_path: Path, mount: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = ProcessTable()  # a proc source that fell behind, or lost the process
    options = {"paths": [str(mount)], "events": ["create"], "processes": table}
    with running(tmp_path, 'default = "allow"\n', **options) as (source, got):
        with made_and_gone(source, monkeypatch, mount, ["unnamed"]):
            t0 = time.monotonic()
            (event,) = wait_for_events(got, bool)
            assert time.monotonic() - t0 < SLACK_S  # SETTLE_S (20 ms), and a poll
        assert event["path"] == str(mount / "unnamed") and event["gone"] is True
        assert event["exe"] is None and event["argv"] is None
        assert source.subjects.unsettled == 1


def test_a_source_drops_its_own_notifications(tmp_path: Path, mount: Path) -> None:
    with running(tmp_path, 'default = "allow"\n', paths=[str(mount)]) as (_, got):
        (mount / "ours.txt").write_text("x")  # this process is the source's own
        subprocess.run(["touch", str(mount / "theirs.txt")], check=True)
        events = wait_for_events(got, lambda evs: any("theirs" in e["path"] for e in evs))
    assert any("theirs" in e["path"] for e in events)
    assert not any("ours" in e["path"] for e in events)


def test_watches_are_added_and_removed_while_running(tmp_path: Path, mount: Path) -> None:
    (mount / "a").mkdir()
    (mount / "a" / "f.txt").write_text("a\n")
    with running(tmp_path, 'default = "deny"\n') as (source, got):
        assert cat(mount / "a" / "f.txt").returncode == 0  # nothing watched yet
        source.watch(Watch(str(mount / "a")))
        assert source.paths == [str(mount / "a")]
        assert cat(mount / "a" / "f.txt").returncode != 0  # the rules decide now
        subprocess.run(["touch", str(mount / "a" / "g.txt")], check=True)
        assert wait_for_events(got, lambda evs: any(e["kind"] == "create" for e in evs))
        assert source.unwatch(str(mount / "a")) == [Watch(str(mount / "a"))]
        assert cat(mount / "a" / "f.txt").returncode == 0
        with pytest.raises(ValueError, match="is not watched"):
            source.unwatch(str(mount / "a"))
        with pytest.raises(OSError, match="nowhere"):
            source.watch(Watch(str(mount / "nowhere")))
        assert source.paths == []


def test_rules_can_match_the_parent_chain(tmp_path: Path, mount: Path) -> None:
    shell = os.path.realpath("/bin/sh")
    rules = (
        f'default = "allow"\n[[rule]]\nname = "not from a shell"\naction = "deny"\n'
        f'ancestors = ["{shell}"]\npath = "{mount}/secret*"\n'
    )
    with running(tmp_path, rules, paths=[str(mount)]) as (_, got):
        assert cat(mount / "secret.txt").returncode == 0  # cat's parent is this python
        # `; true` keeps the shell alive as cat's parent (no exec of the last command).
        via_shell = subprocess.run(
            ["/bin/sh", "-c", f"cat {mount / 'secret.txt'}; true"],
            capture_output=True,
            text=True,
            check=False,
        )
        assert "Permission denied" in via_shell.stderr or "not permitted" in via_shell.stderr
        events = wait_for_events(got, lambda evs: any(e.get("verdict") == "deny" for e in evs))
        denied = next(e for e in events if e.get("verdict") == "deny")
        assert denied["rule"] == "not from a shell" and denied["ancestors"][0] == shell


def test_a_filesystem_without_file_handles_is_still_decided(tmp_path: Path) -> None:
    with mounted(tmp_path / "ramfs", "-t", "ramfs", "ramfs") as point:
        (point / "secret.txt").write_text("s\n")
        rules = f'default = "allow"\n[[rule]]\naction = "deny"\npath = "{point}/secret*"\n'
        with running(tmp_path, rules, paths=[str(point)]) as (source, got):
            assert source.status()["without_names"] == [str(point)]  # ramfs has no handles
            assert cat(point / "secret.txt").returncode != 0  # opens are decided all the same
            subprocess.run(["sh", "-c", f"echo x > {point / 'new.txt'}"], check=True)
            events = wait_for_events(got, lambda evs: any(e["kind"] == "close_write" for e in evs))
            assert any(e["kind"] == "close_write" and e["path"].endswith("new.txt") for e in events)
            assert source.unwatch(str(point)) and source.status()["without_names"] == []


def test_access_perm_decides_each_read(tmp_path: Path, mount: Path) -> None:
    rules = f'default = "allow"\n[[rule]]\naction = "deny"\npath = "{mount}/secret*"\n'
    with running(tmp_path, rules, paths=[str(mount)], permissions=["access_perm"]) as (_, got):
        reader = subprocess.run(
            [
                "python3",
                "-c",
                "import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY)\nprint('opened')\n"
                "try:\n    os.read(fd, 10)\nexcept PermissionError:\n    print('read denied')",
                str(mount / "secret.txt"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert reader.stdout.split("\n")[:2] == ["opened", "read denied"]  # open is not asked
        events = wait_for_events(got, lambda evs: any(e.get("verdict") == "deny" for e in evs))
        assert any(e["kind"] == "access_perm" and e["verdict"] == "deny" for e in events)
