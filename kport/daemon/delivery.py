"""The daemon's delivery path: each event gets its daemon-wide seq and wall-clock time,
passes the daemon-side filters, goes to the journal and out on its source's port.

Any thread delivers: the sources' reader threads (so that an event costs no wake-up of
the event loop) and the loop itself (a decision client's answer). One lock keeps the
seqs gap-free and each port's in order. Events of kport's own (the journal's durability
going off or coming back) come from the journal's writer thread and enter the loop
through ``call_soon_threadsafe``, their one door.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import threading
import time
from collections import deque
from typing import Any

from kport import protocol
from kport.daemon.config import ProcConfig
from kport.daemon.redact import Redactor
from kport.journal.chunks import Row, row_of
from kport.journal.store import Journal
from kport.port.server import ServerPort

#: ports that carry no events (kport's own events go out on every other one)
EVENTLESS_PORTS = ("control", "journal")


class Rate:
    """Events per second over the last few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count

    def per_second(self) -> float:
        now = time.monotonic()
        self.samples.append((now, self.total))
        while self.samples and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        first_t, first_n = self.samples[0]
        return (self.total - first_n) / (now - first_t) if now > first_t else 0.0


class Delivery:
    """Sources → seq and filters → journal and ports (see the module docstring)."""

    def __init__(self, proc: ProcConfig, ports: dict[str, ServerPort]) -> None:
        #: the daemon-side filters of process events
        self.proc = proc
        #: the daemon's ports, by name: an event goes out on the one named as its source
        self.ports = ports
        #: where every event is kept; None without a journal
        self.journal: Journal | None = None
        #: what takes secrets out of command lines; None: they go out as they are
        self.redactor: Redactor | None = None
        #: the last seq handed out
        self.seq = 0
        #: process events the filters held back
        self.filtered = 0
        #: events delivered per source
        self.rates: dict[str, Rate] = {}
        #: events delivered, by source and kind (read with :meth:`counts`)
        self.kinds: dict[str, dict[str, int]] = {}
        #: the daemon's event loop, once it runs
        self.loop: asyncio.AbstractEventLoop | None = None
        #: held while events get their seqs and go to the journal and the ports: sources'
        #: threads and the loop deliver alike, and each port sees seqs in order
        self._lock = threading.Lock()

    def from_thread(self, batch: list[dict[str, Any]]) -> None:
        """Called by a source's thread (or the loop's: an answer from a decision client):
        deliver in that thread. Clients with nothing queued are written to from here, so
        an event costs no wake-up of the loop (see :meth:`ServerPort.publish`)."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        self.deliver(batch)

    def passes(self, event: dict[str, Any]) -> bool:
        """Whether a process event passes the daemon-side filters."""
        cfg = self.proc
        if event.get("kind") == "lost":
            return True  # loss is never filtered away
        if cfg.kinds and event.get("kind") not in cfg.kinds:
            return False
        if cfg.uids and event.get("uid") not in cfg.uids:
            return False
        if cfg.exe:
            exe = event.get("exe") or ""
            if not any(fnmatch.fnmatchcase(exe, pattern) for pattern in cfg.exe):
                return False
        return True

    def deliver(self, batch: list[dict[str, Any]]) -> None:
        """Give each event its daemon-wide seq and wall-clock time, journal it, send it out.

        Any thread may call it. Each event is encoded once, for the journal and every
        client alike; the journal only queues it here, so a slow disk never slows delivery.
        """
        source = batch[0].get("source", "proc") if batch else "proc"
        port = self.ports.get(source)
        journal = self.journal
        pack = protocol.pack_new  # not the loop's shared packer: any thread may be here
        cfg = self.proc
        filtered = source == "proc" and (cfg.kinds or cfg.uids or cfg.exe)
        passes = self.passes if filtered else None  # a call per event saved in a storm
        now = time.time_ns()
        redactor = self.redactor
        if redactor is not None:
            # once per event, after the sources' rules saw the original, before anything
            # (journal, ports, and so the fleet and the UI) sees the event
            redact = redactor.event
            for event in batch:
                redact(event)
        rows: list[Row] = []
        items: list[tuple[int, bytes]] = []
        with self._lock:
            seq = self.seq
            kinds = self.kinds.get(source)
            if kinds is None:
                kinds = self.kinds[source] = {}
            for event in batch:
                if passes is not None and not passes(event):
                    self.filtered += 1
                    continue
                kind = event.get("kind", "")
                kinds[kind] = kinds.get(kind, 0) + 1
                seq += 1
                event["seq"] = seq
                event["ts"] = now
                item = pack(event)
                rows.append((seq, now, event.get("source", "proc"), item))
                items.append((seq, item))
            self.seq = seq
            # the journal first: a replay reads it up to the port's seq
            if journal is not None and rows:
                journal.append_many(rows)
            if port is not None:
                port.publish(items)
            rate = self.rates.get(source)
            if rate is not None:
                rate.add(len(rows))

    def counts(self) -> tuple[int, dict[str, dict[str, int]]]:
        """The last seq handed out and the events delivered up to it, by source and kind:
        taken together, so that the counts are those of every seq up to that one."""
        with self._lock:
            return self.seq, {source: dict(kinds) for source, kinds in self.kinds.items()}

    def journal_state(self, durable: bool, reason: str) -> None:
        """Called by the journal's writer when durability goes off or comes back."""
        event = {"source": "kport", "kind": "journal", "durable": durable, "reason": reason}
        loop = self.loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self.deliver_own, event)

    def deliver_own(self, event: dict[str, Any]) -> None:
        """An event of kport's own: to the journal and every event port."""
        with self._lock:
            self.seq += 1
            seq = self.seq
            kinds = self.kinds.setdefault("kport", {})
            kinds[event["kind"]] = kinds.get(event["kind"], 0) + 1
            event["seq"] = seq
            event["ts"] = time.time_ns()
            item = protocol.pack_new(event)
            if self.journal is not None:
                self.journal.append(row_of(seq, event, item))
            for name, port in self.ports.items():
                if name not in EVENTLESS_PORTS:
                    port.publish([(seq, item)])
