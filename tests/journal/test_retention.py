"""Retention with a real SQLite file while writes go on: by age, by size, and what a
replay is told was removed."""

from __future__ import annotations

import os
import time
from pathlib import Path

from kport.journal.store import Journal
from tests.journal.conftest import append, read_all, wait_committed

OLD_NS = 1_000_000_000 * 3600  # 1970, far past any retention


def test_retention_by_age_while_writes_go_on(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j.db", max_age_s=3600, commit_interval_s=0.01)
    j.open()
    j.start()
    append(j, 1, 2000, ts=OLD_NS)
    append(j, 2001, 3000)
    wait_committed(j, 3000)
    j.retention.last_run = 0  # the next commit prunes
    append(j, 3001, 3100)
    deadline = time.monotonic() + 10
    while j.retention.pruned < 1000:
        assert time.monotonic() < deadline, j.status()
        time.sleep(0.02)
    wait_committed(j, 3100)
    seqs, gaps = read_all(j, 0, 3100)
    # Whole chunks go, once their newest event is too old: a chunk holding both old and
    # new events stays. Every new event stays.
    kept = seqs[0]
    assert 1000 < kept <= 2001 and seqs == list(range(kept, 3101))
    assert [(g.first, g.last, g.reason) for g in gaps] == [(1, kept - 1, "removed by retention")]
    j.close()


def test_retention_by_size_keeps_the_newest(tmp_path: Path) -> None:
    limit = 1 << 20
    j = Journal(tmp_path / "j.db", max_bytes=limit, commit_interval_s=0.01)
    j.open()
    j.start()
    for first in range(1, 20_001, 1000):
        append(j, first, first + 999, noise=300)
        wait_committed(j, first + 999)
        j.retention.last_run = 0
    append(j, 20_001, 20_001, noise=300)
    wait_committed(j, 20_001)
    deadline = time.monotonic() + 10
    while j.size_bytes() > limit:
        assert time.monotonic() < deadline, (j.size_bytes(), j.status())
        j.retention.last_run = 0
        time.sleep(0.05)
    seqs, gaps = read_all(j, 0, 20_001)
    assert seqs[-1] == 20_001 and seqs == list(range(seqs[0], 20_002))
    assert 1000 < len(seqs) < 20_000
    assert gaps[0].first == 1 and gaps[0].last == seqs[0] - 1
    j.close()
    assert os.path.getsize(tmp_path / "j.db") < 2 * limit
