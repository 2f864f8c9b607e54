"""`kport demo`: a port that announces new processes (found by scanning /proc) and a client
that prints them, in one process: the smallest whole use of ServerPort and connect."""

from __future__ import annotations

import argparse
import asyncio
import signal
import threading
import time
from typing import Any

import uvloop

from kport import identity
from kport.errors import PortClosed
from kport.port.client import connect
from kport.port.server import ServerConnection, ServerPort
from kport.sources import procinfo


def _describe(pid: int) -> dict[str, Any]:
    return {
        "ts": time.time_ns(),
        "source": "demo",
        "kind": "seen",
        "pid": pid,
        "start_time": identity.start_time(pid),
        "exe": procinfo.exe(pid),
        "argv": procinfo.argv(pid) or [],
    }


def _watch(runtime_dir: str | None, count: int, done: threading.Event) -> None:
    seen = 0
    with connect("demo", runtime_dir=runtime_dir) as conn:
        print(f"client: connected to {conn.path} (one-way: {conn.one_way})", flush=True)
        try:
            for msg in conn:
                if msg.is_lost:
                    print(f"client: LOST {msg.data['count']} events", flush=True)
                    continue
                ev = msg.data
                print(
                    f"{msg.seq:>6} {ev['kind']:<8} pid {ev['pid']:<7} "
                    f"{' '.join(ev['argv']) or ev['exe'] or '?'}",
                    flush=True,
                )
                seen += 1
                if count and seen >= count:
                    break
        except PortClosed:
            pass
    done.set()


async def run(*, runtime_dir: str | None = None, count: int = 0) -> int:
    def greet(conn: ServerConnection) -> None:
        # A new client first gets what is running now, flagged as a snapshot.
        for pid in sorted(procinfo.all_pids()):
            port.notify(conn, {**_describe(pid), "kind": "snapshot"})

    port = ServerPort("demo", one_way=True, runtime_dir=runtime_dir, on_connect=greet)
    await port.start()
    print(f"server: port 'demo' at {port.path}; new processes are announced on it", flush=True)
    done = threading.Event()
    client = threading.Thread(target=_watch, args=(runtime_dir, count, done), daemon=True)
    client.start()
    known: set[int] = set()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    try:
        while not done.is_set():
            current = set(procinfo.all_pids())
            for pid in sorted(current - known):
                port.broadcast({**_describe(pid), "kind": "new"})
            known = current
            await asyncio.sleep(0.2)
    finally:
        await port.shutdown()
        client.join(2)
    return 0


def command(args: argparse.Namespace) -> int:
    """`kport demo` with its parsed arguments."""
    return uvloop.run(run(runtime_dir=args.runtime_dir, count=args.count))
