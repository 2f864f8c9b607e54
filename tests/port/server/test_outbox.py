"""The outbox, byte by byte with no socket: bounds, drop-oldest, loss accounting, batching,
and history's pages framed the same way whether queued or written at once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kport import protocol
from kport.errors import QueueFull
from kport.port.server.outbox import Outbox, Tally, in_seq_order
from kport.replay import Gap, Page
from tests.test_protocol import pair


def make(limit: int = 100, max_bytes: int = 1 << 20) -> tuple[Outbox, protocol.Connection, Tally]:
    client, server = pair()
    tally = Tally()
    wakes: list[int] = []
    box = Outbox(
        server,
        limit=limit,
        max_bytes=max_bytes,
        wake=lambda: wakes.append(1),
        tally=tally,
        owner="port 'p': connection 1 (pid 42)",
    )
    return box, client, tally


def read(client: protocol.Connection, data: bytes) -> list[Any]:
    """What the client makes of ``data``: seqs for notifications, ("lost", count, first,
    last) for LOST frames, the event for anything else."""
    out: list[Any] = []
    if not data:  # b"" would be the end of the stream
        return out
    client.receive_data(data)
    for event in client.events():
        if isinstance(event, protocol.Notify):
            first = event.seqs
            seqs = list(range(first, first + len(event.items))) if isinstance(first, int) else first
            out.extend(seqs)
        elif isinstance(event, protocol.Lost):
            out.append(("lost", event.count, event.first_seq, event.last_seq))
        else:
            out.append(event)
    return out


def item(seq: int, size: int = 10) -> bytes:
    return protocol.pack_new({"seq": seq, "pad": "x" * size})


def drain(box: Outbox, client: protocol.Connection) -> list[Any]:
    out: list[Any] = []
    while box.due:
        out.extend(read(client, box.take_batch()))
    return out


def test_a_full_outbox_drops_its_oldest_and_says_so_first() -> None:
    box, client, tally = make(limit=3)
    for seq in range(1, 6):
        box.notify(seq, item(seq))
    assert len(box) == 3 and box.lost == 2 and tally.lost == 2
    assert drain(box, client) == [("lost", 2, 1, 2), 3, 4, 5]
    assert not box.due and box.bytes == 0 and box.sent == 3


def test_frames_are_never_dropped_and_refused_when_only_frames_are_left() -> None:
    box, client, _ = make(limit=2)
    box.notify(1, item(1))
    err = protocol.Error(1, "x", 7)
    box.frame(protocol.encode(err), None)
    box.frame(protocol.encode(err), 9)  # evicts notification 1
    with pytest.raises(QueueFull, match=r"connection 1 \(pid 42\).*full of requests"):
        box.frame(protocol.encode(err), 10)
    box.unqueue_request(9)
    assert drain(box, client) == [("lost", 1, 1, 1), err]


def test_a_notification_bigger_than_the_whole_outbox_is_lost_not_queued() -> None:
    box, client, _ = make(max_bytes=50)
    assert not box.notify(1, item(1, size=100))
    assert box.notify(2, item(2))
    assert drain(box, client) == [("lost", 1, 1, 1), 2]


def test_a_lost_range_from_a_failed_history_is_reported_with_its_count() -> None:
    box, client, tally = make()
    box.lose_range(11, 30, 7)
    box.notify(31, item(31))
    assert drain(box, client) == [("lost", 7, 11, 30), 31]
    assert box.lost == 7 and tally.lost == 7


def test_objects_go_alone_and_can_be_withdrawn() -> None:
    box, client, _ = make()
    box.notify(1, item(1))
    entry = box.object(5, [101, 102], b"OBJ")
    box.notify(2, item(2))
    assert read(client, box.take_batch()) == [1]
    assert box.take_object() == ([101, 102], b"OBJ")
    assert not box.withdraw(entry)
    other = box.object(6, [103], b"OBJ2")
    assert box.release() == [103] and not box.withdraw(other) and len(box) == 0


pages = st.lists(st.integers(1, 400), unique=True, max_size=120).flatmap(
    lambda seqs: st.tuples(
        st.just(sorted(seqs)),
        st.lists(
            st.integers(1, 400).filter(lambda s: s not in seqs).map(lambda s: Gap(s, s, 1, "test")),
            unique_by=lambda g: g.first,
            max_size=10,
        ),
    )
)


@given(pages)
def test_a_page_reads_the_same_queued_or_written_at_once(page_parts: Any) -> None:
    seqs, gaps = page_parts
    page = Page([(seq, item(seq, size=seq * 40)) for seq in seqs], gaps, 400)
    expected = [
        ("lost", e.count, e.first, e.last) if isinstance(e, Gap) else e[0]
        for e in in_seq_order(page.items, page.gaps)
    ]
    at_once, client = make(max_bytes=1 << 24)[:2]
    assert read(client, at_once.page_frames(page)) == expected
    queued, client2 = make(limit=1000, max_bytes=1 << 24)[:2]
    queued.page(page)
    assert drain(queued, client2) == expected
    assert at_once.replayed == queued.replayed == len(seqs)
    assert at_once.lost == queued.lost == len(gaps)
