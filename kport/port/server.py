"""`ServerPort`: the privileged end of a communication port, on asyncio.

A port is a Unix stream socket at ``<runtime dir>/<name>.sock``. Each accepted client is
checked (security, ``max_connections``, handshake, ``on_connect``) before it sees a
single event, and then gets its own bounded queue and writer task:

* ``notify`` never blocks the producer. When a queue is full (messages or bytes) its
  oldest notifications are dropped and the client is sent a LOST frame (count and seq
  range) before the next message it receives.
* ``publish`` is ``broadcast`` for any thread: a producer's own thread writes to each
  client that has nothing queued, and hands the rest to the loop to queue.
* Requests, send-replies and errors are never dropped: they may evict notifications to
  find room, and a request that still finds none fails at once with ``QueueFull``.
* Every request ends: reply, deadline (``Timeout``), disconnect or shutdown (``PortClosed``).
* A port given a ``history`` replays it to a client that connects with ``since=SEQ``:
  every notification after SEQ, gaps as LOST frames, then live ones, with no gap and no
  duplicate between the two (the client is held out of broadcasts until it has caught up).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import errno
import functools
import inspect
import itertools
import logging
import os
import select
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from kport import identity, paths, protocol
from kport.errors import (
    ErrorCode,
    KportError,
    NameCollision,
    NameNotFound,
    NoHandler,
    OneWayPort,
    PortClosed,
    ProtocolError,
    QueueFull,
    RemoteProtocolError,
    Timeout,
    code_of,
    error_from_code,
)
from kport.port import handles
from kport.port.security import PeerCredentials, Security, peer_credentials
from kport.replay import Gap, History, Page

if TYPE_CHECKING:
    from kport.objects.event import Event

log = logging.getLogger("kport.port")

DEFAULT_QUEUE_LIMIT: Final = 8192
DEFAULT_QUEUE_BYTES: Final = 32 * 1024 * 1024
DEFAULT_MAX_CONNECTIONS: Final = 64
HANDSHAKE_TIMEOUT_S: Final = 5.0
MAX_SENDS_IN_FLIGHT: Final = 64
_BATCH_BYTES: Final = 256 * 1024
#: fds received and not yet claimed by an OBJECT frame, per connection, at most
MAX_PENDING_FDS: Final = 256
#: objects one client may have handed over and the port still holds
MAX_OBJECTS_PER_CONNECTION: Final = 64
#: history events read per page when replaying
REPLAY_PAGE: Final = 5000
_RECV_SIZE: Final = 256 * 1024
#: a request sent from another thread goes out at once when its frame is at most this
#: big: one skb on a Unix stream socket, so the send is all or nothing (never half a frame)
_DIRECT_MAX: Final = 16 * 1024
#: while requests written from other threads keep coming, the loop starts their deadlines
#: this often (and at once for the first after a quiet spell), rather than being woken
#: for each: see ServerPort.request_from_thread
_THREAD_ASKS_S: Final = 0.05
#: how long the accept loop waits after an error it did not expect before it tries again
ACCEPT_BACKOFF_S: Final = 0.5
_ACCEPT_RETRY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)

# Queue entries: (_NOTIFY, seq, packed item), (_FRAME, request id or None, frame bytes),
# or (_OBJECT, (object id, the fds, owned by the entry), frame bytes).
_NOTIFY: Final = 0
_FRAME: Final = 1
_OBJECT: Final = 2
_Entry = tuple[int, Any, bytes]

OnConnect = Callable[["ServerConnection"], Any]
OnDisconnect = Callable[["ServerConnection"], Any]
OnMessage = Callable[["ServerConnection", Any], Any]
OnObject = Callable[["ServerConnection", int, Any], Any]


class ServerConnection:
    """One accepted client: who it is, its queue, and what it has lost."""

    def __init__(
        self,
        port: ServerPort,
        conn_id: int,
        sock: socket.socket,
        peer: PeerCredentials,
    ) -> None:
        self.port = port
        self.id = conn_id
        self.peer = peer
        self.pid = peer.pid
        self.uid = peer.uid
        self.gid = peer.gid
        self.start_time = identity.start_time(peer.pid)
        self.client_pid: int | None = None
        self.connected_at = time.time()
        self.context: Any = None
        #: notifications dropped because the queue was full
        self.lost = 0
        #: frames written to the socket (a NOTIFY batch counts its items)
        self.sent = 0
        #: replies that came after their request had ended
        self.late_replies = 0
        self.closed = False
        self._sock = sock
        self._proto = protocol.Connection(protocol.Role.SERVER, max_frame=port.max_frame)
        self._queue: deque[_Entry] = deque()
        self._queue_bytes = 0
        self._queued_notifies = 0
        self._lost_count = 0
        self._lost_first: int | None = None
        self._lost_last: int | None = None
        self._wake = asyncio.Event()
        self._pending: dict[int, asyncio.Future[Any]] = {}
        #: done callbacks of requests from other threads, called as their reply is read
        #: rather than a turn of the loop later
        self._eager: dict[int, Callable[[asyncio.Future[Any]], None]] = {}
        self._sends_in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        self._closing = False
        self._reading = False
        #: only the loop writes while set: from creation until the writer task starts
        #: (after the handshake), and while the writer or a replay has a write under way
        self._writing = True
        #: held while the socket is written outside the writer task, or while a write is
        #: claimed, or while it is closed: a frame sent from another thread
        #: (``request_from_thread``, ``publish``) never lands inside one the loop is
        #: writing, nor on a closed socket's reused fd
        self._send_lock = threading.Lock()
        #: publish() calls whose notifications are on their way to the loop, to be queued:
        #: until they are, nothing may overtake them
        self._handed = 0
        #: replaying history: broadcasts skip this connection until it has caught up
        self._held = False
        #: history notifications replayed to this connection
        self.replayed = 0
        #: objects this client handed over (``reference_event``), by handle: this
        #: process's own references, released when the client releases them or goes
        self.objects: dict[int, Any] = {}
        self._handles = itertools.count(1)
        self._fds_in: deque[int] = deque()

    def __repr__(self) -> str:
        return (
            f"<ServerConnection {self.id} pid={self.pid} uid={self.uid} "
            f"queue={len(self._queue)} lost={self.lost}>"
        )

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def queue_bytes(self) -> int:
        return self._queue_bytes

    @property
    def pending_requests(self) -> int:
        return len(self._pending)

    def info(self) -> dict[str, Any]:
        """A plain mapping for status displays."""
        return {
            "id": self.id,
            "pid": self.pid,
            "start_time": self.start_time,
            "uid": self.uid,
            "gid": self.gid,
            "connected_at": self.connected_at,
            "queue_depth": self.queue_depth,
            "queue_bytes": self.queue_bytes,
            "lost": self.lost,
            "sent": self.sent,
            "pending_requests": self.pending_requests,
            "replayed": self.replayed,
            "objects": len(self.objects),
            "replaying": self._held,
        }

    def take(self, handle: int) -> Any:
        """Keep an object the client handed over beyond this connection: it is now yours.

        It leaves :attr:`objects`, so it is not released when the client goes; close it
        when done.
        """
        try:
            return self.objects.pop(handle)
        except KeyError:
            raise NameNotFound(
                f"connection {self.id} (pid {self.pid}) gave no object {handle}"
            ) from None

    def dereference(self, handle: int) -> None:
        """Drop this process's reference to an object the client handed over."""
        obj = self.objects.pop(handle, None)
        if obj is None:
            raise NameNotFound(f"connection {self.id} (pid {self.pid}) gave no object {handle}")
        handles.close_object(obj)

    def _release_all(self) -> None:
        for obj in self.objects.values():
            handles.close_object(obj)
        self.objects.clear()
        for kind, info, _ in self._queue:  # objects that never went out: our copies
            if kind == _OBJECT:
                for fd in info[1]:
                    os.close(fd)
        self._queue.clear()
        while self._fds_in:
            os.close(self._fds_in.popleft())

    # --- the queue -------------------------------------------------------------------

    def _enqueue_notify(self, seq: int, item: bytes) -> bool:
        port = self.port
        size = len(item)
        if size > port.queue_bytes:
            self._record_lost(seq)
            return False
        while len(self._queue) >= port.queue_limit or self._queue_bytes + size > port.queue_bytes:
            if not self._drop_oldest_notify():
                self._record_lost(seq)
                return False
        self._queue.append((_NOTIFY, seq, item))
        self._queue_bytes += size
        self._queued_notifies += 1
        self._wake.set()
        return True

    def _enqueue_frame(self, frame: bytes, request_id: int | None) -> None:
        port = self.port
        size = len(frame)
        while len(self._queue) >= port.queue_limit or self._queue_bytes + size > port.queue_bytes:
            if not self._drop_oldest_notify():
                raise QueueFull(
                    f"port {port.name!r}: the queue of connection {self.id} (pid {self.pid}) "
                    f"is full of requests and replies ({len(self._queue)} messages, "
                    f"{self._queue_bytes} bytes)"
                )
        self._queue.append((_FRAME, request_id, frame))
        self._queue_bytes += size
        self._wake.set()

    def _drop_oldest_notify(self) -> bool:
        if not self._queued_notifies:
            return False
        queue = self._queue
        if queue[0][0] == _NOTIFY:
            _, seq, item = queue.popleft()
        else:  # rare: requests at the head; find the oldest notification behind them
            index = next(i for i, entry in enumerate(queue) if entry[0] == _NOTIFY)
            _, seq, item = queue[index]
            del queue[index]
        self._queue_bytes -= len(item)
        self._queued_notifies -= 1
        self._record_lost(seq)
        return True

    def _record_lost(self, seq: int) -> None:
        self.lost += 1
        self.port.lost += 1
        self._lost_count += 1
        if self._lost_first is None or seq < self._lost_first:
            self._lost_first = seq
        if self._lost_last is None or seq > self._lost_last:
            self._lost_last = seq
        self._wake.set()

    def _idle(self) -> bool:
        """Whether another thread may write a frame now (``_send_lock`` held): nothing
        queued, being written, due to be reported lost, or on its way to the loop."""
        return not (
            self._queue
            or self._writing
            or self._lost_count
            or self._handed
            or self._closing
            or self.closed
        )

    def _send_direct(self, frame: bytes) -> int:
        """Another thread's write of ``frame``, ``_send_lock`` held and the connection
        idle: the bytes the socket took at once (never blocking), 0 when it took none or
        the frame is too big to go out whole; the loop's path queues or drops the rest."""
        if len(frame) > _DIRECT_MAX:
            return 0
        try:
            return self._sock.send(frame, socket.MSG_DONTWAIT)
        except OSError:
            return 0  # full or failing

    def _claim_writing(self) -> None:
        """From now until ``_writing`` is cleared, only the loop writes this socket."""
        with self._send_lock:
            self._writing = True

    def _unqueue_request(self, request_id: int) -> None:
        for index, entry in enumerate(self._queue):
            if entry[0] == _FRAME and entry[1] == request_id:
                del self._queue[index]
                self._queue_bytes -= len(entry[2])
                return

    def _take_batch(self) -> bytes:
        """Pop up to ~256 KiB of queued messages as frame bytes, a LOST frame first if due."""
        parts: list[bytes] = []
        total = 0
        if self._lost_count:
            lost = protocol.Lost(self._lost_count, self._lost_first, self._lost_last)
            parts.append(self._proto.send(lost))
            self._lost_count, self._lost_first, self._lost_last = 0, None, None
        queue = self._queue
        limit = min(_BATCH_BYTES, self.port.max_frame - 64)
        while queue and total < _BATCH_BYTES:
            kind, _, payload = queue[0]
            if kind == _OBJECT:
                break  # it goes alone, with its fds: see ServerPort._writer
            if kind == _FRAME:
                queue.popleft()
                self._queue_bytes -= len(payload)
                parts.append(payload)
                total += len(payload)
                self.sent += 1
                continue
            # A run of notifications becomes one NOTIFY frame.
            seqs: list[int] = []
            items: list[bytes] = []
            run_bytes = 0
            while queue and queue[0][0] == _NOTIFY:
                _, seq, item = queue[0]
                if items and run_bytes + len(item) > limit:
                    break
                queue.popleft()
                seqs.append(seq)
                items.append(item)
                run_bytes += len(item)
            self._queue_bytes -= run_bytes
            self._queued_notifies -= len(items)
            frame = self._proto.send(protocol.Notify(_seq_run(seqs), items, packed=True))
            parts.append(frame)
            total += len(frame)
            self.sent += len(items)
        return b"".join(parts)


class ServerPort:
    """A named communication port served by this process (see the module docstring)."""

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
        #: notifications dropped over all connections
        self.lost = 0
        #: the last seq this port assigned
        self.seq = 0
        #: orders seqs and notifications between threads (``publish``) and the loop, and
        #: holds a replay's switch to live notifications still
        self._publish_lock = threading.Lock()
        self._conns: dict[int, ServerConnection] = {}
        self._conn_ids = itertools.count(1)
        self._request_ids = itertools.count(1)
        self._listener: socket.socket | None = None
        self._lock_fd: int | None = None
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Task[None]] = set()
        self._hup_poll: select.epoll | None = None
        self._hup_fds: dict[int, ServerConnection] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rbuf = bytearray(_RECV_SIZE)  # one read buffer: the loop reads one socket at a time
        self._rview = memoryview(self._rbuf)
        self._closed = False
        self._shut_down = asyncio.Event()
        #: requests written from other threads whose deadlines the loop has yet to start,
        #: and whether it will look at them without being woken (see _arm_thread_asks)
        self._thread_asks: deque[tuple[ServerConnection, asyncio.Future[Any], int, int, float]]
        self._thread_asks = deque()
        self._thread_asks_due = False

    def __repr__(self) -> str:
        return f"<ServerPort {self.name!r} at {self.path} connections={len(self._conns)}>"

    @property
    def connections(self) -> list[ServerConnection]:
        return list(self._conns.values())

    @property
    def closed(self) -> bool:
        return self._closed

    async def __aenter__(self) -> ServerPort:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Create the socket, with its permissions in place before its path exists, and serve."""
        if self._listener is not None:
            raise RuntimeError(f"port {self.name!r} is already started")
        self._loop = asyncio.get_running_loop()
        self._take_lock()
        try:
            self._listener = self._bind()
        except BaseException:
            self._release_lock()
            raise
        if self.one_way:
            self._hup_poll = select.epoll()
            self._loop.add_reader(self._hup_poll.fileno(), self._on_hup)
        self._accept_task = self._loop.create_task(
            self._accept_loop(), name=f"kport-accept-{self.name}"
        )
        log.info("port %s listening at %s (%s)", self.name, self.path, self.security.describe())

    def _take_lock(self) -> None:
        rundir = self.path.parent
        rundir.mkdir(parents=True, exist_ok=True, mode=0o755)
        lock_path = rundir / f".{self.path.name}.lock"
        while True:
            fd = paths.try_lock(lock_path)
            if fd is None:
                raise NameCollision(
                    f"port {self.name!r} is already served by a live process (it holds {lock_path})"
                )
            # The lock file may have been unlinked by a server that was stopping while we
            # waited: then lock the new file instead.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                self._lock_path = lock_path
                return
            os.close(fd)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> socket.socket:
        path = self.path
        if path.exists() or path.is_symlink():
            self._check_stale(path)
        sec = self.security
        # Bind inside a private directory, set owner and mode there, then rename into
        # place: the socket is never reachable with the wrong permissions.
        tmpdir = tempfile.mkdtemp(prefix=f".{self.name}.", dir=path.parent)
        tmp_path = os.path.join(tmpdir, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp_path)
            if (sec.owner, sec.group) != (os.geteuid(), os.getegid()):
                os.chown(tmp_path, sec.owner, sec.group)
            os.chmod(tmp_path, sec.mode)
            sock.listen(128)
            sock.setblocking(False)
            os.rename(tmp_path, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        finally:
            os.rmdir(tmpdir)
        self._inode = os.stat(path).st_ino
        return sock

    def _check_stale(self, path: Path) -> None:
        """A leftover socket of a dead server is replaced; anything alive or foreign is not."""
        if not path.is_socket():
            raise NameCollision(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("port %s: replacing the stale socket %s", self.name, path)
            return
        except OSError as err:
            raise NameCollision(
                f"{path} exists and cannot be checked ({err}); not replacing it"
            ) from err
        finally:
            probe.close()
        raise NameCollision(f"port {self.name!r} is already served at {path} by a live process")

    def close(self) -> None:
        """Stop accepting connections (the socket file goes); existing connections go on."""
        if self._closed:
            return
        self._closed = True
        if self._accept_task is not None:
            self._accept_task.cancel()
        if self._listener is not None:
            self._listener.close()
        self._unlink_socket()

    def _unlink_socket(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == getattr(self, "_inode", None):
                os.unlink(self.path)

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
            self._fail_pending(conn, PortClosed(f"port {self.name!r} shut down: {reason}"))
        if conns:
            await asyncio.gather(*(self._finish(c, reason, grace) for c in conns))
        # Handshakes in flight, and connections that were already ending on their own.
        while self._handshakes or self._background:
            await asyncio.gather(*self._handshakes, *self._background, return_exceptions=True)
        if self._hup_poll is not None and self._loop is not None:
            self._loop.remove_reader(self._hup_poll.fileno())
            self._hup_poll.close()
            self._hup_poll = None
        self._release_lock()
        self._shut_down.set()

    async def wait_shutdown(self) -> None:
        """Wait until :meth:`shutdown` has finished."""
        await self._shut_down.wait()

    async def _finish(self, conn: ServerConnection, reason: str, grace: float) -> None:
        conn._closing = True
        conn._wake.set()
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

    # --- sending ---------------------------------------------------------------------

    def _next_seq(self, seq: int | None) -> int:
        """The seq to send under; call with ``_publish_lock`` held."""
        if seq is None:
            self.seq += 1
            return self.seq
        self.seq = max(self.seq, seq)
        return seq

    def _pack_item(self, data: Any) -> bytes:
        item = protocol.pack(data)
        if len(item) > self.max_frame - 64:
            raise ValueError(
                f"a message of {len(item)} bytes exceeds port {self.name!r}'s frame limit "
                f"of {self.max_frame} bytes"
            )
        return item

    def notify(self, conn: ServerConnection, data: Any, *, seq: int | None = None) -> int:
        """Queue a notification for one client; never blocks. Returns its seq.

        A full queue drops its oldest notifications (counted, and reported to the client
        in a LOST frame). Notifying a connection that has gone is a no-op.
        """
        item = self._pack_item(data)
        with self._publish_lock:
            seq = self._next_seq(seq)
            if not conn.closed and not conn._closing:
                conn._enqueue_notify(seq, item)
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
        item = data if packed or not self._conns else self._pack_item(data)
        with self._publish_lock:
            seq = self._next_seq(seq)
            for conn in self._conns.values():
                if not conn._closing and not conn._held and (where is None or where(conn)):
                    conn._enqueue_notify(seq, item)
        return seq

    def publish(self, items: list[tuple[int, bytes]]) -> None:
        """:meth:`broadcast` from any thread, of notifications already packed:
        ``items`` is ``(seq, msgpack bytes)`` pairs in ascending seq, after this port's.

        A client with nothing queued or being written gets them at once, one NOTIFY frame
        written by the calling thread (the loop is not woken); for any other, they are
        handed to the loop and queued as :meth:`broadcast` queues (bounded, the oldest
        dropped and reported). Either way each client receives them in seq order.
        """
        if not items:
            return
        loop = self._loop
        frame: bytes | None = None
        later: list[tuple[ServerConnection, bytes | None]] = []
        with self._publish_lock:
            self.seq = max(self.seq, items[-1][0])
            for conn in list(self._conns.values()):  # the loop may add or drop meanwhile
                if conn._closing or conn._held:
                    continue
                rest: bytes | None = None
                with conn._send_lock:
                    if conn._idle():
                        if frame is None:
                            frame = protocol.encode_notify_packed(
                                _seq_run([seq for seq, _ in items]), [item for _, item in items]
                            )
                        sent = conn._send_direct(frame)
                        if sent == len(frame):
                            conn.sent += len(items)
                            continue
                        if sent:  # never for one skb, but then the rest goes first
                            conn.sent += len(items)
                            rest = frame[sent:]
                    conn._handed += 1
                later.append((conn, rest))
        if not later or loop is None:
            return
        if asyncio._get_running_loop() is loop:
            self._publish_in_loop(later, items)
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: nothing goes out now
            loop.call_soon_threadsafe(self._publish_in_loop, later, items)

    def _publish_in_loop(
        self, later: list[tuple[ServerConnection, bytes | None]], items: list[tuple[int, bytes]]
    ) -> None:
        """In the loop: queue what :meth:`publish` could not write at once."""
        for conn, rest in later:
            with conn._send_lock:
                conn._handed -= 1
                if conn.closed or conn._closing:
                    continue
                if rest is not None:  # the end of a frame half written: it goes first
                    conn._queue.append((_FRAME, None, rest))
                    conn._queue_bytes += len(rest)
                    conn._wake.set()
                    continue
                for seq, item in items:
                    conn._enqueue_notify(seq, item)

    async def request(self, conn: ServerConnection, data: Any, *, timeout: float = 5.0) -> Any:
        """Send a request and wait for the client's reply.

        Raises ``Timeout`` when ``timeout`` seconds pass, ``PortClosed`` if the client goes
        away or the port shuts down first, ``QueueFull`` if it cannot be queued at all,
        ``OneWayPort`` on a one-way port.
        """
        return await self.request_future(conn, data, timeout=timeout)

    def _new_request(self, conn: ServerConnection, timeout: float) -> tuple[int, int]:
        """A request's id and deadline, once it is known it may be sent at all."""
        if self.one_way:
            raise OneWayPort(f"port {self.name!r} is one-way: it cannot carry requests")
        if conn.closed or conn._closing:
            raise PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed")
        if timeout <= 0:
            raise ValueError(f"request timeout must be positive, not {timeout}")
        return next(self._request_ids), time.monotonic_ns() + int(timeout * 1e9)

    def request_future(
        self, conn: ServerConnection, data: Any, *, timeout: float = 5.0
    ) -> asyncio.Future[Any]:
        """:meth:`request` with no coroutine: the request is sent (or queued) now, and the
        future gets the reply or the same errors. A caller that only adds a done callback
        costs no task and no extra turn of the loop; cancelling the future withdraws the
        request. Call it in the loop's thread."""
        request_id, deadline_ns = self._new_request(conn, timeout)
        frame = conn._proto.send(
            protocol.Request(request_id, deadline_ns, self._pack_item(data), packed=True)
        )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        conn._pending[request_id] = future
        try:
            self._send_frame(conn, frame, request_id)
        except QueueFull:
            del conn._pending[request_id]
            raise
        self._arm(conn, future, request_id, timeout)
        return future

    def request_from_thread(
        self,
        conn: ServerConnection,
        data: Any,
        *,
        timeout: float,
        on_done: Callable[[asyncio.Future[Any]], None],
    ) -> asyncio.Future[Any]:
        """:meth:`request_future` for a thread other than the loop's: the request is written
        from the calling thread at once when nothing else is queued for the connection (no
        wake-up of the loop before the client sees it, nor for it: the loop starts its
        deadline when it next looks, within _THREAD_ASKS_S), else handed to the loop to queue.
        ``on_done`` is the future's done callback, called in the loop's thread. Errors
        found here raise (``OneWayPort``, ``PortClosed``, ``ValueError``); later ones
        (``QueueFull``, ``Timeout``, ``PortClosed``) come in the future."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise PortClosed(f"port {self.name!r} is not running")
        request_id, deadline_ns = self._new_request(conn, timeout)
        # this thread's own packer, not the loop's shared one
        item = protocol.pack_new(data)
        if len(item) > self.max_frame - 64:
            raise ValueError(
                f"a request of {len(item)} bytes exceeds port {self.name!r}'s frame limit "
                f"of {self.max_frame} bytes"
            )
        frame = protocol.encode_request_packed(request_id, deadline_ns, item)
        future: asyncio.Future[Any] = loop.create_future()
        future.add_done_callback(on_done)
        conn._eager[request_id] = on_done
        conn._pending[request_id] = future  # before the send: the reply may come at once
        with conn._send_lock:
            sent = conn._idle() and conn._send_direct(frame) == len(frame)
        try:
            if not sent:
                loop.call_soon_threadsafe(
                    self._request_in_loop, conn, future, request_id, frame, timeout
                )
            else:
                # append, then look at the flag; the loop clears it, then takes them all
                self._thread_asks.append((conn, future, request_id, deadline_ns, timeout))
                if not self._thread_asks_due:
                    self._thread_asks_due = True
                    loop.call_soon_threadsafe(self._arm_thread_asks)
        except RuntimeError:  # the loop closed meanwhile
            _forget(conn, request_id)
            raise PortClosed(f"port {self.name!r} is not running") from None
        return future

    def _arm_thread_asks(self) -> None:
        """In the loop: start the deadlines of the requests other threads wrote. While they
        keep coming, look again in _THREAD_ASKS_S; after a quiet spell, the next one wakes
        the loop. Each deadline counts from when its request was made."""
        assert self._loop is not None
        self._thread_asks_due = False
        asks = self._thread_asks
        if not asks:
            return
        now = time.monotonic_ns()
        while asks:
            conn, future, request_id, deadline_ns, timeout = asks.popleft()
            delay = max(deadline_ns - now, 0) / 1e9
            self._request_in_loop(conn, future, request_id, None, timeout, delay=delay)
        self._thread_asks_due = True
        self._loop.call_later(_THREAD_ASKS_S, self._arm_thread_asks)

    def _request_in_loop(
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
            conn.sent += 1
        if future.done():  # cancelled, or answered before the loop got here
            _forget(conn, request_id)
            return
        # one written already is failed only once its connection has ended
        if conn.closed or (frame is not None and conn._closing):
            _forget(conn, request_id)
            future.set_exception(PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed"))
            return
        if frame is not None:
            try:
                self._send_frame(conn, frame, request_id)
            except QueueFull as err:
                _forget(conn, request_id)
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
        assert self._loop is not None
        timer = self._loop.call_later(
            timeout if delay is None else delay, _expire, future, self.name, conn, timeout, "reply"
        )
        future.add_done_callback(functools.partial(_request_done, conn, request_id, timer))

    # --- accepting -------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        assert self._listener is not None and self._loop is not None
        loop = self._loop
        while True:
            try:
                sock, _ = await loop.sock_accept(self._listener)
            except OSError as err:
                if self._closed:
                    return
                if err.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("port %s: accept failed (%s); retrying", self.name, err)
                    await asyncio.sleep(0.1)
                else:  # never a deaf port that looks up: say it, and keep listening
                    log.exception("port %s: accept failed unexpectedly; retrying", self.name)
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            task = loop.create_task(self._handshake(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _handshake(self, sock: socket.socket) -> None:
        conn: ServerConnection | None = None
        registered = False
        introduced = False  # on_connect was told of it: on_disconnect must be too
        try:
            sock.setblocking(False)
            peer = peer_credentials(sock)
            conn = ServerConnection(self, next(self._conn_ids), sock, peer)
            refusal = self._refusal(peer)
            if refusal is not None:
                await self._refuse(conn, *refusal)
                return
            hello = await self._read_hello(conn)
            if hello is None:
                return
            conn.client_pid = hello.pid
            if hello.since is not None:
                if self.history is None:
                    await self._refuse(
                        conn,
                        ErrorCode.NO_HISTORY,
                        f"port {self.name!r} keeps no history: connect without since",
                    )
                    return
                if hello.since < 0:
                    await self._refuse(
                        conn, ErrorCode.PROTOCOL, f"since must be a seq >= 0, not {hello.since}"
                    )
                    return
            if hello.port not in ("", self.name):
                await self._refuse(
                    conn,
                    ErrorCode.WRONG_PORT,
                    f"this is port {self.name!r}, not {hello.port!r}",
                )
                return
            if self.on_connect is not None:
                try:
                    conn.context = await _maybe_await(self.on_connect(conn))
                except KportError as err:
                    await self._refuse(conn, err.code, f"port {self.name!r} refused: {err}")
                    return
                introduced = True
            if len(self._conns) >= self.max_connections:  # on_connect may have awaited
                await self._refuse(conn, *self._too_many())
                return
            welcome = protocol.Welcome(
                protocol.PROTOCOL_VERSION, self.name, self.one_way, self.max_frame
            )
            frame = conn._proto.send(welcome)
            if self.one_way:
                # The kernel now refuses the client's writes (EPIPE): one way, for real.
                sock.shutdown(socket.SHUT_RD)
            conn._held = hello.since is not None
            self._conns[conn.id] = conn
            registered = True
            await asyncio.get_running_loop().sock_sendall(sock, frame)
            self._start_connection(conn, hello.since)
            log.debug(
                "port %s: connection %d from pid %d uid %d", self.name, conn.id, conn.pid, conn.uid
            )
        except OSError as err:
            log.debug("port %s: handshake failed: %s", self.name, err)
            if conn is not None and registered:
                await self._drop(conn, f"handshake failed: {err}")
            else:
                sock.close()
        except BaseException:
            if conn is not None and registered:
                await self._drop(conn, "handshake cancelled")
            else:
                sock.close()
            raise
        finally:
            if conn is not None and introduced and not registered:
                # refused after on_connect (the port filled meanwhile), or failed
                conn.closed = True
                await self._tell_gone(conn)

    def _refusal(self, peer: PeerCredentials) -> tuple[ErrorCode, str] | None:
        if self._closed:
            return ErrorCode.PORT_CLOSED, f"port {self.name!r} is closed to new connections"
        if not self.security.admits(peer):
            return (
                ErrorCode.ACCESS_DENIED,
                f"port {self.name!r} does not admit uid {peer.uid} gid {peer.gid} "
                f"(it admits {self.security.describe()})",
            )
        if len(self._conns) >= self.max_connections:
            return self._too_many()
        return None

    def _too_many(self) -> tuple[ErrorCode, str]:
        return (
            ErrorCode.TOO_MANY_CONNECTIONS,
            f"port {self.name!r} already has its maximum of {self.max_connections} connections",
        )

    async def _refuse(self, conn: ServerConnection, code: ErrorCode, message: str) -> None:
        log.info("port %s: refused pid %d uid %d: %s", self.name, conn.pid, conn.uid, message)
        try:
            frame = conn._proto.send(protocol.Error(int(code), message))
            async with asyncio.timeout(1.0):
                await asyncio.get_running_loop().sock_sendall(conn._sock, frame)
        except (OSError, TimeoutError, ProtocolError):
            pass
        finally:
            conn._sock.close()

    async def _read_hello(self, conn: ServerConnection) -> protocol.Hello | None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(HANDSHAKE_TIMEOUT_S):
                while True:
                    event = conn._proto.next_event()
                    if isinstance(event, protocol.Hello):
                        return event
                    if isinstance(event, protocol.ConnectionClosed):
                        conn._sock.close()
                        return None
                    data = await loop.sock_recv(conn._sock, 4096)
                    conn._proto.receive_data(data)
        except TimeoutError:
            log.info(
                "port %s: pid %d sent no hello within %g s",
                self.name,
                conn.pid,
                HANDSHAKE_TIMEOUT_S,
            )
            conn._sock.close()
        except RemoteProtocolError as err:
            await self._refuse(conn, err.code, f"bad handshake: {err}")
        return None

    # --- running connections ---------------------------------------------------------

    def _start_connection(self, conn: ServerConnection, since: int | None) -> None:
        loop = asyncio.get_running_loop()
        if since is None:
            conn._writer_task = loop.create_task(self._writer(conn))
        else:
            conn._writer_task = loop.create_task(self._replay_then_write(conn, since))
        conn._tasks.add(conn._writer_task)
        if self.one_way:
            assert self._hup_poll is not None
            fd = conn._sock.fileno()
            self._hup_fds[fd] = conn
            self._hup_poll.register(fd, select.EPOLLHUP)
        else:
            conn._reading = True
            loop.add_reader(conn._sock.fileno(), self._on_readable, conn)

    def _on_hup(self) -> None:
        assert self._hup_poll is not None
        for fd, _ in self._hup_poll.poll(0):
            conn = self._hup_fds.get(fd)
            if conn is not None:
                self._drop_later(conn, "client closed")

    async def _writer(self, conn: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        sock = conn._sock
        conn._writing = False  # the handshake is done: other threads may write when idle
        try:
            while True:
                if not conn._queue and not conn._lost_count:
                    if conn._closing:
                        return
                    conn._wake.clear()
                    await conn._wake.wait()
                    continue
                conn._claim_writing()
                head = conn._queue[0] if conn._queue and not conn._lost_count else None
                if head is not None and head[0] == _OBJECT:
                    conn._queue.popleft()
                    conn._queue_bytes -= len(head[2])
                    await self._send_object(conn, head[1][1], head[2])
                else:
                    await loop.sock_sendall(sock, conn._take_batch())
                conn._writing = False
        except OSError as err:
            if not conn.closed:
                self._drop_later(conn, f"write failed: {err.strerror}")

    async def _send_object(self, conn: ServerConnection, fds: list[int], frame: bytes) -> None:
        """One OBJECT frame with its fds on its first byte; the fds (our dups) are closed."""
        try:
            await handles.send_with_fds(asyncio.get_running_loop(), conn._sock, frame, fds)
            conn.sent += 1
        finally:
            for fd in fds:
                os.close(fd)

    async def _replay_then_write(self, conn: ServerConnection, since: int) -> None:
        """Send the history after ``since`` page by page, then go live with no gap.

        Pages from the database are read in a thread and written while broadcasts skip this
        connection; the last stretch comes from the history's memory in the same loop step
        that lets broadcasts in again, so nothing falls between the two.
        """
        assert self.history is not None
        history = self.history
        loop = asyncio.get_running_loop()
        after = since
        conn._claim_writing()  # requests wait behind the replay
        try:
            while True:
                with self._publish_lock:  # no publish between reading seq and going live
                    upto = self.seq
                    if after >= upto:
                        conn._held = False
                        break
                    page = history.tail(after, upto)
                    if page is not None:
                        self._queue_page(conn, page)
                        conn._held = False
                        break
                page = await asyncio.to_thread(history.read, after, upto, REPLAY_PAGE)
                if page.through <= after:
                    raise RuntimeError(f"history read after seq {after} made no progress")
                frames = self._page_frames(conn, page)
                if frames:
                    await loop.sock_sendall(conn._sock, b"".join(frames))
                    conn.sent += len(page.items)
                after = page.through
        except OSError as err:
            conn._writing = False
            if not conn.closed:
                self._drop_later(conn, f"write failed: {err.strerror}")
            return
        except Exception as err:  # noqa: BLE001  # a failed history: report the range lost, go live
            log.error("port %s: replay to connection %d failed: %s", self.name, conn.id, err)
            if self.seq > after:
                missing = self.seq - after
                conn._lost_count += missing
                conn._lost_first = after + 1
                conn._lost_last = self.seq
                conn.lost += missing
                self.lost += missing
        finally:
            conn._held = False
        conn._writing = False
        await self._writer(conn)

    def _queue_page(self, conn: ServerConnection, page: Page) -> None:
        """Queue a page of history like live notifications (bounded, the oldest dropped
        and reported), each gap's LOST frame in its place."""
        gaps = iter(sorted(page.gaps, key=lambda g: g.first))
        gap = next(gaps, None)
        for seq, item in page.items:
            while gap is not None and gap.first < seq:
                self._queue_lost_frame(conn, gap)
                gap = next(gaps, None)
            conn._enqueue_notify(seq, item)
            conn.replayed += 1
        while gap is not None:
            self._queue_lost_frame(conn, gap)
            gap = next(gaps, None)
        conn._wake.set()

    def _queue_lost_frame(self, conn: ServerConnection, gap: Gap) -> None:
        frame = conn._proto.send(protocol.Lost(gap.count, gap.first, gap.last))
        conn._queue.append((_FRAME, None, frame))
        conn._queue_bytes += len(frame)
        conn.lost += gap.count

    def _page_frames(self, conn: ServerConnection, page: Page) -> list[bytes]:
        """A page as frames in seq order: runs of items as NOTIFY frames, gaps as LOST."""
        frames: list[bytes] = []
        gaps = sorted(page.gaps, key=lambda gap: gap.first)
        limit = min(_BATCH_BYTES, self.max_frame - 64)
        run: list[tuple[int, bytes]] = []
        size = 0

        def flush() -> None:
            nonlocal size
            if run:
                seqs = [seq for seq, _ in run]
                notify = protocol.Notify(_seq_run(seqs), [item for _, item in run], packed=True)
                frames.append(conn._proto.send(notify))
                conn.replayed += len(run)
                run.clear()
                size = 0

        g = 0
        for seq, item in page.items:
            while g < len(gaps) and gaps[g].first < seq:
                flush()
                gap = gaps[g]
                frames.append(conn._proto.send(protocol.Lost(gap.count, gap.first, gap.last)))
                g += 1
            if run and size + len(item) > limit:
                flush()
            run.append((seq, item))
            size += len(item)
        flush()
        for gap in gaps[g:]:
            frames.append(conn._proto.send(protocol.Lost(gap.count, gap.first, gap.last)))
        conn.lost += sum(gap.count for gap in gaps)
        return frames

    def _on_readable(self, conn: ServerConnection) -> None:
        """The client's socket is readable: parse and dispatch in place, with no task hop."""
        try:
            size, ancdata, flags, _ = conn._sock.recvmsg_into(
                [self._rbuf], handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as err:
            self._stop_reading(conn)
            self._drop_later(conn, f"read failed: {err.strerror}")
            return
        proto = conn._proto
        try:
            if ancdata:
                conn._fds_in.extend(handles.fds_from_ancillary(ancdata))
                if flags & socket.MSG_CTRUNC or len(conn._fds_in) > MAX_PENDING_FDS:
                    raise RemoteProtocolError("the client sent more fds than objects to carry them")
            proto.receive_data(self._rview[:size])
            for event in proto.events():
                if isinstance(event, protocol.Reply):
                    self._on_reply(conn, event)
                elif isinstance(event, protocol.Send):
                    self._on_send(conn, event)
                elif isinstance(event, protocol.Object):
                    self._on_object(conn, event)
                elif isinstance(event, protocol.ObjectAck):
                    self._on_object_ack(conn, event)
                elif isinstance(event, protocol.Release):
                    with contextlib.suppress(NameNotFound):
                        conn.dereference(event.handle)
                else:  # Bye or end of stream
                    self._stop_reading(conn)
                    self._drop_later(conn, "client closed")
                    return
        except RemoteProtocolError as err:
            log.warning(
                "port %s: dropping connection %d (pid %d): %s", self.name, conn.id, conn.pid, err
            )
            self._stop_reading(conn)
            with contextlib.suppress(OSError):
                frame = protocol.encode(protocol.Error(int(err.code), str(err)))
                conn._sock.send(frame, socket.MSG_DONTWAIT)
            self._drop_later(conn, f"protocol error: {err}")

    def _stop_reading(self, conn: ServerConnection) -> None:
        if conn._reading and self._loop is not None:
            conn._reading = False
            self._loop.remove_reader(conn._sock.fileno())

    def _send_frame(self, conn: ServerConnection, frame: bytes, request_id: int | None) -> None:
        """Queue a frame that may not be dropped; written at once when the writer is idle.

        Requests and replies are latency-bound: when nothing is queued or being written,
        one non-blocking send saves waking the writer task, a whole loop iteration.
        """
        with conn._send_lock:
            if conn._queue or conn._writing or conn._lost_count:
                conn._enqueue_frame(frame, request_id)
                return
            try:
                sent = conn._sock.send(frame)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as err:
                self._drop_later(conn, f"write failed: {err.strerror}")
                return
            conn.sent += 1
            if sent < len(frame):  # the rest goes first, whatever comes after
                rest = frame[sent:]
                conn._queue.appendleft((_FRAME, None if sent else request_id, rest))
                conn._queue_bytes += len(rest)
                conn._wake.set()

    def _on_object(self, conn: ServerConnection, event: protocol.Object) -> None:
        """A client hands over an object: check it, keep a reference, answer with a handle."""
        if len(conn._fds_in) < event.fds:
            raise RemoteProtocolError(f"an object announced {event.fds} fds that did not come")
        fds = [conn._fds_in.popleft() for _ in range(event.fds)]
        refusal: KportError | None = None
        if self.on_object is None and not self.accept_objects:
            refusal = NoHandler(f"port {self.name!r} takes no objects")
        elif len(conn.objects) >= MAX_OBJECTS_PER_CONNECTION:
            refusal = QueueFull(
                f"port {self.name!r}: connection {conn.id} already holds "
                f"{MAX_OBJECTS_PER_CONNECTION} objects; dereference some first"
            )
        if refusal is not None:
            for fd in fds:
                os.close(fd)
            ack = protocol.ObjectAck(event.id, None, int(refusal.code), str(refusal))
            self._send_frame(conn, conn._proto.send(ack), None)
            return
        try:
            obj = handles.receive(event.type, fds, event.meta)
        except KportError as err:
            log.info("port %s: pid %d passed a bad object: %s", self.name, conn.pid, err)
            ack = protocol.ObjectAck(event.id, None, int(err.code), str(err))
            self._send_frame(conn, conn._proto.send(ack), None)
            return
        handle = next(conn._handles)
        conn.objects[handle] = obj
        self._send_frame(conn, conn._proto.send(protocol.ObjectAck(event.id, handle)), None)
        if self.on_object is not None:
            task = asyncio.get_running_loop().create_task(self._call_on_object(conn, handle, obj))
            conn._tasks.add(task)
            task.add_done_callback(conn._tasks.discard)

    async def _call_on_object(self, conn: ServerConnection, handle: int, obj: Any) -> None:
        assert self.on_object is not None
        try:
            await _maybe_await(self.on_object(conn, handle, obj))
        except Exception:
            log.exception("port %s: on_object failed", self.name)

    def _on_object_ack(self, conn: ServerConnection, event: protocol.ObjectAck) -> None:
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

    async def hand_event(
        self, conn: ServerConnection, event: Event, *, timeout: float = 5.0
    ) -> None:
        """Hand ``event`` to one client, which gets its own reference (an "object" message).

        Raises ``ObjectTypeMismatch`` if the client finds it is not what was announced,
        ``Timeout`` or ``PortClosed`` as a request would.
        """
        if handles.type_name_of(event) != "event":
            raise TypeError(f"hand_event takes a kport.Event, not {type(event).__name__}")
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
            reply_to = _current_send.get()
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
        if self.one_way:
            raise OneWayPort(f"port {self.name!r} is one-way: it cannot pass objects")
        if conn.closed or conn._closing:
            raise PortClosed(f"connection {conn.id} (pid {conn.pid}) is closed")
        if len(fds) > protocol.MAX_OBJECT_FDS:
            raise ValueError(f"an object carries {protocol.MAX_OBJECT_FDS} fds at most")
        loop = asyncio.get_running_loop()
        object_id = next(self._request_ids)
        frame = conn._proto.send(protocol.Object(object_id, type_name, meta, len(fds), reply_to))
        # Our own copies: the caller may close its fds (and the numbers be reused by
        # other objects) while this one waits in the queue.
        copies = [os.dup(fd) for fd in fds]
        future: asyncio.Future[Any] = loop.create_future()
        conn._pending[object_id] = future
        entry = (_OBJECT, (object_id, copies), frame)
        conn._queue.append(entry)  # never dropped: like a request, it waits its turn
        conn._queue_bytes += len(frame)
        conn._wake.set()
        what = f"take the {type_name}"
        timer = loop.call_later(timeout, _expire, future, self.name, conn, timeout, what)
        try:
            await future
        finally:
            timer.cancel()
            conn._pending.pop(object_id, None)
            if conn._queue and entry in conn._queue:  # never sent: it goes no further
                conn._queue.remove(entry)
                conn._queue_bytes -= len(frame)
                for fd in copies:
                    os.close(fd)

    def _on_reply(self, conn: ServerConnection, event: protocol.Reply) -> None:
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
            log.exception("port %s: a request's done callback failed", self.name)

    def _on_send(self, conn: ServerConnection, event: protocol.Send) -> None:
        if self.on_message is None:
            self._send_error(
                conn,
                event.id,
                ErrorCode.NO_HANDLER,
                f"port {self.name!r} takes no messages (it has no on_message)",
            )
            return
        if conn._sends_in_flight >= MAX_SENDS_IN_FLIGHT:
            self._send_error(
                conn,
                event.id,
                ErrorCode.QUEUE_FULL,
                f"port {self.name!r}: more than {MAX_SENDS_IN_FLIGHT} sends in flight",
            )
            return
        conn._sends_in_flight += 1
        task = asyncio.get_running_loop().create_task(self._handle_send(conn, event))
        conn._tasks.add(task)
        task.add_done_callback(conn._tasks.discard)

    async def _handle_send(self, conn: ServerConnection, event: protocol.Send) -> None:
        assert self.on_message is not None
        _current_send.set(event.id)  # this task's own context: see hand_object(with_reply=)
        try:
            result = await _maybe_await(self.on_message(conn, event.data))
            if conn.closed:
                return
            frame = conn._proto.send(protocol.SendReply(event.id, result))
        except Exception as err:  # the handler's failure goes to its client, not the server
            if not isinstance(err, KportError):
                log.exception("port %s: on_message failed", self.name)
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
            self._send_frame(conn, frame, None)
        except QueueFull:
            log.warning("port %s: no room for a reply to connection %d", self.name, conn.id)

    def _send_error(
        self, conn: ServerConnection, send_id: int, code: ErrorCode, message: str
    ) -> None:
        if conn.closed:
            return
        try:
            self._send_frame(
                conn, conn._proto.send(protocol.Error(int(code), message, send_id)), None
            )
        except QueueFull:
            log.warning("port %s: could not queue an error for connection %d", self.name, conn.id)

    def _fail_pending(self, conn: ServerConnection, error: KportError) -> None:
        pending = conn._pending
        while pending:  # popitem: another thread may add a request meanwhile
            request_id, future = pending.popitem()
            conn._eager.pop(request_id, None)
            if not future.done():
                future.set_exception(error)

    def _drop_later(self, conn: ServerConnection, reason: str) -> None:
        """Drop ``conn`` from a task of its own (the caller may be one of its tasks)."""
        task = asyncio.get_running_loop().create_task(self._drop(conn, reason))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drop(self, conn: ServerConnection, reason: str) -> None:
        """End one connection: requests fail with PortClosed, tasks stop, the socket closes."""
        if conn.closed:
            return
        conn.closed = True
        self._conns.pop(conn.id, None)
        self._fail_pending(
            conn, PortClosed(f"connection {conn.id} (pid {conn.pid}) ended: {reason}")
        )
        self._stop_reading(conn)
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
            with conn._send_lock:  # no thread is inside a send to this fd, nor starts one
                conn._sock.close()
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
                await _maybe_await(self.on_disconnect(conn))
            except Exception:
                log.exception("port %s: on_disconnect failed", self.name)


_current_send: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "kport_current_send", default=None
)


def _expire(
    future: asyncio.Future[Any], port: str, conn: ServerConnection, timeout: float, what: str
) -> None:
    """A request's deadline passed: its Timeout, worded only now that it is needed."""
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
    _forget(conn, request_id)
    if conn._queue:  # still queued (deadline, cancellation)
        conn._unqueue_request(request_id)


def _forget(conn: ServerConnection, request_id: int) -> None:
    conn._pending.pop(request_id, None)
    conn._eager.pop(request_id, None)


async def _maybe_await(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _seq_run(seqs: list[int]) -> int | list[int]:
    """A NOTIFY frame's seqs: the first of a contiguous run, else the list."""
    return seqs[0] if seqs[-1] - seqs[0] == len(seqs) - 1 else seqs
