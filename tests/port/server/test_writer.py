"""The writer: one rule for frames written at once, whoever writes them — what the socket
did not take goes next, before anything else."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
from pathlib import Path

import pytest

import kport
from kport import protocol
from tests.conftest import run, spawn_client, wait_for

pytestmark = pytest.mark.timeout(120)

#: a client that connects, says so, and reads nothing until told on stdin
PAUSED = """
import json, sys, kport
with kport.connect("w", runtime_dir=sys.argv[1]) as conn:
    print("ready", flush=True)
    sys.stdin.readline()
    seqs, answered = [], 0
    for msg in conn:
        if msg.needs_reply:
            conn.reply(msg, msg.data["n"])
            answered += 1
        elif msg.is_lost:
            seqs.append(["lost", msg.data["count"]])
        else:
            seqs.append(msg.seq)
        if answered == 2 and len(seqs) >= 12:
            break
print(json.dumps(seqs))
"""


def test_a_frame_half_written_from_a_thread_goes_on_before_anything_else(rundir: Path) -> None:
    """A publishing thread writes a frame the socket takes only part of; the loop then
    sends a request at once. The rest of the frame must reach the client before the
    request, whole: else the client reads a corrupt stream."""

    async def main() -> None:
        async with kport.ServerPort("w", runtime_dir=rundir) as port:
            child = spawn_client(PAUSED, str(rundir), stdin=subprocess.PIPE)
            assert child.stdout is not None and child.stdin is not None
            assert (await asyncio.to_thread(child.stdout.readline)).strip() == "ready"
            await wait_for(lambda: bool(port.connections))
            conn = port.connections[0]
            await wait_for(lambda: not conn.writer.busy)
            # a small send buffer: a 12 KB frame cannot go out whole
            conn._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            items = [
                (seq, protocol.pack_new({"seq": seq, "pad": "x" * 1000})) for seq in range(1, 13)
            ]
            publisher = threading.Thread(target=port.publish, args=(items,))
            publisher.start()
            publisher.join()  # the loop does not run meanwhile: the request comes next
            assert conn.sent == 12  # it went out from the thread, in part at least
            first = port.request_future(conn, {"n": 1}, timeout=60)
            second = port.request_future(conn, {"n": 2}, timeout=60)
            child.stdin.write("go\n")
            child.stdin.flush()
            assert await first == 1
            assert await second == 2
            out, err = await asyncio.to_thread(child.communicate, timeout=60)
            assert child.returncode == 0, err
            assert json.loads(out) == list(range(1, 13))

    run(main())
