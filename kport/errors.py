"""The exception hierarchy of kport, and the wire error codes that name each exception.

Every error kport raises is a :class:`KportError`. Errors caused by the other end of a
connection (a server that refused us, a peer that sent garbage) and errors caused by our
own misuse (sending on a one-way port) are different classes, so callers can tell
"the world did this" from "my code did this".
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Codes carried by an error frame; each maps to one exception class."""

    PROTOCOL = 1
    VERSION = 2
    ACCESS_DENIED = 3
    TOO_MANY_CONNECTIONS = 4
    PORT_CLOSED = 5
    QUEUE_FULL = 6
    NO_HANDLER = 7
    HANDLER_FAILED = 8
    TIMEOUT = 9
    ONE_WAY = 10
    WRONG_PORT = 11
    NAME_NOT_FOUND = 12
    NAME_COLLISION = 13
    OBJECT_TYPE_MISMATCH = 14
    NO_HISTORY = 15
    BAD_REQUEST = 16


class KportError(Exception):
    """Base of every error kport raises."""

    code: ErrorCode = ErrorCode.PROTOCOL


class PortNotFound(KportError, FileNotFoundError):
    """No port of that name: no socket file, or a socket file with no server behind it."""

    code = ErrorCode.WRONG_PORT


class AccessDenied(KportError, PermissionError):
    """The port's security does not admit this caller."""

    code = ErrorCode.ACCESS_DENIED


class TooManyConnections(KportError):
    """The port already has its ``max_connections`` clients."""

    code = ErrorCode.TOO_MANY_CONNECTIONS


class PortClosed(KportError):
    """The connection ended (peer gone, port shut down) before the operation completed."""

    code = ErrorCode.PORT_CLOSED


class Timeout(KportError, TimeoutError):
    """A wait passed its deadline."""

    code = ErrorCode.TIMEOUT


class QueueFull(KportError):
    """A bounded queue had no room, and the item was one that may not be dropped."""

    code = ErrorCode.QUEUE_FULL


class OneWayPort(KportError):
    """The port is notify-only: clients may not send on it."""

    code = ErrorCode.ONE_WAY


class ProtocolError(KportError):
    """The wire protocol was broken, by the peer or by us."""

    code = ErrorCode.PROTOCOL


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are not a valid frame, or a frame not allowed now."""


class LocalProtocolError(ProtocolError):
    """Our own code tried to send a frame that is not valid or not allowed now."""


class VersionMismatch(RemoteProtocolError):
    """The two ends speak different protocol versions."""

    code = ErrorCode.VERSION


class HandlerFailed(KportError):
    """The server's message handler raised; the message names the exception type."""

    code = ErrorCode.HANDLER_FAILED


class NoHandler(KportError):
    """The server port has no ``on_message`` handler, so ``send`` cannot be answered."""

    code = ErrorCode.NO_HANDLER


class NameNotFound(KportError, LookupError):
    """No object of that name exists."""

    code = ErrorCode.NAME_NOT_FOUND


class NameCollision(KportError, FileExistsError):
    """The name is already taken (by a live port or an existing object)."""

    code = ErrorCode.NAME_COLLISION


class ObjectTypeMismatch(KportError, TypeError):
    """A passed handle is not the kind of object that was announced."""

    code = ErrorCode.OBJECT_TYPE_MISMATCH


class NoHistory(KportError):
    """A replay was asked of a port that keeps no history."""

    code = ErrorCode.NO_HISTORY


class BadRequest(KportError, ValueError):
    """The request cannot be carried out as asked; the message says what was wrong."""

    code = ErrorCode.BAD_REQUEST


_BY_CODE: dict[int, type[KportError]] = {
    ErrorCode.PROTOCOL: RemoteProtocolError,
    ErrorCode.VERSION: VersionMismatch,
    ErrorCode.ACCESS_DENIED: AccessDenied,
    ErrorCode.TOO_MANY_CONNECTIONS: TooManyConnections,
    ErrorCode.PORT_CLOSED: PortClosed,
    ErrorCode.QUEUE_FULL: QueueFull,
    ErrorCode.NO_HANDLER: NoHandler,
    ErrorCode.HANDLER_FAILED: HandlerFailed,
    ErrorCode.TIMEOUT: Timeout,
    ErrorCode.ONE_WAY: OneWayPort,
    ErrorCode.WRONG_PORT: PortNotFound,
    ErrorCode.NAME_NOT_FOUND: NameNotFound,
    ErrorCode.NAME_COLLISION: NameCollision,
    ErrorCode.OBJECT_TYPE_MISMATCH: ObjectTypeMismatch,
    ErrorCode.NO_HISTORY: NoHistory,
    ErrorCode.BAD_REQUEST: BadRequest,
}


def error_from_code(code: int, message: str) -> KportError:
    """The exception that an error frame with ``code`` stands for (unknown codes: protocol)."""
    return _BY_CODE.get(code, RemoteProtocolError)(message)


def code_of(exc: BaseException) -> ErrorCode:
    """The wire code for an exception raised by a handler (non-kport ones: handler failed)."""
    if isinstance(exc, KportError):
        return exc.code
    return ErrorCode.HANDLER_FAILED
