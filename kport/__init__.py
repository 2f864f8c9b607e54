"""kport: kernel events to user-mode Python programs on Linux, and their answers back.

The public API, re-exported from the modules that implement it.
"""

from kport.errors import (
    AccessDenied,
    BadRequest,
    KportError,
    LocalProtocolError,
    NameCollision,
    NameNotFound,
    NoHistory,
    ObjectTypeMismatch,
    OneWayPort,
    PortClosed,
    PortNotFound,
    ProtocolError,
    QueueFull,
    RemoteProtocolError,
    Timeout,
    TooManyConnections,
)
from kport.history import fetch, history
from kport.objects import Event, Ring, wait_all, wait_any
from kport.port import (
    AsyncConnection,
    Connection,
    Message,
    PeerCredentials,
    Security,
    ServerConnection,
    ServerPort,
    aconnect,
    connect,
)
from kport.version import __version__

__all__ = [
    "AccessDenied",
    "AsyncConnection",
    "BadRequest",
    "Connection",
    "Event",
    "KportError",
    "LocalProtocolError",
    "Message",
    "NameCollision",
    "NameNotFound",
    "NoHistory",
    "ObjectTypeMismatch",
    "OneWayPort",
    "PeerCredentials",
    "PortClosed",
    "PortNotFound",
    "ProtocolError",
    "QueueFull",
    "RemoteProtocolError",
    "Ring",
    "Security",
    "ServerConnection",
    "ServerPort",
    "Timeout",
    "TooManyConnections",
    "__version__",
    "aconnect",
    "connect",
    "fetch",
    "history",
    "wait_all",
    "wait_any",
]
