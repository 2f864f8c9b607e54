"""What the journal's tests share: events, appending them, waiting for a commit, reading
a range whole, and a journal that commits every 10 ms."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from kport.journal.chunks import row_of
from kport.journal.store import Journal


def event(seq: int, **extra: Any) -> dict[str, Any]:
    base = {
        "seq": seq,
        "ts": time.time_ns(),
        "source": "proc",
        "kind": "exec",
        "pid": 1000 + seq % 7,
        "uid": seq % 3,
        "exe": f"/usr/bin/tool{seq % 5}",
        "argv": ["tool", f"arg-{seq}"],
    }
    base.update(extra)
    return base


def append(journal: Journal, first: int, last: int, *, noise: int = 0, **extra: Any) -> None:
    """Events first..last; ``noise`` random bytes each make them incompressible."""
    for seq in range(first, last + 1):
        ev = event(seq, **extra)
        if noise:
            ev["noise"] = os.urandom(noise)
        journal.append(row_of(seq, ev, msgpack.packb(ev)))


def wait_committed(journal: Journal, seq: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while journal.committed < seq:
        assert time.monotonic() < deadline, f"not committed: {journal.status()}"
        time.sleep(0.01)


def read_all(journal: Journal, after: int, upto: int, limit: int = 1000) -> tuple[list[int], list]:
    seqs: list[int] = []
    gaps = []
    while after < upto:
        page = journal.read(after, upto, limit)
        seqs += [seq for seq, _ in page.items]
        gaps += page.gaps
        assert page.through > after
        after = page.through
    return seqs, gaps


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = Journal(tmp_path / "journal.db", commit_interval_s=0.01)
    assert j.open() == 0
    j.start()
    yield j
    j.close()
