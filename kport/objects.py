"""Named objects: a namespace of events, hosted on a port, like ``\\BaseNamedObjects``.

The daemon hosts one on its ``objects`` port; any program can host its own with
:class:`Namespace`. A name is created once (``NameCollision`` after that) and opened by
name (``NameNotFound`` for a name that does not exist, never a silent "success" on a
typo; ``AccessDenied`` where the object's security does not admit the caller;
``ObjectTypeMismatch`` for the wrong type). Each process's connection to the namespace
holds its references: an object lives while any connection holds one, or, if created
``permanent=True``, until it is removed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from kport import paths
from kport.errors import (
    AccessDenied,
    NameCollision,
    NameNotFound,
    ObjectTypeMismatch,
    PortClosed,
    QueueFull,
)
from kport.event import Event
from kport.port.client import Connection, connect
from kport.port.security import PeerCredentials, Security
from kport.port.server import ServerConnection, ServerPort

DEFAULT_PORT: Final = "objects"
#: objects one (non-root) user may have created in a namespace at once
MAX_PER_UID: Final = 256
MAX_NAME: Final = 255
_NAME: Final = re.compile(r"[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*")
TYPES: Final = ("event",)


def validate_name(name: Any) -> str:
    """A valid object name, or ValueError naming the rule it breaks."""
    if not isinstance(name, str):
        raise ValueError(f"an object name is a string, not {type(name).__name__}")
    if not 1 <= len(name) <= MAX_NAME:
        raise ValueError(f"object name {name!r} must be 1 to {MAX_NAME} characters long")
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"object name {name!r} may hold only letters, digits, '-', '_', '.' and '/' "
            "between parts (no leading, trailing or double '/')"
        )
    if any(part in (".", "..") for part in name.split("/")):
        raise ValueError(f"object name {name!r} may not have '.' or '..' as a part")
    return name


@dataclass
class _Entry:
    serial: int
    name: str
    type: str
    obj: Event
    security: Security
    permanent: bool
    creator_pid: int
    creator_uid: int
    #: references held, by connection id
    refs: dict[int, int] = field(default_factory=dict)

    def admits(self, peer: PeerCredentials) -> bool:
        if peer.uid in (0, self.creator_uid):
            return True
        return self.security.resolve().admits(peer)

    def describe(self) -> dict[str, Any]:
        resolved = self.security.resolve()
        return {
            "name": self.name,
            "type": self.type,
            "manual_reset": self.obj.manual_reset,
            "set": self.obj.is_set(),
            "references": sum(self.refs.values()),
            "permanent": self.permanent,
            "creator_pid": self.creator_pid,
            "creator_uid": self.creator_uid,
            "uids": sorted(resolved.uids),
            "gids": sorted(resolved.gids),
        }


class Namespace:
    """A namespace of named objects served on a port (see the module docstring).

    ``security`` says who may connect to the namespace at all; each object's own
    security then says who may open it (its creator's uid and root always may).
    """

    def __init__(
        self,
        port_name: str = DEFAULT_PORT,
        *,
        security: Security | None = None,
        max_objects: int = 4096,
        runtime_dir: str | os.PathLike[str] | None = None,
        **port_options: Any,
    ) -> None:
        self.max_objects = max_objects
        self.entries: dict[str, _Entry] = {}
        self._serials = itertools.count(1)
        self.port = ServerPort(
            port_name,
            security=security,
            on_message=self._handle,
            on_disconnect=self._on_disconnect,
            runtime_dir=runtime_dir,
            **port_options,
        )

    async def start(self) -> None:
        await self.port.start()

    async def shutdown(self) -> None:
        await self.port.shutdown()
        self.close_objects()

    def close_objects(self) -> None:
        """Drop the namespace's own references (after its port has shut down)."""
        for entry in self.entries.values():
            entry.obj.close()
        self.entries.clear()

    async def __aenter__(self) -> Namespace:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def list(self) -> list[dict[str, Any]]:
        return [entry.describe() for _, entry in sorted(self.entries.items())]

    async def _handle(self, conn: ServerConnection, data: Any) -> Any:
        if not isinstance(data, dict) or not isinstance(data.get("op"), str):
            raise ValueError(f"a namespace request is a mapping with an op, not {data!r:.60}")
        op = data["op"]
        if op == "list":
            if conn.uid != 0:
                raise AccessDenied("only root may list the objects of a namespace")
            return self.list()
        name = validate_name(data.get("name"))
        if op in ("create", "open"):
            return await self._create_or_open(conn, name, data)
        if op == "close":
            serial = data.get("serial")
            entry = self.entries.get(name)
            if entry is not None and entry.serial == serial:  # not a newer one of that name
                self._release(conn.id, entry, 1)
            return None
        if op == "remove":
            return self._remove(conn, name)
        raise ValueError(f"unknown namespace op {op!r} (create, open, close, remove, list)")

    async def _create_or_open(self, conn: ServerConnection, name: str, data: dict[str, Any]) -> Any:
        kind = data.get("type", "event")
        if kind not in TYPES:
            raise ValueError(f"named objects are of type {', '.join(TYPES)}, not {kind!r}")
        entry = self.entries.get(name)
        created = False
        if data["op"] == "create" and entry is not None and not data.get("open_existing"):
            raise NameCollision(
                f"an object named {name!r} exists already (a {entry.type}); open it with "
                "open_named, or pick another name"
            )
        if entry is None:
            if data["op"] == "open":
                raise NameNotFound(
                    f"no object named {name!r} in namespace {self.port.name!r} (names are "
                    "case-sensitive; `kport objects` lists them)"
                )
            if len(self.entries) >= self.max_objects:
                raise QueueFull(
                    f"namespace {self.port.name!r} already holds its maximum of "
                    f"{self.max_objects} objects"
                )
            owned = sum(1 for e in self.entries.values() if e.creator_uid == conn.uid)
            if conn.uid != 0 and owned >= MAX_PER_UID:
                raise QueueFull(
                    f"uid {conn.uid} already created {owned} objects in namespace "
                    f"{self.port.name!r}, the most one user may"
                )
            spec = data.get("security") or {}
            security = Security(uids=spec.get("uids") or [], gids=spec.get("gids") or [])
            security.resolve()  # unknown user or group names fail here, loudly
            event = Event(
                manual_reset=bool(data.get("manual_reset")), initial=bool(data.get("initial"))
            )
            event.name = name
            entry = _Entry(
                next(self._serials),
                name,
                kind,
                event,
                security,
                bool(data.get("permanent")),
                conn.pid,
                conn.uid,
            )
            self.entries[name] = entry
            created = True
        elif entry.type != kind:
            raise ObjectTypeMismatch(f"{name!r} is a {entry.type}, not a {kind}")
        elif not entry.admits(conn.peer):
            raise AccessDenied(f"the security of {name!r} does not admit uid {conn.uid}")
        elif data.get("manual_reset") is not None and (
            bool(data["manual_reset"]) != entry.obj.manual_reset and data["op"] == "create"
        ):
            raise ObjectTypeMismatch(
                f"{name!r} exists as a {'manual' if entry.obj.manual_reset else 'auto'}-reset event"
            )
        # Counted before it is handed over: a holder that closes meanwhile must not take
        # the name away from under this one.
        entry.refs[conn.id] = entry.refs.get(conn.id, 0) + 1
        try:
            await self.port.hand_object(conn, entry.obj, with_reply=True)
        except BaseException:
            self._release(conn.id, entry, 1)
            raise
        return {
            "name": name,
            "serial": entry.serial,
            "created": created,
            "manual_reset": entry.obj.manual_reset,
        }

    def _release(self, conn_id: int, entry: _Entry, count: int) -> None:
        if conn_id not in entry.refs:
            return
        entry.refs[conn_id] -= count
        if entry.refs[conn_id] <= 0:
            del entry.refs[conn_id]
        if not entry.refs and not entry.permanent:
            self._forget(entry)

    def _forget(self, entry: _Entry) -> None:
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
        entry.obj.close()

    def _remove(self, conn: ServerConnection, name: str) -> Any:
        entry = self.entries.get(name)
        if entry is None:
            raise NameNotFound(f"no object named {name!r} in namespace {self.port.name!r}")
        if conn.uid not in (0, entry.creator_uid):
            raise AccessDenied(f"only root or the creator's uid may remove {name!r}")
        self._forget(entry)  # open references stay valid; the name is gone
        return None

    def _on_disconnect(self, conn: ServerConnection) -> None:
        for entry in list(self.entries.values()):
            count = entry.refs.get(conn.id)
            if count:
                self._release(conn.id, entry, count)


# --- the client side ------------------------------------------------------------------


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
