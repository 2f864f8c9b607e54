"""Named objects, the server side: a namespace of events hosted on a port, like
``\\BaseNamedObjects``.

The daemon hosts one on its ``objects`` port; any program can host its own with
:class:`Namespace`. A name is created once (``NameCollision`` after that) and opened by
name (``NameNotFound`` for a name that does not exist, never a silent "success" on a
typo; ``AccessDenied`` where the object's security does not admit the caller;
``ObjectTypeMismatch`` for the wrong type). Each process's connection to the namespace
holds its references: an object lives while any connection holds one, or, if created
``permanent=True``, until it is removed. The calls that use it are in
:mod:`kport.objects.calls`.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from typing import Any, Final

from kport.errors import (
    AccessDenied,
    NameCollision,
    NameNotFound,
    ObjectTypeMismatch,
    QueueFull,
)
from kport.objects.event import Event
from kport.objects.names import DEFAULT_PORT, validate_name
from kport.port.security import PeerCredentials, Security
from kport.port.server import ServerConnection, ServerPort

#: objects one (non-root) user may have created in a namespace at once
MAX_PER_UID: Final = 256
TYPES: Final = ("event",)


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
