"""Small reads of /proc that identify a process: its start time and executable."""

from __future__ import annotations

import os

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks after boot (stat field 22), or None if gone.

    With the pid, this is the process's identity: a pid alone may be reused.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    try:
        return int(fields[19])
    except (IndexError, ValueError):
        return None


def ticks_to_seconds(ticks: int) -> float:
    return ticks / _CLK_TCK


def exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None
