"""The web UI's side of the daemon: its event ports followed (with replay across
reconnects, so the log has no gap), its decision ports held while a person is watching,
the journal port for history and the process tree, and the bounded fan-out of all that
to the open pages.

The UI learns about the machine from the daemon's ports alone, never by itself: what
it may see is what the ports' security admits. Nothing here knows HTTP:
:mod:`kport.ui.app` turns it into routes and a WebSocket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from kport.errors import AccessDenied, BadRequest, KportError, PortNotFound
from kport.port.aclient import AsyncConnection, aconnect
from kport.port.message import Message

log = logging.getLogger("kport.ui")

EVENT_PORTS: Final = ("proc", "file", "net")
#: the decision port of each rules domain
DECIDE_PORTS: Final = {"file": "file-decide", "net": "net-decide"}
#: recent events kept for a page that opens or comes back
RING: Final = 20_000
#: events waiting for one page at most; when full the oldest are dropped and the page is
#: told which seqs it missed, so that it can fetch them from the journal
PAGE_QUEUE: Final = 20_000
#: prompts already settled that pages are still shown (answered, missed, expired)
SETTLED: Final = 100
#: per-second event counts kept for the stats chart
STATS_SECONDS: Final = 300
RETRY_S: Final = (0.25, 0.5, 1.0, 2.0, 4.0)
#: events of kport's own go out on every event port; each is shown once
_OWN_SEEN: Final = 256


@dataclass
class PortState:
    """How the UI stands with one of the daemon's ports, for the status bar and stats."""

    state: str = "connecting"  # connecting | connected | absent | denied | closed | idle
    error: str | None = None
    since: float = field(default_factory=time.time)
    events: int = 0
    lost: int = 0
    last_seq: int | None = None

    def set(self, state: str, error: str | None = None) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error, self.since = state, error, time.time()


class Page:
    """One open page: the events, prompt changes and stats waiting for it, bounded."""

    def __init__(self, limit: int = PAGE_QUEUE, *, gaps: bool = True) -> None:
        self.limit = limit
        self.events: deque[dict[str, Any]] = deque()
        #: whether dropped events are named by seq, for the page to fetch back: this
        #: host's seqs are gap-free; the fleet's are each host's, so its pages get a count
        self.name_gaps = gaps
        #: seqs dropped because the page fell behind: (first, last), for it to fetch back
        self.gaps: list[tuple[int, int]] = []
        self.dropped = 0
        #: dropped since the page was last told
        self.untold = 0
        self.other: list[dict[str, Any]] = []
        self.ready = asyncio.Event()

    def push(self, event: dict[str, Any]) -> None:
        if len(self.events) >= self.limit:
            old = self.events.popleft()
            self.dropped += 1
            self.untold += 1
            seq = old.get("seq")
            if self.name_gaps and isinstance(seq, int):
                if self.gaps and self.gaps[-1][1] == seq - 1:
                    self.gaps[-1] = (self.gaps[-1][0], seq)
                else:
                    self.gaps.append((seq, seq))
        self.events.append(event)
        self.ready.set()

    def post(self, message: dict[str, Any]) -> None:
        self.other.append(message)
        self.ready.set()

    def take(self) -> list[dict[str, Any]]:
        """Every message waiting, events batched into one; clears the page's queue."""
        out, self.other = self.other, []
        if self.events or self.gaps or self.untold:
            out.append(
                {
                    "type": "events",
                    "events": list(self.events),
                    "gaps": self.gaps,
                    "dropped": self.untold,
                }
            )
            self.events.clear()
            self.gaps = []
            self.untold = 0
        self.ready.clear()
        return out


@dataclass
class Prompt:
    """An ask from a decision port, as the pages show it."""

    id: int
    port: str
    request: dict[str, Any]
    deadline_ts: float  # wall clock, s
    message: Message
    conn: AsyncConnection
    state: str = "pending"  # pending | answered | missed | expired | withdrawn
    verdict: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "port": self.port,
            "domain": "net" if self.port == "net-decide" else "file",
            "request": self.request,
            "deadline_ts": self.deadline_ts,
            "state": self.state,
            "verdict": self.verdict,
        }


def _verdicts(port: str) -> tuple[str, ...]:
    return ("allow", "deny", "reject") if port == "net-decide" else ("allow", "deny")


def check_answer(port: str, answer: dict[str, Any]) -> dict[str, Any]:
    """The reply to send for a page's answer, or BadRequest saying what is wrong."""
    verdict = answer.get("verdict")
    if verdict not in _verdicts(port):
        raise BadRequest(f"verdict must be {' or '.join(_verdicts(port))}, not {verdict!r:.40}")
    if port == "file-decide":
        return {"verdict": verdict, "remember": bool(answer.get("remember"))}
    duration = answer.get("duration", "once")
    if not (
        duration in ("once", "restart", "always")
        or (isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0)
    ):
        raise BadRequest(f"duration must be once, restart, always or minutes, not {duration!r:.40}")
    return {"verdict": verdict, "duration": duration}


class Bridge:
    """The daemon's ports as the UI uses them."""

    def __init__(self, runtime_dir: str | os.PathLike[str] | None = None) -> None:
        self.runtime_dir = runtime_dir
        self.ports: dict[str, PortState] = {
            name: PortState() for name in (*EVENT_PORTS, "journal", *DECIDE_PORTS.values())
        }
        for name in ("journal", *DECIDE_PORTS.values()):
            self.ports[name].set("idle")  # connected when needed
        self.ring: deque[dict[str, Any]] = deque(maxlen=RING)
        self.pages: set[Page] = set()
        self.prompts: dict[int, Prompt] = {}
        self.settled: deque[Prompt] = deque(maxlen=SETTLED)
        self._prompt_ids = itertools.count(1)
        self._deciders: dict[str, asyncio.Task[None]] = {}
        self._decide_conns: dict[str, AsyncConnection] = {}
        self._own_seen: deque[int] = deque(maxlen=_OWN_SEEN)
        self._counts: dict[str, int] = dict.fromkeys(EVENT_PORTS, 0)
        #: one entry a second: {"t": wall s, source: events that second, ...}
        self.rates: deque[dict[str, float]] = deque(maxlen=STATS_SECONDS)
        self.started = time.time()

    # --- running -------------------------------------------------------------------------

    async def run(self) -> None:
        """Follow every event port and keep the stats, until cancelled. The ports first
        replay the journal's last RING events, so that the UI starts with the recent past
        and a page that was open before the UI restarted gets what it missed."""
        newest = await self._newest_seq()
        if newest is not None:
            for name in EVENT_PORTS:
                self.ports[name].last_seq = max(0, newest - RING)
        async with asyncio.TaskGroup() as tasks:
            for name in EVENT_PORTS:
                tasks.create_task(self._follow(name))
            tasks.create_task(self._tick())

    async def _newest_seq(self) -> int | None:
        try:
            page = await self.history({"newest_first": True, "limit": 1})
        except (KportError, OSError) as err:
            log.info("no history to start from: %s", err)
            return None
        events = page.get("events") or []
        return int(events[0]["seq"]) if events else None

    async def _hold(
        self,
        name: str,
        since: Callable[[], int | None],
        arrived: Callable[[AsyncConnection, Message], None],
        gone: Callable[[], None] = lambda: None,
    ) -> None:
        """Keep a connection to port ``name`` (reconnecting, with backoff), its state in
        :attr:`ports`, each message given to ``arrived``; ``gone`` after each connection."""
        state = self.ports[name]
        failures = 0
        while True:
            try:
                async with aconnect(name, runtime_dir=self.runtime_dir, since=since()) as conn:
                    if name in DECIDE_PORTS.values():
                        self._decide_conns[name] = conn
                    state.set("connected")
                    self._broadcast_status()
                    failures = 0
                    async for msg in conn:
                        arrived(conn, msg)
                state.set("closed", "the daemon closed the port")
            except PortNotFound as err:
                state.set("absent", str(err))
            except AccessDenied as err:
                state.set("denied", str(err))
            except (KportError, OSError) as err:
                state.set("closed", str(err))
            finally:
                gone()
            self._broadcast_status()
            await asyncio.sleep(RETRY_S[min(failures, len(RETRY_S) - 1)])
            failures += 1

    async def _follow(self, name: str) -> None:
        state = self.ports[name]
        await self._hold(name, lambda: state.last_seq, lambda _, msg: self._arrived(name, msg))

    def _arrived(self, port: str, msg: Message) -> None:
        state = self.ports[port]
        if msg.is_lost:
            data = msg.data if isinstance(msg.data, dict) else {}
            state.lost += int(data.get("count") or 0)
            self._publish({"source": port, "kind": "lost", "ts": time.time_ns(), **data})
            return
        event = msg.data
        if not isinstance(event, dict):
            return
        seq = event.get("seq")
        if isinstance(seq, int):
            state.last_seq = seq
            if event.get("source") == "kport":
                if seq in self._own_seen:
                    return
                self._own_seen.append(seq)
        state.events += 1
        if event.get("kind") == "lost":
            state.lost += int(event.get("count") or 0)
        source = event.get("source")
        if source in self._counts:
            self._counts[source] += 1
        self._publish(event)

    def _publish(self, event: dict[str, Any]) -> None:
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
            self._expire_prompts()

    # --- pages ---------------------------------------------------------------------------

    def new_page(self) -> Page:
        """A page's queue: one that falls behind is told the seqs it missed."""
        return Page()

    def attach(self, page: Page, after: int | None) -> list[dict[str, Any]]:
        """Add an open page; the recent events it lacks (after seq ``after``, or the last
        few thousand for a new page) come back for it to show first."""
        self.pages.add(page)
        self._ensure_deciders()
        if after is None:
            recent = list(self.ring)[-2000:]
        else:
            recent = [e for e in self.ring if isinstance(e.get("seq"), int) and e["seq"] > after]
        return recent

    def detach(self, page: Page) -> None:
        self.pages.discard(page)
        if not self.pages:
            # Nobody is watching: asks must get the default now, not at their deadline.
            for task in self._deciders.values():
                task.cancel()
            self._deciders.clear()

    def oldest_seq(self) -> int | None:
        """The first seq the ring holds: older ones must come from the journal."""
        for event in self.ring:
            if isinstance(event.get("seq"), int):
                return int(event["seq"])
        return None

    def _port_states(self) -> dict[str, dict[str, Any]]:
        return {name: vars(state) for name, state in self.ports.items()}

    def status(self) -> dict[str, Any]:
        return {
            "ports": self._port_states(),
            "pages": len(self.pages),
            "started": self.started,
            "prompts": [p.public() for p in self.prompts.values()],
            "settled": [p.public() for p in self.settled],
        }

    def _broadcast_status(self) -> None:
        ports = self._port_states()
        for page in self.pages:
            page.post({"type": "ports", "ports": ports})

    # --- decisions -----------------------------------------------------------------------

    def _ensure_deciders(self) -> None:
        for port in DECIDE_PORTS.values():
            task = self._deciders.get(port)
            if task is None or task.done():
                self._deciders[port] = asyncio.get_running_loop().create_task(self._decide(port))

    async def _decide(self, port: str) -> None:
        def gone() -> None:
            self._decide_conns.pop(port, None)
            self._withdraw(port)

        try:
            await self._hold(
                port, lambda: None, lambda conn, msg: self._ask_arrived(port, conn, msg), gone
            )
        finally:
            self.ports[port].set("idle")
            self._withdraw(port)

    def _ask_arrived(self, port: str, conn: AsyncConnection, msg: Message) -> None:
        data = msg.data if isinstance(msg.data, dict) else {}
        if msg.needs_reply:
            left = msg.time_left()
            prompt = Prompt(
                id=next(self._prompt_ids),
                port=port,
                request=data,
                deadline_ts=time.time() + (left if left is not None else 10.0),
                message=msg,
                conn=conn,
            )
            self.prompts[prompt.id] = prompt
            self._prompt_changed(prompt)
        elif data.get("kind") == "missed":
            for prompt in list(self.prompts.values()):
                if prompt.port == port and prompt.request == data.get("request"):
                    self._settle(prompt, "missed", data.get("verdict"))
                    break

    def _settle(self, prompt: Prompt, state: str, verdict: str | None) -> None:
        self.prompts.pop(prompt.id, None)
        prompt.state, prompt.verdict = state, verdict
        self.settled.append(prompt)
        self._prompt_changed(prompt)

    def _prompt_changed(self, prompt: Prompt) -> None:
        public = prompt.public()
        for page in self.pages:
            page.post({"type": "prompt", "prompt": public})

    def _expire_prompts(self) -> None:
        """A prompt whose deadline passed without word from the daemon: the daemon has
        applied its default; the page must not offer a choice that no longer counts."""
        now = time.time()
        for prompt in list(self.prompts.values()):
            if prompt.deadline_ts + 1.0 < now:
                self._settle(prompt, "expired", None)

    def _withdraw(self, port: str) -> None:
        for prompt in list(self.prompts.values()):
            if prompt.port == port:
                self._settle(prompt, "withdrawn", None)

    async def answer(self, prompt_id: int, answer: dict[str, Any]) -> dict[str, Any]:
        """A page's answer to a prompt; BadRequest if it is unknown, settled or malformed."""
        prompt = self.prompts.get(prompt_id)
        if prompt is None:
            old = next((p for p in self.settled if p.id == prompt_id), None)
            if old is None:
                raise BadRequest(f"no prompt {prompt_id}")
            raise BadRequest(f"prompt {prompt_id} is already {old.state}")
        reply = check_answer(prompt.port, answer)
        try:
            await prompt.conn.reply(prompt.message, reply)
        except KportError as err:
            self._settle(prompt, "withdrawn", None)
            raise BadRequest(f"the answer could not be given: {err}") from err
        self._settle(prompt, "answered", reply["verdict"])
        return prompt.public()

    # --- rules and history ---------------------------------------------------------------

    async def _request(self, port: str, data: dict[str, Any], timeout: float = 10.0) -> Any:
        conn = self._decide_conns.get(port)
        if conn is not None:
            return await conn.send(data, timeout=timeout)
        # Nobody is watching, so no connection is held: a short one (an ask that reaches
        # it meanwhile gets the default at once when it closes, as with no client at all).
        async with aconnect(port, runtime_dir=self.runtime_dir) as short:
            return await short.send(data, timeout=timeout)

    async def rules(self, domain: str) -> dict[str, Any]:
        return dict(await self._request(_decide_port(domain), {"op": "rules"}))

    async def save_rules(
        self, domain: str, rules: list[dict[str, Any]], version: str
    ) -> dict[str, Any]:
        data = {"op": "save", "rules": rules, "version": version}
        return dict(await self._request(_decide_port(domain), data))

    async def history(self, query: dict[str, Any]) -> dict[str, Any]:
        """A page of the journal (``query`` as the journal port takes it)."""
        return dict(await self._journal({"op": "query", **query}))

    async def processes(self) -> list[dict[str, Any]]:
        """Every process on the machine, for the process tree, as the daemon reads them:
        pid, ppid, start_time, comm, argv, exe, uid and user."""
        return list(await self._journal({"op": "processes"}))

    async def _journal(self, request: dict[str, Any]) -> Any:
        """One request on the daemon's journal port; its state kept for the status bar."""
        state = self.ports["journal"]
        try:
            async with aconnect("journal", runtime_dir=self.runtime_dir) as conn:
                reply = await conn.send(request, timeout=15.0)
        except PortNotFound as err:
            state.set("absent", str(err))
            raise
        except AccessDenied as err:
            state.set("denied", str(err))
            raise
        state.set("connected")
        return reply


def _decide_port(domain: str) -> str:
    try:
        return DECIDE_PORTS[domain]
    except KeyError:
        raise BadRequest(f"rules domain must be file or net, not {domain!r:.20}") from None
