"""What a client receives (`Message`), and the client-side bookkeeping shared by the sync
and asyncio clients: turning protocol events into messages, send replies and end-of-stream.

The inbox is bounded. It only grows past what the client asked for while a ``send`` digs
for its reply through notifications the program has not read yet; then the oldest
notifications are dropped, counted, and a ``lost`` message stands where they were.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import Any, Final

from kport import protocol
from kport.errors import (
    KportError,
    OneWayPort,
    PortClosed,
    error_from_code,
)
from kport.port import handles

DEFAULT_MAX_INBOX: Final = 65536

NOTIFY: Final = "notify"
REQUEST: Final = "request"
LOST: Final = "lost"
OBJECT: Final = "object"
#: fds received and not yet claimed by an OBJECT frame, at most
MAX_PENDING_FDS: Final = 256


class Message:
    """One message from a port.

    ``kind`` is ``"notify"``, ``"request"`` (answer it with ``reply``), ``"lost"``
    (``data`` is ``{"count", "first_seq", "last_seq", "where"}``: notifications that were
    dropped, by the server's queue or this client's inbox) or ``"object"`` (``data`` is
    an object the server handed over, a ``kport.Event`` or ``kport.Ring``, now this
    process's own: close it when done). ``deadline`` is on the
    ``time.monotonic()`` clock (system-wide on Linux), for requests only.
    """

    __slots__ = ("data", "deadline", "id", "kind", "replied", "seq")

    def __init__(
        self,
        kind: str,
        data: Any,
        seq: int | None = None,
        *,
        id: int | None = None,
        deadline: float | None = None,
    ) -> None:
        self.kind = kind
        self.data = data
        self.seq = seq
        self.id = id
        self.deadline = deadline
        self.replied = False

    @property
    def needs_reply(self) -> bool:
        return self.kind == REQUEST

    @property
    def is_lost(self) -> bool:
        return self.kind == LOST

    def time_left(self) -> float | None:
        """Seconds until a request's deadline (negative once passed); None for other kinds."""
        return None if self.deadline is None else self.deadline - time.monotonic()

    def __repr__(self) -> str:
        extra = f" seq={self.seq}" if self.seq is not None else f" id={self.id}"
        return f"<Message {self.kind}{extra} data={self.data!r:.60}>"


def _lost_message(count: int, first: int | None, last: int | None, where: str) -> Message:
    return Message(LOST, {"count": count, "first_seq": first, "last_seq": last, "where": where})


class ClientCore:
    """Client state that does not depend on how bytes are read: inbox, replies, end."""

    def __init__(
        self, port: str, welcome: protocol.Welcome, proto: protocol.Connection, max_inbox: int
    ) -> None:
        if max_inbox < 1:
            raise ValueError(f"max_inbox must be positive, not {max_inbox}")
        self.port = port
        self.one_way = welcome.one_way
        self.proto = proto
        self.max_inbox = max_inbox
        self.inbox: deque[Message] = deque()
        #: notifications lost, as reported by the server and counted by this client
        self.lost = 0
        self.results: dict[int, tuple[bool, Any]] = {}
        self.waiting: set[int] = set()
        self.send_ids = 0
        self.end: KportError | None = None
        self.graceful = False
        #: fds received beside frames, waiting for the OBJECT frame that claims them
        self.fds_in: deque[int] = deque()
        #: frames this side owes the server (object acks), written after each read
        self.outbox: list[bytes] = []
        #: objects that came with the answer to a send, by send id
        self.attached: dict[int, list[Any]] = {}

    def check_can_send(self, what: str) -> None:
        if self.one_way:
            raise OneWayPort(f"port {self.port!r} is one-way: a client cannot {what} on it")
        if self.end is not None:
            raise self.end

    def feed(self, data: bytes | memoryview, fds: list[int] | None = None) -> None:
        """Bytes from the socket (``b""`` at EOF) and the fds beside them → messages."""
        if fds:
            self.fds_in.extend(fds)
            if len(self.fds_in) > MAX_PENDING_FDS:
                self.finish(
                    PortClosed(f"port {self.port!r} sent more fds than objects to carry them"),
                    graceful=False,
                )
                self._close_fds()
                return
        self.proto.receive_data(data)
        self.process()

    def _close_fds(self) -> None:
        while self.fds_in:
            os.close(self.fds_in.popleft())

    def _on_object(self, event: protocol.Object) -> None:
        if len(self.fds_in) < event.fds:
            self.finish(
                PortClosed(f"port {self.port!r} announced {event.fds} fds that did not come"),
                graceful=False,
            )
            return
        fds = [self.fds_in.popleft() for _ in range(event.fds)]
        if event.reply_to is not None and event.reply_to not in self.waiting:
            for fd in fds:  # its send gave up waiting: nobody would ever close it
                os.close(fd)
            refusal = PortClosed(f"port {self.port!r}: nobody waits for that answer any more")
            self.outbox.append(
                self.proto.send(protocol.ObjectAck(event.id, None, int(refusal.code), str(refusal)))
            )
            return
        try:
            obj = handles.receive(event.type, fds, event.meta)
        except KportError as err:
            self.outbox.append(
                self.proto.send(protocol.ObjectAck(event.id, None, int(err.code), str(err)))
            )
            return
        self.outbox.append(self.proto.send(protocol.ObjectAck(event.id, 0)))
        if event.reply_to is not None:
            self.attached.setdefault(event.reply_to, []).append(obj)
        else:
            self.inbox.append(Message(OBJECT, obj, id=event.id))

    def discard(self) -> None:
        """Close every fd and object this connection received and nobody took."""
        self._close_fds()
        for objects in self.attached.values():
            for obj in objects:
                handles.close_object(obj)
        self.attached.clear()
        for msg in self.inbox:
            if msg.kind == OBJECT:
                handles.close_object(msg.data)

    def take_attached(self, send_id: int) -> list[Any]:
        """The objects that came with the answer to send ``send_id``."""
        return self.attached.pop(send_id, [])

    def process(self) -> None:
        """Turn every complete frame buffered so far into messages, replies, or the end."""
        proto = self.proto
        try:
            events = proto.events()
        except KportError as err:
            self.finish(err, graceful=False)
            return
        inbox = self.inbox
        for event in events:
            if type(event) is protocol.Notify:
                seqs = event.seqs
                if isinstance(seqs, int):
                    inbox.extend(
                        [Message(NOTIFY, item, s) for s, item in enumerate(event.items, seqs)]
                    )
                else:
                    inbox.extend(
                        [
                            Message(NOTIFY, item, s)
                            for s, item in zip(seqs, event.items, strict=True)
                        ]
                    )
            elif isinstance(event, protocol.Request):
                deadline = time.monotonic() + (event.deadline_ns - time.monotonic_ns()) / 1e9
                inbox.append(Message(REQUEST, event.data, id=event.id, deadline=deadline))
            elif isinstance(event, protocol.Lost):
                self.lost += event.count
                inbox.append(_lost_message(event.count, event.first_seq, event.last_seq, "server"))
            elif isinstance(event, protocol.SendReply):
                if event.id in self.waiting:
                    self.results[event.id] = (True, event.data)
            elif isinstance(event, protocol.Error):
                error = error_from_code(event.code, f"port {self.port!r}: {event.message}")
                if event.id is None:
                    self.finish(error, graceful=False)
                elif event.id in self.waiting:
                    self.results[event.id] = (False, error)
            elif isinstance(event, protocol.Object):
                self._on_object(event)
            elif isinstance(event, protocol.ObjectAck):
                if event.id in self.waiting:
                    if event.handle is None:
                        error = error_from_code(
                            event.code or 0, f"port {self.port!r}: {event.message}"
                        )
                        self.results[event.id] = (False, error)
                    else:
                        self.results[event.id] = (True, event.handle)
            elif isinstance(event, protocol.Bye):
                self.finish(
                    PortClosed(f"port {self.port!r} closed the connection: {event.reason}"),
                    graceful=True,
                )
            elif isinstance(event, protocol.ConnectionClosed):
                self.finish(
                    PortClosed(f"port {self.port!r}: the server closed the connection"),
                    graceful=True,
                )
        if len(inbox) > self.max_inbox:
            self._trim()

    def _trim(self) -> None:
        """Drop the oldest notifications beyond ``max_inbox``; requests are never dropped."""
        inbox = self.inbox
        excess = len(inbox) - self.max_inbox
        kept: list[Message] = []
        dropped = 0
        first: int | None = None
        last: int | None = None
        while excess > 0 and inbox:
            msg = inbox.popleft()
            if msg.kind == NOTIFY:
                dropped += 1
                excess -= 1
                first = msg.seq if first is None else first
                last = msg.seq
            else:
                kept.append(msg)
        self.lost += dropped
        inbox.extendleft(reversed(kept))
        inbox.appendleft(_lost_message(dropped, first, last, "client"))

    def finish(self, err: KportError, *, graceful: bool) -> None:
        if self.end is None:
            self.end = err
            self.graceful = graceful
        self._close_fds()

    def object_frame(self, obj: Any) -> tuple[int, bytes, list[int]]:
        """(id, frame, fds) to pass ``obj`` to the server; the id awaits an OBJECT_ACK."""
        self.check_can_send("pass objects")
        type_name, fds, meta = handles.parts_of(obj)
        if len(fds) > protocol.MAX_OBJECT_FDS:
            raise ValueError(f"an object carries {protocol.MAX_OBJECT_FDS} fds at most")
        object_id = self.next_send_id()
        frame = self.proto.send(protocol.Object(object_id, type_name, meta, len(fds), None))
        return object_id, frame, fds

    def release_frame(self, handle: int) -> bytes:
        self.check_can_send("release objects")
        return self.proto.send(protocol.Release(handle))

    def next_send_id(self) -> int:
        self.send_ids += 1
        self.waiting.add(self.send_ids)
        return self.send_ids

    def take_result(self, send_id: int) -> Any:
        ok, value = self.results.pop(send_id)
        self.waiting.discard(send_id)
        if not ok:
            raise value
        return value

    def reply_frame(self, msg: Message, data: Any) -> bytes:
        self.check_can_send("reply")
        if msg.kind != REQUEST or msg.id is None:
            raise ValueError(f"only requests take a reply; this message is a {msg.kind}")
        if msg.replied:
            raise ValueError(f"request {msg.id} was already answered")
        frame = self.proto.send(protocol.Reply(msg.id, data))
        msg.replied = True
        return frame
