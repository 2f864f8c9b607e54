"""The asyncio client: ``async with kport.aconnect(name) as conn`` → an `AsyncConnection`.

A reader task fills the bounded inbox. When the inbox is full it stops reading, so the
server's queue (not this process's memory) absorbs a slow consumer and reports the loss,
unless a ``send`` is waiting for its reply, which must not wait behind unread messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from kport import paths, protocol
from kport.errors import KportError, PortClosed, Timeout
from kport.port import handles
from kport.port.client import handshake_result, hello_for, translate_connect_error
from kport.port.message import DEFAULT_MAX_INBOX, ClientCore, Message

if TYPE_CHECKING:
    from kport.objects.event import Event

_RECV_SIZE = 256 * 1024


class AsyncConnection:
    """A connection to a port, for asyncio programs (see :class:`kport.Connection`)."""

    def __init__(self, sock: socket.socket, core: ClientCore, path: Path) -> None:
        self._sock = sock
        self._core = core
        self.path = path
        self.port = core.port
        self._arrived = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._closed = False
        self._write_lock = asyncio.Lock()  # frames from several tasks never interleave
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    def __repr__(self) -> str:
        return f"<kport.AsyncConnection port={self.port!r} one_way={self.one_way} lost={self.lost}>"

    @property
    def one_way(self) -> bool:
        return self._core.one_way

    @property
    def lost(self) -> int:
        return self._core.lost

    @property
    def pending(self) -> int:
        return len(self._core.inbox)

    async def _read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        core = self._core
        rbuf = bytearray(_RECV_SIZE)  # reused: see client.Connection._read_once
        rview = memoryview(rbuf)
        try:
            while core.end is None:
                if len(core.inbox) >= core.max_inbox and not core.waiting:
                    self._space.clear()
                    await self._space.wait()
                    continue
                try:
                    size, fds = await self._recv(loop, rbuf)
                except OSError as err:
                    core.finish(
                        PortClosed(f"port {self.port!r}: read failed: {err.strerror}"),
                        graceful=self._closed,
                    )
                    return
                core.feed(rview[:size], fds)
                if core.outbox:
                    owed, core.outbox = core.outbox, []
                    with contextlib.suppress(PortClosed):
                        await self._write(b"".join(owed))
                self._arrived.set()
        finally:
            if core.end is None:
                core.finish(
                    PortClosed(f"port {self.port!r}: this connection was closed"), graceful=True
                )
            self._arrived.set()

    async def _recv(
        self, loop: asyncio.AbstractEventLoop, rbuf: bytearray
    ) -> tuple[int, list[int] | None]:
        """Read bytes and the fds beside them, waiting for the socket on the loop."""
        sock = self._sock
        while True:
            try:
                size, ancdata, flags, _ = sock.recvmsg_into(
                    [rbuf], handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
                )
            except (BlockingIOError, InterruptedError):
                await handles.fd_ready(loop, sock.fileno())
                continue
            fds = handles.fds_from_ancillary(ancdata) if ancdata else None
            if fds is not None and flags & socket.MSG_CTRUNC:
                for fd in fds:
                    os.close(fd)
                raise OSError(errno.EMSGSIZE, "more fds came at once than fit")
            return size, fds

    async def _wait_until(self, ready: Any, timeout: float | None, what: str) -> None:
        try:
            async with asyncio.timeout(timeout):
                while not ready():
                    if self._core.end is not None:
                        raise self._core.end
                    self._arrived.clear()
                    await self._arrived.wait()
        except TimeoutError:
            if ready():
                return
            raise Timeout(f"port {self.port!r}: {what} within {timeout:g} s") from None

    async def get_message(self, timeout: float | None = None) -> Message:
        """The next message; ``Timeout`` after ``timeout`` s, ``PortClosed`` at the end."""
        inbox = self._core.inbox
        if not inbox:
            await self._wait_until(lambda: bool(inbox), timeout, "nothing arrived")
        msg = inbox.popleft()
        self._space.set()
        return msg

    async def get_messages(
        self, max_count: int = 1024, timeout: float | None = None
    ) -> list[Message]:
        """Every message ready now (at most ``max_count``), waiting for at least one."""
        out = [await self.get_message(timeout)]
        inbox = self._core.inbox
        while inbox and len(out) < max_count:
            out.append(inbox.popleft())
        return out

    def __aiter__(self) -> AsyncIterator[Message]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.get_message()
            except PortClosed:
                if self._core.graceful or self._closed:
                    return
                raise

    async def reply(self, msg: Message, data: Any) -> None:
        """Answer a request. A reply after the request's deadline is ignored by the server."""
        await self._write(self._core.reply_frame(msg, data))

    async def send(self, data: Any, timeout: float = 5.0) -> Any:
        """Send ``data`` to the server's ``on_message`` and return what it returns."""
        return (await self.send_for_objects(data, timeout))[0]

    async def send_for_objects(self, data: Any, timeout: float = 5.0) -> tuple[Any, list[Any]]:
        """:meth:`send`, and the objects the server handed over with its answer."""
        core = self._core
        core.check_can_send("send")
        send_id = core.next_send_id()
        try:
            result = await self._call(
                send_id, core.proto.send(protocol.Send(send_id, data)), [], timeout
            )
        except BaseException:
            for obj in core.take_attached(send_id):
                handles.close_object(obj)
            raise
        return result, core.take_attached(send_id)

    async def reference_event(self, event: Event, timeout: float = 5.0) -> int:
        """Hand ``event`` to the server (see :meth:`kport.Connection.reference_event`)."""
        handles.require_event(event, "reference_event")
        return await self.reference(event, timeout)

    async def reference(self, obj: Any, timeout: float = 5.0) -> int:
        """Hand any passable object (``kport.Event``, ``kport.Ring``) to the server."""
        object_id, frame, fds = self._core.object_frame(obj)
        handle: int = await self._call(object_id, frame, fds, timeout)
        return handle

    async def dereference(self, handle: int) -> None:
        """Make the server drop the reference it holds from :meth:`reference_event`."""
        await self._write(self._core.release_frame(handle))

    async def _call(self, call_id: int, frame: bytes, fds: list[int], timeout: float) -> Any:
        core = self._core
        try:
            self._space.set()  # the answer may sit behind unread messages: keep reading
            await self._write(frame, fds)
            await self._wait_until(lambda: call_id in core.results, timeout, "no answer came")
            return core.take_result(call_id)
        finally:
            core.waiting.discard(call_id)
            core.results.pop(call_id, None)

    async def _write(self, frame: bytes, fds: list[int] | None = None) -> None:
        async with self._write_lock:
            await self._write_locked(frame, fds)

    async def _write_locked(self, frame: bytes, fds: list[int] | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            if fds:
                await handles.send_with_fds(loop, self._sock, frame, fds)
            else:
                await loop.sock_sendall(self._sock, frame)
        except OSError as err:
            raise PortClosed(f"port {self.port!r}: write failed: {err.strerror}") from err

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if not self.one_way and self._core.end is None:
            with contextlib.suppress(OSError, KportError):
                self._sock.send(
                    self._core.proto.send(protocol.Bye("client closed")), socket.MSG_DONTWAIT
                )
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        self._sock.close()
        self._core.discard()

    async def __aenter__(self) -> AsyncConnection:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


async def _recv_with_fds(
    loop: asyncio.AbstractEventLoop, sock: socket.socket
) -> tuple[bytes, list[int]]:
    """One read of a non-blocking socket, with the fds that came beside the bytes."""
    while True:
        try:
            data, ancdata, _, _ = sock.recvmsg(
                65536, handles.ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
            return data, handles.fds_from_ancillary(ancdata)
        except (BlockingIOError, InterruptedError):
            await handles.fd_ready(loop, sock.fileno())


class aconnect:
    """Connect to a port from asyncio: ``conn = await aconnect(name)`` or ``async with``."""

    def __init__(
        self,
        name_or_path: str | os.PathLike[str],
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        timeout: float = 5.0,
        max_inbox: int = DEFAULT_MAX_INBOX,
        max_frame: int = protocol.DEFAULT_MAX_FRAME,
        since: int | None = None,
    ) -> None:
        self._args = (name_or_path, runtime_dir, timeout, max_inbox, max_frame, since)
        self._conn: AsyncConnection | None = None

    def __await__(self) -> Any:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncConnection:
        self._conn = await self._open()
        return self._conn

    async def __aexit__(self, *exc: object) -> None:
        if self._conn is not None:
            await self._conn.close()

    async def _open(self) -> AsyncConnection:
        name_or_path, runtime_dir, timeout, max_inbox, max_frame, since = self._args
        path = paths.port_path(name_or_path, runtime_dir)
        name = paths.port_name_of(path)
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        early_fds: list[int] = []
        try:
            proto = protocol.Connection(protocol.Role.CLIENT, max_frame=max_frame)
            try:
                async with asyncio.timeout(timeout):
                    try:
                        await loop.sock_connect(sock, str(path))
                    except OSError as err:
                        raise translate_connect_error(err, path) from err
                    try:
                        hello = proto.send(hello_for(name, since))
                        # Refused at once: the server's reason waits in our receive queue.
                        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                            await loop.sock_sendall(sock, hello)
                        while (event := proto.next_event()) is protocol.NEED_DATA:
                            data, fds = await _recv_with_fds(loop, sock)
                            early_fds += fds  # an object may follow the welcome at once
                            proto.receive_data(data)
                    except OSError as err:
                        raise PortClosed(
                            f"port {name!r} at {path} closed during the handshake: {err.strerror}"
                        ) from err
            except TimeoutError:
                raise Timeout(
                    f"port {name!r} at {path} did not answer within {timeout:g} s"
                ) from None
            assert not isinstance(event, protocol.NeedData)
            core = ClientCore(name, handshake_result(name, event), proto, max_inbox)
            core.fds_in.extend(early_fds)
            early_fds = []
            core.process()
            conn = AsyncConnection(sock, core, path)
            if core.outbox:  # acks for objects that came with the welcome
                owed, core.outbox = core.outbox, []
                await conn._write(b"".join(owed))
            return conn
        except BaseException:
            for fd in early_fds:
                os.close(fd)
            sock.close()
            raise
