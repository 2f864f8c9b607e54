"""What the fleet calls things: subjects ``kport.<host>.<source>.<kind>``, message ids
that name one event of one host for good, and the events as JSON."""

from __future__ import annotations

import re
from typing import Any, Final

import orjson

#: the stream's subjects, and the root of every kport subject
ROOT: Final = "kport"
DEFAULT_STREAM: Final = "KPORT"
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str) -> str:
    """``name`` as one subject token: dots, spaces, wildcards and the like become ``_``."""
    return _UNSAFE.sub("_", name) or "_"


def subject(host: str, source: str, kind: str) -> str:
    return f"{ROOT}.{token(host)}.{token(source)}.{token(kind)}"


def host_filter(host: str | None, source: str | None = None) -> str:
    """The subject filter for one host (or every host), one source (or all)."""
    return f"{ROOT}.{token(host) if host else '*'}.{token(source) if source else '*'}.>"


def message_id(host: str, journal: str, seq: int) -> str:
    """One event of one host (its subject token, see :func:`token`) for good: a host
    whose journal was wiped starts its seqs again under a new journal identity, so it
    never collides with its own past."""
    return f"{host}:{journal}:{seq}"


def parse_message_id(value: str) -> tuple[str, str, int] | None:
    """(host, journal, seq) of a message id, or None if it is not one of ours."""
    parts = value.rsplit(":", 2)
    if len(parts) != 3 or not parts[2].isdigit():
        return None
    return parts[0], parts[1], int(parts[2])


def payload(event: dict[str, Any], host: str, journal: str) -> bytes:
    """The event as `kport tail --json` prints it, with its ``host`` and the identity of
    its host's ``journal`` (with ``seq``, what names the event for good): UTF-8 JSON. A
    net event's own ``host`` (the peer's name) becomes ``peer_host``. (orjson: a third of
    the exporter's time went to the standard library's encoder.)"""
    out = {**event, "host": host, "journal": journal}
    if "host" in event:
        out["peer_host"] = event["host"]
    return orjson.dumps(out, default=repr)


def as_on_host(event: dict[str, Any]) -> dict[str, Any]:
    """A fleet event as its host's own faces show it: ``host`` the peer's name again."""
    out = {k: v for k, v in event.items() if k not in ("host", "journal", "peer_host")}
    if "peer_host" in event:
        out["host"] = event["peer_host"]
    return out
