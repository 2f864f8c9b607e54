"""`kport.history` and `kport.fetch` before they reach a daemon: a bad filter is refused
before anything is sent, and a missing journal port is said to be missing. With the
daemon they are in tests/daemon/test_daemon.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import kport


def test_a_bad_filter_is_refused_before_anything_is_sent(rundir: Path) -> None:
    with pytest.raises(ValueError, match="unknown query field 'colour'"):
        next(kport.history(runtime_dir=rundir, colour="red"))  # no port there: not reached
    with pytest.raises(ValueError, match="'pids' must be list"):
        kport.fetch(1, 10, runtime_dir=rundir, pids=5)


def test_without_a_journal_port_it_is_port_not_found(rundir: Path) -> None:
    with pytest.raises(kport.PortNotFound, match="journal"):
        next(kport.history(runtime_dir=rundir))
