"""`kport export`: this host's events to a NATS JetStream stream, each exactly once in effect.

The exporter is a client of the daemon's ports, like `kport tail`, never in the delivery
path: it follows each event port with ``since=`` (the journal's replay, then live) and
publishes every event to ``kport.<host>.<source>.<kind>`` with a message id naming it for
good (host, journal identity, seq), up to ``window`` unacknowledged at once.

Where it resumes is the later of two marks: its cursor file (per source, the last seq the
broker acknowledged, written each second) and what the stream holds (the last message of
``kport.<host>.<source>.>``: the messages of one publisher are stored in order, so what is
stored is a prefix). The stream covers the second the cursor had not yet written; the
cursor covers a stream whose old messages its limits removed, which would otherwise be
sent again. After any trouble — the broker killed or away, an acknowledgement late, the
daemon restarted, the exporter itself restarted — it drops its connection, backs off,
asks again and replays from the journal: nothing is skipped, and what might be sent twice
carries the same message id, which the broker refuses within its duplicate window.

Loss is said, never silent: events the journal no longer holds (retention, a full queue)
reach the fleet as one ``lost`` event with their seq range.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StorageType, StreamConfig

from kport import paths
from kport.errors import KportError, NoHistory, PortClosed, PortNotFound, Timeout
from kport.fleet import credentials, subjects
from kport.fleet import state as files
from kport.fleet.window import Refused, Window
from kport.port.aclient import AsyncConnection, aconnect
from kport.port.message import Message

if TYPE_CHECKING:
    from kport.daemon.config import Config, ExportConfig

log = logging.getLogger("kport.export")

#: the event ports an exporter follows
SOURCES: Final = ("proc", "file", "net")
#: how long to wait between tries while the broker or the daemon is away, at most
BACKOFF_MAX_S: Final = 5.0
#: how often the cursor and status files are written
STATUS_EVERY_S: Final = 1.0
#: how long stopping may take: tasks, and closing the broker's connection
STOP_S: Final = 5.0
#: answers received and not yet handed to their window, at most (beyond: a slow
#: consumer, the answers lost, the window late and sent again)
ANSWERS_MAX: Final = 65536
#: how long a question to JetStream (the stream's info, its last message) may take
API_TIMEOUT_S: Final = 2.0
#: how long the broker keeps a message id to refuse it again (the stream kport creates)
DUPLICATE_WINDOW_S: Final = 120.0


class ExportRefused(KportError):
    """The broker or the stream will not take this host's events as configured: trying
    again will not help (credentials refused, a stream whose subjects do not take ours)."""


@dataclass
class Settings:
    """What the exporter needs: [export] from the config, and where this host stands."""

    #: the broker, the stream and its limits, the window, the credentials
    export: ExportConfig
    #: this host's name in the fleet
    host: str = field(default_factory=socket.gethostname)
    runtime_dir: str | os.PathLike[str] | None = None
    #: where the cursor and status files go (default: <state dir>/export)
    state_dir: str | os.PathLike[str] | None = None
    sources: tuple[str, ...] = SOURCES


@dataclass
class SourceState:
    """One event port's export: how far the broker has acknowledged it, and how it went."""

    acked: int = 0
    acked_ts: int = 0
    published: int = 0
    resends: int = 0
    duplicates: int = 0
    lost: int = 0
    state: str = "starting"


class _Trouble(Exception):
    """The broker let us down (gone, late, refused one message): start this source again
    from what the stream holds."""


class Exporter:
    """One host's export (see the module docstring)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.host = subjects.token(settings.host)
        base = files.directory(settings.state_dir)
        self.cursor_path = base / f"{self.host}.cursor.json"
        self.status_path = base / f"{self.host}.status.json"
        self.sources = {name: SourceState() for name in settings.sources}
        self.journal = ""
        #: the journal whose seqs the sources' ``acked`` count
        self._cursor_journal = ""
        self.connected = False
        self.error = ""
        self.daemon_seq = 0
        self._nc: Nats | None = None
        self._js: JetStreamContext | None = None
        self._connecting = asyncio.Lock()
        #: (source, kind) → subject, made once
        self._subjects: dict[tuple[Any, Any], str] = {}
        self._stop = asyncio.Event()
        #: where the broker's answers come, per connection; each pump's window by token
        self._inbox = ""
        self._windows: dict[str, Window] = {}
        self._tokens = itertools.count()

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Export until :meth:`stop` (or a refusal that trying again cannot mend)."""
        self.cursor_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._load_cursor()
        tasks = [asyncio.ensure_future(self._report())]
        tasks += [asyncio.ensure_future(self._follow(name)) for name in self.sources]
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping and task.exception() is not None:
                    refused = task.exception()
                    if isinstance(refused, ExportRefused):
                        self.error = str(refused)
                    raise refused  # type: ignore[misc]
        finally:
            self._stop.set()  # loops that a cancellation misses end at their next turn
            stopping.cancel()
            for task in tasks:
                task.cancel()
            _, late = await asyncio.wait(tasks, timeout=STOP_S)
            if late:
                log.warning(
                    "export %s: %d tasks did not stop in %g s", self.host, len(late), STOP_S
                )
            await self._drop_broker()
            self._write_status()

    def stop(self) -> None:
        self._stop.set()

    async def _follow(self, source: str) -> None:
        """One event port to the stream, again and again after any trouble."""
        state = self.sources[source]
        pause = 0.2
        port = paths.port_path(source, self.settings.runtime_dir)
        while not self._stop.is_set():
            if not port.exists():  # not served (yet, or the daemon is away): nothing to do
                state.state = f"waiting: no port at {port}"
                await asyncio.sleep(1.0)
                continue
            try:
                nc, js = await self._broker()
                journal = await self._journal_identity()
                after = max(
                    await self._stored_up_to(js, source, journal), self._acked(journal)[source]
                )
                state.state = "replaying"
                async with aconnect(
                    source, runtime_dir=self.settings.runtime_dir, since=after, max_inbox=65536
                ) as conn:
                    await self._pump(nc, source, journal, conn, after)
            except ExportRefused:
                raise
            except (PortNotFound, NoHistory) as err:
                state.state = f"waiting: {err}"
            except (PortClosed, ConnectionError) as err:
                state.state = f"daemon away: {err}"
            except (_Trouble, nats.errors.Error, OSError, TimeoutError) as err:
                state.state = f"broker trouble: {_say(err)}"
                await self._drop_broker(f"{source}: {_say(err)}")
            else:
                pause = 0.2
                continue
            await asyncio.sleep(pause)
            pause = min(pause * 2, BACKOFF_MAX_S)

    async def _pump(
        self, nc: Nats, source: str, journal: str, conn: AsyncConnection, after: int
    ) -> None:
        """Publish what the port gives, ``window`` unacknowledged at most, in order."""
        state = self.sources[source]
        cfg = self.settings.export
        window = Window(cfg.window, cfg.ack_timeout_s)
        token = str(next(self._tokens))
        self._windows[token] = window
        reply = f"{self._inbox}.{token}."
        last = after  # the last seq published on this connection
        first_message = True
        kport_events = source == self._kport_source()
        try:
            try:
                while True:
                    try:
                        msgs = await conn.get_messages(1024, timeout=0.5 if len(window) else None)
                    except Timeout:  # quiet: settle what is in flight meanwhile
                        msgs = []
                    for msg in msgs:
                        item = self._item(
                            msg, source, journal, last=last, first=first_message, own=kport_events
                        )
                        first_message = False
                        if item is None:
                            continue
                        seq, ts, subject, data, msg_id = item
                        await nc.publish(
                            subject, data, reply=reply + str(seq), headers={"Nats-Msg-Id": msg_id}
                        )
                        window.sent(seq, ts)
                        state.published += 1
                        last = seq
                        if len(window) > window.limit:
                            self._settled(state, window, await window.drain_to(window.limit))
                    self._settled(state, window, window.settle())
                    state.state = "live"
            except _Again:  # what was sent is settled first (a refusal there is trouble too)
                self._settled(state, window, await window.drain_to(0))
                state.resends += 1
        except Refused as err:
            raise _Trouble(str(err)) from None
        finally:
            del self._windows[token]

    @staticmethod
    def _settled(state: SourceState, window: Window, newest: tuple[int, int] | None) -> None:
        state.duplicates += window.duplicates
        window.duplicates = 0
        if newest is not None:
            state.acked, state.acked_ts = newest

    async def _answer(self, msg: Msg) -> None:
        """The broker's answer to one message: to the window of the source that sent it."""
        token, _, seq = msg.subject[len(self._inbox) + 1 :].partition(".")
        window = self._windows.get(token)
        if window is not None and seq.isdigit():
            status = (msg.headers or {}).get("Status")
            window.answer(int(seq), msg.data, status)

    def _item(
        self, msg: Message, source: str, journal: str, *, last: int, first: bool, own: bool
    ) -> tuple[int, int, str, bytes, str] | None:
        """(seq, ts, subject, payload, message id) to publish for one message from the
        port, or None. A loss that the journal may still mend raises ``_Again``: the port
        is followed again from ``last``; one that comes first, right after ``last``, is
        the journal's own (it does not hold those events), and is published."""
        host = self.host
        if msg.is_lost:
            data = msg.data if isinstance(msg.data, dict) else {}
            begin, end = data.get("first_seq"), data.get("last_seq")
            if begin is None or end is None or not (first and begin == last + 1):
                raise _Again  # dropped on the way (a queue, our inbox): the journal has it
            # the history itself does not hold these: say so, once, for good
            self.sources[source].lost += int(data.get("count") or 0)
            event = {
                "source": source,
                "kind": "lost",
                "count": data.get("count"),
                "first_seq": begin,
                "last_seq": end,
                "reason": "not in the journal (removed by retention, or never written)",
                "ts": time.time_ns(),
                "seq": end,
            }
            return (
                end,
                event["ts"],
                subjects.subject(host, source, "lost"),
                subjects.payload(event, self.settings.host, journal),
                subjects.message_id(host, journal, end),
            )
        event = msg.data
        if not isinstance(event, dict):
            return None
        seq = event.get("seq")
        if not isinstance(seq, int) or seq <= last:
            return None
        origin = event.get("source", source)
        if origin == "kport" and not own:
            return None  # kport's own events come on every port: one exports them
        kind = event.get("kind", "event")
        subject = self._subjects.get((origin, kind))
        if subject is None:
            subject = self._subjects[(origin, kind)] = (
                subjects.subject(host, str(origin), str(kind))
                if origin != "kport"
                else subjects.subject(host, source, f"kport-{kind}")
            )
        return (
            seq,
            int(event.get("ts") or 0),
            subject,
            subjects.payload(event, self.settings.host, journal),
            subjects.message_id(host, journal, seq),
        )

    # --- the broker ----------------------------------------------------------------------

    async def _broker(self) -> tuple[Nats, JetStreamContext]:
        """The connection and its JetStream context, connecting (checking the stream,
        and listening for the broker's answers) if need be."""
        async with self._connecting:
            if self._js is not None and self._nc is not None and self._nc.is_connected:
                return self._nc, self._js
            await self._drop_broker()
            cfg = self.settings.export
            options: dict[str, Any] = {
                "servers": [u.strip() for u in cfg.url.split(",") if u.strip()],
                "allow_reconnect": False,
                "connect_timeout": 2,
                "max_reconnect_attempts": 1,  # 0 would try for ever, inside connect()
                "name": f"kport-export {self.host}",
                "error_cb": _quiet,
                "disconnected_cb": self._disconnected,
                "skip_subject_validation": True,  # subjects.token made them safe
            }
            options.update(credentials.connect_options(cfg))
            try:
                nc = await nats.connect(**options)
            except nats.errors.NoServersError as err:
                raise _Trouble(f"cannot reach {cfg.url}: {_say(err)}") from err
            except Exception as err:
                if "authorization" in str(err).lower() or "authentication" in str(err).lower():
                    raise ExportRefused(
                        f"the broker at {cfg.url} refused the credentials: {_say(err)}"
                    ) from err
                raise _Trouble(f"cannot connect to {cfg.url}: {_say(err)}") from err
            # what is asked of the stream (its info, its last message) goes unanswered while
            # a cluster elects its leader: ask again soon, not after a whole ack timeout
            js = nc.jetstream(timeout=min(cfg.ack_timeout_s, API_TIMEOUT_S))
            try:
                await self._check_stream(js)
                self._inbox = nc.new_inbox()
                await nc.subscribe(
                    f"{self._inbox}.>", cb=self._answer, pending_msgs_limit=ANSWERS_MAX
                )
            except BaseException:
                await nc.close()
                raise
            self._nc, self._js = nc, js
            self.connected, self.error = True, ""
            log.info("export %s: connected to %s, stream %s", self.host, cfg.url, cfg.stream)
            return nc, js

    async def _check_stream(self, js: JetStreamContext) -> None:
        """Make the stream if it is missing; take one an operator made if its subjects
        take ours."""
        cfg = self.settings.export
        ours = subjects.subject(self.host, "proc", "exec")
        try:
            info = await js.stream_info(cfg.stream)
        except nats.js.errors.NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=cfg.stream,
                    subjects=[f"{subjects.ROOT}.>"],
                    storage=StorageType.FILE,
                    num_replicas=cfg.replicas,
                    max_age=cfg.max_age_days * 86400,
                    max_bytes=cfg.max_size_mb * 1024 * 1024,
                    # the broker takes no window longer than the messages live
                    duplicate_window=min(DUPLICATE_WINDOW_S, cfg.max_age_days * 86400),
                )
            )
            log.info(
                "export: created stream %s (kport.>, file, %d replicas)", cfg.stream, cfg.replicas
            )
            return
        taken = info.config.subjects or []
        if not any(_matches(pattern, ours) for pattern in taken):
            raise ExportRefused(
                f"stream {cfg.stream} exists and takes {taken}, not {subjects.ROOT}.{self.host}.>: "
                f"give it {subjects.ROOT}.> or export to another stream ([export] stream)"
            )
        if info.config.no_ack:
            raise ExportRefused(
                f"stream {cfg.stream} exists with no_ack: it would never say what it stored"
            )

    async def _stored_up_to(self, js: JetStreamContext, source: str, journal: str) -> int:
        """The seq of the last message of this host's ``source`` the stream holds, if it
        is of this journal; 0 otherwise (a new journal starts again at seq 1)."""
        try:
            msg = await js.get_last_msg(
                self.settings.export.stream, subjects.host_filter(self.host, source)
            )
        except nats.js.errors.NotFoundError:
            return 0
        named = subjects.parse_message_id((msg.headers or {}).get("Nats-Msg-Id", ""))
        if named is None or named[1] != journal:
            return 0
        return named[2]

    async def _disconnected(self) -> None:
        self.connected = False

    async def _drop_broker(self, why: str = "") -> None:
        nc, self._nc, self._js = self._nc, None, None
        self.connected = False
        if why:
            self.error = why
            log.warning("export %s: %s; trying again", self.host, why)
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), STOP_S)  # a dead broker is not waited for

    # --- the daemon ----------------------------------------------------------------------

    async def _journal_identity(self, conn: AsyncConnection | None = None) -> str:
        """The daemon's journal identity (and how far it stands), over ``conn`` or a
        connection of its own."""
        if conn is None:
            async with aconnect("journal", runtime_dir=self.settings.runtime_dir) as own:
                return await self._journal_identity(own)
        reply = await conn.send({"op": "identity"}, timeout=5)
        self.journal = str(reply["journal"])
        self.daemon_seq = int(reply["last_seq"])
        return self.journal

    def _acked(self, journal: str) -> dict[str, int]:
        """What the broker acknowledged of each source of ``journal``, as far as this
        exporter knows (its cursor): nothing, if the cursor is another journal's."""
        if journal != self._cursor_journal:
            self._cursor_journal = journal
            for state in self.sources.values():
                state.acked, state.acked_ts = 0, 0
        return {name: state.acked for name, state in self.sources.items()}

    def _kport_source(self) -> str:
        """The port whose copy of kport's own events is exported (each port carries them)."""
        return next(iter(self.sources))

    # --- cursor and status ---------------------------------------------------------------

    def _load_cursor(self) -> None:
        try:
            saved = json.loads(self.cursor_path.read_text())
        except (OSError, ValueError):
            return
        for name, seq in (saved.get("acked") or {}).items():
            if name in self.sources and isinstance(seq, int):
                self.sources[name].acked = seq
        self.journal = self._cursor_journal = str(saved.get("journal") or "")
        for name, count in (saved.get("lost") or {}).items():
            if name in self.sources and isinstance(count, int):
                self.sources[name].lost = count

    async def _report(self) -> None:
        """Each second: the status and cursor files, and where the daemon stands (over
        one journal connection, kept while it lasts)."""
        conn: AsyncConnection | None = None
        try:
            while not self._stop.is_set():
                self._write_status()
                try:
                    if conn is None:
                        conn = await aconnect("journal", runtime_dir=self.settings.runtime_dir)
                    await self._journal_identity(conn)
                except (KportError, OSError, TimeoutError):
                    if conn is not None:
                        await conn.close()
                    conn = None  # the daemon is away: again next time
                await asyncio.sleep(STATUS_EVERY_S)
        finally:
            if conn is not None:
                await conn.close()

    def status(self) -> dict[str, Any]:
        now = time.time_ns()
        acked = max((s.acked for s in self.sources.values()), default=0)
        newest_ts = max((s.acked_ts for s in self.sources.values()), default=0)
        behind = max(0, self.daemon_seq - acked)
        return {
            "host": self.host,
            "url": self.settings.export.url,
            "stream": self.settings.export.stream,
            "connected": self.connected,
            "error": self.error,
            "journal": self.journal,
            "cursor": acked,
            "lag_events": behind,
            "lag_s": round((now - newest_ts) / 1e9, 3) if behind and newest_ts else 0.0,
            "sources": {name: vars(s) for name, s in self.sources.items()},
            "updated": now,
        }

    def _write_status(self) -> None:
        status = self.status()
        cursor = {
            "journal": self._cursor_journal,
            "acked": {name: s.acked for name, s in self.sources.items()},
            "lost": {name: s.lost for name, s in self.sources.items()},
        }
        files.write_atomically(self.cursor_path, json.dumps(cursor))
        files.write_atomically(self.status_path, json.dumps(status), durable=False)


class _Again(Exception):
    """A loss on the way: follow the port again from the last seq published."""


def _matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subject pattern (``*``, ``>``) takes ``subject``."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def _say(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    return text if len(text) < 300 else text[:300] + "…"


async def _quiet(err: Exception) -> None:
    log.debug("export: nats: %s", err)


def settings_from(
    config: Config, *, host: str | None = None, stream: str | None = None
) -> Settings:
    """Settings from a daemon Config's [export] and [daemon] dirs, with the command
    line's host and stream."""
    export = replace(config.export, stream=stream) if stream else config.export
    daemon = config.daemon
    return Settings(
        export=export,
        host=host or export.host or socket.gethostname(),
        runtime_dir=daemon.runtime_dir or None,
        state_dir=Path(daemon.state_dir) / "export" if daemon.state_dir else None,
    )
