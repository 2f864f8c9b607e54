"""Objects across a port: handing events and rings to a client, and taking those it hands
over (each a reference of this process's own, held per connection)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from typing import TYPE_CHECKING, Any, Final

from kport import protocol
from kport.errors import (
    KportError,
    NoHandler,
    OneWayPort,
    PortClosed,
    QueueFull,
    RemoteProtocolError,
    error_from_code,
)
from kport.port import handles
from kport.port.server.requests import expire

if TYPE_CHECKING:
    from kport.port.server.connection import ServerConnection
    from kport.port.server.port import ServerPort

log = logging.getLogger("kport.port")

#: objects one client may have handed over and the port still holds
MAX_OBJECTS_PER_CONNECTION: Final = 64

#: the SEND being handled in this task, for ``hand_object(with_reply=True)``
current_send: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "kport_current_send", default=None
)


async def hand_fds(
    port: ServerPort,
    conn: ServerConnection,
    type_name: str,
    fds: list[int],
    meta: dict[str, Any],
    *,
    timeout: float,
    reply_to: int | None,
) -> None:
    """Announce ``type_name`` to one client and pass ``fds`` as its parts; wait until it
    has taken them (``Timeout``, ``PortClosed`` or its refusal otherwise)."""
    if port.one_way:
        raise OneWayPort(f"port {port.name!r} is one-way: it cannot pass objects")
    if not conn.life.admits.requests:
        raise PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed")
    if len(fds) > protocol.MAX_OBJECT_FDS:
        raise ValueError(f"an object carries {protocol.MAX_OBJECT_FDS} fds at most")
    loop = asyncio.get_running_loop()
    object_id = port._requests.next_id()
    frame = conn._proto.send(protocol.Object(object_id, type_name, meta, len(fds), reply_to))
    # Our own copies: the caller may close its fds (and the numbers be reused by
    # other objects) while this one waits in the queue.
    copies = [os.dup(fd) for fd in fds]
    future: asyncio.Future[Any] = loop.create_future()
    conn._pending[object_id] = future
    entry = conn.outbox.object(object_id, copies, frame)
    what = f"take the {type_name}"
    timer = loop.call_later(timeout, expire, future, port.name, conn, timeout, what)
    try:
        await future
    finally:
        timer.cancel()
        conn._pending.pop(object_id, None)
        if conn.outbox.withdraw(entry):  # never sent: it goes no further
            for fd in copies:
                os.close(fd)


def on_object(port: ServerPort, conn: ServerConnection, event: protocol.Object) -> None:
    """A client hands over an object: check it, keep a reference, answer with a handle."""
    if len(conn._fds_in) < event.fds:
        raise RemoteProtocolError(f"an object announced {event.fds} fds that did not come")
    fds = [conn._fds_in.popleft() for _ in range(event.fds)]
    refusal: KportError | None = None
    if port.on_object is None and not port.accept_objects:
        refusal = NoHandler(f"port {port.name!r} takes no objects")
    elif len(conn.objects) >= MAX_OBJECTS_PER_CONNECTION:
        refusal = QueueFull(
            f"port {port.name!r}: connection {conn.id} already holds "
            f"{MAX_OBJECTS_PER_CONNECTION} objects; dereference some first"
        )
    if refusal is not None:
        for fd in fds:
            os.close(fd)
        ack = protocol.ObjectAck(event.id, None, int(refusal.code), str(refusal))
        conn.writer.send(conn._proto.send(ack))
        return
    try:
        obj = handles.receive(event.type, fds, event.meta)
    except KportError as err:
        log.info("port %s: pid %d passed a bad object: %s", port.name, conn.pid, err)
        ack = protocol.ObjectAck(event.id, None, int(err.code), str(err))
        conn.writer.send(conn._proto.send(ack))
        return
    handle = next(conn._handles)
    conn.objects[handle] = obj
    conn.writer.send(conn._proto.send(protocol.ObjectAck(event.id, handle)))
    if port.on_object is not None:
        task = asyncio.get_running_loop().create_task(_call_on_object(port, conn, handle, obj))
        conn._tasks.add(task)
        task.add_done_callback(conn._tasks.discard)


async def _call_on_object(port: ServerPort, conn: ServerConnection, handle: int, obj: Any) -> None:
    assert port.on_object is not None
    try:
        await port.call(port.on_object, conn, handle, obj)
    except Exception:
        log.exception("port %s: on_object failed", port.name)


def on_object_ack(conn: ServerConnection, event: protocol.ObjectAck) -> None:
    """The client took (or refused) an object we handed it."""
    future = conn._pending.get(event.id)
    if future is None or future.done():
        return
    if event.handle is None:
        future.set_exception(
            error_from_code(
                event.code or 0, f"connection {conn.id} (pid {conn.pid}): {event.message}"
            )
        )
    else:
        future.set_result(event.handle)
