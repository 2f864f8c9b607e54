"""A source's asks: bounded in flight, each answered once, every default counted."""

from __future__ import annotations

from typing import Any

from kport.sources.ask import Asking, Done, outcome


def test_no_client_means_the_default_with_its_reason() -> None:
    asking = Asking(None, 4)
    assert asking.reserve() == "no decision client"
    assert (asking.asked, asking.defaulted, asking.in_flight) == (0, 1, 0)


def test_asks_are_bounded_and_each_answered_once() -> None:
    asked: list[tuple[dict[str, Any], Done]] = []
    asking = Asking(lambda request, done: asked.append((request, done)), 2)
    answers: list[tuple[int, str, str, Any]] = []
    for n in (1, 2):
        assert asking.reserve() is None
        asking.send(
            {"n": n},
            lambda verdict, why, client=None, n=n: answers.append((n, verdict, why, client)),
        )
    assert asking.reserve() == "too many asks in flight"  # the third waits for no one
    (_, first), (_, second) = asked
    first("allow", "decided", {"pid": 42})  # which client answered goes along
    first("deny", "decided")  # a second answer is ignored
    second("deny", "deadline")  # the default, after no answer in time
    assert answers == [(1, "allow", "decided", {"pid": 42}), (2, "deny", "deadline", None)]
    assert (asking.asked, asking.defaulted, asking.in_flight) == (2, 2, 0)
    assert asking.reserve() is None  # the places are free again


def test_outcome_names_the_client_the_deadline_or_the_default() -> None:
    assert outcome("decided", {"pid": 7}, "deny", "ask rule") == {
        "by": "client",
        "verdict": "deny",
        "client": {"pid": 7},
        "asked_by_rule": "ask rule",
    }
    late = outcome("no answer within 2 s", None, "allow", None)
    assert late["by"] == "deadline" and late["setting"] == "default_verdict"
    nobody = outcome("no decision client", None, "allow", None)
    assert nobody == {
        "by": "default",
        "verdict": "allow",
        "setting": "default_verdict",
        "reason": "no decision client",
    }
