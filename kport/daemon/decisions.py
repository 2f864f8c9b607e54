"""A decision port's side of the daemon: asking connected decision clients, with a
deadline and a default verdict, for a source's thread that waits on the answer.

A source calls :meth:`Decisions.ask_from_thread` with a request and a ``done``
callback; every way out calls ``done(verdict, why)`` exactly once: the client's answer,
the deadline passing, the client going away, no client at all, or the daemon stopping.
A client that missed its deadline is told so with a ``missed`` notification, so that a
prompt on its screen does not look as if it still mattered. The processes of the
connected decision clients are in :attr:`deciders`, for the sources to let through at
once (a decision client must never wait on its own question). An answer that says more
than its verdict (remember it, for how long) becomes a rule: :func:`remember_file`,
:func:`remember_net`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from kport.daemon.redact import Redactor
from kport.errors import KportError, Timeout
from kport.latency import Latencies
from kport.port.server import ServerConnection, ServerPort
from kport.rules import RuleSet
from kport.sources import net as net_source
from kport.sources.ask import Done

log = logging.getLogger("kport.decisions")

#: requests a source has waiting for decision clients at once, at most (each source is
#: given it as its ``max_asks``); beyond it the source applies its default verdict at once
MAX_ASKS: Final = 256
#: called after a client's answer was applied, when it says more than its verdict
#: (remember, a duration): (request, reply)
OnReply = Callable[[dict[str, Any], dict[str, Any]], Awaitable[None]]


class Decisions:
    """Requests to the clients of one decision port, round robin among them."""

    def __init__(
        self,
        *,
        deadline_s: float,
        default_verdict: str,
        verdicts: Iterable[str] = ("allow", "deny"),
        on_reply: OnReply | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.deadline_s = deadline_s
        self.default_verdict = default_verdict
        self.verdicts = tuple(verdicts)
        self.on_reply = on_reply
        #: what takes secrets out of a request's command line before it leaves the daemon
        self.redactor = redactor
        self.port: ServerPort | None = None
        #: pids of the connected decision clients; replaced whole, never changed in place
        #: (read by the sources' threads)
        self.deciders: frozenset[int] = frozenset()
        self.missed = 0
        #: from the ask to the verdict, by (verdict, decider): "client" when a decision
        #: client answered, "default" when the default verdict was given instead
        self.latency = Latencies()
        #: the requests waiting on a client's answer
        self._asks: set[asyncio.Future[Any]] = set()
        #: answers being applied (remembered as rules)
        self._tasks: set[asyncio.Task[None]] = set()
        self._next = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, port: ServerPort, loop: asyncio.AbstractEventLoop) -> None:
        self.port = port
        self._loop = loop

    def changed(self, conn: ServerConnection) -> None:
        """on_connect / on_disconnect of the port: the pids of the connections still open,
        with ``conn``'s while it is. A process is a decider while any of its connections
        is open: one closing (the UI opens a short second one for rules) leaves it one."""
        assert self.port is not None
        pids = {c.pid for c in self.port.connections if c is not conn and not c.closed}
        if not conn.closed:
            pids.add(conn.pid)
        self.deciders = frozenset(pids)

    def ask_from_thread(self, request: dict[str, Any], done: Done) -> None:
        """Ask a decision client from a source's thread; ``done`` is called from the event
        loop's thread, or from this one, at once, when nobody can be asked.

        The request is written from this thread when the client's queue is empty, so the
        client sees it without the loop being woken first (see
        :meth:`ServerPort.request_from_thread`); the answer comes back through the loop.
        """
        done = self._timed(done)
        if self.redactor is not None:  # the rules saw the original; the client does not
            request = dict(request)
            self.redactor.event(request)
        default = self.default_verdict
        port = self.port
        loop = self._loop
        if port is None or loop is None or loop.is_closed():
            done(default, "kport is stopping")
            return
        conns = [c for c in port.connections if not c.closed]
        if not conns:
            done(default, "no decision client")
            return
        conn = conns[self._next % len(conns)]
        self._next += 1
        try:
            future = port.request_from_thread(
                conn,
                request,
                timeout=self.deadline_s,
                on_done=functools.partial(self._answered, request, done, conn),
            )
        except KportError as err:
            done(default, f"the decision client went away: {err}")
            return
        except (TypeError, ValueError) as err:  # a request the port cannot carry
            done(default, f"the request could not be sent: {err}")
            return
        self._asks.add(future)
        if future.done():  # answered before it was added: _answered has run, or will
            self._asks.discard(future)

    def _timed(self, done: Done) -> Done:
        """``done``, and the time until it was called kept in :attr:`latency`."""
        asked = time.monotonic()

        def timed(verdict: str, why: str, client: Mapping[str, Any] | None = None) -> None:
            took = time.monotonic() - asked
            done(verdict, why, client)  # the verdict first: the metrics wait
            self.latency.observe((verdict, "client" if why == "decided" else "default"), took)

        return timed

    def cancel(self) -> None:
        """Stop every ask: each answers its caller with the default on the way out."""
        for future in list(self._asks):
            future.cancel()
        for task in list(self._tasks):
            task.cancel()

    def _answered(
        self,
        request: dict[str, Any],
        done: Done,
        conn: ServerConnection,
        future: asyncio.Future[Any],
    ) -> None:
        self._asks.discard(future)
        default = self.default_verdict
        if future.cancelled():
            done(default, "kport is stopping")
            return
        error = future.exception()
        if isinstance(error, Timeout):
            done(default, f"no answer within {self.deadline_s:g} s")
            self.missed += 1
            if self.port is not None:
                with contextlib.suppress(KportError):
                    self.port.notify(
                        conn, {"kind": "missed", "request": request, "verdict": default}
                    )
            return
        if error is not None:
            done(default, f"the decision client went away: {error}")
            return
        reply = future.result()
        verdict = reply.get("verdict") if isinstance(reply, dict) else None
        if verdict not in self.verdicts:
            done(default, f"the decision client answered {reply!r:.60}, not {self._choices()}")
            return
        done(verdict, "decided", _client(conn))
        if self.on_reply is not None and len(reply) > 1:  # remember, a duration...
            task = asyncio.get_running_loop().create_task(self._apply(request, reply))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _apply(self, request: dict[str, Any], reply: dict[str, Any]) -> None:
        assert self.on_reply is not None
        try:
            await self.on_reply(request, reply)
        except (OSError, ValueError) as err:
            log.error("could not apply the answer %r: %s", reply, err)

    def _choices(self) -> str:
        return " or ".join(self.verdicts)


def _client(conn: ServerConnection) -> dict[str, Any]:
    """Which decision client answered: its connection, process and user."""
    client: dict[str, Any] = {"connection": conn.id, "pid": conn.pid, "uid": conn.uid}
    with contextlib.suppress(OSError):
        client["comm"] = Path(f"/proc/{conn.pid}/comm").read_text().strip()
    return client


# --- what an answer leaves behind -------------------------------------------------------


async def remember_file(
    rules: RuleSet, remembered: str, request: dict[str, Any], reply: dict[str, Any]
) -> None:
    """A file decision client's "remember": a rule for that path (and executable),
    written to ``remembered``."""
    if not reply.get("remember"):
        return
    rule = {"action": reply["verdict"], "path": request["path"], "name": "remembered"}
    if request.get("exe"):
        rule["exe"] = request["exe"]
    await asyncio.to_thread(rules.remember, remembered, rule)


async def remember_net(
    rules: RuleSet, remembered: str, request: dict[str, Any], reply: dict[str, Any]
) -> None:
    """A network decision client's duration: "once" (nothing more), "restart" (a
    rule in memory), a number of minutes (a rule in memory that ends), or "always"
    (``remember``: a rule written to ``remembered``)."""
    duration = reply.get("duration", "always" if reply.get("remember") else "once")
    if duration == "once":
        return
    rule = reply.get("rule")
    if not isinstance(rule, dict):
        rule = net_source.rule_for(request)
    rule = {**rule, "action": reply["verdict"]}
    if duration == "always":
        rule.setdefault("name", "remembered")
        await asyncio.to_thread(rules.remember, remembered, rule)
    elif duration == "restart":
        rules.add_temporary({"name": "answered until restart", **rule})
    elif isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
        named = {"name": f"answered for {duration:g} minutes", **rule}
        rules.add_temporary(named, minutes=float(duration))
    else:
        raise ValueError(f"duration must be once, restart, always or minutes, not {duration!r:.40}")
