"""`kport query` and its helpers: time and user parsing, and reading a journal file offline."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import msgpack
import pytest

from kport import cli
from kport.cli.query import parse_time, uid_of
from kport.journal.chunks import row_of
from kport.journal.store import Journal

NOW_NS = 1_795_000_000 * 10**9


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10m", NOW_NS - 600 * 10**9),
        ("2h", NOW_NS - 7200 * 10**9),
        ("1.5d", NOW_NS - 129_600 * 10**9),
        ("1795000000", NOW_NS),
    ],
)
def test_parse_time(text: str, expected: int) -> None:
    assert parse_time(text, now_ns=NOW_NS) == expected


def test_parse_time_iso_and_errors() -> None:
    when = dt.datetime(2026, 11, 21, 10, 0)
    assert parse_time("2026-11-21T10:00") == int(when.timestamp() * 1e9)
    with pytest.raises(ValueError, match="'soon' is not a duration ago"):
        parse_time("soon")


def test_uid_of() -> None:
    assert uid_of("root") == 0 and uid_of("1234") == 1234
    with pytest.raises(ValueError, match="no user named 'no-such-user-kport'"):
        uid_of("no-such-user-kport")


def test_query_reads_a_journal_file_without_the_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = Journal(tmp_path / "j.db")
    journal.open()
    journal.start()
    for seq in range(1, 11):
        event = {"seq": seq, "ts": time.time_ns(), "source": "proc", "kind": "exec"}
        event |= {"pid": seq, "argv": ["tool", f"n{seq}"], "exe": "/usr/bin/tool"}
        journal.append(row_of(seq, event, msgpack.packb(event)))
    journal.close()
    db = str(tmp_path / "j.db")
    assert cli.main(["query", "--db", db, "--first", "3", "--last", "5", "--json"]) == 0
    assert [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()] == [3, 4, 5]
    assert cli.main(["query", "--db", db, "--text", "n7"]) == 0
    out = capsys.readouterr().out
    assert "tool n7" in out and "n8" not in out
    assert cli.main(["query", "--db", db, "--kind", "exit"]) == 0
    assert "no events match" in capsys.readouterr().err
    assert cli.main(["query", "--db", str(tmp_path / "none.db")]) == 1
    assert "no journal at" in capsys.readouterr().err
