"""The lifecycle table, walked: every move allowed or refused, and what each state takes."""

from __future__ import annotations

import itertools

import pytest

from kport.errors import LocalProtocolError
from kport.port.server.lifecycle import ADMITS, TRANSITIONS, Lifecycle, State


def reach(state: State) -> Lifecycle:
    """A lifecycle brought to ``state`` by allowed moves only."""
    path = {
        State.HANDSHAKE: [],
        State.REPLAYING: [State.REPLAYING],
        State.LIVE: [State.LIVE],
        State.CLOSING: [State.LIVE, State.CLOSING],
        State.CLOSED: [State.CLOSED],
    }[state]
    life = Lifecycle()
    for step in path:
        life.to(step)
    assert life.state is state
    return life


@pytest.mark.parametrize(("start", "end"), list(itertools.product(State, State)))
def test_every_move_is_allowed_or_refused_as_the_table_says(start: State, end: State) -> None:
    life = reach(start)
    if end in TRANSITIONS[start]:
        life.to(end)
        assert life.state is end
        assert life.admits is ADMITS[end]
    else:
        with pytest.raises(LocalProtocolError, match=f"from {start.value} to {end.value}"):
            life.to(end)
        assert life.state is start  # a refused move changes nothing


def test_every_state_is_reachable_and_closed_is_the_only_end() -> None:
    seen = {State.HANDSHAKE}
    frontier = [State.HANDSHAKE]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(State)
    assert [s for s in State if not TRANSITIONS[s]] == [State.CLOSED]
    assert all(State.CLOSED in TRANSITIONS[s] for s in State if s is not State.CLOSED)


def test_what_each_state_admits() -> None:
    # only a live connection gets broadcasts: one replaying would see an event twice
    assert [s for s in State if ADMITS[s].broadcast] == [State.LIVE]
    # once ending, nothing new is taken
    for state in (State.CLOSING, State.CLOSED):
        assert not ADMITS[state].notify and not ADMITS[state].requests
        assert reach(state).ending
    for state in (State.HANDSHAKE, State.REPLAYING, State.LIVE):
        assert ADMITS[state].notify and ADMITS[state].requests
        assert not reach(state).ending
    assert reach(State.CLOSED).closed and not reach(State.CLOSING).closed
