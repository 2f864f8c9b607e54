"""The exporter's window: answers settled in publish order whatever order they come in,
duplicates counted, a refusal, a "no responders" and a late answer each named, answers
that are not ours ignored."""

from __future__ import annotations

import asyncio
import re

import pytest

from kport.fleet.window import Refused, Window

ACK = b'{"stream":"KPORT","seq":7}'
DUPLICATE = b'{"stream":"KPORT","seq":7,"duplicate":true}'


def test_answers_out_of_order_settle_in_order() -> None:
    window = Window(limit=8, timeout_s=60)
    for seq in (11, 12, 13):
        window.sent(seq, ts=seq * 100)
    window.answer(12, ACK)
    assert window.settle() is None and len(window) == 3  # 11 not yet: nothing moves
    window.answer(11, ACK)
    assert window.settle() == (12, 1200) and len(window) == 1
    window.answer(13, DUPLICATE)
    assert window.settle() == (13, 1300) and len(window) == 0
    assert window.duplicates == 1


def test_answers_that_are_not_ours_are_ignored() -> None:
    window = Window(limit=8, timeout_s=60)
    window.answer(5, ACK)  # nothing pending
    window.sent(6, ts=0)
    window.answer(5, ACK)  # before the oldest pending
    window.answer(99, ACK)  # after the newest
    assert window.settle() is None and len(window) == 1


@pytest.mark.parametrize(
    ("data", "status", "said"),
    [
        (
            b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
            None,
            "the broker refused message 1: maximum messages exceeded",
        ),
        (b"", "503", "no one answered message 1 (status 503)"),
        (b'not json, but an "error"', None, "the broker refused message 1: not json"),
    ],
)
def test_a_refusal_or_no_responder_is_named(data: bytes, status: str | None, said: str) -> None:
    window = Window(limit=8, timeout_s=60)
    window.sent(1, ts=0)
    window.answer(1, data, status)
    with pytest.raises(Refused, match=re.escape(said)):
        window.settle()


def test_drain_waits_for_answers_and_names_a_late_one() -> None:
    async def run() -> None:
        window = Window(limit=2, timeout_s=0.2)
        for seq in (1, 2, 3):
            window.sent(seq, ts=seq)
        loop = asyncio.get_running_loop()
        loop.call_soon(window.answer, 1, ACK)
        assert await window.drain_to(2) == (1, 1) and len(window) == 2
        loop.call_soon(window.answer, 2, ACK)  # 3 never answered
        with pytest.raises(Refused, match=re.escape("no acknowledgement within 0.2 s")):
            await window.drain_to(0)

    asyncio.run(run())
