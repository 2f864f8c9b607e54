"""Objects passed by handle over a port, between real processes, with SCM_RIGHTS."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import kport
from kport.port import handles
from tests.conftest import run, spawn_client, wait_for

pytestmark = pytest.mark.timeout(120)


async def finish(child: Any) -> str:
    out, err = await asyncio.to_thread(child.communicate, timeout=30)
    assert child.returncode == 0, err
    return str(out)


def test_a_reference_outlives_its_sender(rundir: Path) -> None:
    """A hands an event to the server and exits; B gets it from the server; it still works."""

    async def main() -> None:
        got: list[tuple[int, kport.Event]] = []

        def keep(conn: kport.ServerConnection, handle: int, obj: Any) -> None:
            got.append((handle, conn.take(handle)))  # ours beyond the connection

        port = kport.ServerPort("h", runtime_dir=rundir, on_object=keep)
        async with port:
            sender = spawn_client(
                """
                import sys, kport
                ev = kport.Event(manual_reset=False)
                with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                    print(conn.reference_event(ev))
                ev.close()
                """,
                str(rundir),
            )
            handle = int(await finish(sender))
            await wait_for(lambda: bool(got))
            assert got[0][0] == handle
            event = got[0][1]
            assert isinstance(event, kport.Event) and not event.manual_reset
            receiver = spawn_client(
                """
                import sys, kport
                with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                    msg = conn.get_message(timeout=10)
                    assert msg.kind == "object", msg
                    print("ready", flush=True)
                    print(msg.data.wait(timeout=10))
                """,
                str(rundir),
            )
            await wait_for(lambda: len(port.connections) == 1)
            await port.hand_event(port.connections[0], event)
            assert receiver.stdout is not None
            assert (await asyncio.to_thread(receiver.stdout.readline)).strip() == "ready"
            event.set()
            assert (await finish(receiver)).strip() == "True"
            event.close()

    run(main())


def wrong_fds() -> list[tuple[str, Callable[[], list[int]]]]:
    def pipe() -> list[int]:
        r, w = os.pipe()
        os.close(w)
        return [r]

    def file() -> list[int]:
        fd, path = tempfile.mkstemp()
        os.unlink(path)
        return [fd]

    def sock() -> list[int]:
        a, b = socket.socketpair()
        b.close()
        return [a.detach()]

    def memfd() -> list[int]:
        return [os.memfd_create("not-an-event")]

    return [("pipe", pipe), ("file", file), ("socket", sock), ("memfd", memfd)]


@pytest.mark.parametrize(("kind", "make"), wrong_fds())
def test_a_wrong_fd_is_refused_on_both_sides(
    rundir: Path, kind: str, make: Callable[[], list[int]]
) -> None:
    async def main() -> None:
        got: list[Any] = []
        port = kport.ServerPort(
            "h",
            runtime_dir=rundir,
            on_object=lambda c, h, obj: got.append(obj),
            on_message=lambda c, d: d,
        )
        async with port:
            # client → server: the client's call raises, the server keeps nothing
            conn = await asyncio.to_thread(kport.connect, "h", runtime_dir=rundir)
            with conn:
                fds = make()
                with pytest.raises(kport.ObjectTypeMismatch, match=f"passed are {kind}"):
                    await asyncio.to_thread(conn.reference_fds, "event", fds, {})
                for fd in fds:
                    os.close(fd)
                assert await asyncio.to_thread(conn.send, "still here") == "still here"
                assert not got and not port.connections[0].objects
            # server → client: the server's call raises, the client's inbox stays empty
            child = spawn_client(
                """
                import sys, kport
                with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                    print(conn.send("hi"), flush=True)
                    # the refused object leaves no message: the next one is the server's
                    print(conn.get_message(timeout=20).data)
                """,
                str(rundir),
            )
            await wait_for(lambda: len(port.connections) == 1 and port.connections[0].id > 1)
            fds = make()
            with pytest.raises(kport.ObjectTypeMismatch, match=f"passed are {kind}"):
                await port.hand_fds(port.connections[0], "event", fds, {})
            for fd in fds:
                os.close(fd)
            port.notify(port.connections[0], "nothing else")
            assert (await finish(child)).splitlines() == ["hi", "nothing else"]

    run(main())


def test_references_go_with_their_connection_and_on_dereference(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("h", runtime_dir=rundir, accept_objects=True) as port:
            with kport.Event() as ev, kport.Event(manual_reset=True) as ev2:
                conn = await asyncio.to_thread(kport.connect, "h", runtime_dir=rundir)
                h1 = await asyncio.to_thread(conn.reference_event, ev)
                h2 = await asyncio.to_thread(conn.reference_event, ev2)
                server_conn = port.connections[0]
                kept = dict(server_conn.objects)
                assert set(kept) == {h1, h2} and kept[h2].manual_reset
                conn.dereference(h1)
                await wait_for(lambda: h1 not in server_conn.objects)
                assert "closed" in repr(kept[h1])
                conn.close()
                await wait_for(lambda: not port.connections)
                assert "closed" in repr(kept[h2]) and not server_conn.objects
                # the kernel objects live on in this process
                ev2.set()
                assert ev2.is_set()
            with pytest.raises(TypeError, match="cannot be passed by handle"):
                handles.parts_of(object())

    run(main())


def test_objects_with_a_send_reply_and_async_clients(rundir: Path) -> None:
    async def main() -> None:
        made: list[kport.Event] = []

        async def on_message(conn: kport.ServerConnection, data: Any) -> Any:
            ev = kport.Event(manual_reset=True, initial=True)
            made.append(ev)
            await port.hand_object(conn, ev, reply_to=data["id"])
            return "here it is"

        port = kport.ServerPort("h", runtime_dir=rundir, on_message=on_message, accept_objects=True)
        async with port:
            async with kport.aconnect("h", runtime_dir=rundir) as conn:
                ev = kport.Event()
                handle = await conn.reference_event(ev)
                assert port.connections[0].objects[handle].manual_reset is False
                await conn.dereference(handle)
                ev.close()
                child = spawn_client(
                    """
                    import json, sys, kport
                    with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                        reply, objects = conn.send_for_objects({"id": 1})
                        (ev,) = objects
                        print(json.dumps([reply, ev.manual_reset, ev.is_set()]))
                    """,
                    str(rundir),
                )
                assert json.loads(await finish(child)) == ["here it is", True, True]
        for ev in made:
            ev.close()

    run(main())


def test_one_way_ports_carry_no_objects(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("h", runtime_dir=rundir, one_way=True) as port:
            conn = await asyncio.to_thread(kport.connect, "h", runtime_dir=rundir)
            with conn, kport.Event() as ev:
                with pytest.raises(kport.OneWayPort):
                    conn.reference_event(ev)
                await wait_for(lambda: bool(port.connections))
                with pytest.raises(kport.OneWayPort):
                    await port.hand_event(port.connections[0], ev)

    run(main())


def test_a_ring_handed_over_a_port_carries_records_both_ways_of_the_handoff(
    rundir: Path,
) -> None:
    async def main() -> None:
        async with kport.ServerPort("h", runtime_dir=rundir) as port:
            child = spawn_client(
                """
                import sys, kport
                with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                    msg = conn.get_message(timeout=10)
                    ring = msg.data
                    assert isinstance(ring, kport.Ring), msg
                    for i in range(10_000):
                        ring.put(b"record %d" % i, timeout=10)
                    ring.close()
                print("done")
                """,
                str(rundir),
            )
            await wait_for(lambda: bool(port.connections))
            with kport.Ring(64 * 1024) as ring:
                await port.hand_object(port.connections[0], ring)
                got: list[bytes] = []
                while len(got) < 10_000:
                    got += await ring.get_many_async(timeout=10)
                assert got == [b"record %d" % i for i in range(10_000)]
            assert (await finish(child)).strip() == "done"

    run(main())


def test_a_port_takes_objects_only_when_asked_and_only_so_many(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("plain", runtime_dir=rundir):
            conn = await asyncio.to_thread(kport.connect, "plain", runtime_dir=rundir)
            with conn, kport.Event() as ev:
                with pytest.raises(kport.KportError, match="takes no objects"):
                    await asyncio.to_thread(conn.reference_event, ev)
        limit = kport.port.server.MAX_OBJECTS_PER_CONNECTION
        async with kport.ServerPort("h", runtime_dir=rundir, accept_objects=True) as port:
            conn = await asyncio.to_thread(kport.connect, "h", runtime_dir=rundir)
            with conn, kport.Event() as ev:
                for _ in range(limit):
                    await asyncio.to_thread(conn.reference_event, ev)
                with pytest.raises(kport.QueueFull, match="dereference some first"):
                    await asyncio.to_thread(conn.reference_event, ev)
                assert len(port.connections[0].objects) == limit

    run(main())


def test_an_object_queued_behind_a_busy_writer_is_the_one_that_was_handed(
    rundir: Path,
) -> None:
    """The port sends its own copies of the fds: closing the original while the object
    waits in the queue (and its fd number being reused) changes nothing."""

    async def main() -> None:
        async with kport.ServerPort("h", runtime_dir=rundir, on_message=lambda c, d: d) as port:
            child = spawn_client(
                """
                import sys, time, kport
                with kport.connect("h", runtime_dir=sys.argv[1]) as conn:
                    conn.send("ready")
                    time.sleep(1.0)  # not reading: the server's queue backs up
                    while True:
                        msg = conn.get_message(timeout=20)
                        if msg.kind == "object":
                            print(msg.data.manual_reset, msg.data.is_set())
                            break
                """,
                str(rundir),
            )
            await wait_for(lambda: bool(port.connections) and port.connections[0].sent > 0)
            conn = port.connections[0]
            for i in range(3000):  # enough to fill the socket: the writer is busy
                port.notify(conn, {"filler": "x" * 200, "i": i})
            handed = kport.Event(manual_reset=True, initial=True)
            task = asyncio.create_task(port.hand_event(conn, handed))
            await asyncio.sleep(0.05)
            handed.close()  # the number is free again ...
            decoy = kport.Event()  # ... and most likely taken by this one
            await task
            decoy.close()
            assert (await finish(child)).split() == ["True", "True"]

    run(main())


def test_the_types_are_what_kport_objects_registered(rundir: Path) -> None:
    """The port knows no type of its own: events and rings are passable because
    kport.objects registered them, and only an event is taken where one is expected."""
    assert {"event", "ring"} <= set(handles.TYPES)
    with kport.Event() as ev, kport.Ring(4096) as ring:
        assert handles.type_name_of(ev) == "event"
        assert handles.type_name_of(ring) == "ring"
        assert handles.type_name_of(object()) is None

        async def main() -> None:
            async with kport.ServerPort("t", runtime_dir=rundir, accept_objects=True) as port:
                conn = await asyncio.to_thread(kport.connect, "t", runtime_dir=rundir)
                try:
                    with pytest.raises(TypeError, match=r"takes a kport\.Event, not Ring"):
                        conn.reference_event(ring)
                    await wait_for(lambda: bool(port.connections))
                    with pytest.raises(TypeError, match=r"takes a kport\.Event, not Ring"):
                        await port.hand_event(port.connections[0], ring)
                finally:
                    conn.close()

        run(main())
