"""A source's asks: bounded in flight, each answered once, every default counted."""

from __future__ import annotations

from typing import Any

from kport.sources.ask import Asking, Done


def test_no_client_means_the_default_with_its_reason() -> None:
    asking = Asking(None, 4)
    assert asking.reserve() == "no decision client"
    assert (asking.asked, asking.defaulted, asking.in_flight) == (0, 1, 0)


def test_asks_are_bounded_and_each_answered_once() -> None:
    asked: list[tuple[dict[str, Any], Done]] = []
    asking = Asking(lambda request, done: asked.append((request, done)), 2)
    answers: list[tuple[int, str, str]] = []
    for n in (1, 2):
        assert asking.reserve() is None
        asking.send({"n": n}, lambda verdict, why, n=n: answers.append((n, verdict, why)))
    assert asking.reserve() == "too many asks in flight"  # the third waits for no one
    (_, first), (_, second) = asked
    first("allow", "decided")
    first("deny", "decided")  # a second answer is ignored
    second("deny", "deadline")  # the default, after no answer in time
    assert answers == [(1, "allow", "decided"), (2, "deny", "deadline")]
    assert (asking.asked, asking.defaulted, asking.in_flight) == (2, 2, 0)
    assert asking.reserve() is None  # the places are free again
