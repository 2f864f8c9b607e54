"""Communication ports: the server (`ServerPort`), the clients, and their security."""

from kport.port.aclient import AsyncConnection, aconnect
from kport.port.client import Connection, connect
from kport.port.message import Message
from kport.port.security import PeerCredentials, Security
from kport.port.server import ServerConnection, ServerPort

__all__ = [
    "AsyncConnection",
    "Connection",
    "Message",
    "PeerCredentials",
    "Security",
    "ServerConnection",
    "ServerPort",
    "aconnect",
    "connect",
]
