"""A process's identity, (pid, start time): what tells a process from a later one that
was given its pid.

Ports and rings need no more than this of a process, so it stands apart from the kernel
sources' fuller reads of /proc (:mod:`kport.sources.procinfo`): one small file, read
alone, and nothing else of kport imported.
"""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot, or None if it is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.read(fd, 65536)
    except OSError:
        return None
    finally:
        os.close(fd)
    # comm (field 2) may hold spaces and parentheses: the fields start after the last ')';
    # the start time is field 22, the 20th after it.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def alive(pid: int, started: int) -> bool:
    """Whether the process ``pid`` that started at ``started`` still exists (a zombie
    does, until it is reaped); a pid that now names a later process is not it."""
    return start_time(pid) == started
