"""The exporter against the limits of what keeps events: a stream whose age limit removed
a host's old messages (the exporter goes on from its cursor, sending nothing again), and
a journal whose retention removed events never sent (the fleet gets one ``lost`` event
with the range, and `kport status` says it)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from bench.export import Broker
from tests.fleet.hosts import NATS_SERVER, Activity, Host, stream_messages

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed"),
]


def _start(host: Host, what: str, *args: str, config: str) -> subprocess.Popen[bytes]:
    path = host.where / f"{what}.toml"
    path.write_text(config)
    return host._spawn(what, *args, "--config", str(path))


def stream_count(url: str) -> int:
    import nats

    async def count() -> int:
        nc = await nats.connect(url)
        try:
            return int((await nc.jetstream().stream_info("KPORT")).state.messages)
        finally:
            await nc.close()

    return asyncio.run(count())


def wait_for(what: str, check: Callable[[], object], seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    (tmp_path / "broker").mkdir()
    (tmp_path / "h1").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    one = Host("h1", tmp_path / "h1", broker)
    try:
        yield one
    finally:
        one.stop()
        broker.kill()


def test_a_stream_that_aged_out_a_hosts_messages_is_not_sent_them_again(host: Host) -> None:
    host.start_daemon()
    export = (
        f'[export]\nurl = "{host.broker.url}"\nhost = "h1"\n'
        f"max_age_days = {3 / 86400!r}\n"  # the stream keeps a message 3 s
    )
    args = ("export", "--runtime-dir", str(host.run_dir), "--state-dir", str(host.where / "export"))
    host.exporter = _start(host, "exporter", *args, config=export)
    with Activity():
        time.sleep(1)
    newest = max(host.journal_seqs())
    wait_for(
        "the exporter did not catch up",
        lambda: host.status().get("sources", {}).get("proc", {}).get("acked", 0) >= newest,
    )
    host.stop_exporter()
    cursor = host.status()["sources"]["proc"]["acked"]
    assert cursor > 0
    wait_for("the stream did not age out", lambda: stream_count(host.broker.url) == 0)

    host.exporter = _start(host, "exporter", *args, config=export)
    with Activity():
        time.sleep(1)
    newest = max(host.journal_seqs())
    wait_for(
        "the exporter did not go on",
        lambda: host.status().get("sources", {}).get("proc", {}).get("acked", 0) >= newest,
    )
    seqs = [m["seq"] for m in stream_messages(host.broker.url)]
    assert seqs and min(seqs) == cursor + 1, (cursor, min(seqs))  # nothing sent again
    assert len(seqs) == len(set(seqs))


def test_events_retention_removed_unsent_reach_the_fleet_as_one_lost_event(host: Host) -> None:
    daemon = f"[journal]\nmax_age_days = {1 / 86400!r}\n"  # the journal keeps an event 1 s
    host.daemon = _start(
        host,
        "daemon",
        *("serve", "--runtime-dir", str(host.run_dir), "--state-dir", str(host.state_dir)),
        config=daemon,
    )
    wait_for("the daemon did not start", (host.run_dir / "journal.sock").exists)
    with Activity():  # no exporter yet: these are never sent
        time.sleep(1)
    wait_for("retention did not run", lambda: min(host.journal_seqs(), default=1) > 1, 30)
    host.start_exporter()
    wait_for(
        "no lost event reached the fleet",
        lambda: any(m["data"].get("kind") == "lost" for m in stream_messages(host.broker.url)),
    )
    (lost,) = [m["data"] for m in stream_messages(host.broker.url) if m["data"]["kind"] == "lost"]
    assert lost["host"] == "h1" and lost["source"] == "proc" and lost["first_seq"] == 1
    assert lost["last_seq"] >= 1 and lost["count"] == lost["last_seq"] - lost["first_seq"] + 1
    # everything after the range arrives, once
    newest = max(host.journal_seqs())
    wait_for(
        "the exporter did not catch up",
        lambda: host.status().get("sources", {}).get("proc", {}).get("acked", 0) >= newest,
    )
    sent = [m["seq"] for m in stream_messages(host.broker.url) if m["data"]["kind"] != "lost"]
    assert len(sent) == len(set(sent)) and min(sent) == lost["last_seq"] + 1

    status = subprocess.run(
        [
            *(sys.executable, "-m", "kport.cli", "status", "--runtime-dir", str(host.run_dir)),
            *("--state-dir", str(host.where / "export")),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert f"{lost['count']} lost" in status, status
    saved = json.loads((host.where / "export" / "h1.status.json").read_text())
    assert saved["sources"]["proc"]["lost"] == lost["count"]
