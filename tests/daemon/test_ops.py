"""The daemon's request handlers, called as its ports call them: the process tree read
from /proc, and the requests they refuse."""

from __future__ import annotations

import asyncio
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kport import identity
from kport.daemon.ops import TREE_FIELDS, ControlOps, JournalOps, process_tree
from kport.errors import BadRequest
from kport.journal.store import Journal


def test_the_process_tree_has_every_process_with_its_fields() -> None:
    with subprocess.Popen(["sleep", "30"]) as sleeper:
        try:
            started = identity.start_time(sleeper.pid)
            tree = {entry["pid"]: entry for entry in process_tree()}
        finally:
            sleeper.kill()
    entry = tree[sleeper.pid]
    assert list(entry) == ["pid", *TREE_FIELDS]
    assert entry["ppid"] == os.getpid() and entry["start_time"] == started
    assert entry["uid"] == os.geteuid() and entry["comm"] == "sleep"
    assert entry["exe"] == os.path.realpath("/usr/bin/sleep")
    assert {1, os.getpid()} <= set(tree)


def test_the_journal_port_answers_processes_and_refuses_an_unknown_op(tmp_path: Path) -> None:
    async def main() -> list[dict[str, Any]]:
        with ThreadPoolExecutor(1, thread_name_prefix="kport-query") as pool:
            ops = JournalOps(Journal(tmp_path / "j.db"), pool)
            with pytest.raises(ValueError, match="known ops: query, processes"):
                await ops.handle(None, {"op": "tree"})
            tree: list[dict[str, Any]] = await ops.handle(None, {"op": "processes"})
            return tree

    assert os.getpid() in {entry["pid"] for entry in asyncio.run(main())}


def test_the_control_port_refuses_a_watch_without_a_file_source() -> None:
    ops = ControlOps(lambda: {"seq": 7}, {})
    assert ops.handle(None, {"op": "status"}) == {"seq": 7}
    with pytest.raises(BadRequest, match="file access is not enabled"):
        ops.handle(None, {"op": "watch", "path": "/tmp"})
