"""`kport decide`: a decision client for file access, at a terminal or by a policy."""

from __future__ import annotations

import importlib.util
import select
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from kport.errors import PortClosed
from kport.port.client import connect
from kport.port.message import Message

Policy = Callable[[dict[str, Any]], Any]


def load_policy(spec: str) -> Policy:
    """``allow``, ``deny``, or a Python file that defines ``decide(request)`` returning
    "allow", "deny", or {"verdict": ..., "remember": bool}."""
    if spec in ("allow", "deny"):
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


def answer_of(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    if value not in ("allow", "deny"):
        raise ValueError(f"a policy returns allow or deny, not {value!r}")
    return {"verdict": value}


def describe(request: dict[str, Any]) -> str:
    command = " ".join(request.get("cmdline") or []) or request.get("exe") or "?"
    return (
        f"{request.get('kind')} {request.get('path')}\n"
        f"  by pid {request.get('pid')} ({request.get('user') or request.get('uid')}): "
        f"{command}"
    )


def ask_terminal(msg: Message, out: TextIO) -> dict[str, Any] | None:
    """Ask at the terminal until the request's deadline; None if it passes."""
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
            out.write(f"\r  allow or deny? [a/d, A/D to remember] ({shown:3d} s) ")
            out.flush()
        ready, _, _ = select.select([sys.stdin], [], [], min(left, left - int(left) or 1.0))
        if not ready:
            continue
        line = sys.stdin.readline()
        if not line:  # end of input: nobody is left to answer
            out.write("\n  (no more input: kport applies its default)\n")
            return None
        answer = line.strip()
        if answer in ("a", "d", "A", "D"):
            return {
                "verdict": "allow" if answer.lower() == "a" else "deny",
                "remember": answer.isupper(),
            }
        shown = None  # asked again below what was typed


def run(*, policy: str | None, runtime_dir: str | None, count: int = 0) -> int:
    decide = load_policy(policy) if policy else None
    out = sys.stdout
    answered = 0
    with connect("file-decide", runtime_dir=runtime_dir) as conn:
        if decide is None:
            out.write("kport decide: waiting for file access requests (Ctrl-C stops)\n")
            out.flush()
        try:
            for msg in conn:
                if not msg.needs_reply:
                    continue
                started = time.monotonic()
                reply = answer_of(decide(msg.data)) if decide else ask_terminal(msg, out)
                if reply is not None:
                    conn.reply(msg, reply)
                    if decide is None:
                        took = time.monotonic() - started
                        out.write(f"  → {reply['verdict']} ({took:.1f} s)\n")
                        out.flush()
                answered += 1
                if count and answered >= count:
                    break
        except PortClosed as err:
            print(f"kport decide: {err}", file=sys.stderr)
            return 1
    return 0
