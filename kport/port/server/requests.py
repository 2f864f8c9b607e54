"""Requests a port sends its clients, and their deadlines: every request ends.

A request ends with its reply, its deadline (``Timeout``), its connection's end or the
port's shutdown (``PortClosed``), or at once when it cannot be queued (``QueueFull``).
Requests made in another thread enter the loop through one door,
:meth:`Requests.from_thread`: written there when the connection is idle, with the loop
starting their deadlines in batches (no wake-up per request), else handed to the loop.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from kport import protocol
from kport.errors import KportError, OneWayPort, PortClosed, QueueFull, Timeout

if TYPE_CHECKING:
    from kport.port.server.connection import ServerConnection
    from kport.port.server.port import ServerPort

log = logging.getLogger("kport.port")

#: while requests written from other threads keep coming, the loop starts their deadlines
#: this often (and at once for the first after a quiet spell), rather than being woken
#: for each
THREAD_ASKS_S: Final = 0.05

_Ask = tuple["ServerConnection", asyncio.Future[Any], int, int, float]


class Requests:
    """One port's requests in flight (see the module docstring)."""

    def __init__(self, port: ServerPort) -> None:
        self._port = port
        self._ids = itertools.count(1)
        #: requests written from other threads whose deadlines the loop has yet to start,
        #: and whether it will look at them without being woken (see _arm_thread_asks)
        self._thread_asks: deque[_Ask] = deque()
        self._thread_asks_due = False

    def next_id(self) -> int:
        """An id for a request or an object, unique in this port."""
        return next(self._ids)

    def _new(self, conn: ServerConnection, timeout: float) -> tuple[int, int]:
        """A request's id and deadline, once it is known it may be sent at all."""
        port = self._port
        if port.one_way:
            raise OneWayPort(f"port {port.name!r} is one-way: it cannot carry requests")
        if not conn.life.admits.requests:
            raise PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed")
        if timeout <= 0:
            raise ValueError(f"request timeout must be positive, not {timeout}")
        return next(self._ids), time.monotonic_ns() + int(timeout * 1e9)

    def future(self, conn: ServerConnection, data: Any, timeout: float) -> asyncio.Future[Any]:
        """In the loop: send (or queue) a request now; the future gets the reply."""
        request_id, deadline_ns = self._new(conn, timeout)
        item = protocol.pack(data)
        self._port.check_size(item, "a request")
        frame = conn._proto.send(protocol.Request(request_id, deadline_ns, item, packed=True))
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn._pending[request_id] = future
        try:
            conn.writer.send(frame, request_id)
        except QueueFull:
            del conn._pending[request_id]
            raise
        self._arm(conn, future, request_id, timeout)
        return future

    def from_thread(
        self,
        conn: ServerConnection,
        data: Any,
        timeout: float,
        on_done: Callable[[asyncio.Future[Any]], None],
    ) -> asyncio.Future[Any]:
        """A request from a thread other than the loop's (see
        ``ServerPort.request_from_thread``)."""
        port = self._port
        loop = port._loop
        if loop is None or loop.is_closed():
            raise PortClosed(f"port {port.name!r} is not running")
        request_id, deadline_ns = self._new(conn, timeout)
        # this thread's own packer, not the loop's shared one
        item = protocol.pack_new(data)
        port.check_size(item, "a request")
        frame = protocol.encode_request_packed(request_id, deadline_ns, item)
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(on_done)
        conn._eager[request_id] = on_done
        conn._pending[request_id] = future  # before the send: the reply may come at once
        writer = conn.writer
        with writer.lock:
            written = writer.may_write_now() and writer.write_now(frame)
        try:
            if not written:
                loop.call_soon_threadsafe(self._in_loop, conn, future, request_id, frame, timeout)
            else:
                # append, then look at the flag; the loop clears it, then takes them all
                self._thread_asks.append((conn, future, request_id, deadline_ns, timeout))
                if not self._thread_asks_due:
                    self._thread_asks_due = True
                    loop.call_soon_threadsafe(self._arm_thread_asks)
        except RuntimeError:  # the loop closed meanwhile
            forget(conn, request_id)
            raise PortClosed(f"port {port.name!r} is not running") from None
        return future

    def _arm_thread_asks(self) -> None:
        """In the loop: start the deadlines of the requests other threads wrote. While they
        keep coming, look again in THREAD_ASKS_S; after a quiet spell, the next one wakes
        the loop. Each deadline counts from when its request was made."""
        loop = self._port._loop
        assert loop is not None
        self._thread_asks_due = False
        asks = self._thread_asks
        if not asks:
            return
        now = time.monotonic_ns()
        while asks:
            conn, future, request_id, deadline_ns, timeout = asks.popleft()
            delay = max(deadline_ns - now, 0) / 1e9
            self._in_loop(conn, future, request_id, None, timeout, delay=delay)
        self._thread_asks_due = True
        loop.call_later(THREAD_ASKS_S, self._arm_thread_asks)

    def _in_loop(
        self,
        conn: ServerConnection,
        future: asyncio.Future[Any],
        request_id: int,
        frame: bytes | None,
        timeout: float,
        *,
        delay: float | None = None,
    ) -> None:
        """In the loop: a request from another thread, which wrote it (``frame`` None) or
        left it to the loop to queue; its deadline (``timeout``, or ``delay`` from now)
        starts to count."""
        if frame is None:
            conn.outbox.sent += 1
        if future.done():  # cancelled, or answered before the loop got here
            forget(conn, request_id)
            return
        # one written already is failed only once its connection has ended
        if conn.closed or (frame is not None and not conn.life.admits.requests):
            forget(conn, request_id)
            future.set_exception(PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed"))
            return
        if frame is not None:
            try:
                conn.writer.send(frame, request_id)
            except QueueFull as err:
                forget(conn, request_id)
                future.set_exception(err)
                return
        self._arm(conn, future, request_id, timeout, delay)

    def _arm(
        self,
        conn: ServerConnection,
        future: asyncio.Future[Any],
        request_id: int,
        timeout: float,
        delay: float | None = None,
    ) -> None:
        """Fail the request with Timeout ``delay`` from now (default ``timeout``)."""
        loop = self._port._loop
        assert loop is not None
        timer = loop.call_later(
            timeout if delay is None else delay,
            expire,
            future,
            self._port.name,
            conn,
            timeout,
            "reply",
        )
        future.add_done_callback(functools.partial(_request_done, conn, request_id, timer))

    def on_reply(self, conn: ServerConnection, event: protocol.Reply) -> None:
        """A client's reply: its request's future gets it (a late one is counted)."""
        future = conn._pending.get(event.id)
        if future is None or future.done():
            conn.late_replies += 1
            return
        on_done = conn._eager.pop(event.id, None)
        if on_done is None or not future.remove_done_callback(on_done):
            future.set_result(event.data)
            return
        future.set_result(event.data)
        try:
            on_done(future)  # now, not on the loop's next turn: a source is waiting
        except Exception:
            log.exception("port %s: a request's done callback failed", self._port.name)


def fail_pending(conn: ServerConnection, error: KportError) -> None:
    """Every request and object still waiting on ``conn`` fails with ``error``."""
    pending = conn._pending
    while pending:  # popitem: another thread may add a request meanwhile
        request_id, future = pending.popitem()
        conn._eager.pop(request_id, None)
        if not future.done():
            future.set_exception(error)


def expire(
    future: asyncio.Future[Any], port: str, conn: ServerConnection, timeout: float, what: str
) -> None:
    """A deadline passed: its Timeout, worded only now that it is needed."""
    if not future.done():
        future.set_exception(
            Timeout(
                f"port {port!r}: connection {conn.id} (pid {conn.pid}) did not {what} "
                f"within {timeout:g} s"
            )
        )


def _request_done(
    conn: ServerConnection, request_id: int, timer: asyncio.TimerHandle, _: asyncio.Future[Any]
) -> None:
    """However a request ended: no timer, no pending entry, and not sent late."""
    timer.cancel()
    forget(conn, request_id)
    if len(conn.outbox):  # still queued (deadline, cancellation)
        conn.outbox.unqueue_request(request_id)


def forget(conn: ServerConnection, request_id: int) -> None:
    conn._pending.pop(request_id, None)
    conn._eager.pop(request_id, None)
