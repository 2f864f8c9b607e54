"""fanotify: its groups, its marks, its permission answers, and its event byte layouts.

Nothing else in kport calls ``fanotify_init``, ``fanotify_mark`` or ``open_by_handle_at``.
The calls go through ctypes on libc: the PyPI wrappers are unmaintained or lack permission
events. :func:`parse` is pure (bytes in, :class:`RawEvent` out) so it is tested and fuzzed
without a kernel; :class:`FanotifyGroup` owns the file descriptors and the syscalls.

What the kernel allows (checked on Linux 6.18, and by ``tests/sources/test_fanotify.py``):

* Permission events (``FAN_*_PERM``) need a ``FAN_CLASS_CONTENT`` group, and such a group
  cannot report file ids (``FAN_REPORT_FID``/``FAN_REPORT_DFID_NAME`` → ``EINVAL``). So a
  permission group gets fd-based events: the kernel opens the file for each event.
* Name events (create, delete, moved_from, moved_to) need a ``FAN_REPORT_DFID_NAME``
  notification group, and an inode or filesystem mark: a mount mark refuses them.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import fcntl
import functools
import os
import struct
from collections.abc import Callable
from types import TracebackType
from typing import Final, Literal, NamedTuple, Self

# Event bits (fanotify_mark's mask, and the mask of each event read).
FAN_ACCESS: Final = 0x00000001
FAN_MODIFY: Final = 0x00000002
FAN_ATTRIB: Final = 0x00000004
FAN_CLOSE_WRITE: Final = 0x00000008
FAN_CLOSE_NOWRITE: Final = 0x00000010
FAN_OPEN: Final = 0x00000020
FAN_MOVED_FROM: Final = 0x00000040
FAN_MOVED_TO: Final = 0x00000080
FAN_CREATE: Final = 0x00000100
FAN_DELETE: Final = 0x00000200
FAN_DELETE_SELF: Final = 0x00000400
FAN_MOVE_SELF: Final = 0x00000800
FAN_OPEN_EXEC: Final = 0x00001000
FAN_Q_OVERFLOW: Final = 0x00004000
FAN_OPEN_PERM: Final = 0x00010000
FAN_ACCESS_PERM: Final = 0x00020000
FAN_OPEN_EXEC_PERM: Final = 0x00040000
FAN_RENAME: Final = 0x10000000  # one event with the old and the new name (Linux 5.17)
FAN_EVENT_ON_CHILD: Final = 0x08000000
FAN_ONDIR: Final = 0x40000000
FAN_CLOSE: Final = FAN_CLOSE_WRITE | FAN_CLOSE_NOWRITE
FAN_MOVE: Final = FAN_MOVED_FROM | FAN_MOVED_TO
FAN_PERMISSION_EVENTS: Final = FAN_OPEN_PERM | FAN_ACCESS_PERM | FAN_OPEN_EXEC_PERM
#: Events about a directory entry: reported only by name groups, refused on mount marks.
FAN_DIRENT_EVENTS: Final = (
    FAN_CREATE | FAN_DELETE | FAN_MOVE | FAN_RENAME | FAN_DELETE_SELF | FAN_MOVE_SELF
)

# fanotify_init flags.
FAN_CLOEXEC: Final = 0x00000001
FAN_NONBLOCK: Final = 0x00000002
FAN_CLASS_NOTIF: Final = 0x00000000
FAN_CLASS_CONTENT: Final = 0x00000004
FAN_REPORT_FID: Final = 0x00000200
FAN_REPORT_DIR_FID: Final = 0x00000400
FAN_REPORT_NAME: Final = 0x00000800
FAN_REPORT_DFID_NAME: Final = FAN_REPORT_DIR_FID | FAN_REPORT_NAME

# fanotify_mark flags.
FAN_MARK_ADD: Final = 0x00000001
FAN_MARK_REMOVE: Final = 0x00000002
FAN_MARK_FLUSH: Final = 0x00000080
FAN_MARK_INODE: Final = 0x00000000
FAN_MARK_MOUNT: Final = 0x00000010
FAN_MARK_FILESYSTEM: Final = 0x00000100

# struct fanotify_response.response, and the fd of an event that carries none.
FAN_ALLOW: Final = 0x01
FAN_DENY: Final = 0x02
FAN_NOFD: Final = -1

FANOTIFY_METADATA_VERSION: Final = 3
FAN_EVENT_INFO_TYPE_FID: Final = 1
FAN_EVENT_INFO_TYPE_DFID_NAME: Final = 2
FAN_EVENT_INFO_TYPE_DFID: Final = 3
FAN_EVENT_INFO_TYPE_PIDFD: Final = 4
FAN_EVENT_INFO_TYPE_ERROR: Final = 5
FAN_EVENT_INFO_TYPE_OLD_DFID_NAME: Final = 10
FAN_EVENT_INFO_TYPE_NEW_DFID_NAME: Final = 12

_AT_FDCWD: Final = -100

#: struct fanotify_event_metadata: event_len, vers, reserved, metadata_len, mask, fd, pid.
_METADATA = struct.Struct("=IBBHQii")
METADATA_LEN: Final = _METADATA.size  # 24
#: struct fanotify_event_info_header: info_type, pad, len (the whole record's length).
_INFO_HEADER = struct.Struct("=BBH")
#: After the header of a fid record: fsid (two s32), then struct file_handle's
#: handle_bytes (u32) and handle_type (s32), then handle_bytes of f_handle.
_FID_HEAD = struct.Struct("=iiIi")
_PIDFD = struct.Struct("=i")
_ERROR = struct.Struct("=iI")  # error, error_count
_RESPONSE = struct.Struct("=iI")  # struct fanotify_response: fd, response

#: Event bit → kind name, in the order :func:`kinds_of` lists them.
KINDS: Final[dict[int, str]] = {
    FAN_OPEN: "open",
    FAN_OPEN_EXEC: "open_exec",
    FAN_ACCESS: "access",
    FAN_MODIFY: "modify",
    FAN_ATTRIB: "attrib",
    FAN_CLOSE_WRITE: "close_write",
    FAN_CLOSE_NOWRITE: "close_nowrite",
    FAN_CREATE: "create",
    FAN_DELETE: "delete",
    FAN_MOVED_FROM: "moved_from",
    FAN_MOVED_TO: "moved_to",
    FAN_DELETE_SELF: "delete_self",
    FAN_MOVE_SELF: "move_self",
    FAN_RENAME: "rename",
    FAN_OPEN_PERM: "open_perm",
    FAN_OPEN_EXEC_PERM: "open_exec_perm",
    FAN_ACCESS_PERM: "access_perm",
    FAN_Q_OVERFLOW: "overflow",
}

MarkKind = Literal["inode", "mount", "filesystem"]
_MARK_KINDS: Final[dict[str, int]] = {
    "inode": FAN_MARK_INODE,
    "mount": FAN_MARK_MOUNT,
    "filesystem": FAN_MARK_FILESYSTEM,
}

Buffer = bytes | bytearray | memoryview


def kinds_of(mask: int) -> list[str]:
    """The kind names of the event bits set in ``mask`` (unknown bits are left out)."""
    return [name for bit, name in KINDS.items() if mask & bit]


@functools.lru_cache(maxsize=1024)  # a group sees few distinct masks
def _kinds(mask: int) -> tuple[str, ...]:
    return tuple(kinds_of(mask))


# --- the pure parser ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class FileId:
    """A fid info record: which object (or which directory, and a name in it)."""

    info_type: int  # FAN_EVENT_INFO_TYPE_FID, _DFID, _DFID_NAME, _OLD_/_NEW_DFID_NAME
    fsid: tuple[int, int]
    handle_type: int
    handle: bytes  # f_handle, opaque: for open_by_handle_at
    name: str | None  # the entry's name, for the *_DFID_NAME types only


@dataclasses.dataclass(frozen=True, slots=True)
class PidFd:
    """A pidfd info record (FAN_REPORT_PIDFD): a pidfd owned by the reader, or < 0."""

    pidfd: int


@dataclasses.dataclass(frozen=True, slots=True)
class FsError:
    """An error info record (FAN_FS_ERROR)."""

    error: int
    error_count: int


InfoRecord = FileId | PidFd | FsError


class RawEvent(NamedTuple):
    """One event as the kernel wrote it: the metadata, and its info records in order."""

    mask: int
    fd: int
    pid: int
    records: tuple[InfoRecord, ...]


def _file_id(with_name: bool) -> Callable[[Buffer, int, int, int], InfoRecord]:
    def parse_file_id(buf: Buffer, info_type: int, start: int, end: int) -> InfoRecord:
        if end - start < _FID_HEAD.size:
            raise ValueError(
                f"fid info record of {end - start + _INFO_HEADER.size} bytes is shorter "
                f"than its {_INFO_HEADER.size + _FID_HEAD.size}-byte fixed part"
            )
        fsid0, fsid1, handle_bytes, handle_type = _FID_HEAD.unpack_from(buf, start)
        handle_start = start + _FID_HEAD.size
        handle_end = handle_start + handle_bytes
        if handle_end > end:
            raise ValueError(
                f"file handle of {handle_bytes} bytes runs past its info record "
                f"({end - handle_start} bytes left)"
            )
        name: str | None = None
        if with_name:
            tail = bytes(buf[handle_end:end])
            nul = tail.find(b"\0")
            if nul < 0:
                raise ValueError("the name in a dfid_name info record has no NUL terminator")
            name = os.fsdecode(tail[:nul])
        handle = bytes(buf[handle_start:handle_end])
        return FileId(info_type, (fsid0, fsid1), handle_type, handle, name)

    return parse_file_id


def _pidfd(buf: Buffer, _info_type: int, start: int, end: int) -> InfoRecord:
    if end - start < _PIDFD.size:
        raise ValueError("pidfd info record is too short for its pidfd")
    return PidFd(_PIDFD.unpack_from(buf, start)[0])


def _fs_error(buf: Buffer, _info_type: int, start: int, end: int) -> InfoRecord:
    if end - start < _ERROR.size:
        raise ValueError("error info record is too short for its error and count")
    return FsError(*_ERROR.unpack_from(buf, start))


#: info type → parser of the record's body (after its header). Types a later kernel adds
#: are not listed: their records are skipped by their length.
_INFO_PARSERS: Final[dict[int, Callable[[Buffer, int, int, int], InfoRecord]]] = {
    FAN_EVENT_INFO_TYPE_FID: _file_id(with_name=False),
    FAN_EVENT_INFO_TYPE_DFID: _file_id(with_name=False),
    FAN_EVENT_INFO_TYPE_DFID_NAME: _file_id(with_name=True),
    FAN_EVENT_INFO_TYPE_OLD_DFID_NAME: _file_id(with_name=True),
    FAN_EVENT_INFO_TYPE_NEW_DFID_NAME: _file_id(with_name=True),
    FAN_EVENT_INFO_TYPE_PIDFD: _pidfd,
    FAN_EVENT_INFO_TYPE_ERROR: _fs_error,
}


def parse(buf: Buffer) -> list[RawEvent]:
    """Every event in one ``read`` of a fanotify fd.

    A buffer the kernel would not write (a length that runs past the buffer or its event,
    a metadata version other than 3, an info record of length 0) raises ``ValueError``
    saying what is wrong; every length is checked before it is used, so no input loops.
    """
    events: list[RawEvent] = []
    offset = 0
    end = len(buf)
    while offset < end:
        if end - offset < METADATA_LEN:
            raise ValueError(
                f"event at offset {offset}: {end - offset} bytes left, fewer than the "
                f"{METADATA_LEN}-byte metadata"
            )
        event_len, version, _reserved, metadata_len, mask, fd, pid = _METADATA.unpack_from(
            buf, offset
        )
        if version != FANOTIFY_METADATA_VERSION:
            raise ValueError(
                f"event at offset {offset}: metadata version {version}, this parser reads "
                f"version {FANOTIFY_METADATA_VERSION}"
            )
        if not METADATA_LEN <= metadata_len <= event_len:
            raise ValueError(
                f"event at offset {offset}: metadata_len {metadata_len} is not between "
                f"{METADATA_LEN} and event_len {event_len}"
            )
        if offset + event_len > end:
            raise ValueError(
                f"event at offset {offset}: event_len {event_len} runs past the buffer "
                f"({end - offset} bytes left)"
            )
        records = _parse_info(buf, offset + metadata_len, offset + event_len)
        events.append(RawEvent(mask, fd, pid, records))
        offset += event_len
    return events


def _parse_info(buf: Buffer, start: int, end: int) -> tuple[InfoRecord, ...]:
    records: list[InfoRecord] = []
    pos = start
    while pos < end:
        if end - pos < _INFO_HEADER.size:
            raise ValueError(
                f"info record at offset {pos}: {end - pos} bytes left in the event, fewer "
                f"than the {_INFO_HEADER.size}-byte header"
            )
        info_type, _pad, length = _INFO_HEADER.unpack_from(buf, pos)
        if length < _INFO_HEADER.size:
            raise ValueError(f"info record at offset {pos} (type {info_type}): length {length}")
        if pos + length > end:
            raise ValueError(
                f"info record at offset {pos} (type {info_type}): length {length} runs past "
                f"its event ({end - pos} bytes left)"
            )
        parser = _INFO_PARSERS.get(info_type)
        if parser is not None:
            records.append(parser(buf, info_type, pos + _INFO_HEADER.size, pos + length))
        pos += length
    return tuple(records)


# --- the syscalls ---------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_fanotify_init = _libc.fanotify_init
_fanotify_init.argtypes = [ctypes.c_uint, ctypes.c_uint]
_fanotify_init.restype = ctypes.c_int
_fanotify_mark = _libc.fanotify_mark
_fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
_fanotify_mark.restype = ctypes.c_int
_open_by_handle_at = _libc.open_by_handle_at
_open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
_open_by_handle_at.restype = ctypes.c_int


class _Statfs(ctypes.Structure):
    # glibc's struct statfs64 where __fsword_t is a long (every 64-bit Linux but s390x).
    _fields_ = (
        ("f_type", ctypes.c_long),
        ("f_bsize", ctypes.c_long),
        ("f_blocks", ctypes.c_uint64),
        ("f_bfree", ctypes.c_uint64),
        ("f_bavail", ctypes.c_uint64),
        ("f_files", ctypes.c_uint64),
        ("f_ffree", ctypes.c_uint64),
        ("f_fsid", ctypes.c_int * 2),
        ("f_namelen", ctypes.c_long),
        ("f_frsize", ctypes.c_long),
        ("f_flags", ctypes.c_long),
        ("f_spare", ctypes.c_long * 4),
    )


_statfs64 = _libc.statfs64
_statfs64.argtypes = [ctypes.c_char_p, ctypes.POINTER(_Statfs)]
_statfs64.restype = ctypes.c_int

_INIT_FLAG_NAMES: Final[dict[int, str]] = {
    FAN_CLOEXEC: "FAN_CLOEXEC",
    FAN_NONBLOCK: "FAN_NONBLOCK",
    FAN_CLASS_CONTENT: "FAN_CLASS_CONTENT",
    FAN_REPORT_FID: "FAN_REPORT_FID",
    FAN_REPORT_DIR_FID: "FAN_REPORT_DIR_FID",
    FAN_REPORT_NAME: "FAN_REPORT_NAME",
}
_MARK_FLAG_NAMES: Final[dict[int, str]] = {
    FAN_MARK_ADD: "FAN_MARK_ADD",
    FAN_MARK_REMOVE: "FAN_MARK_REMOVE",
    FAN_MARK_FLUSH: "FAN_MARK_FLUSH",
    FAN_MARK_MOUNT: "FAN_MARK_MOUNT",
    FAN_MARK_FILESYSTEM: "FAN_MARK_FILESYSTEM",
}

#: errno → what it usually means for fanotify, appended to the message.
_HINTS: Final[dict[int, str]] = {
    errno.EPERM: "fanotify needs CAP_SYS_ADMIN (run as root)",
    errno.ENOSYS: "the kernel was built without CONFIG_FANOTIFY",
    errno.EMFILE: "too many open fds or fanotify groups (fs.fanotify.max_user_groups)",
    errno.ENOSPC: "too many marks (fs.fanotify.max_user_marks)",
    errno.ENODEV: "this filesystem cannot encode file handles for name reporting",
    errno.EOPNOTSUPP: "this filesystem cannot encode file handles for name reporting",
    errno.EXDEV: "this filesystem's file handles are not unique (subvolume?)",
}


def _flag_names(flags: int, names: dict[int, str], zero: str) -> str:
    parts = [name for bit, name in names.items() if flags & bit]
    rest = flags & ~sum(names)
    if rest:
        parts.append(hex(rest))
    return "|".join(parts) or zero


def _os_error(call: str, hint: str | None = None, path: str | None = None) -> OSError:
    """The ``OSError`` subclass for libc's errno, its message naming the call."""
    code = ctypes.get_errno()
    message = f"{call}: {os.strerror(code)}"
    extra = hint or _HINTS.get(code)
    if extra:
        message += f" ({extra})"
    if path is None:
        return OSError(code, message)
    return OSError(code, message, path)


def _fsid_of(path: bytes) -> tuple[int, int]:
    buf = _Statfs()
    if _statfs64(path, ctypes.byref(buf)) != 0:
        raise _os_error(f"statfs({os.fsdecode(path)!r})", path=os.fsdecode(path))
    return (buf.f_fsid[0], buf.f_fsid[1])


# --- groups and events ----------------------------------------------------------------


_DELETED: Final = " (deleted)"


def _unlinked(fd: int) -> bool:
    try:
        return os.fstat(fd).st_nlink == 0
    except OSError:
        return False


@dataclasses.dataclass(slots=True)
class FanotifyEvent:
    """One event, decoded. It owns ``fd`` (the file, opened by the kernel, or -1).

    Call :meth:`close` (or use ``with``) once done with the event; for a permission event,
    only after :meth:`FanotifyGroup.respond` has been called with it.
    """

    mask: int
    kinds: tuple[str, ...]
    pid: int
    fd: int
    path: str | None
    name: str | None = None
    #: a rename's old path (``path`` is the new one); None for every other event
    old_path: str | None = None
    #: the file was unlinked by the time the event was read (``path`` is its last name)
    deleted: bool = False

    @property
    def is_dir(self) -> bool:
        return bool(self.mask & FAN_ONDIR)

    @property
    def overflow(self) -> bool:
        return bool(self.mask & FAN_Q_OVERFLOW)

    @property
    def permission(self) -> bool:
        """Must be answered (:meth:`FanotifyGroup.respond`) before the opener goes on."""
        return bool(self.mask & FAN_PERMISSION_EVENTS)

    def close(self) -> None:
        """Close the event's fd (idempotent)."""
        if self.fd >= 0:
            fd, self.fd = self.fd, FAN_NOFD
            os.close(fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class FanotifyGroup:
    """One fanotify group (one fd): its marks, its events, its permission answers.

    ``permissions=True`` makes a ``FAN_CLASS_CONTENT`` group, which may mark permission
    events (open_perm, open_exec_perm, access_perm) besides notification events. Every
    event of such a group carries an fd the kernel opened on the file, and its path is
    read from ``/proc/self/fd``. Each permission event must be answered with
    :meth:`respond`, then its fd closed: the opener waits until then. Closing the group
    answers every unanswered event with "allow".

    ``report_names=True`` makes a ``FAN_REPORT_DFID_NAME`` notification group: events
    carry the directory's file handle and the entry's name instead of an fd, which is how
    create, delete, moved_from and moved_to are reported. Mark such events on an inode
    (a directory) or a filesystem; the kernel refuses them on a mount mark. The kernel
    also refuses name reporting in a permission group, so the two flags exclude each other:
    a program that wants both opens two groups.

    Resolving a handle back to a path uses ``open_by_handle_at`` on an fd of the marked
    filesystem, which :meth:`mark` opens (once per filesystem) and the group keeps.
    """

    def __init__(self, *, permissions: bool, report_names: bool = False) -> None:
        if permissions and report_names:
            raise ValueError(
                "the kernel refuses name reporting (FAN_REPORT_DFID_NAME) in a group with "
                "permission events (FAN_CLASS_CONTENT): open one group of each"
            )
        self.permissions = permissions
        self.report_names = report_names
        self._mount_fds: dict[tuple[int, int], int] = {}
        flags = FAN_CLOEXEC | FAN_NONBLOCK
        flags |= FAN_CLASS_CONTENT if permissions else FAN_CLASS_NOTIF
        if report_names:
            flags |= FAN_REPORT_DFID_NAME
        event_f_flags = os.O_RDONLY | os.O_CLOEXEC | os.O_LARGEFILE
        fd: int = _fanotify_init(flags, event_f_flags)
        if fd < 0:
            call = f"fanotify_init({_flag_names(flags, _INIT_FLAG_NAMES, 'FAN_CLASS_NOTIF')})"
            raise _os_error(call)
        self._fd = fd
        # An event's path is read from /proc/self/fd/<its fd>: through this directory's
        # fd, the kernel need not walk /proc/self for each event (a third of the cost).
        try:
            self._fd_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            raise

    def move_above(self, fd: int) -> None:
        """Give the group an fd number above ``fd``. A dying process closes its fds from
        the highest number down; see :class:`kport.sources.file.FileSource` for why the
        order of two groups' closes matters."""
        old = self._open_fd()
        if old > fd:
            return
        self._fd = fcntl.fcntl(old, fcntl.F_DUPFD_CLOEXEC, fd + 1)
        os.close(old)

    def fileno(self) -> int:
        """The group's fd: readable when events are queued (for selectors and asyncio)."""
        return self._open_fd()

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _open_fd(self) -> int:
        if self._fd < 0:
            raise ValueError("the fanotify group is closed")
        return self._fd

    def mark(
        self,
        path: str | os.PathLike[str],
        mask: int,
        *,
        kind: MarkKind = "inode",
        remove: bool = False,
    ) -> None:
        """Add (or remove) the events of ``mask`` on the inode, mount or filesystem of
        ``path``. For an inode mark on a directory, ``FAN_EVENT_ON_CHILD`` extends the
        events to its entries and ``FAN_ONDIR`` includes events on directories."""
        fd = self._open_fd()
        if kind not in _MARK_KINDS:
            raise ValueError(f"mark kind {kind!r}: expected one of {sorted(_MARK_KINDS)}")
        encoded = os.fsencode(path)
        flags = (FAN_MARK_REMOVE if remove else FAN_MARK_ADD) | _MARK_KINDS[kind]
        if self.report_names and not remove:
            self._keep_mount_fd(encoded)
        if _fanotify_mark(fd, flags, mask, _AT_FDCWD, encoded) != 0:
            call = (
                f"fanotify_mark({os.fsdecode(encoded)!r}, "
                f"{_flag_names(flags, _MARK_FLAG_NAMES, '0')}, mask={kinds_of(mask)})"
            )
            raise _os_error(call, self._mark_hint(mask, kind), os.fsdecode(encoded))

    def _mark_hint(self, mask: int, kind: str) -> str | None:
        if ctypes.get_errno() != errno.EINVAL:
            return None
        if mask & FAN_PERMISSION_EVENTS and not self.permissions:
            return "permission events need a group made with permissions=True"
        if mask & FAN_DIRENT_EVENTS and not self.report_names:
            return "create/delete/move events need a group made with report_names=True"
        if mask & FAN_DIRENT_EVENTS and kind == "mount":
            return "a mount mark cannot report create/delete/move: mark the filesystem"
        return None

    def _keep_mount_fd(self, path: bytes) -> None:
        # Taken before the mark exists, so this open is no event of this group. O_PATH would
        # be quieter, but open_by_handle_at refuses an O_PATH fd (EBADF).
        fsid = _fsid_of(path)
        if fsid in self._mount_fds:
            return
        directory = path if os.path.isdir(path) else os.path.dirname(path) or b"."
        try:
            self._mount_fds[fsid] = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise OSError(
                err.errno,
                f"open({os.fsdecode(directory)!r}) for resolving file handles: {err.strerror}",
                os.fsdecode(directory),
            ) from err

    def read_events(self, buffer_size: int = 65536) -> list[FanotifyEvent]:
        """Every event queued now ([] if none; never blocks), each owning its fd."""
        fd = self._open_fd()
        try:
            data = os.read(fd, buffer_size)
        except BlockingIOError:
            return []
        except OSError as err:
            hint = {
                errno.EMFILE: "the kernel could not open an event's fd: close event fds",
                errno.EINVAL: f"a buffer of {buffer_size} bytes is too small for one event",
            }.get(err.errno if err.errno is not None else 0, "")
            raise OSError(
                err.errno, f"read of a fanotify group: {err.strerror} {hint}".strip()
            ) from err
        paths: dict[tuple[tuple[int, int], int, bytes], str | None] = {}
        return [self._event(raw, paths) for raw in parse(data)]

    def _event(
        self, raw: RawEvent, paths: dict[tuple[tuple[int, int], int, bytes], str | None]
    ) -> FanotifyEvent:
        path: str | None = None
        name: str | None = None
        old_path: str | None = None
        deleted = False
        if raw.fd >= 0:
            path = self._path_of(raw.fd)
            if path is not None and path.endswith(_DELETED) and _unlinked(raw.fd):
                path, deleted = path[: -len(_DELETED)], True
        for record in raw.records:
            if not isinstance(record, FileId):
                continue
            # One record per event, except FAN_RENAME's two: the old name, then the new.
            key = (record.fsid, record.handle_type, record.handle)
            if key not in paths:
                paths[key] = self._resolve(record)
            base, name = paths[key], record.name
            full = base if base is None or name in (None, ".") else os.path.join(base, name)
            if record.info_type == FAN_EVENT_INFO_TYPE_OLD_DFID_NAME:
                old_path = full
            else:
                path = full
        mask = raw.mask  # positional: each keyword costs time on every event
        return FanotifyEvent(mask, _kinds(mask), raw.pid, raw.fd, path, name, old_path, deleted)

    def _path_of(self, fd: int) -> str | None:
        """The path of an fd of this process (None if it cannot be read)."""
        try:
            return os.readlink(str(fd), dir_fd=self._fd_dir)
        except OSError:
            return None

    def _resolve(self, record: FileId) -> str | None:
        """The path of a file handle, or None (no mount fd, or the object is gone)."""
        mount_fd = self._mount_fds.get(record.fsid)
        if mount_fd is None:
            return None
        handle = struct.pack("=Ii", len(record.handle), record.handle_type) + record.handle
        fd: int = _open_by_handle_at(mount_fd, handle, os.O_PATH | os.O_CLOEXEC)
        if fd < 0:
            return None
        try:
            return self._path_of(fd)
        finally:
            os.close(fd)

    def respond(self, fd: int, allow: bool) -> None:
        """Answer the permission event whose fd is ``fd``: the opener proceeds, or gets
        ``EPERM``. The fd stays open: close it (``event.close()``) after this returns."""
        group_fd = self._open_fd()
        answer = FAN_ALLOW if allow else FAN_DENY
        try:
            os.write(group_fd, _RESPONSE.pack(fd, answer))
        except OSError as err:
            hint = " (no pending permission event has this fd)" if err.errno == errno.ENOENT else ""
            verdict = "FAN_ALLOW" if allow else "FAN_DENY"
            raise OSError(
                err.errno, f"fanotify response {verdict} for fd {fd}: {err.strerror}{hint}"
            ) from err

    def close(self) -> None:
        """Close the group (the kernel allows every unanswered permission event) and the
        fds it keeps for resolving handles. Idempotent."""
        fd, self._fd = self._fd, -1
        mount_fds, self._mount_fds = self._mount_fds, {}
        for mount_fd in mount_fds.values():
            os.close(mount_fd)
        if fd >= 0:
            os.close(fd)
            os.close(self._fd_dir)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
