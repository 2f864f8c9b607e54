"""Simulated hosts for the fleet tests: daemons with their exporters as processes, steady
process activity, and the check that a stream holds exactly each host's journal."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol

from kport.journal.chunks import chunk_items

NATS_SERVER = shutil.which("nats-server")


class Reachable(Protocol):
    """A broker as the exporters see it: one server, or a comma-separated list of them."""

    url: str


class Host:
    """One simulated host: a daemon (proc events, journal on) and its exporter, which is
    given ``export_config`` (TOML, e.g. ``[export] replicas = 3``) when there is one."""

    def __init__(self, name: str, where: Path, broker: Reachable, export_config: str = "") -> None:
        self.name = name
        self.where = where
        self.run_dir = where / "run"
        self.state_dir = where / "state"
        self.broker = broker
        self.export_config = export_config
        self.daemon: subprocess.Popen[bytes] | None = None
        self.exporter: subprocess.Popen[bytes] | None = None

    def _spawn(self, what: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.where / f"{what}.log", "ab")  # noqa: SIM115  # the child keeps it
        try:
            return subprocess.Popen([sys.executable, "-m", "kport.cli", *args], stderr=log)
        finally:
            log.close()

    def start_daemon(self) -> None:
        self.daemon = self._spawn(
            "daemon",
            *("serve", "--runtime-dir", str(self.run_dir), "--state-dir", str(self.state_dir)),
        )
        deadline = time.monotonic() + 30
        while not (self.run_dir / "journal.sock").exists() or not _answers(self.run_dir):
            assert self.daemon.poll() is None, self.log("daemon")
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)

    def stop_daemon(self) -> None:
        assert self.daemon is not None
        self.daemon.terminate()
        assert self.daemon.wait(30) == 0, self.log("daemon")

    def start_exporter(self) -> None:
        config: tuple[str, ...] = ()
        if self.export_config:
            path = self.where / "export.toml"
            path.write_text(self.export_config)
            config = ("--config", str(path))
        self.exporter = self._spawn(
            "exporter",
            *("export", "--nats", self.broker.url, "--host", self.name, *config),
            *("--runtime-dir", str(self.run_dir), "--state-dir", str(self.where / "export")),
        )

    def kill_exporter(self) -> None:
        assert self.exporter is not None
        self.exporter.kill()
        self.exporter.wait(10)

    def stop_exporter(self) -> None:
        assert self.exporter is not None
        self.exporter.terminate()
        assert self.exporter.wait(30) == 0, self.log("exporter")

    def stop(self) -> None:
        """The exporter and the daemon ended, whatever state they are in."""
        for proc in (self.exporter, self.daemon):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def journal_seqs(self) -> list[int]:
        """Every seq this host's journal holds, committed."""
        db = sqlite3.connect(f"file:{self.state_dir / 'journal.db'}?mode=ro", uri=True)
        try:
            chunks = db.execute("SELECT seqs, offsets, sources, data FROM chunks ORDER BY first")
            return [seq for chunk in chunks for seq, _, _ in chunk_items(*chunk)]
        finally:
            db.close()

    def last_seq(self) -> int:
        """The daemon's newest seq now, asked of its journal port."""
        import kport

        with kport.connect("journal", runtime_dir=self.run_dir, timeout=5) as conn:
            return int(conn.send({"op": "identity"}, timeout=5)["last_seq"])

    def status(self) -> dict[str, Any]:
        path = self.where / "export" / f"{self.name}.status.json"
        try:
            return dict(json.loads(path.read_text()))
        except (OSError, ValueError):
            return {}

    def log(self, what: str) -> str:
        return (self.where / f"{what}.log").read_text()[-3000:]


def _answers(run_dir: Path) -> bool:
    import kport

    try:
        with kport.connect("control", runtime_dir=run_dir, timeout=2) as conn:
            conn.send({"op": "status"}, timeout=2)
        return True
    except kport.KportError:
        return False


def stream_messages(url: str, stream: str = "KPORT") -> list[dict[str, Any]]:
    """Every message in the stream, as (host, journal, seq) from its id, its data and its
    stream sequence. ``url`` may be a comma-separated list of servers: any one that is up
    answers."""
    import nats
    import nats.js.errors

    async def read() -> list[dict[str, Any]]:
        nc = await nats.connect(servers=[u.strip() for u in url.split(",") if u.strip()])
        try:
            js = nc.jetstream()
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                return []  # not made yet
            out: list[dict[str, Any]] = []
            if not info.state.messages:
                return out
            sub = await js.pull_subscribe("kport.>", durable=None, stream=stream)
            while len(out) < info.state.messages:
                for msg in await sub.fetch(1000, timeout=10):
                    host, journal, seq = (msg.headers or {})["Nats-Msg-Id"].rsplit(":", 2)
                    data = json.loads(msg.data)
                    out.append(
                        {
                            "host": host,
                            "journal": journal,
                            "seq": int(seq),
                            "data": data,
                            "stream_seq": msg.metadata.sequence.stream,
                        }
                    )
                    await msg.ack()
            return out
        finally:
            await nc.close()

    return asyncio.run(read())


class Activity:
    """Processes started steadily (about 200 a second) while a fault is made."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)
        self.started = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            pid = os.posix_spawn("/bin/true", ["true", "kport-fleet"], os.environ)
            os.waitpid(pid, 0)
            self.started += 1
            time.sleep(0.005)

    def __enter__(self) -> Activity:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def check_exactly(
    hosts: list[Host], broker: Reachable, what: str, deadline_s: float = 120.0
) -> None:
    """Each host's events in the stream are exactly those its journal held (committed) when
    the check began: none missing and none twice. A message the consumer happens to be
    given again (same stream sequence) is one message; two stream sequences for one
    (host, seq) are the event stored twice.

    The journals are read first, then the stream: the daemons see every process of the
    machine, and events that come while a long stream is read are not asked for. Reading
    a whole stream is dear, so it is read once the exporters say they have had those
    events acknowledged (and again, until the deadline, if some are not there)."""
    deadline = time.monotonic() + deadline_s
    wanted = {h.name: set(h.journal_seqs()) for h in hosts}
    for host in hosts:
        newest = max(wanted[host.name], default=0)
        while int(host.status().get("cursor") or 0) < newest:
            assert time.monotonic() < deadline, (what, host.name, newest, host.status())
            time.sleep(0.5)
    import nats.errors

    while True:
        by_host: dict[str, dict[int, set[int]]] = {h.name: defaultdict(set) for h in hosts}
        try:
            messages = stream_messages(broker.url)
        except nats.errors.Error as err:
            # a cluster that has just lost a server may give the reader's consumer to it,
            # and never answer: not there yet, as a message not yet stored is
            trouble = f"the stream could not be read: {err!r}"
        else:
            trouble = ""
            for m in messages:
                by_host[m["host"]][m["seq"]].add(m["stream_seq"])
            if all(wanted[h.name] and by_host[h.name].keys() >= wanted[h.name] for h in hosts):
                break
        assert time.monotonic() < deadline, (
            what,
            trouble,
            {h.name: (len(wanted[h.name]), len(by_host[h.name]), h.status()) for h in hosts},
        )
        time.sleep(0.5)
    for host in hosts:
        journal = wanted[host.name]
        got = by_host[host.name]
        twice = {seq: sorted(stored) for seq, stored in got.items() if len(stored) > 1}
        assert not twice, (what, host.name, "stored twice", sorted(twice.items())[:20])
        extra = set(got) - journal
        # events after the journal was read may be in the stream, and only those
        assert all(seq > max(journal) for seq in extra), (what, host.name, sorted(extra)[:20])
        missing = journal - set(got)
        assert not missing, (what, host.name, "missing", sorted(missing)[:20])
