"""`kport serve --metrics`: /metrics scraped with a real HTTP client while a storm runs,
parsed with prometheus_client's parser, and its counts checked against what a client of
the proc port received."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

import kport
from bench.common import free_port
from kport.daemon import config
from kport.daemon.metrics import MetricsAddressError, parse_listen
from tests.daemon.test_daemon import (
    cat,
    decider,
    file_daemon,
    start_daemon,
    stop_daemon,
    wait_connected,
    wait_until,
    watched_mount,
)

pytestmark = [
    pytest.mark.timeout(240),
    pytest.mark.skipif(os.geteuid() != 0, reason="kport serve needs root"),
]
STORM = 300


def scrape(port: int) -> list[Sample]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """The one sample named ``name`` with these labels (and no others)."""
    found = [s.value for s in samples if s.name == name and s.labels == labels]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def execs_in(samples: list[Sample]) -> float:
    """kport_events_total of the proc source's execs; 0 before the first."""
    labels = {"source": "proc", "kind": "exec"}
    found = [s.value for s in samples if s.name == "kport_events_total" and s.labels == labels]
    return found[0] if found else 0.0


class Received:
    """A client of the proc port: the seq and kind of every event, and what it lost."""

    def __init__(self, rundir: Path) -> None:
        self.conn = kport.connect("proc", runtime_dir=rundir)
        self.events: list[tuple[int, str, list[str]]] = []
        self.lost = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        for msg in self.conn:
            if msg.is_lost:
                self.lost += msg.data["count"]
            else:
                self.events.append((msg.seq, msg.data["kind"], msg.data.get("argv") or []))

    def execs(self, marker: str) -> list[int]:
        """The seqs of the execs whose last argument starts with ``marker``."""
        return [
            seq
            for seq, kind, argv in list(self.events)
            if kind == "exec" and argv and argv[-1].startswith(marker)
        ]

    def close(self) -> None:
        self.conn.close()
        self.thread.join(5)


def test_the_counts_match_what_a_client_received_during_a_storm(rundir: Path) -> None:
    port = free_port()
    daemon = start_daemon(rundir, "--metrics", f"127.0.0.1:{port}")
    client = Received(rundir)
    try:
        # the probe connection start_daemon made may still be ending
        wait_until(lambda: value(scrape(port), "kport_port_clients", port="proc") == 1)
        before = scrape(port)
        seq0 = value(before, "kport_seq")
        # no exec since the daemon started: no sample yet, a count of 0
        execs0 = execs_in(before)

        scrapes: list[float] = []
        storm_over = threading.Event()

        def scraper() -> None:  # a real HTTP client, while the storm runs
            while not storm_over.is_set():
                samples = scrape(port)
                assert value(samples, "kport_up") == 1
                scrapes.append(execs_in(samples))

        thread = threading.Thread(target=scraper)
        thread.start()
        marker = f"METRICS-{os.getpid()}-"
        try:
            for i in range(STORM):
                subprocess.run(["/bin/true", f"{marker}{i}"], check=True)
        finally:
            storm_over.set()
            thread.join(30)
        assert scrapes and scrapes == sorted(scrapes), "a counter went down"
        wait_until(lambda: len(client.execs(marker)) == STORM)

        after = scrape(port)
        seq1 = value(after, "kport_seq")
        execs1 = value(after, "kport_events_total", source="proc", kind="exec")
        # an exec after the scrape has a later seq: once the client has it, it has every
        # event up to seq1 (a port sends in seq order)
        subprocess.run(["/bin/true", f"{marker}end"], check=True)
        wait_until(lambda: bool(client.execs(f"{marker}end")))

        received = [
            seq for seq, kind, _ in list(client.events) if kind == "exec" and seq0 < seq <= seq1
        ]
        assert len(client.execs(marker)) - 1 == STORM  # the storm's, and the end's
        assert len(received) >= STORM
        # The counter counts every exec given a seq up to kport_seq; the client got each of
        # them unless its queue dropped some, which it was told of.
        assert len(received) <= execs1 - execs0 <= len(received) + client.lost
        if client.lost == 0:
            assert execs1 - execs0 == len(received)

        assert value(after, "kport_lost_total", source="proc", reason="source") >= 0
        assert value(after, "kport_lost_total", source="proc", reason="clients") == value(
            after, "kport_port_lost_total", port="proc"
        )
        assert value(after, "kport_port_clients", port="proc") == 1
        with kport.connect("proc", runtime_dir=rundir):
            assert value(scrape(port), "kport_port_clients", port="proc") == 2
        wait_until(lambda: value(scrape(port), "kport_port_clients", port="proc") == 1)

        assert value(after, "kport_journal_written_total") > 0
        assert value(after, "kport_journal_queue_limit") == 200_000
        assert value(after, "kport_journal_durable") == 1
        assert value(after, "kport_journal_file_bytes") > 0
        commits = value(after, "kport_journal_commit_seconds_count")
        assert value(after, "kport_journal_commit_seconds_bucket", le="+Inf") == commits > 0
        assert value(after, "process_cpu_seconds_total") > 0
        assert value(after, "process_resident_memory_bytes") > 0
    finally:
        client.close()
        stop_daemon(daemon, rundir)
    with pytest.raises(urllib.error.URLError):  # stopped with the daemon
        scrape(port)


def test_decisions_are_counted_and_timed_by_verdict_and_decider(
    rundir: Path, tmp_path: Path
) -> None:
    port = free_port()
    with (
        watched_mount(tmp_path) as mount,
        file_daemon(rundir, mount, "--metrics", f"127.0.0.1:{port}", "--decision-deadline", "5"),
    ):
        status, _ = cat(mount / "data.txt")  # no decider: the default (allow) at once
        assert status == 0
        client = decider(
            rundir,
            "for msg in conn:\n"
            "    if msg.needs_reply:\n"
            "        conn.reply(msg, {'verdict': 'deny'})\n",
        )
        try:
            wait_connected(client)
            status, _ = cat(mount / "data.txt")
            assert status != 0  # the client's deny
            samples = scrape(port)
        finally:
            client.kill()
            client.communicate(timeout=10)
    timed = "kport_decision_seconds_count"
    by_client = value(samples, timed, source="file", verdict="deny", decider="client")
    by_default = value(samples, timed, source="file", verdict="allow", decider="default")
    assert by_client >= 1 and by_default >= 1
    # each ask is timed once: the histogram holds every ask, and no more
    assert by_client + by_default == value(samples, "kport_asks_total", source="file")
    assert value(samples, "kport_verdicts_total", source="file", verdict="deny") >= by_client
    assert value(samples, "kport_asks_in_flight", source="file") == 0
    bucket = "kport_decision_seconds_bucket"
    inf = value(samples, bucket, source="file", verdict="deny", decider="client", le="+Inf")
    assert inf == by_client


def test_an_address_beyond_loopback_needs_the_flag(rundir: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", str(rundir)),
            *("--state-dir", str(rundir / "state"), "--metrics", f"0.0.0.0:{port}"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"kport serve: metrics address 0.0.0.0:{port} is not loopback: add --metrics-public "
        "(or [metrics] public = true) to serve metrics beyond this machine"
    ]
    assert not (rundir / "proc.sock").exists()


def test_addresses() -> None:
    assert parse_listen("127.0.0.1:9464", public=False).beyond is False
    assert parse_listen("[::1]:9464", public=False).host == "::1"
    assert parse_listen("localhost:9464", public=False).port == 9464
    assert parse_listen("0.0.0.0:9464", public=True).beyond is True
    for wrong in ("127.0.0.1", "127.0.0.1:x", ":9464", "127.0.0.1:70000", "10.1.2.3:9464"):
        with pytest.raises(MetricsAddressError):
            parse_listen(wrong, public=False)


def test_the_metrics_section_of_the_configuration(tmp_path: Path) -> None:
    path = tmp_path / "kport.toml"
    path.write_text('[metrics]\nlisten = "127.0.0.1:9464"\npublic = true\n')
    cfg = config.load(path)
    assert (cfg.metrics.listen, cfg.metrics.public) == ("127.0.0.1:9464", True)
    assert config.load(None).metrics.listen == ""  # off by default
    path.write_text("[metrics]\nport = 9464\n")
    with pytest.raises(config.ConfigError, match="metrics: unknown key 'port'"):
        config.load(path)
