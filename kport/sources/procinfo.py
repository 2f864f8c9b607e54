"""Reads of /proc/<pid> that describe one process, checked against its identity.

A pid alone is reused. ``describe`` reads through one open /proc/<pid> directory fd,
which pins the process it was opened for: once that process is gone, every read through
the fd fails, even if the pid names another process by then. So what is returned belongs
to the process whose start time was read first, or is None.

Owner and cgroup come from a pidfd (``PIDFD_GET_INFO``, Linux 6.13+) where the kernel has
it: one ioctl instead of rendering /proc/<pid>/status and /proc/<pid>/cgroup, whose text
cost several times more. Older kernels get those two files read.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import struct
import time
from dataclasses import dataclass
from typing import Any, Final

_CLK_TCK = os.sysconf("SC_CLK_TCK")
#: ns of CLOCK_BOOTTIME in one /proc start-time tick
NS_PER_TICK: Final = 1_000_000_000 // _CLK_TCK
#: a kernel thread's flag in /proc/<pid>/stat's flags (include/linux/sched.h)
PF_KTHREAD: Final = 0x00200000
_user_names: dict[int, str | None] = {}

#: _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11, struct pidfd_info) and that struct (64 bytes): mask,
#: cgroupid, then pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid, fsuid, fsgid, spare
_PIDFD_GET_INFO: Final = (3 << 30) | (64 << 16) | (0xFF << 8) | 11
_PIDFD_INFO: Final = struct.Struct("=QQ12I")
_MASK: Final = struct.Struct("=Q")
_PIDFD_INFO_CREDS: Final = 1 << 1
_PIDFD_INFO_CGROUPID: Final = 1 << 2
_pidfd_info = True  # until the kernel says it has no PIDFD_GET_INFO
#: cgroup v2 path by cgroup id (ids are not reused while the system runs); bounded
_cgroup_paths: dict[int, str | None] = {}
_CGROUP_PATHS_MAX: Final = 4096


@dataclass(frozen=True, slots=True)
class Stat:
    comm: str
    state: str  # R, S, D, Z (a zombie: exited, not yet reaped)...
    ppid: int
    tty_nr: int
    start_time: int  # clock ticks after boot
    flags: int = 0  # the kernel's PF_* flags of the task

    @property
    def kernel_thread(self) -> bool:
        return bool(self.flags & PF_KTHREAD)


def _read(path: str, dir_fd: int | None = None) -> bytes | None:
    """A small /proc file's bytes, or None. os.open/os.read: the builtin open() builds a
    buffered file object per call and cost several times more on the event path."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        return os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_stat(pid: int) -> Stat | None:
    """The fields of /proc/<pid>/stat kport uses, or None if the process is gone."""
    return _parse_stat(_read(f"/proc/{pid}/stat"))


def read_stat_at(proc_dir: int) -> Stat | None:
    """:func:`read_stat` through an open /proc/<pid> directory fd (that process, or None)."""
    return _parse_stat(_read("stat", proc_dir))


def _parse_stat(raw: bytes | None) -> Stat | None:
    if raw is None:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    close = raw.rfind(b")")
    fields = raw[close + 2 :].split()
    try:
        return Stat(
            comm=raw[raw.find(b"(") + 1 : close].decode(errors="replace"),
            state=fields[0].decode(),
            ppid=int(fields[1]),
            tty_nr=int(fields[4]),
            start_time=int(fields[19]),
            flags=int(fields[6]),
        )
    except (IndexError, ValueError):
        return None


def boottime_ns_from_monotonic_ns(ns: int) -> int:
    """A CLOCK_MONOTONIC time (a proc connector timestamp) on CLOCK_BOOTTIME, the clock
    start times count in (they part after a suspend)."""
    return ns + time.clock_gettime_ns(time.CLOCK_BOOTTIME) - time.monotonic_ns()


def ticks_from_monotonic_ns(ns: int) -> int:
    """A CLOCK_MONOTONIC time (a proc connector timestamp) as /proc start-time ticks."""
    return boottime_ns_from_monotonic_ns(ns) * _CLK_TCK // 1_000_000_000


def ticks_from_boottime_ns(ns: int) -> int:
    """A CLOCK_BOOTTIME time in ns (a task's start_boottime) as /proc start-time ticks:
    exactly what /proc/<pid>/stat says for the same task."""
    return ns // NS_PER_TICK


def ticks_to_seconds(ticks: int) -> float:
    return ticks / _CLK_TCK


def _readlink(path: str, dir_fd: int | None = None) -> str | None:
    try:
        return os.readlink(path, dir_fd=dir_fd)
    except OSError:
        return None


def exe(pid: int) -> str | None:
    return _readlink(f"/proc/{pid}/exe")


def cwd(pid: int) -> str | None:
    return _readlink(f"/proc/{pid}/cwd")


def argv(pid: int) -> list[str] | None:
    """The argument vector; None if gone, [] for kernel threads and zombies."""
    return _parse_argv(_read(f"/proc/{pid}/cmdline"))


def _parse_argv(raw: bytes | None) -> list[str] | None:
    if raw is None:
        return None
    if not raw:
        return []
    return [a.decode(errors="replace") for a in raw.rstrip(b"\0").split(b"\0")]


def ids(pid: int) -> tuple[int, int] | None:
    """(effective uid, effective gid) from /proc/<pid>/status."""
    return _parse_ids(_read(f"/proc/{pid}/status"))


def _parse_ids(raw: bytes | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    # "Uid:\treal\teffective\tsaved\tfs" and the same for Gid, a few lines in
    found: list[int] = []
    for key in (b"\nUid:", b"\nGid:"):
        at = raw.find(key)
        if at < 0:
            return None
        fields = raw[at + 5 : raw.find(b"\n", at + 5)].split()
        if len(fields) < 2 or not fields[1].isdigit():
            return None
        found.append(int(fields[1]))
    return found[0], found[1]


def cgroup(pid: int) -> str | None:
    return _parse_cgroup(_read(f"/proc/{pid}/cgroup"))


def _parse_cgroup(raw: bytes | None) -> str | None:
    if raw is None:
        return None
    for line in raw.split(b"\n"):
        if line.startswith(b"0::"):
            return line[3:].decode(errors="replace")
    return None


def tty_name(tty_nr: int) -> str | None:
    """A controlling terminal number as a device name (None: no terminal)."""
    if tty_nr == 0:
        return None
    major = (tty_nr >> 8) & 0xFFF
    minor = (tty_nr & 0xFF) | ((tty_nr >> 12) & 0xFFF00)
    if 136 <= major <= 143:
        return f"pts/{(major - 136) * 256 + minor}"
    if major == 4:
        return f"tty{minor}" if minor < 64 else f"ttyS{minor - 64}"
    return f"tty({major}:{minor})"


def user_name(uid: int) -> str | None:
    if uid not in _user_names:
        try:
            _user_names[uid] = pwd.getpwuid(uid).pw_name
        except KeyError:
            _user_names[uid] = None
    return _user_names[uid]


def describe(pid: int, expect_start: int | None = None) -> dict[str, Any] | None:
    """Everything kport reports about a process, or None if it is gone (or is another one).

    ``expect_start``: the start time the caller knows for this pid; a different one means
    the pid now names another process, whose details must not be reported.
    """
    try:
        proc_dir = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return describe_at(proc_dir, expect_start, pid)
    finally:
        os.close(proc_dir)


def _owner_by_pidfd(pid: int, proc_dir: int) -> tuple[int, int, str | None] | tuple[()] | None:
    """(euid, egid, cgroup) of the process ``proc_dir`` pins, through a pidfd; ``()`` if
    that process is gone; None if the kernel cannot say (read /proc instead)."""
    global _pidfd_info
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as err:
        return () if err.errno == errno.ESRCH else None
    try:
        info = _pidfd_get_info(pidfd)
        if info is None:
            return ()
        mask, cgroup_id, *ids = info
        if not mask & _PIDFD_INFO_CGROUPID:
            cgroup = _parse_cgroup(_read("cgroup", proc_dir))
        else:
            cgroup = _cgroup_paths.get(cgroup_id, "")
            if cgroup == "":
                cgroup = _parse_cgroup(_read("cgroup", proc_dir))
                again = _pidfd_get_info(pidfd)
                if again is not None and again[1] == cgroup_id:  # it did not move meanwhile
                    if len(_cgroup_paths) >= _CGROUP_PATHS_MAX:
                        _cgroup_paths.clear()
                    _cgroup_paths[cgroup_id] = cgroup
    except OSError as err:
        if err.errno in (errno.ENOTTY, errno.EINVAL, errno.EOPNOTSUPP):
            _pidfd_info = False  # this kernel has no PIDFD_GET_INFO: /proc from now on
        return None
    finally:
        os.close(pidfd)
    # The pidfd named whoever had the pid when it was opened. The process the directory
    # pins being there still, after every read, means the pid was not reused meanwhile:
    # all of it is that one process's.
    try:
        os.stat("stat", dir_fd=proc_dir)
    except OSError:
        return ()
    return ids[5], ids[6], cgroup  # euid, egid


def _pidfd_get_info(pidfd: int) -> tuple[int, ...] | None:
    """PIDFD_GET_INFO's fields (credentials and cgroup id asked for); None if the process
    has been reaped. Other errors raise."""
    buf = bytearray(_PIDFD_INFO.size)
    _MASK.pack_into(buf, 0, _PIDFD_INFO_CREDS | _PIDFD_INFO_CGROUPID)
    try:
        fcntl.ioctl(pidfd, _PIDFD_GET_INFO, buf)
    except OSError as err:
        if err.errno == errno.ESRCH:
            return None
        raise
    return _PIDFD_INFO.unpack(buf)


def describe_at(
    proc_dir: int, expect_start: int | None = None, pid: int | None = None
) -> dict[str, Any] | None:
    """:func:`describe` through an open /proc/<pid> directory fd (that process, or None).
    Given ``pid`` (the directory's), owner and cgroup may come from a pidfd."""
    stat = _parse_stat(_read("stat", proc_dir))
    if stat is None or (expect_start is not None and stat.start_time != expect_start):
        return None
    info: dict[str, Any] = {
        "exe": _readlink("exe", proc_dir),
        "argv": _parse_argv(_read("cmdline", proc_dir)),
        "cwd": _readlink("cwd", proc_dir),
    }
    # read last: the process being there still says the reads above are all its own
    owner = _owner_by_pidfd(pid, proc_dir) if pid is not None and _pidfd_info else None
    if owner is None:
        status = _read("status", proc_dir)
        if status is None:
            return None  # gone while we read: the reads that failed say nothing true
        ids = _parse_ids(status)
        uid, gid = ids if ids else (None, None)
        cgroup = _parse_cgroup(_read("cgroup", proc_dir))
    elif not owner:
        return None
    else:
        uid, gid, cgroup = owner
    info["cgroup"] = cgroup
    info["uid"], info["gid"] = uid, gid
    info["user"] = user_name(uid) if uid is not None else None
    info["ppid"] = stat.ppid
    info["start_time"] = stat.start_time
    info["comm"] = stat.comm
    info["tty"] = tty_name(stat.tty_nr)
    return info


def all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]
