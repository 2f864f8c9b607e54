"""Objects passed by handle over a port: the types there are, and how each is checked.

An object travels as a type name, a small ``meta`` mapping and its fds (``SCM_RIGHTS``).
The receiver checks every fd against what the type announces before it builds anything:
a pipe, a file, a socket or a memfd where an eventfd was announced is refused with
``ObjectTypeMismatch``, and the sender's call raises it too. The receiver then holds its
own reference (its own fds), valid after the sender closes its copy or exits.

The port knows no type of its own: each is registered here by the module that defines
it (:mod:`kport.objects` registers ``event`` and ``ring`` as it is imported).
"""

from __future__ import annotations

import array
import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kport.errors import ObjectTypeMismatch


def fd_kind(fd: int) -> str:
    """What an fd is: eventfd, memfd, pipe, socket, file, other (or closed)."""
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "closed"
    if link == "anon_inode:[eventfd]":
        return "eventfd"
    if link.startswith("/memfd:"):
        return "memfd"
    if link.startswith("pipe:"):
        return "pipe"
    if link.startswith("socket:"):
        return "socket"
    if link.startswith("/"):
        return "file"
    return "other"


def _close_method(obj: Any) -> None:
    obj.close()


@dataclass(frozen=True)
class ObjectType:
    """A kind of object that can be passed: the fd kinds it is made of, in order, how to
    build one from received fds (taking them over: on failure it closes them), its
    parts to send, its class, and how to give back a received one."""

    name: str
    fd_kinds: tuple[str, ...]
    build: Callable[[list[int], dict[str, Any]], Any]
    parts: Callable[[Any], tuple[list[int], dict[str, Any]]]
    cls: type
    close: Callable[[Any], None] = _close_method


#: every passable type, by name
TYPES: dict[str, ObjectType] = {}


def register(kind: ObjectType) -> None:
    """Make a kind of object passable (the mechanism is general)."""
    TYPES[kind.name] = kind


def _kind_of(obj: Any) -> ObjectType | None:
    for kind in TYPES.values():
        if isinstance(obj, kind.cls):
            return kind
    return None


def type_name_of(obj: Any) -> str | None:
    """The name ``obj`` is passed under (``"event"``, ``"ring"``), or None if it is not
    passable."""
    kind = _kind_of(obj)
    return None if kind is None else kind.name


def require_event(obj: Any, caller: str) -> None:
    """``caller`` takes a ``kport.Event`` only: a ``TypeError`` for anything else."""
    if type_name_of(obj) != "event":
        raise TypeError(f"{caller} takes a kport.Event, not {type(obj).__name__}")


def parts_of(obj: Any) -> tuple[str, list[int], dict[str, Any]]:
    """(type, fds, meta) to send ``obj``; the fds stay the sender's."""
    kind = _kind_of(obj)
    if kind is None:
        known = ", ".join(TYPES)
        raise TypeError(f"a {type(obj).__name__} cannot be passed by handle (known types: {known})")
    fds, meta = kind.parts(obj)
    return kind.name, fds, meta


def check(type_name: str, fds: Sequence[int]) -> None:
    """Raise ObjectTypeMismatch unless ``fds`` are what ``type_name`` announces."""
    kind = TYPES.get(type_name)
    if kind is None:
        raise ObjectTypeMismatch(f"unknown object type {type_name!r} (known: {', '.join(TYPES)})")
    found = tuple(fd_kind(fd) for fd in fds)
    if found != kind.fd_kinds:
        raise ObjectTypeMismatch(
            f"a {type_name} is made of {', '.join(kind.fd_kinds)}, but the fds passed are "
            f"{', '.join(found) or 'none'}"
        )


def receive(type_name: str, fds: list[int], meta: dict[str, Any]) -> Any:
    """Check and build a received object. On any failure its fds end up closed, once:
    here when the check fails, by the type's ``build`` when building fails."""
    try:
        check(type_name, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    try:
        return TYPES[type_name].build(fds, meta)
    except (ValueError, TypeError, OSError) as err:
        raise ObjectTypeMismatch(f"the {type_name} passed is not valid: {err}") from err


def close_object(obj: Any) -> None:
    """Give back an object that was received by handle (it was built by its type)."""
    kind = _kind_of(obj)
    if kind is not None:
        kind.close(obj)


# --- fds on a socket ---------------------------------------------------------------------

#: ancillary space for one recvmsg: room for many OBJECT frames' fds at once
ANCILLARY_SIZE = socket.CMSG_SPACE(64 * array.array("i").itemsize)


def fds_from_ancillary(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The fds carried by recvmsg ancillary data (SCM_RIGHTS), in order."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            values = array.array("i")
            values.frombytes(data[: len(data) - (len(data) % values.itemsize)])
            fds.extend(values)
    return fds


def rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data that sends ``fds`` with sendmsg."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]


async def fd_ready(loop: asyncio.AbstractEventLoop, fd: int, *, write: bool = False) -> None:
    """Wait on ``loop`` until ``fd`` is readable (or writable)."""
    ready = loop.create_future()

    def wake() -> None:
        # The callback may already be queued when the waiter is cancelled.
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def send_with_fds(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, frame: bytes, fds: Sequence[int]
) -> None:
    """Send ``frame`` on a non-blocking socket with ``fds`` on its first byte, waiting
    while the socket buffer is full."""
    while True:
        try:
            sent = sock.sendmsg([frame], rights(fds))
            break
        except (BlockingIOError, InterruptedError):
            await fd_ready(loop, sock.fileno(), write=True)
    if sent < len(frame):
        await loop.sock_sendall(sock, frame[sent:])
