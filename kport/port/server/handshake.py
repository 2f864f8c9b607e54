"""A client's way in: SO_PEERCRED, HELLO, the port's refusals, on_connect, WELCOME, and
``SHUT_RD`` on a one-way port, so that its clients' writes fail in the kernel."""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Final

from kport import protocol
from kport.errors import ErrorCode, KportError, ProtocolError, RemoteProtocolError
from kport.port.security import PeerCredentials, peer_credentials
from kport.port.server.connection import ServerConnection
from kport.port.server.lifecycle import State

if TYPE_CHECKING:
    from kport.port.server.port import ServerPort

log = logging.getLogger("kport.port")

HANDSHAKE_TIMEOUT_S: Final = 5.0


async def handshake(port: ServerPort, sock: socket.socket) -> None:
    """Admit the client on ``sock`` as a live (or replaying) connection, or refuse it with
    one ERROR frame saying why; a connection on_connect was told of is told of its end."""
    conn: ServerConnection | None = None
    registered = False
    introduced = False  # on_connect was told of it: on_disconnect must be too
    try:
        sock.setblocking(False)
        peer = peer_credentials(sock)
        conn = ServerConnection(port, next(port._conn_ids), sock, peer, port._tally)
        refusal = _refusal(port, peer)
        if refusal is not None:
            await refuse(port, conn, *refusal)
            return
        hello = await _read_hello(port, conn)
        if hello is None:
            return
        conn.client_pid = hello.pid
        if hello.since is not None:
            if port.history is None:
                await refuse(
                    port,
                    conn,
                    ErrorCode.NO_HISTORY,
                    f"port {port.name!r} keeps no history: connect without since",
                )
                return
            if hello.since < 0:
                await refuse(
                    port, conn, ErrorCode.PROTOCOL, f"since must be a seq >= 0, not {hello.since}"
                )
                return
        if hello.port not in ("", port.name):
            await refuse(
                port, conn, ErrorCode.WRONG_PORT, f"this is port {port.name!r}, not {hello.port!r}"
            )
            return
        if port.on_connect is not None:
            try:
                conn.context = await port.call(port.on_connect, conn)
            except KportError as err:
                await refuse(port, conn, err.code, f"port {port.name!r} refused: {err}")
                return
            introduced = True
        if len(port._conns) >= port.max_connections:  # on_connect may have awaited
            await refuse(port, conn, *_too_many(port))
            return
        welcome = protocol.Welcome(
            protocol.PROTOCOL_VERSION, port.name, port.one_way, port.max_frame
        )
        frame = conn._proto.send(welcome)
        if port.one_way:
            # The kernel now refuses the client's writes (EPIPE): one way, for real.
            sock.shutdown(socket.SHUT_RD)
        # admitted: broadcasts reach it from now on (queued behind the welcome), unless it
        # replays history first
        conn.life.to(State.LIVE if hello.since is None else State.REPLAYING)
        port._conns[conn.id] = conn
        registered = True
        await asyncio.get_running_loop().sock_sendall(sock, frame)
        port._start_connection(conn, hello.since)
        log.debug(
            "port %s: connection %d from pid %d uid %d", port.name, conn.id, conn.pid, conn.uid
        )
    except OSError as err:
        log.debug("port %s: handshake failed: %s", port.name, err)
        if conn is not None and registered:
            await port._drop(conn, f"handshake failed: {err}")
        else:
            sock.close()
    except BaseException:
        if conn is not None and registered:
            await port._drop(conn, "handshake cancelled")
        else:
            sock.close()
        raise
    finally:
        if conn is not None and not registered and not conn.closed:
            conn.life.to(State.CLOSED)
            if introduced:  # refused after on_connect (the port filled meanwhile), or failed
                await port._tell_gone(conn)


def _refusal(port: ServerPort, peer: PeerCredentials) -> tuple[ErrorCode, str] | None:
    if port.closed:
        return ErrorCode.PORT_CLOSED, f"port {port.name!r} is closed to new connections"
    if not port.security.admits(peer):
        return (
            ErrorCode.ACCESS_DENIED,
            f"port {port.name!r} does not admit uid {peer.uid} gid {peer.gid} "
            f"(it admits {port.security.describe()})",
        )
    if len(port._conns) >= port.max_connections:
        return _too_many(port)
    return None


def _too_many(port: ServerPort) -> tuple[ErrorCode, str]:
    return (
        ErrorCode.TOO_MANY_CONNECTIONS,
        f"port {port.name!r} already has its maximum of {port.max_connections} connections",
    )


async def refuse(port: ServerPort, conn: ServerConnection, code: ErrorCode, message: str) -> None:
    """Tell the client why in one ERROR frame (if it will take it within 1 s), and close."""
    log.info("port %s: refused pid %d uid %d: %s", port.name, conn.pid, conn.uid, message)
    try:
        frame = conn._proto.send(protocol.Error(int(code), message))
        async with asyncio.timeout(1.0):
            await asyncio.get_running_loop().sock_sendall(conn._sock, frame)
    except (OSError, TimeoutError, ProtocolError):
        pass
    finally:
        conn._sock.close()


async def _read_hello(port: ServerPort, conn: ServerConnection) -> protocol.Hello | None:
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
            "port %s: pid %d sent no hello within %g s", port.name, conn.pid, HANDSHAKE_TIMEOUT_S
        )
        conn._sock.close()
    except RemoteProtocolError as err:
        await refuse(port, conn, err.code, f"bad handshake: {err}")
    return None
