"""`kport query --why SEQ`: one verdict explained — what asked (the process, the file or
the connection), and what decided: the rule (its name, file, line, and each of its fields
beside the value it matched), the default when no rule matched, the decision client that
answered, or the default verdict when none answered in time."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from kport.cli.tail import connection

#: a rule's field → the event's field it looks at
_LOOKS_AT: dict[str, str] = {
    "kinds": "kind",
    "path": "path",
    "exe": "exe",
    "uids": "uid",
    "users": "uid",
    "gids": "gid",
    "groups": "gid",
    "ancestors": "ancestors",
    "cmdline": "argv",
    "hosts": "host",
    "addresses": "dst",
    "ports": "dport",
    "protocols": "protocol",
    "interfaces": "interface",
    "direction": "direction",
    "sha256": "exe_sha256",
}


def explain(event: Mapping[str, Any]) -> list[str]:
    """The lines that explain ``event``'s verdict (an event with a ``why``)."""
    why = event.get("why") or {}
    lines = [_headline(event), *_subject(event)]
    by = why.get("by")
    verdict = str(event.get("verdict", "?")).upper()
    if by == "rule":
        where = (
            f"{why.get('file')}:{why.get('line')}"
            if why.get("file")
            else f"kept {why.get('kept', '')}"
        )
        lines.append(f"  decided: {verdict} by rule {why.get('rule')!r} ({where})")
        lines.append(f"           its action: {why.get('action')}")
        fields = why.get("fields") or {}
        if fields:
            lines.append("  matched:")
            for name, wanted in fields.items():
                seen = event.get(_LOOKS_AT.get(name, name))
                lines.append(f"    {name} = {wanted!r}  ←  {_shown(seen)}")
        else:
            lines.append("  matched: everything (the rule has no criteria)")
    elif by == "default":
        if why.get("setting") == "default_verdict":
            lines.append(
                f"  decided: {verdict} by the default verdict (default_verdict): "
                f"{why.get('reason')}"
            )
        else:
            lines.append(
                f"  decided: {verdict} by the default action ({why.get('action')}): "
                f"{why.get('reason', 'no rule matched')}"
            )
    elif by == "deadline":
        lines.append(
            f"  decided: {verdict} by the default verdict (default_verdict): the deadline "
            f"passed ({why.get('reason')})"
        )
    elif by == "client":
        client = why.get("client") or {}
        who = f"pid {client.get('pid')}"
        if client.get("comm"):
            who += f" ({client['comm']})"
        lines.append(
            f"  decided: {verdict} by a decision client: {who}, uid {client.get('uid')}, "
            f"connection {client.get('connection')}"
        )
    else:
        lines.append(f"  decided: {verdict} ({why!r})")
    if why.get("asked_by_rule"):
        lines.append(f"  asked because of rule {why['asked_by_rule']!r} (action ask)")
    if event.get("redacted"):
        lines.append("  (its command line was redacted before it left the daemon)")
    return lines


def _headline(event: Mapping[str, Any]) -> str:
    ts = event.get("ts")
    when = dt.datetime.fromtimestamp(ts / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ts else ""
    what = event.get("path") or connection(event)
    return f"seq {event.get('seq')}  {when}  {event.get('source')} {event.get('kind')}  {what}"


def _subject(event: Mapping[str, Any]) -> list[str]:
    user = event.get("user")
    lines = [
        f"  subject: pid {event.get('pid')} ({event.get('exe')}), "
        f"user {user + ' ' if user else ''}({event.get('uid')})"
    ]
    argv = event.get("argv")
    if argv:
        lines.append(f"           argv: {' '.join(map(str, argv))}")
    ancestors = event.get("ancestors")
    if ancestors:
        lines.append(f"           ancestors: {' ← '.join(map(str, ancestors))}")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "(not known)"
    if isinstance(value, list | tuple):
        return " ".join(map(str, value))
    return str(value)
