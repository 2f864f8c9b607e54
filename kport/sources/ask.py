"""How a kernel source asks about what its rules leave open: the ``ask`` callback it is
given, and the ``done`` callback it passes along.

The source neither knows nor cares who answers (the daemon's decision ports, a test,
a policy). Its side of the bargain: ``done`` is called exactly once for every ask, from
any thread, and the source bounds how many of its asks are in flight at once (the
``max_asks`` it is given), applying its default verdict beyond that.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol


class Done(Protocol):
    """done(verdict, why, client): why is "decided" when a client answered, and then
    ``client`` says which; called exactly once, from any thread."""

    def __call__(self, verdict: str, why: str, client: Mapping[str, Any] | None = None) -> None: ...


#: a source's way to ask: ask(request, done)
Ask = Callable[[dict[str, Any], Done], None]


class Asking:
    """A source's asks in flight: at most ``max_asks`` at once, each answered once.

    ``reserve`` takes a place for one ask or says why there is none (the source then
    applies its default verdict); ``send`` makes the ask in that place, and gives the
    place back with the first answer — a second answer (a late one after the default,
    say) is ignored.
    """

    def __init__(self, ask: Ask | None, max_asks: int) -> None:
        self.ask = ask
        self.max_asks = max_asks
        #: asks made
        self.asked = 0
        #: asks that got the default verdict: none could be made, or none was answered
        self.defaulted = 0
        self.in_flight = 0
        self._lock = threading.Lock()

    def reserve(self) -> str | None:
        """A place for one ask (None), or why there is none."""
        with self._lock:
            if self.ask is None:
                why = "no decision client"
            elif self.in_flight >= self.max_asks:
                why = "too many asks in flight"
            else:
                self.in_flight += 1
                self.asked += 1
                return None
            self.defaulted += 1
        return why

    def send(self, request: dict[str, Any], answered: Done) -> None:
        """Ask, in a place :meth:`reserve` took; ``answered(verdict, why)`` gets the first
        answer only, once the place is free again."""
        assert self.ask is not None
        once = threading.Lock()

        def done(verdict: str, why: str, client: Mapping[str, Any] | None = None) -> None:
            if not once.acquire(blocking=False):
                return  # answered already
            with self._lock:
                self.in_flight -= 1
                if why != "decided":
                    self.defaulted += 1
            answered(verdict, why, client)

        self.ask(request, done)


def outcome(
    why: str, client: Mapping[str, Any] | None, verdict: str, rule: str | None
) -> dict[str, Any]:
    """Why an ask ended in ``verdict``, for the event and `kport query --why`: a client
    answered (which one), or the default verdict applied (the deadline passed, no client,
    too many asks...). ``rule`` is the rule that sent it to be asked."""
    asked = {"asked_by_rule": rule} if rule else {}
    if why == "decided":
        return {"by": "client", "verdict": verdict, "client": dict(client or {}), **asked}
    by = "deadline" if why.startswith("no answer within") else "default"
    return {"by": by, "verdict": verdict, "setting": "default_verdict", "reason": why, **asked}
