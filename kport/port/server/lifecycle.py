"""A server connection's life: one state, the moves allowed from each, and what each lets in.

Every question the port asks about a connection's life ("may it get broadcasts?", "may a
request still be sent to it?") is answered from :data:`ADMITS`; every change of state goes
through :meth:`Lifecycle.to`, which refuses a move :data:`TRANSITIONS` does not list.
Who writes the socket, and when, is the writer's question (``writer.py``), not this one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from kport.errors import LocalProtocolError


class State(enum.Enum):
    #: accepted and being checked (credentials, hello, on_connect); not yet one of the
    #: port's connections, so no broadcast reaches it
    HANDSHAKE = "handshake"
    #: admitted with ``since``: history goes out first, broadcasts pass it by until it
    #: has caught up
    REPLAYING = "replaying"
    #: admitted: notifications, broadcasts, requests and objects
    LIVE = "live"
    #: the port is shutting down: what is queued may still go out, nothing new is taken
    CLOSING = "closing"
    #: the socket is closed and the connection forgotten
    CLOSED = "closed"

    __hash__ = object.__hash__  # members are singletons; Enum's hash runs Python code


@dataclass(frozen=True, slots=True)
class Admits:
    """What a connection in one state takes."""

    #: ``ServerPort.notify`` queues for it
    notify: bool
    #: ``broadcast`` and ``publish`` include it
    broadcast: bool
    #: new requests and objects may be sent to it
    requests: bool


ADMITS: Final[dict[State, Admits]] = {
    # on_connect may notify or ask before the welcome: it all waits behind the welcome
    State.HANDSHAKE: Admits(notify=True, broadcast=False, requests=True),
    State.REPLAYING: Admits(notify=True, broadcast=False, requests=True),
    State.LIVE: Admits(notify=True, broadcast=True, requests=True),
    State.CLOSING: Admits(notify=False, broadcast=False, requests=False),
    State.CLOSED: Admits(notify=False, broadcast=False, requests=False),
}

TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.HANDSHAKE: frozenset({State.REPLAYING, State.LIVE, State.CLOSED}),
    # caught up (or its history failed: the rest is reported lost) and then live
    State.REPLAYING: frozenset({State.LIVE, State.CLOSING, State.CLOSED}),
    State.LIVE: frozenset({State.CLOSING, State.CLOSED}),
    State.CLOSING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Lifecycle:
    """One connection's state; :meth:`to` is the only way to change it."""

    __slots__ = ("admits", "state")

    def __init__(self) -> None:
        self.state = State.HANDSHAKE
        self.admits = ADMITS[State.HANDSHAKE]

    def to(self, state: State) -> None:
        """Move to ``state``; a move the table does not allow is our bug, and raises."""
        if state not in TRANSITIONS[self.state]:
            raise LocalProtocolError(
                f"a connection cannot go from {self.state.value} to {state.value}"
            )
        self.state = state
        self.admits = ADMITS[state]

    @property
    def ending(self) -> bool:
        """Closing or closed: it takes nothing new."""
        return self.state is State.CLOSING or self.state is State.CLOSED

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED
