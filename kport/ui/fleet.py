"""The web UI's side of the fleet (`kport ui --fleet URL`): every host's events followed
from the JetStream stream through :mod:`kport.fleet.reader`, each (host, seq) once for as
long as the UI runs, kept in a bounded ring and fanned out to the open pages as
:class:`~kport.ui.bridge.Bridge` does for this host's ports.

The fleet is read instead of this host's ports, not beside them: ``kport ui --fleet`` may
run where no daemon does, and a host that exports is in the fleet already, so a log of
both would show its events twice. Prompts, rules and the process tree are each host's
own; here they are refused with a reason, and no decision port is ever held.

How the UI stands with the broker comes from the NATS client's callbacks: an error on
every attempt while the broker cannot be reached (one line in the log when the reason
changes, not one per attempt), ``reconnected`` when it is back. The client tries for ever
by itself; a missing stream ends the reading, which starts again after a pause.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any, Final

from kport.errors import BadRequest
from kport.fleet import reader, subjects

# RING: the fleet's recent events kept for pages that open, as for this host's (the oldest
# go first; how many went is in the status): the stream holds the rest (kport query --fleet)
from kport.ui.bridge import EVENT_PORTS, RING, STATS_SECONDS, Page, PortState

log = logging.getLogger("kport.ui")

#: events sent to an opening page per WebSocket message
RECENT_CHUNK: Final = 2_000
#: where a UI started without ``--since`` begins: this far back in the stream
LOOK_BACK_S: Final = 600
#: a reading that starts again (the broker came back) starts this far before the last
#: event's arrival, so that a clock of the broker's a little behind the UI's loses
#: nothing; the repeats this brings are dropped by (host, seq)
OVERLAP_S: Final = 30
#: pauses between readings that failed (no stream yet, say), the last one repeated
RETRY_S: Final = (0.5, 1.0, 2.0, 4.0, 5.0)
#: the NATS client reports each failed attempt (one every two seconds or so): this long
#: without a report while reading, the broker is taken to be reached
QUIET_S: Final = 5.0
#: what a fleet UI refuses, and where to go instead
NOT_HERE: Final = (
    "this UI shows the fleet (kport ui --fleet): prompts, rules and the process tree are "
    "each host's own; open kport ui on that host"
)


class FleetBridge:
    """The fleet's stream as the UI uses it: one reading at a time, its state in
    :attr:`ports` (``fleet``), the events in :attr:`ring` and the pages' queues."""

    def __init__(
        self,
        url: str,
        *,
        stream: str = subjects.DEFAULT_STREAM,
        since_seq: int | None = None,
        since_ns: int | None = None,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.stream = stream
        #: the client's connect options: credentials and TLS ([export] in --config)
        self.connect_options = dict(options or {})
        if since_seq is None and since_ns is None:
            since_ns = time.time_ns() - LOOK_BACK_S * 1_000_000_000
        self.since_seq, self.since_ns = since_seq, since_ns
        self.state = PortState()
        self.ports: dict[str, PortState] = {"fleet": self.state}
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        #: events the ring let go to make room (pages that open later do not get them)
        self.ring_dropped = 0
        self.pages: set[Page] = set()
        self.seen = reader.Seen()
        self._counts: dict[str, int] = dict.fromkeys(EVENT_PORTS, 0)
        self.rates: deque[dict[str, float]] = deque(maxlen=STATS_SECONDS)
        self.started = time.time()
        #: wall ns of the last event's arrival: where a new reading starts (less OVERLAP_S)
        self._last_arrival_ns: int | None = None
        self._reading: asyncio.Task[None] | None = None
        self._restarting = False
        #: monotonic s of the reading's start or of its last trouble, for QUIET_S
        self._trouble_at = time.monotonic()

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow the fleet and keep the stats, until cancelled."""
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._follow())
            tasks.create_task(self._tick())

    async def _follow(self) -> None:
        """One reading after another: again at once when the broker came back (the NATS
        client's own resumption is not relied on: it cannot resume a consumer that
        started at a time), after a pause when a reading failed."""
        failures = 0
        while True:
            self._restarting = False
            self._trouble_at = time.monotonic()
            reading = asyncio.create_task(self._read())
            self._reading = reading
            try:
                await asyncio.wait({reading})
            finally:
                self._reading = None
                if not reading.done():  # cancelled ourselves: stop the reading too
                    reading.cancel()
                    await asyncio.wait({reading})
            if reading.cancelled() and self._restarting:
                failures = 0
                continue
            error = None if reading.cancelled() else reading.exception()
            if isinstance(error, reader.FleetError):
                self._trouble(str(error))
            elif error is not None:
                self._trouble(f"the fleet at {self.url}: {type(error).__name__}: {error}")
            else:
                self._trouble(f"the fleet at {self.url} ended the subscription")
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1

    async def _read(self) -> None:
        since_seq, since_ns = self.since_seq, self.since_ns
        if self._last_arrival_ns is not None:
            since_seq, since_ns = None, self._last_arrival_ns - OVERLAP_S * 1_000_000_000
        events = reader.follow(
            self.url,
            stream=self.stream,
            since_seq=since_seq,
            since_ns=since_ns,
            options={
                **self.connect_options,
                "name": "kport ui",
                "error_cb": self._nats_error,
                "reconnected_cb": self._nats_reconnected,
            },
        )
        async for event in events:
            if self.state.state != "connected":
                self._connected()
            if self.seen.first_time(event):
                self._arrived(event)

    async def _nats_error(self, error: Exception) -> None:
        if isinstance(error, OSError):
            self._trouble(f"cannot reach the fleet at {self.url}: {error}")
        else:
            self._trouble(f"the fleet at {self.url}: {error}")

    async def _nats_reconnected(self) -> None:
        """The broker is back: read again from the last event's arrival (the repeats
        are dropped by (host, seq))."""
        log.info("the fleet at %s is back; reading again", self.url)
        if self._reading is not None:
            self._restarting = True
            self._reading.cancel()

    def _trouble(self, error: str) -> None:
        self._trouble_at = time.monotonic()
        if (self.state.state, self.state.error) != ("absent", error):
            log.warning("%s; trying again", error)
        self.state.set("absent", error)
        self._broadcast_status()

    def _connected(self) -> None:
        log.info("following the fleet at %s, stream %s", self.url, self.stream)
        self.state.set("connected")
        self._broadcast_status()

    def _arrived(self, event: dict[str, Any]) -> None:
        self._last_arrival_ns = time.time_ns()
        self.state.events += 1
        if event.get("kind") == "lost":
            self.state.lost += int(event.get("count") or 0)
        source = event.get("source")
        if isinstance(source, str) and source in self._counts:
            self._counts[source] += 1
        if len(self.ring) == self.ring.maxlen:
            self.ring_dropped += 1
        self.ring.append(event)
        for page in self.pages:
            page.push(event)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            sample: dict[str, float] = {"t": round(time.time(), 3), **self._counts}
            self._counts = dict.fromkeys(EVENT_PORTS, 0)
            self.rates.append(sample)
            for page in self.pages:
                page.post({"type": "rate", "sample": sample})
            quiet = time.monotonic() - self._trouble_at >= QUIET_S
            if self._reading is not None and self.state.state != "connected" and quiet:
                self._connected()  # a quiet fleet: no events, and no trouble either

    # --- pages ---------------------------------------------------------------------------

    def new_page(self) -> Page:
        """A page's queue: the fleet's seqs are each host's, so a page that falls behind
        is told how many it missed, not which."""
        return Page(gaps=False)

    def attach(self, page: Page, after: int | None) -> list[dict[str, Any]]:
        """Add an open page; it gets the whole ring first (the stream's history is not
        fetched page by page here), and drops what it has by (host, seq)."""
        del after  # a seq names nothing across hosts
        self.pages.add(page)
        return list(self.ring)

    def detach(self, page: Page) -> None:
        self.pages.discard(page)

    def oldest_seq(self) -> int | None:
        """None: nothing older is fetched from a journal in fleet mode."""
        return None

    def status(self) -> dict[str, Any]:
        return {
            "fleet": {"url": self.url, "stream": self.stream},
            "ports": self._port_states(),
            "pages": len(self.pages),
            "started": self.started,
            "ring": {"events": len(self.ring), "limit": RING, "dropped": self.ring_dropped},
            "repeats": self.seen.repeats,
            "prompts": [],
            "settled": [],
        }

    def _port_states(self) -> dict[str, dict[str, Any]]:
        return {name: vars(state) for name, state in self.ports.items()}

    def _broadcast_status(self) -> None:
        ports = self._port_states()
        for page in self.pages:
            page.post({"type": "ports", "ports": ports})

    # --- what a host's own UI does -------------------------------------------------------

    async def history(self, query: dict[str, Any]) -> dict[str, Any]:
        raise BadRequest(f"{NOT_HERE}; kport query --fleet answers from the stream")

    async def processes(self) -> list[dict[str, Any]]:
        raise BadRequest(NOT_HERE)

    async def rules(self, domain: str) -> dict[str, Any]:
        raise BadRequest(NOT_HERE)

    async def save_rules(
        self, domain: str, rules: list[dict[str, Any]], version: str
    ) -> dict[str, Any]:
        raise BadRequest(NOT_HERE)

    async def answer(self, prompt_id: int, answer: dict[str, Any]) -> dict[str, Any]:
        raise BadRequest(NOT_HERE)
