"""Replay from history: a client that connects with ``since=SEQ`` gets every notification
after SEQ, gaps as LOST frames, then the live ones — with no gap and no duplicate between
the two, as broadcasts pass it by until it has caught up."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, TypeVar

from kport.port.server.lifecycle import State
from kport.replay import History

if TYPE_CHECKING:
    from kport.port.server.connection import ServerConnection
    from kport.port.server.port import ServerPort

log = logging.getLogger("kport.port")

_T = TypeVar("_T")

#: history events read per page when replaying
REPLAY_PAGE: Final = 5000


async def replay(port: ServerPort, conn: ServerConnection, since: int) -> None:
    """Send the history after ``since`` page by page, then go live with no gap.

    Pages from the database are read in a thread and written while broadcasts skip this
    connection; the last stretch comes from the history's memory in the same step, under
    the port's publish lock, that lets broadcasts in again, so nothing falls between the
    two. If the history fails, what it did not give is reported lost — counted as this
    port's events alone, and with those published meanwhile, which broadcasts passed by
    — in the step that lets broadcasts in again, and the connection goes live. Failed
    writes raise ``OSError`` to the caller.
    """
    history = port.history
    assert history is not None
    after = since
    try:
        while True:
            with port._publish_lock:  # no publish between reading seq and going live
                upto = port.seq
                if after >= upto:
                    _go_live(conn)
                    return
                page = _ask(history.tail, after, upto)
                if page is not None:
                    conn.outbox.page(page)
                    _go_live(conn)
                    return
            page = await asyncio.to_thread(_ask, history.read, after, upto, REPLAY_PAGE)
            if page.through <= after:
                raise HistoryFailed(f"history read after seq {after} made no progress")
            frames = conn.outbox.page_frames(page)
            if frames:
                await conn.writer.send_all(frames)  # an OSError here is the caller's
            after = page.through
    except HistoryFailed as err:  # report what it did not give as lost, and go live
        log.error("port %s: replay to connection %d failed: %s", port.name, conn.id, err)
    with port._publish_lock:
        upto, published = port.seq, port.published
    missing = await asyncio.to_thread(_count, history, after, upto)
    with port._publish_lock:
        if conn.life.state is not State.REPLAYING:
            return  # closing meanwhile: nothing more goes to it
        # and what the port published meanwhile, which broadcasts passed by
        missing += port.published - published
        if missing:
            conn.outbox.lose_range(after + 1, port.seq, missing)
        _go_live(conn)


class HistoryFailed(Exception):
    """The history could not give what a replay asked of it."""


def _ask(call: Callable[..., _T], *args: int) -> _T:
    """A history's answer, or ``HistoryFailed`` saying why not (an ``OSError`` of the
    history's is not one of the socket's)."""
    try:
        return call(*args)
    except Exception as err:
        raise HistoryFailed(f"{type(err).__name__}: {err}") from err


def _count(history: History, after: int, upto: int) -> int:
    """How many of this port's notifications the history holds with ``after < seq <=
    upto`` (seqs are shared with other ports'); every seq in the range when it cannot say."""
    try:
        return history.count(after, upto)
    except Exception as err:  # noqa: BLE001  # the history has failed once already
        log.warning("port history cannot count seqs %d..%d either: %s", after + 1, upto, err)
        return upto - after


def _go_live(conn: ServerConnection) -> None:
    """Caught up (the port's publish lock held): broadcasts reach it from now on — unless
    the port began to shut down meanwhile."""
    if conn.life.state is State.REPLAYING:
        conn.life.to(State.LIVE)
