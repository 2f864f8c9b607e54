"""Named objects, the calls a process makes: create, open and remove a named event in a
namespace (the daemon's ``objects`` port, or any :class:`~kport.objects.Namespace`).

Each process holds one connection per namespace, and its references with it: closing a
named event gives one back, and a process that exits gives back all of its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from kport import paths
from kport.errors import ObjectTypeMismatch, PortClosed
from kport.objects.event import Event
from kport.objects.names import DEFAULT_PORT, validate_name
from kport.port.client import Connection, connect
from kport.port.security import Security


class _Clients:
    """One connection per namespace per process: it holds that process's references."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conns: dict[tuple[int, Path], Connection] = {}

    def get(
        self, namespace: str, runtime_dir: str | os.PathLike[str] | None, *, fresh: bool = False
    ) -> Connection:
        path = paths.port_path(namespace, runtime_dir)
        key = (os.getpid(), path)  # a forked child gets its own: the parent's is the parent's
        with self._lock:
            conn = self._conns.get(key)
            if conn is None or fresh or conn._core.end is not None:
                if conn is not None:
                    conn.close()
                conn = connect(path)
                self._conns[key] = conn
            return conn

    def send(
        self, namespace: str, runtime_dir: str | os.PathLike[str] | None, data: dict[str, Any]
    ) -> tuple[Connection, Any, list[Any]]:
        """Send on the process's connection; once more on a new one if that one is dead
        (the namespace restarted: the references it held went with it anyway)."""
        conn = self.get(namespace, runtime_dir)
        try:
            reply, objects = conn.send_for_objects(data, timeout=10)
        except PortClosed:
            conn = self.get(namespace, runtime_dir, fresh=True)
            reply, objects = conn.send_for_objects(data, timeout=10)
        return conn, reply, objects


_clients = _Clients()


def _request(
    op: str,
    name: str,
    namespace: str,
    runtime_dir: str | os.PathLike[str] | None,
    **fields: Any,
) -> Event:
    validate_name(name)
    conn, reply, objects = _clients.send(namespace, runtime_dir, {"op": op, "name": name, **fields})
    if len(objects) != 1 or not isinstance(objects[0], Event):
        for obj in objects:
            obj.close()
        raise ObjectTypeMismatch(f"namespace {namespace!r} answered {op} {name!r} without it")
    event: Event = objects[0]
    event.name = name
    event._namespace = (conn, name, reply["serial"], os.getpid())
    return event


def create_named(
    name: str,
    *,
    manual_reset: bool = False,
    initial: bool = False,
    security: Security | None = None,
    permanent: bool = False,
    namespace: str = DEFAULT_PORT,
    runtime_dir: str | os.PathLike[str] | None = None,
    open_existing: bool = False,
) -> Event:
    spec = None
    if security is not None:
        spec = {"uids": list(security.uids or []), "gids": list(security.gids)}
    return _request(
        "create",
        name,
        namespace,
        runtime_dir,
        manual_reset=manual_reset,
        initial=initial,
        security=spec,
        permanent=permanent,
        open_existing=open_existing,
    )


def open_named(
    name: str,
    *,
    namespace: str = DEFAULT_PORT,
    runtime_dir: str | os.PathLike[str] | None = None,
) -> Event:
    return _request("open", name, namespace, runtime_dir)


def remove_named(
    name: str,
    *,
    namespace: str = DEFAULT_PORT,
    runtime_dir: str | os.PathLike[str] | None = None,
) -> None:
    """Remove a name (a permanent object's, typically); references already open stay valid."""
    validate_name(name)
    _clients.send(namespace, runtime_dir, {"op": "remove", "name": name})


def release(handle: tuple[Connection, str, int, int]) -> None:
    """Give back one reference (what ``Event.close()`` does for a named event).

    Only in the process that opened it: a forked child's copy of the event closes its
    own fd and leaves the parent's reference alone.
    """
    conn, name, serial, pid = handle
    if pid != os.getpid():
        return
    with contextlib.suppress(PortClosed):  # the namespace is gone, and every reference
        conn.send({"op": "close", "name": name, "serial": serial}, timeout=5)
