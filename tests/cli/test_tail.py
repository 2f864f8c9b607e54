"""`kport tail`'s lines: each source's event read as a person scanning the log needs it."""

from __future__ import annotations

from typing import Any

from kport.cli.tail import format_line

TS = 1_764_860_000_123_000_000
PROCESS = {"pid": 4242, "user": "alice", "argv": ["cat", "notes.txt"], "exe": "/usr/bin/cat"}


def line(**event: Any) -> str:
    return format_line({"ts": TS, **PROCESS, **event})


def test_a_process_event_names_its_command_and_parent() -> None:
    text = line(source="proc", kind="exit", code=0, run_time_s=0.25, parent_exe="/bin/sh", ppid=7)
    assert text.endswith("4242 alice      cat notes.txt code=0 ran=0.250s <- /bin/sh(7)")


def test_a_file_event_names_the_file_the_verdict_and_who_gave_it() -> None:
    asked = line(
        source="file",
        kind="open_perm",
        path="/srv/notes.txt",
        verdict="allow",
        rule="default",
        decided_by="no answer within 10 s",
    )
    assert " open_perm         4242 alice      /srv/notes.txt -> allow (no" in asked
    assert "-> allow (no answer within 10 s)  by" in asked
    assert asked.endswith("  by cat notes.txt")
    answered = line(source="file", path="/k", verdict="deny", decided_by="decided")
    assert "/k -> deny (decision client)" in answered
    by_rule = line(source="file", kind="open_exec_perm", path="/k", verdict="deny", rule="no keys")
    assert "/k -> deny (rule 'no keys')  by" in by_rule
    by_default = line(source="file", kind="open_perm", path="/k", verdict="deny", rule="default")
    assert "/k -> deny (no rule matched)" in by_default
    net_default = line(source="net", verdict="allow", rule="default", decided_by="default")
    assert "-> allow (no rule matched)" in net_default


def test_a_file_notification_says_what_else_happened_to_the_file() -> None:
    moved = line(source="file", kind="move", path="/srv/b", **{"from": "/srv/a"})
    assert "/srv/a -> /srv/b  by cat notes.txt" in moved
    merged = line(source="file", kind="create", path="/srv/d", dir=True, kinds=["create", "attrib"])
    assert "/srv/d/ [create+attrib]  by" in merged
    gone = line(source="file", kind="close_write", path="/srv/x", deleted=True, gone=True)
    assert "/srv/x [deleted]  by cat notes.txt (gone)" in gone


def test_a_connection_names_its_peer_and_verdict() -> None:
    out = line(
        source="net",
        kind="connect",
        direction="out",
        protocol="tcp",
        dst="10.9.9.9",
        dport=443,
        host="example.org",
        verdict="reject",
        decided_by="client",
    )
    assert "tcp to 10.9.9.9 (example.org) port 443 -> reject (decision client)  by cat" in out
    inbound = line(
        source="net", kind="connect", direction="in", protocol="udp", src="10.9.9.8", dport=53
    )
    assert "udp from 10.9.9.8 to port 53  by cat notes.txt" in inbound


def test_a_loss_is_a_line_of_its_own() -> None:
    lost = format_line({"ts": TS, "kind": "lost", "count": 12, "reason": "queue full"})
    assert lost.endswith("LOST     12 events (queue full)")
