"""`kport decide`'s answers as typed, and how it shows a request."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

import kport
from kport.cli import decide
from kport.cli.decide import answer_of, describe, parse_answer
from tests.conftest import run, wait_for

CONNECT = {
    "kind": "connect",
    "direction": "out",
    "protocol": "tcp",
    "dst": "192.0.2.1",
    "dport": 443,
    "host": "a.example.org",
    "interface": "eth0",
    "pid": 7,
    "user": "alice",
    "cmdline": ["curl", "https://a.example.org"],
}


@pytest.mark.parametrize(
    ("typed", "answer"),
    [
        ("a", {"verdict": "allow", "duration": "once"}),
        ("R", {"verdict": "reject", "duration": "always"}),
        ("d15", {"verdict": "deny", "duration": 15}),
        ("a!", {"verdict": "allow", "duration": "restart"}),
        ("x", None),
        ("a-1", None),
    ],
)
def test_connection_answers(typed: str, answer: object) -> None:
    assert parse_answer(typed, connection=True) == answer


def test_file_answers_have_no_reject_and_no_duration() -> None:
    assert parse_answer("D", connection=False) == {"verdict": "deny", "remember": True}
    assert parse_answer("r", connection=False) is None
    assert parse_answer("a5", connection=False) is None
    assert answer_of("reject", {"kind": "open_perm", "path": "/x"}) == {"verdict": "deny"}
    assert answer_of("reject", CONNECT) == {"verdict": "reject"}
    with pytest.raises(ValueError, match="allow, deny or reject"):
        answer_of("maybe", CONNECT)


def test_a_connection_is_shown_with_its_host_and_process() -> None:
    first, second = describe(CONNECT).splitlines()
    assert first == "connect tcp to 192.0.2.1 (a.example.org) port 443 on eth0"
    assert second == "  by pid 7 (alice): curl https://a.example.org"
    inbound = describe({**CONNECT, "direction": "in", "src": "198.51.100.2", "dport": 22})
    assert inbound.startswith("incoming tcp from 198.51.100.2 to port 22")


def test_a_prompt_shows_the_program_hash_and_whether_it_changed() -> None:
    sha = "ab" * 32
    lines = describe({**CONNECT, "exe_sha256": sha, "hash_changed": False}).splitlines()
    assert lines[2] == f"  sha256 {sha}"
    changed = describe({**CONNECT, "exe_sha256": sha, "hash_changed": True}).splitlines()
    assert changed[2] == f"  sha256 {sha}  CHANGED since the last decision about this program"


def test_a_policy_answers_both_ports_in_their_reader_threads_and_stops_at_count(
    rundir: Path,
) -> None:
    async def main() -> None:
        async with (
            kport.ServerPort("file-decide", runtime_dir=rundir) as files,
            kport.ServerPort("net-decide", runtime_dir=rundir) as nets,
        ):
            done = asyncio.create_task(
                asyncio.to_thread(decide.run, policy="deny", runtime_dir=str(rundir), count=3)
            )
            await wait_for(lambda: bool(files.connections and nets.connections))
            file_conn, net_conn = files.connections[0], nets.connections[0]
            answers = await asyncio.gather(
                files.request(file_conn, {"kind": "open_perm", "path": "/x"}),
                nets.request(net_conn, CONNECT),
                files.request(file_conn, {"kind": "open_perm", "path": "/y"}),
            )
            assert answers == [{"verdict": "deny"}] * 3
            assert await asyncio.wait_for(done, 10) == 0  # three answers: done

    run(main())
