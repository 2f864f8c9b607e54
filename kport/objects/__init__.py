"""The objects processes share through kport: events, rings, and named objects.

:mod:`~kport.objects.event` and :mod:`~kport.objects.ring` are the objects;
:mod:`~kport.objects.namespace` hosts named ones on a port, and
:mod:`~kport.objects.calls` creates, opens and removes them. Importing this package makes
events and rings passable by handle over a port: it registers them with
:mod:`kport.port.handles`, which knows no type of its own.
"""

from __future__ import annotations

import os
from typing import Any

from kport.objects.calls import create_named, open_named, remove_named
from kport.objects.event import Event, wait_all, wait_any
from kport.objects.names import DEFAULT_PORT, validate_name
from kport.objects.namespace import Namespace
from kport.objects.ring import Ring
from kport.port import handles


def _build_event(fds: list[int], meta: dict[str, Any]) -> Event:
    """Builds take ownership of the fds: on failure they close them (as Ring.from_fds does)."""
    try:
        return Event.from_fd(fds[0], manual_reset=bool(meta.get("manual_reset")))
    except BaseException:
        os.close(fds[0])
        raise


def _event_parts(event: Event) -> tuple[list[int], dict[str, Any]]:
    return [event.fileno()], {"manual_reset": event.manual_reset}


def _ring_parts(ring: Ring) -> tuple[list[int], dict[str, Any]]:
    return list(ring.fds()), dict(ring.meta())


handles.register(handles.ObjectType("event", ("eventfd",), _build_event, _event_parts, Event))
handles.register(
    handles.ObjectType("ring", ("memfd", "eventfd", "eventfd"), Ring.from_fds, _ring_parts, Ring)
)

__all__ = [
    "DEFAULT_PORT",
    "Event",
    "Namespace",
    "Ring",
    "create_named",
    "open_named",
    "remove_named",
    "validate_name",
    "wait_all",
    "wait_any",
]
