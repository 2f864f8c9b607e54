"""`kport query`: the journal's history, filtered, as a table, lines or JSON lines; from the
daemon's journal port, or from a journal file with no daemon (``--db``)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import pwd
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from kport.cli.tail import format_line
from kport.history import history
from kport.journal.query import Query
from kport.journal.reader import JournalReader

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_time(text: str, now_ns: int | None = None) -> int:
    """``10m``/``2h``/``3d`` ago, an ISO 8601 date or time, or epoch seconds → ns."""
    now = dt.datetime.now().timestamp() if now_ns is None else now_ns / 1e9
    text = text.strip()
    match = _RELATIVE.match(text)
    if match:
        return int((now - float(match[1]) * _UNIT_S[match[2]]) * 1e9)
    try:
        return int(float(text) * 1e9)
    except ValueError:
        pass
    try:
        return int(dt.datetime.fromisoformat(text).timestamp() * 1e9)
    except ValueError:
        raise ValueError(
            f"time {text!r} is not a duration ago (10m, 2h, 3d), an ISO date/time "
            f"(2026-11-21T10:00) or epoch seconds"
        ) from None


def uid_of(user: str) -> int:
    """A user name or a numeric uid → uid."""
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"no user named {user!r} on this machine") from None


_COLUMNS = ("seq", "time", "source", "kind", "pid", "user", "command")


def _row(event: dict[str, Any]) -> list[str]:
    ts = event.get("ts")
    when = dt.datetime.fromtimestamp(ts / 1e9).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if ts else ""
    argv = event.get("argv")
    command = " ".join(argv) if argv else (event.get("exe") or event.get("comm") or "")
    if event.get("source") == "kport":
        command = event.get("reason", "")
    user = event.get("user") or event.get("uid")
    return [
        str(event.get("seq", "")),
        when,
        str(event.get("source", "")),
        str(event.get("kind", "")),
        str(event.get("pid", "")),
        "" if user is None else str(user),
        command,
    ]


def run(
    filters: dict[str, Any],
    *,
    as_json: bool,
    db: str | None,
    runtime_dir: str | None,
) -> int:
    """`kport query`: print matching history as a table (a terminal), lines, or JSON lines."""
    if db is not None:
        path = Path(db)
        if not path.exists():
            print(f"kport query: no journal at {path}", file=sys.stderr)
            return 1
        events: Iterator[dict[str, Any]] = JournalReader(path).query(Query.from_mapping(filters))
    else:
        events = history(runtime_dir=runtime_dir, **filters)
    out = sys.stdout
    shown = 0
    if as_json:
        for event in events:
            out.write(json.dumps(event, default=repr) + "\n")
            shown += 1
    elif out.isatty():
        table = Table(*_COLUMNS, box=None, header_style="bold")
        for event in events:
            table.add_row(*_row(event))
            shown += 1
        Console().print(table)
    else:
        for event in events:
            out.write(f"{event.get('seq', ''):>8} {format_line(event)}\n")
            shown += 1
    if not shown:
        print("kport query: no events match", file=sys.stderr)
    return 0


def command(args: argparse.Namespace) -> int:
    """`kport query` with its parsed arguments."""
    try:
        filters: dict[str, Any] = {
            "limit": args.limit or 2**62,
            "newest_first": args.newest_first,
        }
        for key, value in (
            ("sources", args.source),
            ("kinds", args.kind),
            ("pids", args.pid),
            ("exe", args.exe),
            ("text", args.text),
            ("first", args.first),
            ("last", args.last),
        ):
            if value:
                filters[key] = value
        if args.user:
            filters["uids"] = [uid_of(user) for user in args.user]
        if args.since:
            filters["since_ns"] = parse_time(args.since)
        if args.until:
            filters["until_ns"] = parse_time(args.until)
        if args.why is not None:
            if args.fleet:
                raise ValueError("--why is for this host's journal, not --fleet")
            return _why(args)
        if args.fleet:
            return _fleet(args, filters)
        if args.host or args.stream_seq is not None or args.config:
            raise ValueError("--host, --stream-seq and --config are for --fleet")
        return run(filters, as_json=args.json, db=args.db, runtime_dir=args.runtime_dir)
    except ValueError as err:
        print(f"kport query: {err}", file=sys.stderr)
        return 2


def _why(args: argparse.Namespace) -> int:
    """`kport query --why SEQ`: that event's verdict explained (see :mod:`kport.cli.why`)."""
    from kport.cli.why import explain

    seq = args.why
    filters = {"first": seq, "last": seq, "limit": 1}
    if args.db is not None:
        if not Path(args.db).exists():
            print(f"kport query: no journal at {args.db}", file=sys.stderr)
            return 1
        found = list(JournalReader(Path(args.db)).query(Query.from_mapping(filters)))
    else:
        found = list(history(runtime_dir=args.runtime_dir, **filters))
    if not found:
        print(f"kport query: the journal holds no event with seq {seq}", file=sys.stderr)
        return 1
    event = found[0]
    if "why" not in event:
        print(
            f"kport query: event {seq} ({event.get('source')} {event.get('kind')}) is not a "
            "verdict: only file and net decisions have one",
            file=sys.stderr,
        )
        return 1
    if args.json:
        print(json.dumps(event, default=repr))
    else:
        print("\n".join(explain(event)))
    return 0


def fleet_options(config: str | None) -> dict[str, Any]:
    """The NATS connect options (credentials, TLS) of ``config``'s [export], for the faces
    that read the fleet; none without a configuration."""
    if not config:
        return {}
    from kport.daemon import config as config_mod
    from kport.fleet import credentials

    try:
        export = config_mod.load(config).export
        config_mod.check_export(export, config)
        return credentials.connect_options(export)
    except (config_mod.ConfigError, OSError) as err:
        raise ValueError(str(err)) from None


def _fleet(args: argparse.Namespace, filters: dict[str, Any]) -> int:
    """`kport query --fleet URL`: the same filters, over every host's events in the stream."""
    from kport.fleet import reader, subjects

    try:
        events = asyncio.run(
            reader.history(
                args.fleet,
                Query.from_mapping(filters),
                host=args.host,
                since_seq=args.stream_seq,
                options=fleet_options(args.config),
            )
        )
    except reader.FleetError as err:
        print(f"kport query: {err}", file=sys.stderr)
        return 1
    out = sys.stdout
    if args.json:
        for event in events:
            out.write(json.dumps(event, default=repr) + "\n")
    elif out.isatty():
        table = Table("host", *_COLUMNS, box=None, header_style="bold")
        for event in events:
            table.add_row(str(event.get("host", "")), *_row(subjects.as_on_host(event)))
        Console().print(table)
    else:
        for event in events:
            out.write(
                f"{event.get('host', ''):<12} {event.get('seq', ''):>8} {format_line(event)}\n"
            )
    if not events:
        print("kport query: no events match", file=sys.stderr)
    return 0
