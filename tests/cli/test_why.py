"""`kport query --why SEQ` on a real daemon's file verdicts: a deny by a rule (with what
each of its fields matched), an allow by the default, the default verdict when no
decision client is there, a decision client's answer (which client), and the deadline
passing; and a refusal for an event that is no verdict."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import kport
from tests.daemon.test_daemon import cat, decider, file_daemon, wait_connected, watched_mount

CAT = os.path.realpath(shutil.which("cat") or "/usr/bin/cat")

pytestmark = [
    pytest.mark.timeout(180),
    pytest.mark.skipif(os.geteuid() != 0, reason="fanotify permission events need root"),
]


def verdict_of(rundir: Path, path: Path) -> dict[str, Any]:
    """The newest journaled verdict about ``path`` (journaled within a commit interval)."""
    deadline = time.monotonic() + 30
    while True:
        for event in kport.history(sources=["file"], runtime_dir=rundir, newest_first=True):
            if event.get("path") == str(path) and "verdict" in event:
                return event
        assert time.monotonic() < deadline, f"no verdict about {path} in the journal"
        time.sleep(0.1)


def why(rundir: Path, seq: int) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "query", "--why", str(seq), "--runtime-dir", rundir],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_every_verdict_is_explained(rundir: Path, tmp_path: Path) -> None:
    with watched_mount(tmp_path) as mount:
        for name in ("secret.txt", "ask-1.txt", "ask-2.txt", "ask-3.txt"):
            (mount / name).write_text("x\n")
        rules = tmp_path / "rules.toml"
        rules.write_text(
            'default = "log"\n'
            "\n"
            "[[rule]]\n"
            'name = "no secrets"\n'
            'action = "deny"\n'
            f'path = ["{mount}/secret*"]\n'
            f'exe = ["{CAT}"]\n'
            "\n"
            "[[rule]]\n"
            'action = "ask"\n'
            f'path = ["{mount}/ask-*"]\n'
        )
        config = tmp_path / "kport.toml"
        config.write_text(f'[file]\nrules = ["{rules}"]\n')
        with file_daemon(
            rundir,
            mount,
            *("--config", str(config), "--default-verdict", "allow", "--decision-deadline", "2"),
        ):
            # a deny by a rule: its name, its file and line, and what each field matched
            assert cat(mount / "secret.txt")[0] != 0
            denied = verdict_of(rundir, mount / "secret.txt")
            text = why(rundir, denied["seq"])
            assert f"decided: DENY by rule 'no secrets' ({rules}:3)" in text
            assert f"path = ['{mount}/secret*']  ←  {mount}/secret.txt" in text
            assert f"exe = ['{CAT}']  ←  {CAT}" in text
            assert denied["why"]["fields"] == {"path": [f"{mount}/secret*"], "exe": [CAT]}

            # an allow by the default: no rule matched
            assert cat(mount / "data.txt")[0] == 0
            logged = verdict_of(rundir, mount / "data.txt")
            assert logged["verdict"] == "allow"
            assert "decided: ALLOW by the default action (log): no rule matched" in why(
                rundir, logged["seq"]
            )

            # asked, with no decision client: the default verdict, and the rule that asked
            assert cat(mount / "ask-1.txt")[0] == 0
            text = why(rundir, verdict_of(rundir, mount / "ask-1.txt")["seq"])
            assert "by the default verdict (default_verdict): no decision client" in text
            assert f"asked because of rule 'rule 2 ({rules}:9)'" in text

            # a decision client's answer: which client
            client = decider(
                rundir,
                "msg = conn.get_message(timeout=60)\n"
                "conn.reply(msg, {'verdict': 'deny'})\n"
                "time.sleep(30)\n",
            )
            try:
                wait_connected(client)
                assert cat(mount / "ask-2.txt")[0] != 0
                text = why(rundir, verdict_of(rundir, mount / "ask-2.txt")["seq"])
                assert f"decided: DENY by a decision client: pid {client.pid} (python" in text
            finally:
                client.terminate()
                client.communicate(timeout=10)

            # a client that does not answer in time: the deadline, then the default
            client = decider(rundir, "msg = conn.get_message(timeout=60)\ntime.sleep(30)\n")
            try:
                wait_connected(client)
                assert cat(mount / "ask-3.txt")[0] == 0  # the default verdict: allow
                text = why(rundir, verdict_of(rundir, mount / "ask-3.txt")["seq"])
                assert "the deadline passed (no answer within 2 s)" in text
            finally:
                client.terminate()
                client.communicate(timeout=10)

            # an event that is no verdict
            exec_event = next(
                e for e in kport.history(sources=["proc"], runtime_dir=rundir, limit=50)
            )
            result = subprocess.run(
                [
                    *(sys.executable, "-m", "kport.cli", "query"),
                    *("--why", str(exec_event["seq"]), "--runtime-dir", str(rundir)),
                ],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert result.returncode == 1
            assert "is not a verdict: only file and net decisions have one" in result.stderr
