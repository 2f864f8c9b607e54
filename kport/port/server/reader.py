"""What a client sends a port — replies, sends, objects, releases, its end — read and
dispatched in place as its socket becomes readable, with no task hop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING, Final

from kport import protocol
from kport.errors import (
    ErrorCode,
    KportError,
    NameNotFound,
    QueueFull,
    RemoteProtocolError,
    code_of,
)
from kport.port import handles
from kport.port.server.handing import current_send, on_object, on_object_ack

if TYPE_CHECKING:
    from kport.port.server.connection import ServerConnection
    from kport.port.server.port import ServerPort

log = logging.getLogger("kport.port")

MAX_SENDS_IN_FLIGHT: Final = 64
#: fds received and not yet claimed by an OBJECT frame, per connection, at most
MAX_PENDING_FDS: Final = 256
_RECV_SIZE: Final = 256 * 1024


class Reader:
    """One port's reading of its clients' sockets (the loop reads one at a time, so one
    buffer serves them all)."""

    def __init__(self, port: ServerPort) -> None:
        self._port = port
        self._buf = bytearray(_RECV_SIZE)
        self._view = memoryview(self._buf)

    def start(self, conn: ServerConnection) -> None:
        conn._reading = True
        asyncio.get_running_loop().add_reader(conn._sock.fileno(), self.on_readable, conn)

    def stop(self, conn: ServerConnection) -> None:
        loop = self._port._loop
        if conn._reading and loop is not None:
            conn._reading = False
            loop.remove_reader(conn._sock.fileno())

    def on_readable(self, conn: ServerConnection) -> None:
        """The client's socket is readable: parse and dispatch what it sent."""
        port = self._port
        try:
            size, ancdata, flags, _ = conn._sock.recvmsg_into(
                [self._buf], handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self.stop(conn)
            port._drop_later(conn, f"read failed: {err.strerror}")
            return
        proto = conn._proto
        try:
            if ancdata:
                conn._fds_in.extend(handles.fds_from_ancillary(ancdata))
                if flags & socket.MSG_CTRUNC or len(conn._fds_in) > MAX_PENDING_FDS:
                    raise RemoteProtocolError("the client sent more fds than objects to carry them")
            proto.receive_data(self._view[:size])
            for event in proto.events():
                if isinstance(event, protocol.Reply):
                    port._requests.on_reply(conn, event)
                elif isinstance(event, protocol.Send):
                    self._on_send(conn, event)
                elif isinstance(event, protocol.Object):
                    on_object(port, conn, event)
                elif isinstance(event, protocol.ObjectAck):
                    on_object_ack(conn, event)
                elif isinstance(event, protocol.Release):
                    with contextlib.suppress(NameNotFound):
                        conn.dereference(event.handle)
                else:  # Bye or end of stream
                    self.stop(conn)
                    port._drop_later(conn, "client closed")
                    return
        except RemoteProtocolError as err:
            log.warning(
                "port %s: dropping connection %d (pid %d): %s", port.name, conn.id, conn.pid, err
            )
            self.stop(conn)
            with contextlib.suppress(OSError):
                frame = protocol.encode(protocol.Error(int(err.code), str(err)))
                conn._sock.send(frame, socket.MSG_DONTWAIT)
            port._drop_later(conn, f"protocol error: {err}")

    def _on_send(self, conn: ServerConnection, event: protocol.Send) -> None:
        port = self._port
        if port.on_message is None:
            self._send_error(
                conn,
                event.id,
                ErrorCode.NO_HANDLER,
                f"port {port.name!r} takes no messages (it has no on_message)",
            )
            return
        if conn._sends_in_flight >= MAX_SENDS_IN_FLIGHT:
            self._send_error(
                conn,
                event.id,
                ErrorCode.QUEUE_FULL,
                f"port {port.name!r}: more than {MAX_SENDS_IN_FLIGHT} sends in flight",
            )
            return
        conn._sends_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._handle_send(conn, event))
        conn._tasks.add(task)
        task.add_done_callback(conn._tasks.discard)

    async def _handle_send(self, conn: ServerConnection, event: protocol.Send) -> None:
        port = self._port
        assert port.on_message is not None
        current_send.set(event.id)  # this task's own context: see hand_object
        try:
            result = await port.call(port.on_message, conn, event.data)
            if conn.closed:
                return
            frame = conn._proto.send(protocol.SendReply(event.id, result))
        except Exception as err:  # the handler's failure goes to its client, not the server
            if not isinstance(err, KportError):
                log.exception("port %s: on_message failed", port.name)
            message = (
                str(err)
                if isinstance(err, KportError)
                else f"handler raised {type(err).__name__}: {err}"
            )
            self._send_error(conn, event.id, code_of(err), message)
            return
        finally:
            conn._sends_in_flight -= 1
        try:
            conn.writer.send(frame)
        except QueueFull:
            log.warning("port %s: no room for a reply to connection %d", port.name, conn.id)

    def _send_error(
        self, conn: ServerConnection, send_id: int, code: ErrorCode, message: str
    ) -> None:
        if conn.closed:
            return
        try:
            conn.writer.send(conn._proto.send(protocol.Error(int(code), message, send_id)))
        except QueueFull:
            log.warning(
                "port %s: could not queue an error for connection %d", self._port.name, conn.id
            )
