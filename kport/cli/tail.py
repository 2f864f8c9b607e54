"""`kport tail SOURCE`: one readable line (or one JSON object) per event, lost ones included."""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

from rich.console import Console
from rich.markup import escape

from kport.errors import PortClosed
from kport.port.client import connect
from kport.port.message import Message

_COLOURS = {
    "exec": "green",
    "exit": "red",
    "fork": "cyan",
    "clone": "cyan",
    "lost": "bold white on red",
    "snapshot": "dim",
}


class Filter:
    """``key=value`` terms, all of which must match; a value with * ? [ is a glob."""

    def __init__(self, terms: list[str]) -> None:
        self.terms: list[tuple[str, str]] = []
        for term in terms:
            key, sep, value = term.partition("=")
            if not sep or not key:
                raise ValueError(f"filter {term!r} is not KEY=VALUE (for example kind=exec)")
            self.terms.append((key, value))

    def matches(self, event: dict[str, Any]) -> bool:
        if event.get("kind") == "lost":
            return True  # loss is never filtered away
        for key, pattern in self.terms:
            value = event.get(key)
            if isinstance(value, list):
                value = " ".join(map(str, value))
            if not fnmatch.fnmatchcase("" if value is None else str(value), pattern):
                return False
        return True


def format_line(event: dict[str, Any]) -> str:
    """time, kind, pid, user, then what a person scanning the log wants of that source: a
    process's command and parent; a file's path, or a connection's peer, with the verdict
    and who gave it, then the command behind it."""
    ts = event.get("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(ts / 1e9)) if ts else "--:--:--"
    millis = f".{(ts // 1_000_000) % 1000:03d}" if ts else ""
    kind = event.get("kind", "?")
    if kind == "lost":
        count, at_most = event.get("count"), event.get("at_most")
        if count is not None:
            how_many = str(count)
        elif at_most is not None:  # only a bound is known (after a crash)
            how_many = f"up to {at_most}"
        else:
            how_many = "some"
        return (
            f"{clock}{millis} LOST     {how_many} events "
            f"({event.get('reason') or event.get('where', '')})"
        )
    argv = event.get("argv")
    command = " ".join(argv) if argv else (event.get("exe") or event.get("comm") or "?")
    if event.get("gone"):
        command += " (gone)"
    user = event.get("user") or event.get("uid")
    source = event.get("source")
    width = 14 if source in ("file", "net") else 8  # open_exec_perm; exec, snapshot
    head = f"{clock}{millis} {kind:<{width}} {event.get('pid', '?'):>7} {user or '?':<10} "
    if source == "file":
        return f"{head}{_file_target(event)}{_verdict(event)}  by {command}"
    if source == "net":
        return f"{head}{connection(event)}{_verdict(event)}  by {command}"
    extra = ""
    if kind == "exit":
        extra = (
            f" code={event.get('code')}"
            if event.get("signal") is None
            else (f" signal={event.get('signal')}")
        )
        if event.get("run_time_s") is not None:
            extra += f" ran={event['run_time_s']:.3f}s"
    elif kind in ("uid", "gid", "comm", "ptrace", "sid"):
        extra = " " + " ".join(
            f"{k}={event[k]}" for k in ("euid", "egid", "comm", "tracer_pid") if k in event
        )
    parent = f" <- {event.get('parent_exe') or '?'}({event.get('ppid')})"
    return f"{head}{command}{extra}{parent}"


def _file_target(event: dict[str, Any]) -> str:
    """The file, and what else the event says of it (a move's origin, merged kinds)."""
    text = str(event.get("path") or "?")
    if event.get("dir"):
        text += "/"
    if event.get("from"):
        text = f"{event['from']} -> {text}"
    notes = ["+".join(map(str, event["kinds"]))] if event.get("kinds") else []
    if event.get("deleted"):
        notes.append("deleted")
    return text + (f" [{', '.join(notes)}]" if notes else "")


def connection(event: Mapping[str, Any]) -> str:
    """The peer of a connection, as a person would say it."""
    protocol = event.get("protocol") or "?"
    if event.get("direction") == "in":
        text = f"{protocol} from {event.get('src')} to port {event.get('dport')}"
    else:
        host = f" ({event['host']})" if event.get("host") else ""
        text = f"{protocol} to {event.get('dst')}{host} port {event.get('dport')}"
    if event.get("interface"):
        text += f" on {event['interface']}"
    return text


def _verdict(event: dict[str, Any]) -> str:
    """`` -> deny (rule 'no keys')``: the verdict and who gave it, if the event has one."""
    verdict = event.get("verdict")
    if verdict is None:
        return ""
    why = event.get("decided_by")
    rule = event.get("rule")
    if why in (None, "rule") and rule not in (None, "default"):
        why = f"rule {rule!r}"
    elif why in ("decided", "client"):
        why = "decision client"
    elif why in (None, "default") and rule == "default":
        why = "no rule matched"
    return f" -> {verdict}" + (f" ({why})" if why else "")


def print_message(msg: Message, *, as_json: bool, out: TextIO, console: Console | None) -> None:
    event = msg.data if isinstance(msg.data, dict) else {"data": msg.data}
    if msg.is_lost:
        event = {"kind": "lost", **msg.data, "ts": time.time_ns()}
    if as_json:
        out.write(json.dumps(event, default=repr) + "\n")
        return
    line = format_line(event)
    if console is not None:
        colour = _COLOURS.get(event.get("kind", ""), "")
        if event.get("verdict") in ("deny", "reject"):
            colour = "bold red"
        console.print(
            f"[{colour}]{escape(line)}[/]" if colour else escape(line),
            highlight=False,
            soft_wrap=True,
        )
    else:
        out.write(line + "\n")


def run(
    source: str,
    *,
    as_json: bool,
    terms: list[str],
    runtime_dir: str | None,
    count: int = 0,
    since: int | None = None,
) -> int:
    event_filter = Filter(terms)
    out = sys.stdout
    console = Console() if not as_json and out.isatty() else None
    shown = 0
    with connect(source, runtime_dir=runtime_dir, since=since) as conn:
        try:
            for msg in conn:
                if not msg.is_lost and not (
                    isinstance(msg.data, dict) and event_filter.matches(msg.data)
                ):
                    continue
                print_message(msg, as_json=as_json, out=out, console=console)
                out.flush()
                shown += 1
                if count and shown >= count:
                    break
        except PortClosed as err:
            print(f"kport tail: {err}", file=sys.stderr)
            return 1
    return 0


def command(args: argparse.Namespace) -> int:
    """`kport tail` with its parsed arguments."""
    try:
        if args.fleet:
            return _fleet(args)
        if args.source is None:
            raise ValueError("which source? e.g. kport tail proc (or --fleet URL)")
        if args.host or args.config:
            raise ValueError("--host and --config are for --fleet: a local port is this host's")
        if args.since is not None and not args.since.isdigit():
            raise ValueError(f"--since takes a seq here, not {args.since!r}")
        return run(
            args.source,
            as_json=args.json,
            terms=args.filter or [],
            runtime_dir=args.runtime_dir,
            count=args.count,
            since=None if args.since is None else int(args.since),
        )
    except ValueError as err:
        print(f"kport tail: {err}", file=sys.stderr)
        return 2


def _fleet(args: argparse.Namespace) -> int:
    """`kport tail --fleet URL`: the fleet's events, the host on every line."""
    from kport.cli.query import fleet_options, parse_time
    from kport.fleet import reader, subjects

    since_seq = since_ns = None
    if args.since is not None:
        if args.since.isdigit():
            since_seq = int(args.since)
        else:
            since_ns = parse_time(args.since)
    event_filter = Filter(args.filter or [])
    options = fleet_options(args.config)
    out = sys.stdout
    console = Console() if not args.json and out.isatty() else None

    async def show() -> None:
        shown = 0
        events = reader.follow(
            args.fleet,
            host=args.host,
            source=args.source,
            since_seq=since_seq,
            since_ns=since_ns,
            options=options,
        )
        async for event in events:
            if event.get("kind") != "lost" and not event_filter.matches(event):
                continue
            if args.json:
                out.write(json.dumps(event, default=repr) + "\n")
            else:
                line = f"{event.get('host', '?'):<12} {format_line(subjects.as_on_host(event))}"
                if console is not None:
                    console.print(escape(line), highlight=False, soft_wrap=True)
                else:
                    out.write(line + "\n")
            out.flush()
            shown += 1
            if args.count and shown >= args.count:
                return

    try:
        asyncio.run(show())
    except reader.FleetError as err:
        print(f"kport tail: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
