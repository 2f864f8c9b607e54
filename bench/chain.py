"""The floor under `kport bench file`'s client-decided ask: a bare Python daemon and decision
client, with none of kport's machinery (no threads, asyncio, rules, subjects, journal or
port protocol).

The daemon reads fanotify's open_perm events, sends each to the decider as one msgpack
message over a socketpair (path, pid, exe, as kport's request has them), waits for the
answer and writes the verdict; the decider unpacks the request and answers allow. What
that round trip costs is what any daemon with a decision client in another process, both
written in Python, pays on this machine for three processes taking turns; the rest of
kport's figure is kport's own.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import select
import signal
import socket
from collections.abc import Iterator
from multiprocessing.connection import Connection as Pipe
from pathlib import Path

import msgpack

from kport.sources import fanotify as fan

#: how long the chain may take to start watching
START_TIMEOUT_S = 30.0


def _decide(sock: socket.socket) -> None:
    """The decision client: allow everything, until the daemon goes away."""
    unpack, pack = msgpack.unpackb, msgpack.packb
    while message := sock.recv(65536):
        number, _request = unpack(message)
        sock.sendall(pack([number, {"verdict": "allow"}]))


def _serve(mnt: str, sock: socket.socket, ready: Pipe) -> None:
    """The daemon: each open of a file on ``mnt`` waits for the decision client's verdict.
    Whatever goes wrong with one event, it is allowed; when the decision client goes away,
    the daemon ends and the kernel allows whatever was still waiting."""
    unpack, pack = msgpack.unpackb, msgpack.packb
    with fan.FanotifyGroup(permissions=True) as group:
        group.mark(mnt, fan.FAN_OPEN_PERM, kind="mount")
        ready.send("watching")
        poller = select.poll()
        poller.register(group.fileno(), select.POLLIN)
        asked = 0
        while True:
            poller.poll()
            for raw in fan.parse(os.read(group.fileno(), 65536)):
                allow = True
                try:
                    asked += 1
                    request = {
                        "kind": "open_perm",
                        "path": os.readlink(f"/proc/self/fd/{raw.fd}"),
                        "pid": raw.pid,
                        "exe": os.readlink(f"/proc/{raw.pid}/exe"),
                    }
                    sock.sendall(pack([asked, request]))
                    answer = sock.recv(65536)
                    if not answer:
                        return
                    allow = unpack(answer)[1]["verdict"] == "allow"
                except OSError:
                    pass
                finally:
                    group.respond(raw.fd, allow)
                    os.close(raw.fd)


@contextlib.contextmanager
def chain(mnt: Path) -> Iterator[list[int]]:
    """The bare daemon and decision client, watching ``mnt``; yields their pids."""
    ctx = mp.get_context("spawn")
    theirs, ours = socket.socketpair()
    ready, told = ctx.Pipe()
    daemon = ctx.Process(target=_serve, args=(str(mnt), theirs, told), name="chain-daemon")
    decider = ctx.Process(target=_decide, args=(ours,), name="chain-decider")
    try:
        decider.start()
        daemon.start()
        if not ready.poll(START_TIMEOUT_S):
            raise RuntimeError(f"the bare Python chain did not watch {mnt} in time")
        ready.recv()
        assert daemon.pid is not None and decider.pid is not None
        yield [daemon.pid, decider.pid]
    finally:
        for process in (daemon, decider):
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
            process.join(10)
        theirs.close()
        ours.close()
