"""`ServerConnection`: one accepted client — who it is, its life, outbox, writer and objects."""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kport import identity, protocol
from kport.errors import NameNotFound
from kport.port import handles
from kport.port.security import PeerCredentials
from kport.port.server.lifecycle import Lifecycle, State
from kport.port.server.outbox import Outbox, Tally
from kport.port.server.writer import Writer

if TYPE_CHECKING:
    from kport.port.server.port import ServerPort


class ServerConnection:
    """One accepted client: who it is, its queue, and what it has lost."""

    def __init__(
        self,
        port: ServerPort,
        conn_id: int,
        sock: socket.socket,
        peer: PeerCredentials,
        tally: Tally,
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
        #: replies that came after their request had ended
        self.late_replies = 0
        self.life = Lifecycle()
        self._sock = sock
        self._proto = protocol.Connection(protocol.Role.SERVER, max_frame=port.max_frame)
        wake = asyncio.Event()  # set: the writer task has something to write
        self.outbox = Outbox(
            self._proto,
            limit=port.queue_limit,
            max_bytes=port.queue_bytes,
            wake=wake.set,
            tally=tally,
            owner=f"port {port.name!r}: connection {conn_id} (pid {peer.pid})",
        )
        self.writer = Writer(sock, self.outbox, self.life, wake, asyncio.get_running_loop())
        #: requests in flight, by id
        self._pending: dict[int, asyncio.Future[Any]] = {}
        #: done callbacks of requests from other threads, called as their reply is read
        #: rather than a turn of the loop later
        self._eager: dict[int, Callable[[asyncio.Future[Any]], None]] = {}
        self._sends_in_flight = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writer_task: asyncio.Task[None] | None = None
        #: the loop watches the socket for the client's frames
        self._reading = False
        #: objects this client handed over (``reference_event``), by handle: this
        #: process's own references, released when the client releases them or goes
        self.objects: dict[int, Any] = {}
        self._handles = itertools.count(1)
        self._fds_in: deque[int] = deque()

    def __repr__(self) -> str:
        return (
            f"<ServerConnection {self.id} pid={self.pid} uid={self.uid} "
            f"{self.life.state.value} queue={len(self.outbox)} lost={self.lost}>"
        )

    @property
    def closed(self) -> bool:
        return self.life.closed

    @property
    def lost(self) -> int:
        """Notifications this client lost: dropped from its full queue, or missing from
        the history it replayed."""
        return self.outbox.lost

    @property
    def sent(self) -> int:
        """Frames written to the socket (a NOTIFY batch counts its items)."""
        return self.outbox.sent

    @property
    def replayed(self) -> int:
        """History notifications replayed to this client."""
        return self.outbox.replayed

    @property
    def queue_depth(self) -> int:
        return len(self.outbox)

    @property
    def queue_bytes(self) -> int:
        return self.outbox.bytes

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
            "replaying": self.life.state is State.REPLAYING,
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
        for fd in self.outbox.release():  # objects that never went out: our copies
            os.close(fd)
        while self._fds_in:
            os.close(self._fds_in.popleft())
