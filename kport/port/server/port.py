"""`ServerPort`: the facade over a port's rooms, and what ties them together — starting,
seqs and notifications for one client or all, and ending connections and the port."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from kport import paths, protocol
from kport.errors import PortClosed, ProtocolError
from kport.port import handles
from kport.port.security import Security
from kport.port.server.connection import ServerConnection
from kport.port.server.handing import current_send, hand_fds
from kport.port.server.handshake import handshake
from kport.port.server.lifecycle import State
from kport.port.server.listener import Listener
from kport.port.server.outbox import Tally, seq_run
from kport.port.server.reader import Reader
from kport.port.server.replay import replay
from kport.port.server.requests import Requests, fail_pending
from kport.replay import History

if TYPE_CHECKING:
    from kport.objects.event import Event

log = logging.getLogger("kport.port")

DEFAULT_QUEUE_LIMIT: Final = 8192
DEFAULT_QUEUE_BYTES: Final = 32 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 64

OnConnect = Callable[[ServerConnection], Any]
OnDisconnect = Callable[[ServerConnection], Any]
OnMessage = Callable[[ServerConnection, Any], Any]
OnObject = Callable[[ServerConnection, int, Any], Any]


class ServerPort:
    """A named communication port served by this process (see ``kport.port.server``)."""

    def __init__(
        self,
        name: str,
        *,
        security: Security | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        one_way: bool = False,
        queue_limit: int = DEFAULT_QUEUE_LIMIT,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_frame: int = protocol.DEFAULT_MAX_FRAME,
        on_connect: OnConnect | None = None,
        on_disconnect: OnDisconnect | None = None,
        on_message: OnMessage | None = None,
        on_object: OnObject | None = None,
        accept_objects: bool = False,
        runtime_dir: str | os.PathLike[str] | None = None,
        history: History | None = None,
    ) -> None:
        paths.validate_port_name(name)
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        if queue_limit < 1 or queue_bytes < 1:
            raise ValueError("queue_limit and queue_bytes must be positive")
        self.name = name
        self.security = (security or Security()).resolve()
        self.max_connections = max_connections
        self.one_way = one_way
        self.queue_limit = queue_limit
        self.queue_bytes = queue_bytes
        self.max_frame = max_frame
        self.on_connect = on_connect
        self.on_disconnect = on_disconnect
        self.on_message = on_message
        self.on_object = on_object
        #: whether clients may hand this port objects (always, with an on_object handler)
        self.accept_objects = accept_objects
        self.history = history
        self.path = paths.port_path(name, runtime_dir)
        #: the last seq this port assigned or was given
        self.seq = 0
        #: notifications broadcast or published (``_publish_lock`` held to change it)
        self.published = 0
        #: orders seqs and notifications between threads (``publish``) and the loop, and
        #: holds a replay's switch to live notifications still
        self._publish_lock = threading.Lock()
        self._tally = Tally()
        self._conns: dict[int, ServerConnection] = {}
        self._conn_ids = itertools.count(1)
        self._listener = Listener(name, self.path, self.security)
        self._requests = Requests(self)
        self._reader = Reader(self)
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._hup_poll: select.epoll | None = None
        self._hup_fds: dict[int, ServerConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._shut_down = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ServerPort {self.name!r} at {self.path} connections={len(self._conns)}>"

    @property
    def connections(self) -> list[ServerConnection]:
        return list(self._conns.values())

    @property
    def closed(self) -> bool:
        return self._listener.closed

    @property
    def lost(self) -> int:
        """Notifications dropped over all connections, those gone included."""
        return self._tally.lost

    async def __aenter__(self) -> ServerPort:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket, with its permissions in place before its path exists, and serve."""
        if self._listener.listening:
            raise RuntimeError(f"port {self.name!r} is already started")
        self._loop = asyncio.get_running_loop()
        if self.history is not None:  # a replay asked for before the first new event
            self.seq = max(self.seq, self.history.last_seq())  # covers the history whole
        self._listener.open()
        if self.one_way:
            self._hup_poll = select.epoll()
            self._loop.add_reader(self._hup_poll.fileno(), self._on_hup)
        self._accept_task = self._loop.create_task(
            self._listener.accept_loop(self._on_accept), name=f"kport-accept-{self.name}"
        )
        log.info("port %s listening at %s (%s)", self.name, self.path, self.security.describe())

    def _on_accept(self, sock: socket.socket) -> None:
        assert self._loop is not None
        task = self._loop.create_task(handshake(self, sock))
        self._handshakes.add(task)
        task.add_done_callback(self._handshakes.discard)

    def close(self) -> None:
        """Stop accepting connections (the socket file goes); existing connections go on."""
        if self._listener.closed:
            return
        if self._accept_task is not None:
            self._accept_task.cancel()
        self._listener.close()

    async def shutdown(self, *, grace: float = 1.0, reason: str = "port shut down") -> None:
        """End every connection, resolve every pending request with ``PortClosed``.

        Queued messages get up to ``grace`` seconds to reach their clients, then each
        client is told BYE and its connection is closed. The socket file is removed.
        """
        self.close()
        if self._accept_task is not None:
            try:
                await self._accept_task
            except asyncio.CancelledError:
                pass
            except Exception:  # the rest of the shutdown must happen all the same
                log.exception("port %s: the accept loop had failed", self.name)
        for task in list(self._handshakes):
            task.cancel()
        conns = list(self._conns.values())
        for conn in conns:
            fail_pending(conn, PortClosed(f"port {self.name!r} shut down: {reason}"))
        if conns:
            await asyncio.gather(*(self._finish(c, reason, grace) for c in conns))
        # Handshakes in flight, and connections that were already ending on their own.
        while self._handshakes or self._background:
            await asyncio.gather(*self._handshakes, *self._background, return_exceptions=True)
        if self._hup_poll is not None and self._loop is not None:
            self._loop.remove_reader(self._hup_poll.fileno())
            self._hup_poll.close()
            self._hup_poll = None
        self._listener.release_lock()
        self._shut_down.set()

    async def wait_shutdown(self) -> None:
        """Wait until :meth:`shutdown` has finished."""
        await self._shut_down.wait()

    async def _finish(self, conn: ServerConnection, reason: str, grace: float) -> None:
        if not conn.life.ending:
            conn.life.to(State.CLOSING)
        conn.writer.kick()
        writer = conn._writer_task
        if writer is not None and not writer.done():
            await asyncio.wait({writer}, timeout=grace)
            if not writer.done():
                log.info(
                    "port %s: connection %d still had %d queued at shutdown",
                    self.name,
                    conn.id,
                    conn.queue_depth,
                )
        if not conn.closed:
            with contextlib.suppress(OSError, ProtocolError):
                conn._sock.send(conn._proto.send(protocol.Bye(reason)), socket.MSG_DONTWAIT)
        await self._drop(conn, reason)

    # --- notifications ---------------------------------------------------------------

    def pack_item(self, data: Any) -> bytes:
        """``data`` as msgpack (the loop's packer), checked against the frame limit."""
        item = protocol.pack(data)
        if len(item) > self.max_frame - 64:
            self.check_size(item, "a message")
        return item

    def check_size(self, item: bytes, what: str) -> None:
        """Raise the error for ``item`` when it exceeds this port's frame limit."""
        if len(item) > self.max_frame - 64:
            raise ValueError(
                f"{what} of {len(item)} bytes exceeds port {self.name!r}'s frame limit "
                f"of {self.max_frame} bytes"
            )

    def _next_seq(self, seq: int | None) -> int:
        """The seq to send under; call with ``_publish_lock`` held."""
        if seq is None:
            self.seq += 1
            return self.seq
        self.seq = max(self.seq, seq)
        return seq

    def notify(self, conn: ServerConnection, data: Any, *, seq: int | None = None) -> int:
        """Queue a notification for one client; never blocks. Returns its seq.

        A full queue drops its oldest notifications (counted, and reported to the client
        in a LOST frame). Notifying a connection that has gone is a no-op.
        """
        item = self.pack_item(data)
        with self._publish_lock:
            seq = self._next_seq(seq)
            if conn.life.admits.notify:
                conn.outbox.notify(seq, item)
        return seq

    def broadcast(
        self,
        data: Any,
        *,
        seq: int | None = None,
        where: Callable[[ServerConnection], bool] | None = None,
        packed: bool = False,
    ) -> int:
        """Queue one notification for every client (or those ``where`` accepts); encoded once.

        With ``packed=True``, ``data`` is already msgpack bytes (for a producer that also
        stores what it sends).
        """
        item = data if packed or not self._conns else self.pack_item(data)
        with self._publish_lock:
            seq = self._next_seq(seq)
            self.published += 1
            for conn in self._conns.values():
                if conn.life.admits.broadcast and (where is None or where(conn)):
                    conn.outbox.notify(seq, item)
        return seq

    def publish(self, items: list[tuple[int, bytes]]) -> None:
        """:meth:`broadcast` from any thread, of notifications already packed:
        ``items`` is ``(seq, msgpack bytes)`` pairs in ascending seq, after this port's.

        A client the writer says may be written now gets them at once, one NOTIFY frame
        written by the calling thread (the loop is not woken); any other gets them handed
        to the loop and queued as :meth:`broadcast` queues (bounded, the oldest dropped
        and reported). Either way each client receives them in seq order.
        """
        if not items:
            return
        loop = self._loop
        frame: bytes | None = None
        later: list[ServerConnection] = []
        with self._publish_lock:
            self.seq = max(self.seq, items[-1][0])
            self.published += len(items)
            for conn in list(self._conns.values()):  # the loop may add or drop meanwhile
                if not conn.life.admits.broadcast:
                    continue
                writer = conn.writer
                with writer.lock:
                    if writer.may_write_now():
                        if frame is None:
                            frame = protocol.encode_notify_packed(
                                seq_run([seq for seq, _ in items]), [item for _, item in items]
                            )
                        if writer.write_now(frame):
                            conn.outbox.sent += len(items)
                            continue
                    writer.handed += 1
                later.append(conn)
        if not later or loop is None:
            return
        if asyncio._get_running_loop() is loop:
            self._publish_in_loop(later, items)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing goes out now
            loop.call_soon_threadsafe(self._publish_in_loop, later, items)

    def _publish_in_loop(
        self, later: list[ServerConnection], items: list[tuple[int, bytes]]
    ) -> None:
        """In the loop: queue what :meth:`publish` could not write at once."""
        for conn in later:
            with conn.writer.lock:
                conn.writer.handed -= 1
                if not conn.life.admits.broadcast:
                    continue
                for seq, item in items:
                    conn.outbox.notify(seq, item)

    # --- requests --------------------------------------------------------------------

    async def request(self, conn: ServerConnection, data: Any, *, timeout: float = 5.0) -> Any:
        """Send a request and wait for the client's reply.

        Raises ``Timeout`` when ``timeout`` seconds pass, ``PortClosed`` if the client goes
        away or the port shuts down first, ``QueueFull`` if it cannot be queued at all,
        ``OneWayPort`` on a one-way port.
        """
        return await self._requests.future(conn, data, timeout)

    def request_future(
        self, conn: ServerConnection, data: Any, *, timeout: float = 5.0
    ) -> asyncio.Future[Any]:
        """:meth:`request` with no coroutine: the request is sent (or queued) now, and the
        future gets the reply or the same errors. A caller that only adds a done callback
        costs no task and no extra turn of the loop; cancelling the future withdraws the
        request. Call it in the loop's thread."""
        return self._requests.future(conn, data, timeout)

    def request_from_thread(
        self,
        conn: ServerConnection,
        data: Any,
        *,
        timeout: float,
        on_done: Callable[[asyncio.Future[Any]], None],
    ) -> asyncio.Future[Any]:
        """:meth:`request_future` for a thread other than the loop's: the request is written
        from the calling thread at once when the writer says it may be (no wake-up of the
        loop before the client sees it, nor for it: the loop starts its deadline when it
        next looks, within ``requests.THREAD_ASKS_S``), else handed to the loop to queue.
        ``on_done`` is the future's done callback, called in the loop's thread. Errors
        found here raise (``OneWayPort``, ``PortClosed``, ``ValueError``); later ones
        (``QueueFull``, ``Timeout``, ``PortClosed``) come in the future."""
        return self._requests.from_thread(conn, data, timeout, on_done)

    # --- objects ---------------------------------------------------------------------

    async def hand_event(
        self, conn: ServerConnection, event: Event, *, timeout: float = 5.0
    ) -> None:
        """Hand ``event`` to one client, which gets its own reference (an "object" message).

        Raises ``ObjectTypeMismatch`` if the client finds it is not what was announced,
        ``Timeout`` or ``PortClosed`` as a request would.
        """
        handles.require_event(event, "hand_event")
        await self.hand_object(conn, event, timeout=timeout)

    async def hand_object(
        self,
        conn: ServerConnection,
        obj: Any,
        *,
        timeout: float = 5.0,
        reply_to: int | None = None,
        with_reply: bool = False,
    ) -> None:
        """Hand any passable object (``kport.Event``, ``kport.Ring``) to one client.

        From an ``on_message`` handler, ``with_reply=True`` attaches the object to the
        answer of the message being handled: the client gets both from
        ``send_for_objects``.
        """
        if with_reply:
            reply_to = current_send.get()
            if reply_to is None:
                raise RuntimeError("with_reply=True is for on_message handlers only")
        type_name, fds, meta = handles.parts_of(obj)
        await self.hand_fds(conn, type_name, fds, meta, timeout=timeout, reply_to=reply_to)

    async def hand_fds(
        self,
        conn: ServerConnection,
        type_name: str,
        fds: list[int],
        meta: dict[str, Any],
        *,
        timeout: float = 5.0,
        reply_to: int | None = None,
    ) -> None:
        """The general form: announce ``type_name`` and pass ``fds`` as its parts."""
        await hand_fds(self, conn, type_name, fds, meta, timeout=timeout, reply_to=reply_to)

    # --- running and ending connections ----------------------------------------------

    async def call(self, handler: Callable[..., Any], *args: Any) -> Any:
        """A user's handler, awaited if it is a coroutine function's."""
        value = handler(*args)
        if inspect.isawaitable(value):
            return await value
        return value

    def _start_connection(self, conn: ServerConnection, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        conn._writer_task = loop.create_task(self._write(conn, since))
        conn._tasks.add(conn._writer_task)
        if self.one_way:
            assert self._hup_poll is not None
            fd = conn._sock.fileno()
            self._hup_fds[fd] = conn
            self._hup_poll.register(fd, select.EPOLLHUP)
        else:
            self._reader.start(conn)

    async def _write(self, conn: ServerConnection, since: int | None) -> None:
        """The connection's writer task: its history first if it asked, then the outbox."""
        if since is not None:
            try:
                await replay(self, conn, since)
            except OSError as err:
                if not conn.closed:
                    self._drop_later(conn, f"write failed: {err.strerror}")
                return
        await conn.writer.run(lambda reason: self._drop_later(conn, reason))

    def _on_hup(self) -> None:
        assert self._hup_poll is not None
        for fd, _ in self._hup_poll.poll(0):
            conn = self._hup_fds.get(fd)
            if conn is not None:
                self._drop_later(conn, "client closed")

    def _drop_later(self, conn: ServerConnection, reason: str) -> None:
        """Drop ``conn`` from a task of its own (the caller may be one of its tasks)."""
        if conn.closed:
            return
        task = asyncio.get_running_loop().create_task(self._drop(conn, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop(self, conn: ServerConnection, reason: str) -> None:
        """End one connection: requests fail with PortClosed, tasks stop, the socket closes."""
        if conn.closed:
            return
        conn.life.to(State.CLOSED)
        self._conns.pop(conn.id, None)
        fail_pending(conn, PortClosed(f"connection {conn.id} (pid {conn.pid}) ended: {reason}"))
        self._reader.stop(conn)
        fd = conn._sock.fileno()
        if self._hup_fds.pop(fd, None) is not None and self._hup_poll is not None:
            with contextlib.suppress(OSError, ValueError):
                self._hup_poll.unregister(fd)
        current = asyncio.current_task()
        tasks = [t for t in conn._tasks if t is not current and not t.done()]
        for task in tasks:
            task.cancel()
        try:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            conn.writer.close_socket()
        if conn.lost:
            log.info(
                "port %s: connection %d (pid %d) ended (%s); it lost %d notifications",
                self.name,
                conn.id,
                conn.pid,
                reason,
                conn.lost,
            )
        else:
            log.debug("port %s: connection %d ended: %s", self.name, conn.id, reason)
        await self._tell_gone(conn)
        conn._release_all()  # every reference the client gave goes with it

    async def _tell_gone(self, conn: ServerConnection) -> None:
        """on_disconnect, for a connection on_connect was told of."""
        if self.on_disconnect is not None:
            try:
                await self.call(self.on_disconnect, conn)
            except Exception:
                log.exception("port %s: on_disconnect failed", self.name)
