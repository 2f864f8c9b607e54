"""The fleet with a real nats-server: three hosts (three daemons, each with its own
runtime and state dirs, its host name and its exporter) stream to one JetStream stream
while the broker is killed, the exporters are killed, a daemon restarts and the broker
stops answering; after each, the stream holds exactly each host's events: none missing,
none twice."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.export import Broker
from tests.fleet.hosts import NATS_SERVER, Activity, Host, check_exactly

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(os.geteuid() != 0, reason="kport serve needs root"),
]

if NATS_SERVER is None:  # scripts/setup-system.sh --tests installs it: say so, never silently
    pytestmark.append(
        pytest.mark.skip(reason="nats-server is not installed (scripts/setup-system.sh --tests)")
    )


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Broker, list[Host]]]:
    (tmp_path / "broker").mkdir()
    broker = Broker(tmp_path / "broker")
    broker.start()
    hosts = []
    for name in ("h1", "h2", "h3"):
        (tmp_path / name).mkdir()
        hosts.append(Host(name, tmp_path / name, broker))
    try:
        for host in hosts:
            host.start_daemon()
            host.start_exporter()
        yield broker, hosts
    finally:
        for host in hosts:
            host.stop()
        if broker.proc is not None and broker.proc.poll() is None:
            broker.proc.kill()
            broker.proc.wait()


def test_every_hosts_events_arrive_exactly_once_through_every_fault(
    fleet: tuple[Broker, list[Host]],
) -> None:
    broker, hosts = fleet
    with Activity():
        time.sleep(2)
    check_exactly(hosts, broker, "steady")

    with Activity():  # the broker killed mid-stream, and started again
        time.sleep(1)
        broker.kill()
        time.sleep(2)
        broker.start()
        time.sleep(2)
    check_exactly(hosts, broker, "broker killed")

    with Activity():  # every exporter killed mid-stream, and started again
        time.sleep(1)
        for host in hosts:
            host.kill_exporter()
        time.sleep(1)
        for host in hosts:
            host.start_exporter()
        time.sleep(2)
    check_exactly(hosts, broker, "exporters killed")

    with Activity():  # a daemon restarted
        time.sleep(1)
        hosts[0].stop_daemon()
        time.sleep(1)
        hosts[0].start_daemon()
        time.sleep(2)
    check_exactly(hosts, broker, "daemon restarted")

    with Activity():  # the broker unreachable for 10 s: it answers nothing
        time.sleep(1)
        broker.signal(signal.SIGSTOP)
        time.sleep(10)
        broker.signal(signal.SIGCONT)
        time.sleep(2)
    check_exactly(hosts, broker, "broker unreachable for 10 s")

    for host in hosts:
        host.stop_exporter()
        status = host.status()
        assert status["host"] == host.name and status["sources"]["proc"]["acked"] > 0


# --- bad input: one clear line each; local delivery goes on ----------------------------


@pytest.fixture
def one_host(tmp_path: Path) -> Iterator[tuple[Broker, Host]]:
    (tmp_path / "broker").mkdir()
    (tmp_path / "h1").mkdir()
    broker = Broker(tmp_path / "broker")
    host = Host("h1", tmp_path / "h1", broker)
    host.start_daemon()
    try:
        yield broker, host
    finally:
        for proc in (host.exporter, host.daemon, broker.proc):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def delivered_locally(host: Host) -> bool:
    """A process started now reaches a client of the host's proc port."""
    import kport

    marker = f"kport-local-{time.monotonic_ns()}"
    with kport.connect("proc", runtime_dir=host.run_dir) as conn:
        subprocess.run(["/bin/true", marker], check=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            msg = conn.get_message(timeout=10)
            if marker in (msg.data.get("argv") or []):
                return True
    return False


def export_until_it_exits(
    broker: Broker, host: Host, *extra: str
) -> subprocess.CompletedProcess[str]:
    """`kport export` for host h1, run to its end (a refusal ends it), its output kept."""
    return subprocess.run(
        [
            *(sys.executable, "-m", "kport.cli", "export", "--nats", broker.url, "--host", "h1"),
            *("--runtime-dir", str(host.run_dir), "--state-dir", str(host.where / "export")),
            *extra,
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_broker_that_is_not_there_is_said_and_tried_again(one_host: tuple[Broker, Host]) -> None:
    broker, host = one_host  # never started
    host.start_exporter()
    deadline = time.monotonic() + 30
    # said in its log, and in its status file (written each second: it may come later)
    while "cannot reach" not in host.log("exporter") or "error" not in host.status():
        assert host.exporter is not None and host.exporter.poll() is None, host.log("exporter")
        assert time.monotonic() < deadline, host.log("exporter")
        time.sleep(0.2)
    while "cannot reach" not in host.status()["error"]:
        assert time.monotonic() < deadline, host.status()
        time.sleep(0.2)
    assert host.status()["connected"] is False
    assert delivered_locally(host)
    broker.start()  # it comes: the exporter finds it
    check_exactly([host], broker, "broker late")


def test_refused_credentials_are_one_line_and_exit_1(
    one_host: tuple[Broker, Host], tmp_path: Path
) -> None:
    broker, host = one_host
    broker.user, broker.password = "kport", "right"
    broker.start()
    config = tmp_path / "export.toml"
    config.write_text('[export]\nuser = "kport"\npassword = "wrong"\n')
    result = export_until_it_exits(broker, host, "--config", str(config))
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("kport export: the broker at") and "refused the credentials" in last
    assert "wrong" not in result.stderr  # the password is never said
    assert delivered_locally(host)


def test_a_stream_with_other_subjects_is_one_line_and_exit_1(
    one_host: tuple[Broker, Host],
) -> None:
    broker, host = one_host
    broker.start()
    import nats
    from nats.js.api import StreamConfig

    async def make() -> None:
        nc = await nats.connect(broker.url)
        await nc.jetstream().add_stream(StreamConfig(name="KPORT", subjects=["other.>"]))
        await nc.close()

    asyncio.run(make())
    result = export_until_it_exits(broker, host)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "stream KPORT exists and takes ['other.>'], not kport.h1.>" in last, last
    assert delivered_locally(host)


def test_credentials_in_the_url_are_refused_before_anything_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            *(sys.executable, "-m", "kport.cli", "export"),
            *("--nats", "nats://u:secret@127.0.0.1:1", "--state-dir", str(tmp_path)),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "export.url holds credentials" in result.stderr and "secret" not in result.stderr
