"""The bridge's parts that need no daemon: a page's bounded queue, answers checked."""

from __future__ import annotations

import asyncio

import pytest

from kport.errors import BadRequest
from kport.ui.bridge import Page, check_answer


def test_a_page_that_falls_behind_drops_the_oldest_and_names_the_seqs() -> None:
    async def go() -> None:
        page = Page(limit=3)
        for seq in range(1, 8):
            page.push({"seq": seq})
        page.post({"type": "rate"})
        assert page.ready.is_set()
        rate, events = page.take()
        assert rate == {"type": "rate"}
        assert [e["seq"] for e in events["events"]] == [5, 6, 7]
        assert events["gaps"] == [(1, 4)] and page.dropped == 4
        assert page.take() == [] and not page.ready.is_set()

    asyncio.run(go())


def test_answers_are_checked_per_decision_port() -> None:
    assert check_answer("file-decide", {"verdict": "deny", "remember": 1}) == {
        "verdict": "deny",
        "remember": True,
    }
    assert check_answer("net-decide", {"verdict": "reject", "duration": 15}) == {
        "verdict": "reject",
        "duration": 15,
    }
    with pytest.raises(BadRequest, match="verdict must be allow or deny, not 'reject'"):
        check_answer("file-decide", {"verdict": "reject"})
    with pytest.raises(BadRequest, match="duration must be"):
        check_answer("net-decide", {"verdict": "allow", "duration": -1})
    with pytest.raises(BadRequest, match="duration must be"):
        check_answer("net-decide", {"verdict": "allow", "duration": True})
