"""fanotify against the real kernel on private mounts, and its byte layouts built by hand."""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kport.sources import fanotify as fa
from kport.sources.fanotify import FanotifyEvent, FanotifyGroup
from tests.conftest import SLACK_S, mount_tmpfs, mounted

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="fanotify and mount need root")
slow = pytest.mark.timeout(120)


# --- helpers: mounts, event collection, openers ---------------------------------------


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A private 16 MiB tmpfs, lazily unmounted afterwards."""
    with mount_tmpfs(tmp_path / "mnt", "16m") as mnt:
        yield mnt


@pytest.fixture(params=["tmpfs", "ext4"])
def name_fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A private tmpfs, or a loop-mounted ext4 image: the name test runs on both."""
    mnt = tmp_path / "mnt"
    if request.param == "tmpfs":
        how: tuple[str, ...] = ("-t", "tmpfs", "-o", "size=16m", "tmpfs")
    else:
        if shutil.which("mkfs.ext4") is None:
            pytest.skip("no mkfs.ext4 to make an ext4 image")
        image = tmp_path / "ext4.img"
        with open(image, "wb") as f:
            f.truncate(16 * 1024 * 1024)
        _run("mkfs.ext4", "-q", "-F", str(image))
        how = ("-o", "loop", str(image))
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(mounted(mnt, *how))
        except subprocess.CalledProcessError as err:
            pytest.skip(f"cannot mount {request.param}: {err.stderr.decode().strip()}")
        yield mnt


@pytest.fixture
def owned() -> Iterator[list[FanotifyEvent]]:
    """Events read in a test: their fds are closed at teardown, whatever happened."""
    events: list[FanotifyEvent] = []
    yield events
    for event in events:
        event.close()


def collect(
    group: FanotifyGroup,
    into: list[FanotifyEvent],
    until: Callable[[list[FanotifyEvent]], bool],
    deadline_s: float = 5.0,
) -> list[FanotifyEvent]:
    """Read events into ``into`` until ``until(into)`` holds; fail after ``deadline_s``."""
    poller = select.poll()
    poller.register(group.fileno(), select.POLLIN)
    deadline = time.monotonic() + deadline_s
    while not until(into):
        left = deadline - time.monotonic()
        assert left > 0, f"events so far: {into}"
        if poller.poll(left * 1000):
            into.extend(group.read_events())
    return into


def kinds_by_path(events: list[FanotifyEvent]) -> dict[str | None, set[str]]:
    """The kernel merges consecutive events on one object: compare unions of kinds."""
    out: dict[str | None, set[str]] = {}
    for event in events:
        out.setdefault(event.path, set()).update(event.kinds)
    return out


class Opener(threading.Thread):
    """Opens ``path`` for reading in a thread (the open waits for the permission answer)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.outcome: str | OSError | None = None

    def run(self) -> None:
        try:
            with open(self.path) as f:
                self.outcome = f.read()
        except OSError as err:
            self.outcome = err


# --- 1. notification events with an fd ------------------------------------------------


@needs_root
@slow
def test_fd_events_open_modify_close(tmpfs: Path, owned: list[FanotifyEvent]) -> None:
    target = tmpfs / "file.txt"
    target.write_text("before")
    with FanotifyGroup(permissions=False) as group:
        group.mark(tmpfs, fa.FAN_OPEN | fa.FAN_MODIFY | fa.FAN_CLOSE, kind="mount")
        with open(target, "a") as f:
            f.write("more")
        collect(group, owned, lambda evs: "close_write" in kinds_by_path(evs).get(str(target), ()))
        assert kinds_by_path(owned)[str(target)] == {"open", "modify", "close_write"}
        written = len(owned)
        assert target.read_text() == "beforemore"
        collect(group, owned, lambda evs: any("close_nowrite" in e.kinds for e in evs[written:]))
        assert kinds_by_path(owned[written:])[str(target)] == {"open", "close_nowrite"}
        for event in owned:
            assert event.pid == os.getpid() and event.path == str(target)
            assert event.name is None and not event.is_dir and not event.permission
            assert os.fstat(event.fd).st_ino == target.stat().st_ino  # the kernel's own fd
        assert group.read_events() == []
    fd = owned[0].fd
    owned[0].close()
    owned[0].close()  # idempotent
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(ValueError, match="closed"):
        group.fileno()


@needs_root
def test_a_file_unlinked_before_the_read_keeps_its_name(
    tmpfs: Path, owned: list[FanotifyEvent]
) -> None:
    target = tmpfs / "short-lived (deleted)"  # a real name may end like that too
    kept = tmpfs / "kept (deleted)"
    with FanotifyGroup(permissions=False) as group:
        group.mark(tmpfs, fa.FAN_CLOSE_WRITE, kind="mount")
        target.write_text("x")
        kept.write_text("x")
        target.unlink()
        collect(group, owned, lambda evs: len(evs) >= 2)
    got = {(e.path, e.deleted) for e in owned}
    assert got == {(str(target), True), (str(kept), False)}


# --- 2. name events from file handles -------------------------------------------------


@needs_root
@slow
def test_name_events_give_directory_and_name(name_fs: Path) -> None:
    sub = name_fs / "sub"
    sub.mkdir()
    (name_fs / "old").write_text("x")
    (name_fs / "gone").write_text("x")
    mask = fa.FAN_CREATE | fa.FAN_DELETE | fa.FAN_MOVE | fa.FAN_ONDIR
    events: list[FanotifyEvent] = []
    with FanotifyGroup(permissions=False, report_names=True) as group:
        # A mount mark may not carry name events: the kernel refuses, the message says why.
        with pytest.raises(OSError, match="mount mark cannot report") as refused:
            group.mark(name_fs, mask, kind="mount")
        assert refused.value.errno == errno.EINVAL
        assert str(name_fs) in str(refused.value) and "FAN_MARK_MOUNT" in str(refused.value)
        group.mark(name_fs, mask, kind="filesystem")
        (name_fs / "new").write_text("x")
        (name_fs / "old").rename(sub / "renamed")
        (name_fs / "gone").unlink()
        (name_fs / "newdir").mkdir()
        collect(group, events, lambda evs: any(e.name == "newdir" for e in evs))
    got = {(e.path, e.name, e.is_dir): set(e.kinds) for e in events}
    assert got == {
        (str(name_fs / "new"), "new", False): {"create"},
        (str(name_fs / "old"), "old", False): {"moved_from"},
        (str(sub / "renamed"), "renamed", False): {"moved_to"},
        (str(name_fs / "gone"), "gone", False): {"delete"},
        (str(name_fs / "newdir"), "newdir", True): {"create"},
    }
    assert all(e.pid == os.getpid() and e.fd == fa.FAN_NOFD for e in events)


@needs_root
def test_a_rename_is_one_event_with_both_paths(name_fs: Path) -> None:
    sub = name_fs / "sub"
    sub.mkdir()
    (name_fs / "old").write_text("x")
    events: list[FanotifyEvent] = []
    with FanotifyGroup(permissions=False, report_names=True) as group:
        group.mark(name_fs, fa.FAN_RENAME | fa.FAN_ONDIR, kind="filesystem")
        (name_fs / "old").rename(sub / "renamed")
        collect(group, events, bool)
    assert [(e.kinds, e.old_path, e.path, e.name) for e in events] == [
        (("rename",), str(name_fs / "old"), str(sub / "renamed"), "renamed")
    ]


@needs_root
def test_what_the_kernel_refuses(tmpfs: Path) -> None:
    with pytest.raises(ValueError, match="open one group of each"):
        FanotifyGroup(permissions=True, report_names=True)
    with FanotifyGroup(permissions=False) as group:
        with pytest.raises(OSError, match="permissions=True") as refused:
            group.mark(tmpfs, fa.FAN_OPEN_PERM)
        assert refused.value.errno == errno.EINVAL
        with pytest.raises(OSError, match="report_names=True"):
            group.mark(tmpfs, fa.FAN_CREATE)
        with pytest.raises(FileNotFoundError, match="fanotify_mark") as missing:
            group.mark(tmpfs / "nowhere", fa.FAN_OPEN)
        assert missing.value.filename == str(tmpfs / "nowhere")
    with FanotifyGroup(permissions=True) as group:
        with pytest.raises(OSError, match="no pending permission event") as unknown:
            group.respond(12345, allow=True)
        assert unknown.value.errno == errno.ENOENT


# --- 3. permission events -------------------------------------------------------------


@needs_root
@slow
@pytest.mark.parametrize("allow", [True, False])
def test_open_perm_allow_and_deny(tmpfs: Path, owned: list[FanotifyEvent], allow: bool) -> None:
    target = tmpfs / "guarded"
    target.write_text("secret")
    with FanotifyGroup(permissions=True) as group:
        group.mark(tmpfs, fa.FAN_OPEN_PERM, kind="mount")
        opener = Opener(target)
        opener.start()
        try:
            [event] = collect(group, owned, bool)
            assert event.kinds == ("open_perm",) and event.permission
            assert event.path == str(target) and event.pid == os.getpid()
            time.sleep(0.1)
            assert opener.is_alive(), "the open did not wait for the answer"
            group.respond(event.fd, allow=allow)
            os.fstat(event.fd)  # respond leaves the fd to its owner
            event.close()
            opener.join(5)
            assert not opener.is_alive()
        finally:
            group.close()  # releases the opener, whatever failed above
            opener.join(5)
    if allow:
        assert opener.outcome == "secret"
    else:
        assert isinstance(opener.outcome, PermissionError), opener.outcome


@needs_root
@slow
def test_open_exec_perm_denies_running_a_script(tmpfs: Path, owned: list[FanotifyEvent]) -> None:
    script = tmpfs / "script.sh"
    script.write_text("#!/bin/sh\nexit 7\n")
    script.chmod(0o755)
    outcomes: list[int | OSError] = []

    def run_script() -> None:
        try:
            outcomes.append(subprocess.run([str(script)], check=False).returncode)
        except OSError as err:
            outcomes.append(err)

    with FanotifyGroup(permissions=True) as group:
        group.mark(tmpfs, fa.FAN_OPEN_EXEC_PERM, kind="mount")
        for allow in (False, True):
            runner = threading.Thread(target=run_script, daemon=True)
            runner.start()
            try:
                before = len(owned)
                collect(group, owned, lambda evs: len(evs) > before)  # noqa: B023
                [event] = owned[before:]
                assert event.kinds == ("open_exec_perm",) and event.path == str(script)
                assert event.pid != os.getpid()  # the child that calls execve
                group.respond(event.fd, allow=allow)
                event.close()
                runner.join(10)
            finally:
                if runner.is_alive():
                    group.close()
                    runner.join(5)
    denied, allowed = outcomes
    assert isinstance(denied, PermissionError), denied
    assert allowed == 7


# --- 4. a closed group releases the openers it never answered -------------------------


@needs_root
@slow
@pytest.mark.parametrize("read_first", [True, False])
def test_closing_the_group_releases_unanswered_openers(
    tmpfs: Path, owned: list[FanotifyEvent], read_first: bool
) -> None:
    target = tmpfs / "guarded"
    target.write_text("released")
    group = FanotifyGroup(permissions=True)
    opener = Opener(target)
    try:
        group.mark(tmpfs, fa.FAN_OPEN_PERM, kind="mount")
        opener.start()
        if read_first:  # read, so the event is pending an answer that never comes
            collect(group, owned, bool)
        else:  # or leave it in the queue, unread
            poller = select.poll()
            poller.register(group.fileno(), select.POLLIN)
            assert poller.poll(5000)
        time.sleep(0.1)
        assert opener.is_alive()
    finally:
        group.close()
    started = time.monotonic()
    opener.join(SLACK_S)
    assert not opener.is_alive(), f"the opener was not released within {SLACK_S:g} s"
    assert time.monotonic() - started < SLACK_S
    assert opener.outcome == "released"


# --- 6. overflow, from the real kernel ------------------------------------------------


@needs_root
@slow
def test_a_full_queue_reports_overflow(tmpfs: Path) -> None:
    limit = int(Path("/proc/sys/fs/fanotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"fs.fanotify.max_queued_events is {limit}: too many files to fill it")
    events: list[FanotifyEvent] = []
    with FanotifyGroup(permissions=False, report_names=True) as group:
        group.mark(tmpfs, fa.FAN_CREATE, kind="filesystem")
        for i in range(limit + 10):  # distinct names: events that cannot merge
            os.close(os.open(tmpfs / f"f{i}", os.O_CREAT | os.O_WRONLY, 0o600))
        while batch := group.read_events():
            events.extend(batch)
    assert len(events) == limit + 1
    assert all(e.kinds == ("create",) for e in events[:-1])
    assert events[0].path == str(tmpfs / "f0")
    last = events[-1]
    assert last.overflow and last.kinds == ("overflow",) and last.fd == fa.FAN_NOFD
    assert last.path is None and last.name is None


# --- 5 and 6. byte layouts ------------------------------------------------------------


def info_record(info_type: int, body: bytes) -> bytes:
    padded = body + b"\0" * (-(4 + len(body)) % 4)  # the kernel aligns records to 4
    return struct.pack("=BBH", info_type, 0, 4 + len(padded)) + padded


def fid_record(info_type: int, handle: bytes, name: bytes | None = None) -> bytes:
    body = struct.pack("=iiIi", 11, -22, len(handle), 0x81) + handle
    if name is not None:
        body += name + b"\0"
    return info_record(info_type, body)


def metadata(mask: int, fd: int, pid: int, info: bytes = b"", *, vers: int = 3) -> bytes:
    return struct.pack("=IBBHQii", 24 + len(info), vers, 0, 24, mask, fd, pid) + info


def test_dfid_name_round_trip() -> None:
    create = metadata(
        fa.FAN_CREATE | fa.FAN_ONDIR,
        fa.FAN_NOFD,
        4321,
        fid_record(fa.FAN_EVENT_INFO_TYPE_DFID_NAME, b"\x01\x02\x03\x04\x05", b"d\xc3\xa9j\xff"),
    )
    opened = metadata(fa.FAN_OPEN | fa.FAN_CLOSE_NOWRITE, 7, 99)
    mixed = metadata(
        fa.FAN_MODIFY,
        fa.FAN_NOFD,
        5,
        info_record(99, b"from a later kernel")
        + fid_record(fa.FAN_EVENT_INFO_TYPE_FID, b"\xaa" * 8)
        + info_record(fa.FAN_EVENT_INFO_TYPE_PIDFD, struct.pack("=i", -2))
        + info_record(fa.FAN_EVENT_INFO_TYPE_ERROR, struct.pack("=iI", -5, 3)),
    )
    assert fa.parse(create + opened + mixed) == [
        fa.RawEvent(
            fa.FAN_CREATE | fa.FAN_ONDIR,
            -1,
            4321,
            (fa.FileId(2, (11, -22), 0x81, b"\x01\x02\x03\x04\x05", "d\xe9j\udcff"),),
        ),
        fa.RawEvent(fa.FAN_OPEN | fa.FAN_CLOSE_NOWRITE, 7, 99, ()),
        fa.RawEvent(
            fa.FAN_MODIFY,
            -1,
            5,
            (fa.FileId(1, (11, -22), 0x81, b"\xaa" * 8, None), fa.PidFd(-2), fa.FsError(-5, 3)),
        ),
    ]
    assert fa.parse(memoryview(bytearray(opened))) == fa.parse(opened)
    assert fa.parse(b"") == []
    assert fa.kinds_of(fa.FAN_OPEN | fa.FAN_CLOSE_NOWRITE | 1 << 62) == ["open", "close_nowrite"]


def test_overflow_layout() -> None:
    [event] = fa.parse(metadata(fa.FAN_Q_OVERFLOW, fa.FAN_NOFD, 0))
    assert event == fa.RawEvent(fa.FAN_Q_OVERFLOW, -1, 0, ())
    assert fa.kinds_of(event.mask) == ["overflow"]


def _with(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


_GOOD = metadata(fa.FAN_CREATE, -1, 1, fid_record(2, b"\x01" * 8, b"name"))
_MALFORMED = {
    "fewer than the 24-byte metadata": _GOOD[:20],
    "metadata version 2": _with(_GOOD, 4, "=B", 2),
    "event_len 200 runs past the buffer": _with(_GOOD, 0, "=I", 200),
    "metadata_len 8 is not between": _with(_GOOD, 6, "=H", 8),
    "metadata_len 30 is not between 24 and event_len 24": _with(metadata(1, -1, 1), 6, "=H", 30),
    r"\(type 2\): length 0": _with(_GOOD, 26, "=H", 0),
    "length 200 runs past its event": _with(_GOOD, 26, "=H", 200),
    "fewer than the 4-byte header": metadata(1, -1, 1, b"\x01\x00"),
    "file handle of 99 bytes runs past": _with(_GOOD, 36, "=I", 99),
    "no NUL terminator": metadata(
        1, -1, 1, info_record(2, struct.pack("=iiIi", 0, 0, 0, 0) + b"abcd")
    ),
    "shorter than its 20-byte fixed part": metadata(1, -1, 1, info_record(3, b"\0" * 8)),
    "pidfd info record is too short": metadata(1, -1, 1, struct.pack("=BBH", 4, 0, 4)),
    "error info record is too short": metadata(1, -1, 1, info_record(5, b"\0" * 4)),
}


@pytest.mark.parametrize("message", list(_MALFORMED))
def test_malformed_buffers_raise_value_error(message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fa.parse(_MALFORMED[message])


def test_a_good_event_then_a_bad_one_still_raises() -> None:
    with pytest.raises(ValueError, match=f"event at offset {len(_GOOD)}: event_len"):
        fa.parse(_GOOD + _GOOD[:30])


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        fa.parse(data)


@settings(max_examples=500, deadline=None)
@given(st.lists(st.binary(max_size=120), max_size=4), st.integers(0, 2**64 - 1))
def test_arbitrary_info_records_raise_only_value_error(tails: list[bytes], mask: int) -> None:
    # A valid metadata header before each tail, so the fuzzing reaches the info records.
    data = b"".join(metadata(mask, -1, 1, tail) for tail in tails)
    try:
        events = fa.parse(data)
    except ValueError:
        return
    assert [e.mask for e in events] == [mask] * len(tails)
