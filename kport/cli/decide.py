"""`kport decide`: a decision client for file access and connections, at a terminal or
by a policy.

One reader thread per decision port. At a terminal they put requests on one queue and
the main thread answers them in turn, so several prompts at once wait their turn, each
with its own deadline ticking; with a policy each reader answers its own port's
requests at once, one at a time across ports, with no hop to another thread. A request
whose deadline passed while it waited is shown as missed, and so is a ``missed`` notice
from kport (a prompt answered too late)."""

from __future__ import annotations

import argparse
import importlib.util
import queue
import re
import select
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final, TextIO

from kport.errors import PortClosed, PortNotFound
from kport.port.client import Connection, connect
from kport.port.message import Message

PORTS = ("file-decide", "net-decide")

Policy = Callable[[dict[str, Any]], Any]


def load_policy(spec: str) -> Policy:
    """``allow``, ``deny``, ``reject``, or a Python file that defines ``decide(request)``
    returning a verdict, or {"verdict": ..., "remember": bool} (files), or {"verdict":
    ..., "duration": "once" | "restart" | "always" | minutes} (connections)."""
    if spec in ("allow", "deny", "reject"):
        return lambda request: spec
    path = Path(spec)
    if not path.is_file():
        raise ValueError(f"policy {spec!r} is not allow, deny, or a Python file")
    module_spec = importlib.util.spec_from_file_location("kport_policy", path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"policy {spec!r} cannot be loaded as Python")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    decide = getattr(module, "decide", None)
    if not callable(decide):
        raise ValueError(f"policy file {spec} must define decide(request)")
    return decide  # type: ignore[no-any-return]


def answer_of(value: Any, request: dict[str, Any]) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if value == "reject" and not is_connection(request):
        value = "deny"  # a file access has no reject: it is denied
    if value not in ("allow", "deny", "reject"):
        raise ValueError(f"a policy returns allow, deny or reject, not {value!r}")
    return {"verdict": value}


def is_connection(request: dict[str, Any]) -> bool:
    return "protocol" in request


def describe(request: dict[str, Any]) -> str:
    command = " ".join(request.get("cmdline") or []) or request.get("exe") or "?"
    who = f"  by pid {request.get('pid')} ({request.get('user') or request.get('uid')}): {command}"
    sha256 = request.get("exe_sha256")
    if sha256:  # the program's content; and whether it is not what was last decided about
        who += f"\n  sha256 {sha256}"
        if request.get("hash_changed"):
            who += "  CHANGED since the last decision about this program"
    if not is_connection(request):
        return f"{request.get('kind')} {request.get('path')}\n{who}"
    if request.get("direction") == "in":
        what = (
            f"incoming {request.get('protocol')} from {request.get('src')} "
            f"to port {request.get('dport')}"
        )
    else:
        host = f" ({request['host']})" if request.get("host") else ""
        what = f"connect {request.get('protocol')} to {request.get('dst')}{host}"
        what += f" port {request.get('dport')}"
    if request.get("interface"):
        what += f" on {request['interface']}"
    return f"{what}\n{who}"


_NET_ANSWER = re.compile(r"([adrADR])(\d+|!)?")


def parse_answer(text: str, connection: bool) -> dict[str, Any] | None:
    """A typed answer, or None if it is not one. Files: a/d, A/D to remember.
    Connections: a/d/r (allow, deny, reject) once; A/D/R always; a15 for 15 minutes;
    a! until kport restarts."""
    verdicts = {"a": "allow", "d": "deny", "r": "reject"}
    if not connection:
        if text in ("a", "d", "A", "D"):
            return {"verdict": verdicts[text.lower()], "remember": text.isupper()}
        return None
    match = _NET_ANSWER.fullmatch(text)
    if match is None:
        return None
    letter, extra = match.groups()
    duration: Any = "always" if letter.isupper() else "once"
    if extra == "!":
        duration = "restart"
    elif extra:
        duration = int(extra)
    return {"verdict": verdicts[letter.lower()], "duration": duration}


def ask_terminal(msg: Message, out: TextIO) -> dict[str, Any] | None:
    """Ask at the terminal until the request's deadline; None if it passes."""
    connection = is_connection(msg.data)
    choices = (
        "allow, deny or reject? [a/d/r once, A/D/R always, a15 for 15 min, a! until restart]"
        if connection
        else "allow or deny? [a/d, A/D to remember]"
    )
    out.write(describe(msg.data) + "\n")
    live = out.isatty()
    shown = None
    while True:
        left = msg.time_left()
        if left is None or left <= 0:
            out.write("\n  (deadline passed: kport applies its default)\n")
            return None
        if shown != int(left) and (live or shown is None):
            # On a terminal the countdown ticks in place; elsewhere it is written once.
            shown = int(left)
            out.write(f"\r  {choices} ({shown:3d} s) ")
            out.flush()
        ready, _, _ = select.select([sys.stdin], [], [], min(left, left - int(left) or 1.0))
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:  # end of input: nobody is left to answer
            out.write("\n  (no more input: kport applies its default)\n")
            return None
        answer = parse_answer(line.strip(), connection)
        if answer is not None:
            return answer
        shown = None  # asked again below what was typed


#: what a reader thread puts on the inbox once ``count`` answers were given
_ENOUGH: Final = "enough"

Inbox = queue.Queue[tuple[str, Message | str | None]]
#: handle(port, message) → True once ``count`` answers were given
Handler = Callable[[str, Message], bool]


def _read(port: str, conn: Connection, inbox: Inbox, handle: Handler | None) -> None:
    """Take ``port``'s messages: answered here by ``handle`` (a policy answers at once,
    with no hop to another thread), else put on ``inbox`` for the main thread."""
    try:
        for msg in conn:
            if handle is None:
                inbox.put((port, msg))
            elif handle(port, msg):
                inbox.put((port, _ENOUGH))
                break
    except PortClosed:
        pass
    inbox.put((port, None))


def run(
    *,
    policy: str | None,
    runtime_dir: str | None,
    count: int = 0,
    ports: Sequence[str] | None = None,
) -> int:
    decide = load_policy(policy) if policy else None
    out = sys.stdout
    conns: dict[str, Connection] = {}
    for name in ports or PORTS:
        try:
            conns[name] = connect(name, runtime_dir=runtime_dir)
        except PortNotFound:
            if ports:
                raise
    if not conns:
        print(
            "kport decide: kport serves no decision port (start it with --watch PATH, "
            "--firewall, or [file]/[net] enabled in its config)",
            file=sys.stderr,
        )
        return 1
    answered = 0
    # one message at a time, whichever thread handles it: a policy file need not be
    # thread-safe, and the output is not interleaved
    turn = threading.Lock()

    def handle(name: str, msg: Message) -> bool:
        nonlocal answered
        with turn:
            if count and answered >= count:
                return True
            if not msg.needs_reply:
                if isinstance(msg.data, dict) and msg.data.get("kind") == "missed":
                    request = msg.data.get("request") or {}
                    out.write(
                        f"missed: {describe(request).splitlines()[0]} "
                        f"(kport applied {msg.data.get('verdict')})\n"
                    )
                    out.flush()
                return False
            left = msg.time_left()
            if left is not None and left <= 0:
                out.write(f"missed while waiting: {describe(msg.data).splitlines()[0]}\n")
                return False
            started = time.monotonic()
            if decide:
                reply: dict[str, Any] | None = answer_of(decide(msg.data), msg.data)
            else:
                reply = ask_terminal(msg, out)
            if reply is not None:
                conns[name].reply(msg, reply)
                if decide is None:
                    took = time.monotonic() - started
                    out.write(f"  → {reply['verdict']} ({took:.1f} s)\n")
                    out.flush()
            answered += 1
            return bool(count and answered >= count)

    inbox: Inbox = queue.Queue()
    for name, conn in conns.items():
        args = (name, conn, inbox, handle if decide else None)
        threading.Thread(target=_read, args=args, daemon=True).start()
    if decide is None:
        out.write(f"kport decide: answering {', '.join(conns)} (Ctrl-C stops)\n")
        out.flush()
    open_ports = len(conns)
    try:
        while open_ports:
            name, msg = inbox.get()
            if msg is None:
                print(f"kport decide: {name} closed", file=sys.stderr)
                open_ports -= 1
            elif msg == _ENOUGH or (isinstance(msg, Message) and handle(name, msg)):
                break
    finally:
        for conn in conns.values():
            conn.close()
    return 1 if not open_ports else 0  # every port closed: kport went away


def command(args: argparse.Namespace) -> int:
    """`kport decide` with its parsed arguments."""
    try:
        return run(
            policy=args.policy, runtime_dir=args.runtime_dir, count=args.count, ports=args.port
        )
    except ValueError as err:
        print(f"kport decide: {err}", file=sys.stderr)
        return 2
