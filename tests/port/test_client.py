"""The blocking client against a real server running in a thread of its own."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest

import kport
from kport import protocol
from tests.conftest import SLACK_S

T = TypeVar("T")
pytestmark = pytest.mark.timeout(60)


class Served:
    """A ServerPort on an event loop in another thread; call into it with ``call``."""

    def __init__(self, port: kport.ServerPort, loop: asyncio.AbstractEventLoop) -> None:
        self.port = port
        self.loop = loop

    def call(self, fn: Callable[[], T]) -> T:
        future: Future[T] = Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as err:  # noqa: BLE001 - handed to the caller
                future.set_exception(err)

        self.loop.call_soon_threadsafe(run)
        return future.result(10)

    def wait_connections(self, count: int) -> list[kport.ServerConnection]:
        deadline = time.monotonic() + 10
        while len(conns := self.call(lambda: self.port.connections)) < count:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        return conns


@contextmanager
def served(rundir: Path, name: str = "c", **kwargs: Any) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    port = kport.ServerPort(name, runtime_dir=rundir, **kwargs)
    started = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with port:
            started.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),))
    thread.start()
    assert started.wait(10)
    try:
        yield Served(port, loop)
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def test_missing_port_names_the_path(rundir: Path) -> None:
    with pytest.raises(kport.PortNotFound, match=f"{rundir}/nothing.sock"):
        kport.connect("nothing", runtime_dir=rundir)


def test_silent_server_times_out_the_handshake(rundir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(rundir / "mute.sock"))
        listener.listen()
        started = time.monotonic()
        with pytest.raises(kport.Timeout, match="did not answer the handshake"):
            kport.connect("mute", runtime_dir=rundir, timeout=0.3)
        assert time.monotonic() - started < 0.3 + SLACK_S


def test_version_mismatch_is_reported(rundir: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(rundir / "future.sock"))
        listener.listen()

        def serve() -> None:
            peer, _ = listener.accept()
            with peer:
                peer.recv(4096)
                body = msgpack.packb([protocol.FrameType.WELCOME, 99, "future", False, 1 << 20])
                peer.sendall(struct.pack(">I", len(body)) + body)
                peer.recv(1)

        thread = threading.Thread(target=serve)
        thread.start()
        with pytest.raises(kport.ProtocolError, match="version 99"):
            kport.connect("future", runtime_dir=rundir)
        thread.join(5)


def test_send_from_one_thread_while_another_reads(rundir: Path) -> None:
    with served(rundir, on_message=lambda c, d: d * 2) as srv:
        with kport.connect("c", runtime_dir=rundir) as conn:
            got: list[Any] = []
            reader = threading.Thread(target=lambda: got.append(conn.get_message(10).data))
            reader.start()
            time.sleep(0.1)  # the reader now blocks in recv on the socket
            assert conn.send(21) == 42
            (server_conn,) = srv.wait_connections(1)
            srv.call(lambda: srv.port.notify(server_conn, "hello"))
            reader.join(10)
            assert got == ["hello"]


def test_reply_rules(rundir: Path) -> None:
    with served(rundir) as srv, kport.connect("c", runtime_dir=rundir) as conn:
        (server_conn,) = srv.wait_connections(1)
        srv.call(lambda: srv.port.notify(server_conn, "n"))
        note = conn.get_message(5)
        with pytest.raises(ValueError, match="only requests take a reply"):
            conn.reply(note, "x")
        fut = asyncio.run_coroutine_threadsafe(
            srv.port.request(server_conn, "q", timeout=5), srv.loop
        )
        req = conn.get_message(5)
        conn.reply(req, "a")
        with pytest.raises(ValueError, match="already answered"):
            conn.reply(req, "b")
        assert fut.result(5) == "a"


def test_send_digging_for_its_reply_bounds_the_inbox(rundir: Path) -> None:
    total = 5000
    with served(rundir, on_message=lambda c, d: "pong") as srv:
        with kport.connect("c", runtime_dir=rundir, max_inbox=100) as conn:
            (server_conn,) = srv.wait_connections(1)

            def flood() -> None:
                for i in range(total):
                    srv.port.notify(server_conn, i)

            srv.call(flood)
            assert conn.send("ping") == "pong"  # its reply sits behind 5,000 notifications
            assert conn.pending <= 101
            received = lost = 0
            while received + lost < total:
                msg = conn.get_message(5)
                if msg.is_lost:
                    assert msg.data["where"] == "client"
                    lost += msg.data["count"]
                else:
                    received += 1
            assert lost > 0 and received + lost == total == received + conn.lost


def test_iteration_ends_when_the_port_shuts_down(rundir: Path) -> None:
    with served(rundir) as srv:
        conn = kport.connect("c", runtime_dir=rundir)
        (server_conn,) = srv.wait_connections(1)
        srv.call(lambda: srv.port.notify(server_conn, 1))
    assert [m.data for m in conn] == [1]
    with pytest.raises(kport.PortClosed, match="port shut down"):
        conn.get_message(1)
    conn.close()
