"""The blocking client: `kport.connect(name)` → a `Connection` to a port.

A `Connection` may be used from several threads: one thread reads the socket at a time,
the others wait on a condition for what it delivers (a message, their send's reply), and
replies may be written from any thread.
"""

from __future__ import annotations

import contextlib
import math
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from kport import paths, protocol
from kport.errors import (
    AccessDenied,
    KportError,
    PortClosed,
    PortNotFound,
    Timeout,
    error_from_code,
)
from kport.port import handles
from kport.port.message import DEFAULT_MAX_INBOX, ClientCore, Message

if TYPE_CHECKING:
    from kport.objects.event import Event

_RECV_SIZE = 256 * 1024
T = TypeVar("T")


def translate_connect_error(err: OSError, path: Path) -> KportError:
    """The kport error for a failed ``connect()`` to a port's socket (one place for it)."""
    if isinstance(err, FileNotFoundError):
        return PortNotFound(
            f"no port at {path}: the socket does not exist (is the server running?)"
        )
    if isinstance(err, ConnectionRefusedError):
        return PortNotFound(f"no server behind {path}: the socket is stale or its server is gone")
    if isinstance(err, PermissionError):
        return AccessDenied(f"not allowed to connect to {path}: {err.strerror}")
    if isinstance(err, TimeoutError):
        return Timeout(f"connecting to {path} timed out")
    if isinstance(err, NotADirectoryError | IsADirectoryError):
        return PortNotFound(f"{path} is not a port socket: {err.strerror}")
    return PortClosed(f"connecting to {path} failed: {err.strerror or err}")


def handshake_result(core_port: str, event: protocol.Event | protocol.NeedData) -> protocol.Welcome:
    """The server's answer to our hello: a Welcome, or the error it stands for."""
    if isinstance(event, protocol.Welcome):
        return event
    if isinstance(event, protocol.Error):
        raise error_from_code(event.code, event.message)
    raise PortClosed(f"port {core_port!r}: the server closed the connection during the handshake")


def hello_for(name: str, since: int | None = None) -> protocol.Hello:
    if since is not None and (type(since) is not int or since < 0):
        raise ValueError(f"since must be a seq >= 0, not {since!r}")
    return protocol.Hello(protocol.PROTOCOL_VERSION, name, os.getpid(), since)


class Connection:
    """A connection to a port: receive messages, reply to requests, send to the server."""

    def __init__(self, sock: socket.socket, core: ClientCore, path: Path) -> None:
        self._sock = sock
        self._core = core
        self.path = path
        self.port = core.port
        # with self._lock (C), not with self._cond (a Python method per enter and exit);
        # the condition is only waited on and notified when a second thread waits
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._waiters = 0
        self._reading = False
        self._write_lock = threading.Lock()
        self._rbuf = bytearray(_RECV_SIZE)
        self._rview = memoryview(self._rbuf)
        sock.settimeout(None)  # blocking for good: timed reads wait in poll (_read_once)
        self._poller = select.poll()
        self._poller.register(sock.fileno(), select.POLLIN)
        self._closed = False

    def __repr__(self) -> str:
        return f"<kport.Connection port={self.port!r} one_way={self.one_way} lost={self.lost}>"

    @property
    def one_way(self) -> bool:
        return self._core.one_way

    @property
    def lost(self) -> int:
        """Notifications lost so far (server queue and client inbox together)."""
        return self._core.lost

    @property
    def pending(self) -> int:
        """Messages received and not yet taken."""
        return len(self._core.inbox)

    def fileno(self) -> int:
        return self._sock.fileno()

    # --- receiving -------------------------------------------------------------------

    def get_message(self, timeout: float | None = None) -> Message:
        """The next message; ``Timeout`` after ``timeout`` s, ``PortClosed`` at the end."""
        try:
            return self._core.inbox.popleft()
        except IndexError:
            pass
        return self._wait(self._pop_one, timeout)

    def get_messages(self, max_count: int = 1024, timeout: float | None = None) -> list[Message]:
        """Every message ready now (at most ``max_count``), waiting for at least one."""
        first = self.get_message(timeout)
        inbox = self._core.inbox
        out = [first]
        while inbox and len(out) < max_count:
            try:
                out.append(inbox.popleft())
            except IndexError:
                break
        return out

    def __iter__(self) -> Iterator[Message]:
        """Messages until the port closes the connection."""
        while True:
            try:
                yield self.get_message()
            except PortClosed:
                if self._core.graceful or self._closed:
                    return
                raise

    def _pop_one(self) -> Message | None:
        inbox = self._core.inbox
        return inbox.popleft() if inbox else None

    def _wait(self, ready: Callable[[], T | None], timeout: float | None) -> T:
        """Wait until ``ready()`` gives a value, reading the socket when no other thread is."""
        deadline = None if timeout is None else time.monotonic() + timeout
        lock = self._lock
        with lock:
            while True:
                value = ready()
                if value is not None:
                    return value
                if self._core.end is not None:
                    raise self._core.end
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise Timeout(f"port {self.port!r}: nothing arrived within {timeout:g} s")
                if self._reading:
                    self._waiters += 1
                    try:
                        self._cond.wait(remaining)
                    finally:
                        self._waiters -= 1
                    continue
                self._reading = True
                lock.release()  # the read itself holds no lock; what it got is fed under it
                try:
                    self._read_once(remaining)
                finally:
                    lock.acquire()
                    self._reading = False
                    if self._waiters:
                        self._cond.notify_all()

    def _read_once(self, timeout: float | None) -> None:
        if self._closed:
            self._core.finish(
                PortClosed(f"port {self.port!r}: this connection was closed"), graceful=True
            )
            return
        # The socket stays blocking (a writer in another thread never changes a reader's
        # wait), yet every read waits in poll first, for POLLIN alone: a reader blocked in
        # recvmsg on a unix stream socket is also woken whenever the port reads what this
        # side wrote (the kernel's write-space wake-up shares the socket's wait queue), a
        # wasted context switch per request answered. Only this thread reads, so readable
        # stays readable until the recvmsg below.
        wait_ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
        if not self._poller.poll(wait_ms):
            return
        try:
            # recv_into a buffer kept for the connection: a fresh 256 KiB bytes per read
            # costs an mmap, page faults and a copy, which dominated a round trip.
            size, ancdata, flags, _ = self._sock.recvmsg_into(
                [self._rbuf], handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            data = self._rview[:size]
            fds = handles.fds_from_ancillary(ancdata) if ancdata else None
        except OSError as err:
            fds = None
            if self._closed:
                data = memoryview(b"")
            else:
                self._core.finish(
                    PortClosed(f"port {self.port!r}: read failed: {err.strerror}"), graceful=False
                )
                return
        with self._lock:
            if fds is not None and flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                self._core.finish(
                    PortClosed(f"port {self.port!r}: more fds came at once than fit"),
                    graceful=False,
                )
                return
            self._core.feed(data, fds)
            owed, self._core.outbox = self._core.outbox, []
        if owed:
            with contextlib.suppress(PortClosed):
                self._write(b"".join(owed))

    # --- sending ---------------------------------------------------------------------

    def reply(self, msg: Message, data: Any) -> None:
        """Answer a request. A reply after the request's deadline is ignored by the server."""
        with self._lock:
            frame = self._core.reply_frame(msg, data)
        self._write(frame)

    def send(self, data: Any, timeout: float = 5.0) -> Any:
        """Send ``data`` to the server's ``on_message`` and return what it returns."""
        return self.send_for_objects(data, timeout)[0]

    def send_for_objects(self, data: Any, timeout: float = 5.0) -> tuple[Any, list[Any]]:
        """:meth:`send`, and the objects the server handed over with its answer."""
        with self._lock:
            self._core.check_can_send("send")
            send_id = self._core.next_send_id()
            frame = self._core.proto.send(protocol.Send(send_id, data))
        try:
            result = self._call(send_id, frame, [], timeout)
        except BaseException:
            with self._lock:
                for obj in self._core.take_attached(send_id):
                    handles.close_object(obj)
            raise
        with self._lock:
            return result, self._core.take_attached(send_id)

    def reference_event(self, event: Event, timeout: float = 5.0) -> int:
        """Hand ``event`` to the server, which keeps its own reference to it.

        The server may then set it (or wait on it) whenever it likes, after this process
        closed its copy or even exited: the ``DeviceIoControl(IO_REFERENCE_EVENT)`` of the
        seeds, by ``SCM_RIGHTS``. Returns the server's handle for it, for
        :meth:`dereference`. Raises ``ObjectTypeMismatch`` if the server finds the fd is
        not what was announced.
        """
        handles.require_event(event, "reference_event")
        return self.reference(event, timeout)

    def reference(self, obj: Any, timeout: float = 5.0) -> int:
        """Hand any passable object (``kport.Event``, ``kport.Ring``) to the server."""
        with self._lock:
            object_id, frame, fds = self._core.object_frame(obj)
        handle: int = self._call(object_id, frame, fds, timeout)
        return handle

    def reference_fds(
        self, type_name: str, fds: list[int], meta: dict[str, Any], timeout: float = 5.0
    ) -> int:
        """The general form: announce ``type_name`` and pass ``fds`` as its parts."""
        if len(fds) > protocol.MAX_OBJECT_FDS:
            raise ValueError(f"an object carries {protocol.MAX_OBJECT_FDS} fds at most")
        with self._lock:
            self._core.check_can_send("pass objects")
            object_id = self._core.next_send_id()
            frame = self._core.proto.send(
                protocol.Object(object_id, type_name, meta, len(fds), None)
            )
        handle: int = self._call(object_id, frame, fds, timeout)
        return handle

    def dereference(self, handle: int) -> None:
        """Make the server drop the reference it holds from :meth:`reference_event`."""
        with self._lock:
            frame = self._core.release_frame(handle)
        self._write(frame)

    def _call(self, call_id: int, frame: bytes, fds: list[int], timeout: float) -> Any:
        """Write a frame (with fds), wait for the answer with ``call_id``, return it."""
        try:
            self._write(frame, fds)
            results = self._core.results

            def ready() -> tuple[int] | None:
                return (call_id,) if call_id in results else None

            self._wait(ready, timeout)
            with self._lock:
                return self._core.take_result(call_id)
        finally:
            with self._lock:
                self._core.waiting.discard(call_id)
                self._core.results.pop(call_id, None)

    def _write(self, frame: bytes, fds: list[int] | None = None) -> None:
        with self._write_lock:
            try:
                if fds:
                    sent = self._sock.sendmsg([frame], handles.rights(fds))
                    if sent < len(frame):
                        self._sock.sendall(frame[sent:])
                else:
                    self._sock.sendall(frame)
            except OSError as err:
                raise PortClosed(f"port {self.port!r}: write failed: {err.strerror}") from err

    # --- closing ---------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            if not self.one_way and self._core.end is None:
                with self._lock:
                    frame = self._core.proto.send(protocol.Bye("client closed"))
                self._sock.send(frame, socket.MSG_DONTWAIT)
        except (OSError, KportError):
            pass
        finally:
            self._sock.close()
            with self._lock:
                self._core.discard()

    def __enter__(self) -> Connection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def connect(
    name_or_path: str | os.PathLike[str],
    *,
    runtime_dir: str | os.PathLike[str] | None = None,
    timeout: float = 5.0,
    max_inbox: int = DEFAULT_MAX_INBOX,
    max_frame: int = protocol.DEFAULT_MAX_FRAME,
    since: int | None = None,
) -> Connection:
    """Connect to a port by name (``<runtime dir>/<name>.sock``) or by socket path.

    With ``since=SEQ`` a port that keeps history first replays every notification after
    SEQ (gaps in its history arrive as lost messages), then goes on live, with no gap and
    no duplicate between the two; a port without history refuses with ``NoHistory``.

    Raises ``PortNotFound``, ``AccessDenied``, ``TooManyConnections``, ``Timeout`` or
    ``ProtocolError``, each naming the port.
    """
    path = paths.port_path(name_or_path, runtime_dir)
    name = paths.port_name_of(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as err:
            raise translate_connect_error(err, path) from err
        proto = protocol.Connection(protocol.Role.CLIENT, max_frame=max_frame)
        deadline = time.monotonic() + timeout
        hello = proto.send(hello_for(name, since))
        try:
            # A server that refuses us at once (security, limits) has already closed;
            # its reason is waiting in our receive queue, so read it rather than fail here.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                sock.sendall(hello)
            early_fds: list[int] = []  # an object may follow the welcome at once
            while True:
                event = proto.next_event()
                if event is not protocol.NEED_DATA:
                    break
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data, ancdata, _, _ = sock.recvmsg(
                    65536, handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
                early_fds += handles.fds_from_ancillary(ancdata)
                proto.receive_data(data)
        except TimeoutError as err:
            raise Timeout(
                f"port {name!r} at {path} did not answer the handshake in {timeout:g} s"
            ) from err
        except OSError as err:
            raise PortClosed(
                f"port {name!r} at {path} closed during the handshake: {err.strerror}"
            ) from err
        assert not isinstance(event, protocol.NeedData)
        try:
            welcome = handshake_result(name, event)
        except BaseException:
            for fd in early_fds:
                os.close(fd)
            raise
        core = ClientCore(name, welcome, proto, max_inbox)
        core.fds_in.extend(early_fds)
        core.process()  # frames that came in the same read as the welcome
        conn = Connection(sock, core, path)
        if core.outbox:  # acks for objects that came with the welcome
            owed, core.outbox = core.outbox, []
            conn._write(b"".join(owed))
        return conn
    except BaseException:
        sock.close()
        raise
