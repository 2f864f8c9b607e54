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

The rooms, one job each:

=================  =====================================================================
``port``           ``ServerPort``, the facade: start and shutdown, seqs, notify, publish
``listener``       the name's lock, bind-then-rename, stale sockets, the accept loop
``handshake``      SO_PEERCRED, HELLO, refusals, on_connect, WELCOME, SHUT_RD (one-way)
``connection``     ``ServerConnection``: who the client is, and its parts below
``lifecycle``      a connection's state, the moves allowed, what each state lets in
``outbox``         the bounded queue, drop-oldest, loss accounting, batching (sans-IO)
``writer``         the writer task and writes made at once: *may I write now?* asked once
``requests``       requests and their deadlines; the one door for other threads' requests
``replay``         history after ``since``, then live with no gap
``reader``         what clients send: replies, sends, objects, their end
``handing``        objects across the port, both ways
=================  =====================================================================
"""

from kport.port.server.connection import ServerConnection
from kport.port.server.handing import MAX_OBJECTS_PER_CONNECTION
from kport.port.server.handshake import HANDSHAKE_TIMEOUT_S
from kport.port.server.listener import ACCEPT_BACKOFF_S
from kport.port.server.port import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_LIMIT,
    ServerPort,
)
from kport.port.server.reader import MAX_PENDING_FDS, MAX_SENDS_IN_FLIGHT
from kport.port.server.replay import REPLAY_PAGE

__all__ = [
    "ACCEPT_BACKOFF_S",
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_LIMIT",
    "HANDSHAKE_TIMEOUT_S",
    "MAX_OBJECTS_PER_CONNECTION",
    "MAX_PENDING_FDS",
    "MAX_SENDS_IN_FLIGHT",
    "REPLAY_PAGE",
    "ServerConnection",
    "ServerPort",
]
