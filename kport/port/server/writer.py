"""Who writes a connection's socket, and when: the writer task, and writes made at once.

Two kinds of write reach a socket. The writer task, in the loop, writes what the outbox
holds. A frame may also go straight to the socket — from the loop (a reply) or from a
producer's own thread (``publish``, ``request_from_thread``) — but only when
:meth:`Writer.may_write_now` says so, asked with :attr:`Writer.lock` held: that is the
one place the question is answered. A straight write never blocks; when the socket
takes only part of a frame, the rest is the writer task's to write next, before
anything else, so frames never interleave.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from collections.abc import Callable

from kport.port import handles
from kport.port.server.lifecycle import Lifecycle, State
from kport.port.server.outbox import Outbox


class Writer:
    """One connection's writing (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        outbox: Outbox,
        life: Lifecycle,
        wake: asyncio.Event,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._sock = sock
        self._outbox = outbox
        self._life = life
        self._loop = loop
        #: held while deciding to write and writing outside the writer task, while a write
        #: is claimed, and while the socket closes: a frame from another thread never lands
        #: inside one the loop is writing, nor on a closed socket's reused fd
        self.lock = threading.Lock()
        #: only the loop writes while set: from the connection's creation until the writer
        #: task starts (the handshake and any replay write), and while it has a write under way
        self.busy = True
        #: ``publish`` calls whose notifications are on their way to the loop to be queued:
        #: until they are, nothing may overtake them
        self.handed = 0
        #: the part of a frame the socket did not take at once: it goes next
        self._rest: bytes | None = None
        #: set when there may be something to write (the outbox sets it too)
        self.wake = wake

    def may_write_now(self) -> bool:
        """Whether a frame may go straight to the socket now (call with :attr:`lock`
        held): the connection is live, and nothing is being written, queued, due to be
        reported lost, half written or on its way to the loop."""
        return (
            self._life.state is State.LIVE
            and not self.busy
            and not self.handed
            and self._rest is None
            and not self._outbox.due
        )

    def write_now(self, frame: bytes) -> bool:
        """Write ``frame`` straight to the socket, never blocking (``lock`` held and
        :meth:`may_write_now` true). True: the frame is on its way, whole or with its rest
        left for the writer task; False: the socket took none of it (full or failing),
        and the caller queues it."""
        try:
            sent = self._sock.send(frame, socket.MSG_DONTWAIT)
        except OSError:
            return False  # full, or failing: the writer task's write will say which
        if sent < len(frame):
            self._rest = frame[sent:]
            self._kick()
        return True

    def send(self, frame: bytes, request_id: int | None = None) -> None:
        """In the loop: a frame that may not be dropped, written at once when it may be
        (a request or reply saves a wake-up of the writer task), else queued
        (``QueueFull`` when there is no room)."""
        with self.lock:
            if self.may_write_now() and self.write_now(frame):
                self._outbox.sent += 1
                return
            self._outbox.frame(frame, request_id)

    def kick(self) -> None:
        """In the loop: there may be something to write."""
        self.wake.set()

    def _kick(self) -> None:
        if asyncio._get_running_loop() is self._loop:
            self.wake.set()
        else:
            self._loop.call_soon_threadsafe(self.wake.set)

    async def run(self, on_error: Callable[[str], None]) -> None:
        """The writer task: write what is due until the connection is closing and its
        outbox is empty; a failed write is given to ``on_error``."""
        loop = self._loop
        sock = self._sock
        outbox = self._outbox
        self.busy = False  # the handshake (and replay) are done: others may write when idle
        try:
            while True:
                with self.lock:
                    rest, self._rest = self._rest, None
                    idle = rest is None and not outbox.due
                    self.busy = not idle
                if idle:
                    if self._life.ending:
                        return
                    self.wake.clear()
                    await self.wake.wait()
                    continue
                if rest is not None:
                    await loop.sock_sendall(sock, rest)
                elif (obj := outbox.take_object()) is not None:
                    await self.send_object(*obj)
                else:
                    await loop.sock_sendall(sock, outbox.take_batch())
                self.busy = False
        except OSError as err:
            on_error(f"write failed: {err.strerror}")

    async def send_all(self, data: bytes) -> None:
        """In the loop, ``busy`` set (a replay): write ``data`` whole."""
        await self._loop.sock_sendall(self._sock, data)

    async def send_object(self, fds: list[int], frame: bytes) -> None:
        """One OBJECT frame with its fds on its first byte; the fds (our dups) are closed."""
        try:
            await handles.send_with_fds(self._loop, self._sock, frame, fds)
            self._outbox.sent += 1
        finally:
            for fd in fds:
                os.close(fd)

    def close_socket(self) -> None:
        """Close the socket once no thread is inside a write to it (nor can start one)."""
        with self.lock:
            self._sock.close()
