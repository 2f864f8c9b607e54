"""Secrets kept out: the built-in rules and the configuration's patterns one argument at
a time, then `kport serve` with the real kernel — the port, the journal file's bytes,
the journal port, the web UI and a decision client never see a secret, and a rule still
matches the original command line."""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
import zstandard
from hypothesis import given
from hypothesis import strategies as st

import kport
from bench.common import free_port
from kport.daemon import config
from kport.daemon.redact import MASK, Redactor
from kport.journal.chunks import chunk_items
from tests.conftest import SLACK_S, Netns
from tests.daemon.test_daemon import Collector, start_daemon, stop_daemon, wait_until

REDACTOR = Redactor()


def redacted(*argv: str) -> list[str]:
    return REDACTOR.argv(list(argv))[0]


# --- the rules ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["/bin/true", "--password=hunter2", "--token", "abc"],
            ["/bin/true", "--password=***", "--token", "***"],
        ),
        (
            ["x", "-password", "p", "--db-password=q"],
            ["x", "-password", "***", "--db-password=***"],
        ),
        (
            ["x", "--api-key", "k", "--client-secret=s"],
            ["x", "--api-key", "***", "--client-secret=***"],
        ),
        (["x", "--auth", "u:p", "--access-token=t"], ["x", "--auth", "***", "--access-token=***"]),
        (["mysql", "-uroot", "-phunter2", "db"], ["mysql", "-uroot", "-p***", "db"]),
        (
            ["/usr/bin/mariadb-dump", "-pX", "-p", "db"],
            ["/usr/bin/mariadb-dump", "-p***", "-p", "db"],
        ),
        (["sshpass", "-p", "pw", "ssh", "h"], ["sshpass", "-p", "***", "ssh", "h"]),
        (
            ["git", "clone", "https://alice:s3cret@example.org/r.git"],
            ["git", "clone", "https://alice:***@example.org/r.git"],
        ),
        (
            ["psql", "postgresql://app:pw@db:5432/x?sslmode=require"],
            ["psql", "postgresql://app:***@db:5432/x?sslmode=require"],
        ),
        (
            [
                "curl",
                "-H",
                "Authorization: Bearer abc.def",
                "-u",
                "bob:pw",
                "https://x/?a=1&token=z",
            ],
            [
                "curl",
                "-H",
                "Authorization: Bearer ***",
                "-u",
                "bob:***",
                "https://x/?a=1&token=***",
            ],
        ),
        (["curl", "--user=bob:pw", "-ubob:pw2"], ["curl", "--user=bob:***", "-ubob:***"]),
        (["wget", "--header=authorization:xyz"], ["wget", "--header=authorization:***"]),
        (
            ["env", "PGPASSWORD=pw", "MYSQL_PWD=x", "psql"],
            ["env", "PGPASSWORD=***", "MYSQL_PWD=***", "psql"],
        ),
        (["keytool", "-storepass", "changeit"], ["keytool", "-storepass", "***"]),
    ],
)
def test_the_usual_forms_are_redacted_and_their_keys_kept(
    argv: list[str], expected: list[str]
) -> None:
    out, changed = REDACTOR.argv(argv)
    assert (out, changed) == (expected, True)


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-pl"],  # -p is a password only for mysql-like programs
        ["mysql", "-p", "db"],  # -p alone asks for it; db is the database
        ["docker", "login", "--password-stdin", "-u", "me"],  # a flag, not a value
        ["x", "--no-password", "file", "--ask-pass", "host"],
        ["x", "--bypass", "file", "--compass", "n"],
        ["x", "--token-file", "/run/t", "--password=", "git@github.com:x/y"],
        ["curl", "https://example.org/a@b", "-u", "bob"],
        ["/usr/bin/python3", "-m", "kport.cli", "serve", "--state-dir", "/var/lib/kport"],
    ],
)
def test_what_is_no_secret_comes_back_as_the_same_list(argv: list[str]) -> None:
    out, changed = REDACTOR.argv(argv)
    assert out is argv and not changed


def test_the_list_given_is_never_changed_in_place() -> None:
    argv = ["x", "--password", "p"]
    out, _ = REDACTOR.argv(argv)
    assert argv == ["x", "--password", "p"] and out == ["x", "--password", MASK]


def test_an_event_says_it_was_redacted_and_its_bytes_are_redacted_too() -> None:
    argv_bytes = [b"x", b"--password=s\xffcret", b"plain\xfe"]
    event: dict[str, Any] = {
        "argv": [a.decode(errors="replace") for a in argv_bytes],
        "argv_bytes": argv_bytes,
    }
    assert REDACTOR.event(event) is True
    assert event["redacted"] is True
    assert event["argv"] == ["x", "--password=***", "plain\ufffd"]
    assert event["argv_bytes"] == [b"x", b"--password=***", b"plain\xfe"]
    request: dict[str, Any] = {"cmdline": ["curl", "-H", "Authorization: Basic Zm9v"]}
    assert REDACTOR.event(request) and request["cmdline"][-1] == "Authorization: Basic ***"
    plain: dict[str, Any] = {"argv": ["ls"], "cmdline": None}
    assert REDACTOR.event(plain) is False and "redacted" not in plain


def test_patterns_replace_their_group_or_their_match() -> None:
    custom = Redactor(patterns=[r"^--pin=(\d+)$", r"sk_live_\w+"], defaults=False)
    assert custom.argv(["x", "--pin=1234", "key=sk_live_abc", "--password=p"]) == (
        ["x", "--pin=***", "key=***", "--password=p"],  # defaults off
        True,
    )
    both = Redactor(patterns=[r"ACME-(\w+)"])
    assert both.argv(["x", "--token=t", "ACME-zz"])[0] == ["x", "--token=***", "ACME-***"]


@pytest.mark.parametrize(
    ("pattern", "says"),
    [("(", "'(' is not a regular expression"), ("(a)(b)", "has 2 groups"), ("x*", "empty")],
)
def test_a_bad_pattern_is_a_config_error_naming_it(tmp_path: Path, pattern: str, says: str) -> None:
    path = tmp_path / "kport.toml"
    path.write_text(f"[redact]\npatterns = [{json.dumps(pattern)}]\n")
    with pytest.raises(config.ConfigError, match=f"redact.patterns: .*{re.escape(says)}"):
        config.load(path)
    path.write_text("[redact]\nenabled = false\ndefaults = false\npatterns = ['a(b)']\n")
    loaded = config.load(path).redact
    assert (loaded.enabled, loaded.defaults, loaded.patterns) == (False, False, ["a(b)"])


# --- every position, any value -------------------------------------------------------------

#: a value with none of the words the rules look for, so that it is known where it went
VALUES = st.text("ABCDEFGHIJLMNQRSUVWXYZ0123456789!%^_+", min_size=4, max_size=16)
#: arguments with nothing secret in them
WORDS = st.sampled_from(["-v", "--verbose", "-o", "out.txt", "file", "--level=3", "x=y", "-"])
FORMS = [
    lambda v: [f"--password={v}"],
    lambda v: ["--token", v],
    lambda v: ["--api-key", v],
    lambda v: [f"-secret={v}"],
    lambda v: [f"DB_PASSWORD={v}"],
    lambda v: [f"https://user:{v}@host/path"],
    lambda v: [f"Authorization: Bearer {v}"],
    lambda v: ["-H", f"authorization: {v}"],
    lambda v: [f"https://host/?x=1&access_token={v}"],
]


@given(
    program=st.sampled_from(["/bin/true", "curl", "tool"]),
    before=st.lists(WORDS, max_size=4),
    after=st.lists(WORDS, max_size=4),
    form=st.sampled_from(FORMS),
    value=VALUES,
)
def test_no_secret_value_survives_in_any_position(
    program: str, before: list[str], after: list[str], form: Any, value: str
) -> None:
    argv = [program, *before, *form(value), *after]
    out, changed = REDACTOR.argv(argv)
    assert changed and len(out) == len(argv)
    assert not any(value in arg for arg in out), out
    assert out[: 1 + len(before)] == argv[: 1 + len(before)]  # what came before, untouched


@given(program=st.sampled_from(["/bin/true", "ls", "mysql", "curl"]), rest=st.lists(WORDS))
def test_an_argv_without_secrets_is_returned_unchanged_and_identical(
    program: str, rest: list[str]
) -> None:
    argv = [program, *rest]
    out, changed = REDACTOR.argv(argv)
    assert out is argv and not changed


# --- the daemon ----------------------------------------------------------------------------

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="kport serve needs root")


def journal_bytes(rundir: Path) -> bytes:
    """Every chunk of the journal file, decompressed, back to back."""
    db = sqlite3.connect(f"file:{rundir / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        unzip = zstandard.ZstdDecompressor()
        return b"".join(unzip.decompress(data) for (data,) in db.execute("SELECT data FROM chunks"))
    finally:
        db.close()


def journal_has(rundir: Path, seq: int) -> bool:
    db = sqlite3.connect(f"file:{rundir / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT max(last) FROM chunks").fetchone()
        return row[0] is not None and row[0] >= seq
    finally:
        db.close()


def exec_of(collector: Collector, marker: str) -> dict[str, Any]:
    wait_until(lambda: any(marker in str(e.get("argv")) for e in collector.by_pid("exec").values()))
    return next(e for e in collector.by_pid("exec").values() if marker in str(e.get("argv")))


@pytest.fixture
def serving(rundir: Path) -> Iterator[tuple[subprocess.Popen[str], Collector]]:
    proc = start_daemon(rundir)
    try:
        collector = Collector(rundir)
        try:
            yield proc, collector
        finally:
            collector.close()
    finally:
        stop_daemon(proc, rundir)


def stored_item(rundir: Path, seq: int) -> bytes:
    """The journal file's bytes of one event, decompressed from its chunk."""
    db = sqlite3.connect(f"file:{rundir / 'state' / 'journal.db'}?mode=ro", uri=True)
    try:
        chunks = db.execute(
            "SELECT seqs, offsets, sources, data FROM chunks WHERE first <= ? AND last >= ?",
            (seq, seq),
        )
        return next(item for chunk in chunks for at, _, item in chunk_items(*chunk) if at == seq)
    finally:
        db.close()


@needs_root
def test_no_secret_reaches_the_port_the_journal_file_or_the_journal_port(
    serving: tuple[subprocess.Popen[str], Collector], rundir: Path
) -> None:
    _, collector = serving
    # the issue's own command, and one whose values are found nowhere else
    subprocess.run(["/bin/true", "--password=hunter2", "--token", "abc"], check=True)
    secret, token = f"hunter2-{secrets.token_hex(4)}", f"abcTOKEN{secrets.token_hex(4)}"
    marker = f"redact-{secrets.token_hex(4)}"
    subprocess.run(["/bin/true", marker, f"--password={secret}", "--token", token], check=True)
    own = exec_of(collector, marker)
    assert own["argv"] == ["/bin/true", marker, "--password=***", "--token", "***"]
    assert own["redacted"] is True
    issue = exec_of(collector, "--password=***', '--token', '***']")
    assert issue["argv"] == ["/bin/true", "--password=***", "--token", "***"]
    assert issue["redacted"] is True and issue["seq"] < own["seq"]

    def exit_of(pid: int) -> dict[str, Any] | None:
        exits = (e for e in list(collector.events) if e.get("kind") == "exit")
        return next((e for e in exits if e["pid"] == pid), None)

    wait_until(lambda: exit_of(own["pid"]) is not None)
    gone = exit_of(own["pid"])
    assert gone is not None and gone["argv"] == own["argv"] and gone["redacted"] is True
    assert not any(secret in str(e) or token in str(e) for e in list(collector.events))
    # the journal file, once committed: every chunk decompressed
    wait_until(lambda: journal_has(rundir, gone["seq"]))
    stored = journal_bytes(rundir)
    assert marker.encode() in stored  # the events are there...
    for value in (secret, token, "hunter2"):
        assert value.encode() not in stored, value  # ... their secrets are not
    for seq in (issue["seq"], own["seq"], gone["seq"]):
        item = stored_item(rundir, seq)
        assert b"--password=***" in item and b"hunter2" not in item and b"abc" not in item
    # the journal port, as kport query and the web UI's scroll-back read it
    found = list(kport.history(text=marker, runtime_dir=str(rundir), limit=100))
    assert {e["kind"] for e in found} >= {"exec", "exit"} and all(e["redacted"] for e in found)
    assert not list(kport.history(text="hunter2", runtime_dir=str(rundir), limit=100))


@needs_root
def test_the_process_tree_is_redacted(
    serving: tuple[subprocess.Popen[str], Collector], rundir: Path
) -> None:
    secret = f"tree-{secrets.token_hex(4)}"
    holder = subprocess.Popen(["/bin/sh", "-c", "sleep 60", "sh", f"--password={secret}"])
    try:
        wait_until(lambda: Path(f"/proc/{holder.pid}/cmdline").read_bytes().count(b"\0") >= 4)
        with kport.connect("journal", runtime_dir=rundir) as conn:
            tree = {e["pid"]: e for e in conn.send({"op": "processes"}, timeout=10)}
        assert tree[holder.pid]["argv"][-1] == "--password=***"
        assert tree[holder.pid]["redacted"] is True
        assert secret not in json.dumps(list(tree.values()))
    finally:
        holder.kill()
        holder.wait()


@needs_root
def test_redact_off_lets_the_command_line_through(rundir: Path, tmp_path: Path) -> None:
    path = tmp_path / "kport.toml"
    path.write_text("[redact]\nenabled = false\n")
    proc = start_daemon(rundir, "--config", str(path))
    try:
        collector = Collector(rundir)
        try:
            marker = f"plain-{secrets.token_hex(4)}"
            subprocess.run(["/bin/true", marker, "--password=visible"], check=True)
            event = exec_of(collector, marker)
            assert event["argv"][-1] == "--password=visible" and "redacted" not in event
        finally:
            collector.close()
    finally:
        stop_daemon(proc, rundir)


# --- the web UI ------------------------------------------------------------------------------


@needs_root
def test_no_secret_reaches_the_web_ui(
    serving: tuple[subprocess.Popen[str], Collector], rundir: Path
) -> None:
    _, collector = serving
    port, token = free_port(), secrets.token_urlsafe(16)
    base = f"http://127.0.0.1:{port}"
    ui = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "ui", "--runtime-dir", str(rundir)),
            *("--listen", f"127.0.0.1:{port}"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KPORT_UI_TOKEN": token},
    )
    try:
        assert ui.stdout is not None and ui.stdout.readline().startswith("kport ui: ")

        def get(path: str) -> str:
            request = urllib.request.Request(
                base + path, headers={"Authorization": f"Bearer {token}"}
            )
            with urllib.request.urlopen(request, timeout=10) as response:
                body: bytes = response.read()
                return body.decode()

        wait_until(lambda: json.loads(get("/api/status"))["ports"]["proc"]["state"] == "connected")
        secret = f"ui-{secrets.token_hex(4)}"
        marker = f"redact-ui-{secrets.token_hex(4)}"
        url = f"ws://127.0.0.1:{port}/api/live?token={token}"
        seen = []
        with websockets.sync.client.connect(url, origin=base) as live:  # type: ignore[arg-type]
            seen.append(live.recv(timeout=10))  # hello: attached from here on
            subprocess.run(["/bin/true", marker, "--token", secret], check=True)
            deadline = time.monotonic() + SLACK_S
            while marker not in "".join(map(str, seen)):
                assert time.monotonic() < deadline, "the exec never reached the page"
                seen.append(live.recv(timeout=SLACK_S))
        live_text = "".join(map(str, seen))
        assert f'"{marker}","--token","***"' in live_text.replace(", ", ",")
        assert secret not in live_text
        exec_of(collector, marker)
        wait_until(lambda: marker in get(f"/api/events?text={marker}"))
        assert secret not in get(f"/api/events?text={marker}")
        assert secret not in get("/api/processes")
    finally:
        ui.terminate()
        ui.communicate(timeout=20)


# --- rules see the original ---------------------------------------------------------------


@needs_root
def test_a_rule_matches_the_original_command_line_and_the_client_sees_it_redacted(
    netns: Netns, rundir: Path
) -> None:
    from tests.sources.test_net import SERVER, connect, decider, events, net_daemon

    server = netns.popen(netns.server, [sys.executable, "-c", SERVER, netns.server_ip])
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    secret = f"net-{secrets.token_hex(4)}"
    rules = (
        'default = "ask"\n'
        f'[[rule]]\nname = "by its password"\naction = "reject"\n'
        f'cmdline = ["*--password={secret}*"]\n'
    )
    with net_daemon(netns, rundir, rules, "--decision-deadline", "10"):
        assert connect(netns, 8081, marker=f"--password={secret}")["result"] == "refused"
        wait_until(lambda: len(events(rundir, "rejected")) == 1)
        rejected = events(rundir, "rejected")[0]
        assert rejected["rule"] == "by its password"  # matched on what the process ran
        assert rejected["argv"][-1] == "--password=***" and rejected["redacted"] is True
        client = decider(rundir, "def answer(r):\n    return {'verdict': 'allow'}\n")
        try:
            assert connect(netns, 8080, marker=f"--password=other{secret}x")["result"] == "ok"
        finally:
            client.kill()
            out, _ = client.communicate()
        request = json.loads(out.splitlines()[0])
        assert request["cmdline"][-1] == "--password=***" and request["redacted"] is True
        assert secret not in out
