"""`kport tail --fleet`: the fleet's events from a real nats-server, the host on each,
one host or all, each (host, seq) once though the stream holds it twice."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common import free_port
from bench.export import Broker
from kport.fleet import subjects
from kport.fleet.reader import Seen
from tests.fleet.hosts import NATS_SERVER

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed"),
]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    found = Broker(tmp_path)
    found.start()
    try:
        yield found
    finally:
        assert found.proc is not None
        found.proc.kill()
        found.proc.wait()


def publish(url: str, events: list[tuple[str, dict[str, object], str]]) -> None:
    """(host, event, message id) as exporters would publish them."""
    import nats
    from nats.js.api import StreamConfig

    async def send() -> None:
        nc = await nats.connect(url)
        js = nc.jetstream()
        await js.add_stream(StreamConfig(name="KPORT", subjects=["kport.>"]))
        for host, event, msg_id in events:
            subject = subjects.subject(host, str(event["source"]), str(event["kind"]))
            await js.publish(
                subject,
                subjects.payload(event, host, msg_id.split(":")[1]),
                headers={"Nats-Msg-Id": msg_id},
            )
        await nc.close()

    asyncio.run(send())


def tail(url: str, *args: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "tail", "--fleet", url, "--since", "1", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_the_fleet_tails_with_hosts_one_host_and_no_repeat(broker: Broker) -> None:
    events = []
    for seq in (1, 2, 3):
        for host in ("alpha", "beta.example"):
            event = {"seq": seq, "ts": 1, "source": "proc", "kind": "exec", "pid": seq}
            events.append((host, event, subjects.message_id(subjects.token(host), "j1", seq)))
    # a redelivery, as after a server was killed: same host and seq, another message
    events.append(("alpha", events[0][1], "alpha:j1:1:again"))
    publish(broker.url, events)
    got = [json.loads(line) for line in tail(broker.url, "--json", "--count", "6")]
    assert sorted((e["host"], e["seq"]) for e in got) == sorted(
        (h, s) for h in ("alpha", "beta.example") for s in (1, 2, 3)
    )
    lines = tail(broker.url, "--host", "beta.example", "--count", "3")
    assert len(lines) == 3 and all(line.startswith("beta.example") for line in lines)
    assert all(" exec " in line for line in lines)


def test_a_missing_broker_or_stream_is_one_line(tmp_path: Path, broker: Broker) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "tail", "--fleet", broker.url, "--count", "1"],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        f"kport tail: no stream KPORT at {broker.url}: nothing exported yet?"
    )


def test_seen_drops_repeats_and_forgets_the_oldest() -> None:
    seen = Seen(limit=2)
    assert seen.first_time({"host": "a", "seq": 1})
    assert not seen.first_time({"host": "a", "seq": 1})
    assert seen.first_time({"host": "b", "seq": 1}) and seen.first_time({"host": "a", "seq": 2})
    assert seen.first_time({"host": "a", "seq": 1})  # forgotten: past the limit
    assert seen.repeats == 1


def test_the_fleet_answers_queries_by_host_kind_and_stream_sequence(broker: Broker) -> None:
    events = []
    for seq in (1, 2, 3, 4):
        for host in ("alpha", "beta"):
            kind = "exec" if seq % 2 else "exit"
            event = {"seq": seq, "ts": seq, "source": "proc", "kind": kind, "pid": seq}
            events.append((host, event, subjects.message_id(subjects.token(host), "j1", seq)))
    events.append(("alpha", events[0][1], "alpha:j1:1:again"))  # redelivered
    publish(broker.url, events)

    def query(*args: str) -> list[dict[str, object]]:
        result = subprocess.run(
            [sys.executable, "-m", "kport.cli", "query", "--fleet", broker.url, "--json", *args],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines()]

    got = query("--host", "alpha", "--kind", "exec")
    assert [(e["host"], e["seq"]) for e in got] == [("alpha", 1), ("alpha", 3)]
    assert len(query()) == 8  # the redelivery once
    # from stream sequence 7: the last two, and the redelivered copy, new to this reader
    assert [(e["host"], e["seq"]) for e in query("--stream-seq", "7")] == [
        ("alpha", 4),
        ("beta", 4),
        ("alpha", 1),
    ]
    newest = query("--newest-first", "--limit", "2")  # the redelivery is not new
    assert [(e["host"], e["seq"]) for e in newest] == [("beta", 4), ("alpha", 4)]


def test_a_host_whose_journal_was_wiped_is_not_a_repeat() -> None:
    seen = Seen()
    assert seen.first_time({"host": "a", "journal": "j1", "seq": 1})
    assert seen.first_time({"host": "a", "journal": "j2", "seq": 1})  # its seqs began again
    assert not seen.first_time({"host": "a", "journal": "j2", "seq": 1})


def test_no_broker_at_the_start_is_one_line_at_once(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "kport.cli", "tail", "--fleet", url],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"kport tail: cannot reach the fleet at {url}")
    assert len(result.stderr.strip().splitlines()) == 1


def test_following_from_a_time_goes_on_after_the_broker_restarts(broker: Broker) -> None:
    def events(seqs: range) -> list[tuple[str, dict[str, object], str]]:
        return [
            (
                "alpha",
                {"seq": seq, "ts": time.time_ns(), "source": "proc", "kind": "exec"},
                subjects.message_id("alpha", "j1", seq),
            )
            for seq in seqs
        ]

    publish(broker.url, events(range(1, 4)))
    follower = subprocess.Popen(
        [
            *(sys.executable, "-m", "kport.cli", "tail", "--fleet", broker.url, "--json"),
            *("--since", "1h", "--count", "6"),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert follower.stdout is not None
        got = [json.loads(follower.stdout.readline())["seq"] for _ in range(3)]
        broker.kill()
        broker.start()
        publish(broker.url, events(range(4, 7)))
        out, _ = follower.communicate(timeout=120)
        got += [json.loads(line)["seq"] for line in out.splitlines()]
        assert got == [1, 2, 3, 4, 5, 6]
        assert follower.returncode == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()


def test_the_faces_sign_in_with_export_credentials_and_say_a_refusal(tmp_path: Path) -> None:
    broker = Broker(tmp_path, user="kport", password="right")
    broker.start()
    try:
        signed = f"nats://kport:right@127.0.0.1:{broker.port}"  # the publisher's side only
        event = {"seq": 1, "ts": 1, "source": "proc", "kind": "exec", "pid": 1}
        publish(signed, [("alpha", event, subjects.message_id("alpha", "j1", 1))])
        right, wrong = tmp_path / "right.toml", tmp_path / "wrong.toml"
        right.write_text('[export]\nuser = "kport"\npassword = "right"\n')
        wrong.write_text('[export]\nuser = "kport"\npassword = "wrong"\n')
        assert len(tail(broker.url, "--count", "1", "--config", str(right))) == 1
        for face in (["tail", "--count", "1"], ["query"]):
            result = subprocess.run(
                [
                    *(sys.executable, "-m", "kport.cli", *face, "--fleet", broker.url),
                    *("--config", str(wrong)),
                ],
                check=False,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 1, result.stderr
            (line,) = result.stderr.strip().splitlines()
            assert "refused the credentials" in line and "wrong" not in line
    finally:
        broker.kill()
