"""ServerPort with real sockets and real client processes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import stat
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import kport
from kport import protocol
from kport.port.server import requests
from tests.conftest import SLACK_S, run, run_as_nobody, spawn_client, wait_for

pytestmark = pytest.mark.timeout(120)


async def first_connection(port: kport.ServerPort) -> kport.ServerConnection:
    """The port's first client, once it has connected."""
    await wait_for(lambda: bool(port.connections))
    return port.connections[0]


def test_notify_request_send_between_processes(rundir: Path) -> None:
    async def main() -> None:
        async def on_message(conn: kport.ServerConnection, data: Any) -> Any:
            return {"echo": data, "pid": conn.pid}

        async with kport.ServerPort("p", runtime_dir=rundir, on_message=on_message) as port:
            child = spawn_client(
                """
                import json, sys, kport
                with kport.connect("p", runtime_dir=sys.argv[1]) as conn:
                    out = {"send": conn.send("hello")}
                    notes = []
                    for msg in conn:
                        if msg.needs_reply:
                            conn.reply(msg, {"verdict": msg.data["q"] * 2})
                        else:
                            notes.append([msg.seq, msg.data])
                    out["notes"] = notes
                print(json.dumps(out))
                """,
                str(rundir),
            )
            conn = await first_connection(port)
            assert conn.pid == child.pid
            assert conn.start_time is not None
            port.notify(conn, {"n": 1})
            port.broadcast({"n": 2})
            assert await port.request(conn, {"q": 21}, timeout=5) == {"verdict": 42}
            await wait_for(lambda: conn.queue_depth == 0)
        out, err = await asyncio.to_thread(child.communicate, timeout=10)
        assert child.returncode == 0, err
        result = json.loads(out)
        assert result["send"] == {"echo": "hello", "pid": child.pid}
        assert result["notes"] == [[1, {"n": 1}], [2, {"n": 2}]]

    run(main())


def test_async_client(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("a", runtime_dir=rundir, on_message=lambda c, d: d + 1) as port:
            async with kport.aconnect("a", runtime_dir=rundir) as conn:
                assert await conn.send(41) == 42
                port.broadcast("x")
                msg = await conn.get_message(timeout=5)
                assert (msg.kind, msg.data, msg.seq) == ("notify", "x", 1)
                task = asyncio.create_task(port.request(port.connections[0], "q", timeout=5))
                req = await conn.get_message(timeout=5)
                assert req.needs_reply and req.time_left() is not None
                await conn.reply(req, "a")
                assert await task == "a"
                with pytest.raises(kport.Timeout):
                    await conn.get_message(timeout=0.05)

    run(main())


def test_socket_has_its_permissions_and_owner(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("perm", runtime_dir=rundir) as port:
            st = os.stat(port.path)
            assert stat.S_ISSOCK(st.st_mode)
            assert stat.S_IMODE(st.st_mode) == 0o600
            assert st.st_uid == os.geteuid()
            # The private bind directory is gone; only the socket and the lock are left.
            assert sorted(p.name for p in rundir.iterdir()) == [".perm.sock.lock", "perm.sock"]
        sec = kport.Security(gids=[0])
        async with kport.ServerPort("grp", runtime_dir=rundir, security=sec) as port:
            assert stat.S_IMODE(os.stat(port.path).st_mode) == 0o660
        assert list(rundir.iterdir()) == []

    run(main())


def connect_as_nobody(rundir: Path, name: str) -> str:
    """Fork a child that drops to nobody and connects; what happened, as one line."""

    def action() -> str:
        try:
            kport.connect(name, runtime_dir=rundir, timeout=5).close()
        except kport.AccessDenied as err:
            return f"AccessDenied {err}"
        except Exception as err:  # noqa: BLE001 - reported to the parent
            return f"other {type(err).__name__} {err}"
        return "connected"

    return run_as_nobody(action)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
@pytest.mark.parametrize("mode", [None, 0o666])
def test_other_uid_is_refused(rundir: Path, mode: int | None) -> None:
    """mode None: the file mode keeps nobody out; 0o666: SO_PEERCRED does, with a reply."""

    async def main() -> str:
        sec = kport.Security(mode=mode)
        async with kport.ServerPort("locked", runtime_dir=rundir, security=sec):
            loop = asyncio.get_running_loop()
            # The server must keep serving while the child connects: fork from a thread-free
            # executor would do, but a plain fork then a blocking read in a thread is simplest.
            return await loop.run_in_executor(None, connect_as_nobody, rundir, "locked")

    out = run(main())
    assert out.startswith("AccessDenied"), out
    if mode == 0o666:
        assert "does not admit uid 65534" in out
    else:
        assert "not allowed to connect" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_admitted_other_uid_connects(rundir: Path) -> None:
    async def main() -> None:
        sec = kport.Security(uids=[0, "nobody"])
        async with kport.ServerPort("locked", runtime_dir=rundir, security=sec) as port:
            out = await asyncio.get_running_loop().run_in_executor(
                None, connect_as_nobody, rundir, "locked"
            )
            assert out == "connected"
            assert stat.S_IMODE(os.stat(port.path).st_mode) == 0o666

    run(main())


def test_max_connections_plus_one_is_refused(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("few", runtime_dir=rundir, max_connections=2) as port:
            first = await kport.aconnect("few", runtime_dir=rundir)
            second = await kport.aconnect("few", runtime_dir=rundir)
            with pytest.raises(kport.TooManyConnections, match="maximum of 2"):
                await kport.aconnect("few", runtime_dir=rundir)
            assert len(port.connections) == 2
            await first.close()
            await wait_for(lambda: len(port.connections) == 1)
            third = await kport.aconnect("few", runtime_dir=rundir)
            await second.close()
            await third.close()

    run(main())


def test_on_connect_may_refuse_or_attach_context(rundir: Path) -> None:
    async def main() -> None:
        def on_connect(conn: kport.ServerConnection) -> Any:
            if conn.client_pid == -1:
                raise kport.AccessDenied("never happens")
            return {"since": 1}

        async with kport.ServerPort("ctx", runtime_dir=rundir, on_connect=on_connect) as port:
            async with kport.aconnect("ctx", runtime_dir=rundir):
                await wait_for(lambda: bool(port.connections))
                assert port.connections[0].context == {"since": 1}

        def refuse(conn: kport.ServerConnection) -> None:
            raise kport.AccessDenied(f"pid {conn.pid} is not on the list")

        async with kport.ServerPort("ctx", runtime_dir=rundir, on_connect=refuse):
            with pytest.raises(kport.AccessDenied, match="is not on the list"):
                await kport.aconnect("ctx", runtime_dir=rundir)

    run(main())


def test_a_connection_refused_after_on_connect_is_given_its_on_disconnect(rundir: Path) -> None:
    # on_connect may await; meanwhile another connection may take the last place, and the
    # first is then refused. Whoever on_connect told of it must be told that it went.
    async def main() -> None:
        told: list[tuple[str, int]] = []

        async def on_connect(conn: kport.ServerConnection) -> None:
            told.append(("connect", conn.id))
            await asyncio.sleep(0.3)

        def on_disconnect(conn: kport.ServerConnection) -> None:
            told.append(("disconnect", conn.id))

        async with kport.ServerPort(
            "full",
            runtime_dir=rundir,
            max_connections=1,
            on_connect=on_connect,
            on_disconnect=on_disconnect,
        ) as port:
            results = await asyncio.gather(
                kport.aconnect("full", runtime_dir=rundir),
                kport.aconnect("full", runtime_dir=rundir),
                return_exceptions=True,
            )
            refused = [r for r in results if isinstance(r, kport.TooManyConnections)]
            kept = [r for r in results if not isinstance(r, BaseException)]
            assert len(refused) == 1 and len(kept) == 1, results
            (live,) = port.connections
            connected = {cid for what, cid in told if what == "connect"}
            assert len(connected) == 2
            assert [("disconnect", cid) for cid in connected - {live.id}] == [
                t for t in told if t[0] == "disconnect"
            ]
            await kept[0].close()

    run(main())


def test_an_unexpected_accept_error_leaves_the_port_listening_and_shutdown_clean(
    rundir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        real = loop.sock_accept
        failures = [OSError(errno.EBADMSG, "something no one expected")]

        async def flaky(sock: socket.socket) -> tuple[socket.socket, Any]:
            if failures:
                raise failures.pop()
            return await real(sock)

        loop.sock_accept = flaky  # type: ignore[method-assign]
        port = kport.ServerPort("flaky", runtime_dir=rundir)
        await port.start()
        try:
            client = await kport.aconnect("flaky", runtime_dir=rundir, timeout=10)
            await wait_for(lambda: bool(port.connections))
            await client.close()
        finally:
            await port.shutdown()  # raises nothing
        assert not failures

    run(main())
    assert "something no one expected" in caplog.text


def test_one_way_is_enforced_by_the_kernel(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("oneway", runtime_dir=rundir, one_way=True) as port:
            conn = await asyncio.to_thread(kport.connect, "oneway", runtime_dir=rundir)
            assert conn.one_way
            with pytest.raises(kport.OneWayPort):
                conn.send("x")
            # Past the library: a raw write on the client's socket is refused by the kernel.
            raw = socket.socket(fileno=os.dup(conn.fileno()))
            with pytest.raises(BrokenPipeError):
                raw.send(b"\x00\x00\x00\x01\xc0")
            raw.close()
            port.broadcast("still flows")
            msg = await asyncio.to_thread(conn.get_message, 5)
            assert msg.data == "still flows"
            with pytest.raises(kport.OneWayPort):
                await port.request(port.connections[0], "q")
            conn.close()
            # The server notices the client left without reading from it.
            await wait_for(lambda: not port.connections, timeout=5)

    run(main())


def test_request_deadline_and_late_reply(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("slow", runtime_dir=rundir) as port:
            client = await kport.aconnect("slow", runtime_dir=rundir)
            conn = await first_connection(port)
            started = time.monotonic()
            with pytest.raises(kport.Timeout, match=r"did not reply within 0\.2 s"):
                await port.request(conn, "q", timeout=0.2)
            assert 0.2 <= time.monotonic() - started < 0.2 + SLACK_S  # at its deadline
            msg = await client.get_message(timeout=5)
            assert msg.time_left() is not None and msg.time_left() <= 0  # type: ignore[operator]
            await client.reply(msg, "too late")
            await wait_for(lambda: conn.late_replies == 1)
            assert conn.pending_requests == 0
            await client.close()

    run(main())


def test_request_future_answers_by_callback_and_a_cancelled_one_is_withdrawn(
    rundir: Path,
) -> None:
    async def main() -> None:
        async with kport.ServerPort("cb", runtime_dir=rundir) as port:
            client = await kport.aconnect("cb", runtime_dir=rundir)
            conn = await first_connection(port)
            answers: list[Any] = []
            future = port.request_future(conn, {"n": 1}, timeout=5)
            future.add_done_callback(lambda f: answers.append(f.result()))
            msg = await client.get_message(timeout=5)
            await client.reply(msg, {"n": msg.data["n"] + 1})
            await wait_for(lambda: answers == [{"n": 2}])
            assert conn.pending_requests == 0
            # withdrawn: nothing pending, and a reply that comes anyway is only counted
            cancelled = port.request_future(conn, "q", timeout=5)
            msg = await client.get_message(timeout=5)
            cancelled.cancel()
            await wait_for(lambda: conn.pending_requests == 0)
            await client.reply(msg, "late")
            await wait_for(lambda: conn.late_replies == 1)
            expired = port.request_future(conn, "q", timeout=0.1)
            with pytest.raises(kport.Timeout, match=r"did not reply within 0\.1 s"):
                await expired
            await client.close()

    run(main())


def test_request_from_thread_is_written_there_or_queued_and_answered_in_the_loop(
    rundir: Path,
) -> None:
    async def main() -> None:
        async with kport.ServerPort("th", runtime_dir=rundir) as port:
            client = await kport.aconnect("th", runtime_dir=rundir)
            conn = await first_connection(port)
            loop_thread = threading.get_ident()
            answers: list[tuple[Any, bool]] = []

            def on_done(future: asyncio.Future[Any]) -> None:
                outcome = future.exception() or future.result()
                answers.append((outcome, threading.get_ident() == loop_thread))

            def ask(data: Any, timeout: float = 5) -> asyncio.Future[Any]:
                return port.request_from_thread(conn, data, timeout=timeout, on_done=on_done)

            # an idle connection: written from the thread, answered in the loop's thread
            sent_before = conn.sent
            await asyncio.to_thread(ask, {"n": 1})
            assert conn.queue_depth == 0  # it never waited in the queue
            msg = await client.get_message(timeout=5)
            await client.reply(msg, {"n": msg.data["n"] + 1})
            await wait_for(lambda: answers == [({"n": 2}, True)])
            assert conn.sent == sent_before + 1
            # notifications still queued (the client is not reading): the request waits
            # behind them, in order, and is written by the loop
            for i in range(3):
                port.notify(conn, {"note": i})
            await asyncio.to_thread(ask, {"n": 10})
            got = [await client.get_message(timeout=5) for _ in range(4)]
            assert [m.data for m in got[:3]] == [{"note": 0}, {"note": 1}, {"note": 2}]
            assert got[3].needs_reply and got[3].data == {"n": 10}
            await client.reply(got[3], "ok")
            await wait_for(lambda: len(answers) == 2)
            assert answers[1] == ("ok", True)
            # the deadline holds for a request sent from a thread
            await asyncio.to_thread(ask, "late", 0.1)
            await client.get_message(timeout=5)
            await wait_for(lambda: len(answers) == 3)
            assert isinstance(answers[2][0], kport.Timeout)
            await wait_for(lambda: conn.pending_requests == 0)
            # the client goes away with a request pending: PortClosed
            await asyncio.to_thread(ask, "gone")
            await client.get_message(timeout=5)
            await client.close()
            await wait_for(lambda: len(answers) == 4)
            assert isinstance(answers[3][0], kport.PortClosed)
            with pytest.raises(kport.PortClosed):
                await asyncio.to_thread(ask, "after")

    run(main())


def test_requests_from_a_thread_keep_their_deadlines_though_the_loop_is_not_woken(
    rundir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written from a thread, a request's deadline is started by the loop when it next
    looks: each still fails at its own deadline, counted from when it was made. The loop
    is made to look only every 3 s, so a deadline counted from the look would come more
    than 2.5 s late for all but the first: a bound that a busy machine cannot break."""
    monkeypatch.setattr(requests, "THREAD_ASKS_S", 3.0)

    async def main() -> None:
        async with kport.ServerPort("dl", runtime_dir=rundir) as port:
            client = await kport.aconnect("dl", runtime_dir=rundir)  # reads, never answers
            conn = await first_connection(port)
            ended: dict[int, tuple[float, Any]] = {}

            def ask_many() -> list[float]:
                starts = []
                for i in range(40):
                    starts.append(time.monotonic())
                    port.request_from_thread(
                        conn,
                        {"i": i},
                        timeout=1.0,
                        on_done=lambda f, i=i: ended.__setitem__(
                            i, (time.monotonic(), f.exception() or f.result())
                        ),
                    )
                    time.sleep(0.011)
                return starts

            starts = await asyncio.to_thread(ask_many)
            await wait_for(lambda: len(ended) == 40, timeout=30)
            for i, start in enumerate(starts):
                at, outcome = ended[i]
                assert isinstance(outcome, kport.Timeout), outcome
                assert "within 1 s" in str(outcome)
                assert 1.0 <= at - start < 1.0 + 2.0, (i, at - start)
            await wait_for(lambda: conn.pending_requests == 0)
            assert conn.sent == 40  # every one was written by the thread itself
            await client.close()

    run(main())


def test_requests_from_threads_never_interleave_with_the_loops_writes(rundir: Path) -> None:
    """Two threads ask while the loop floods notifications: every frame arrives whole."""

    async def main() -> None:
        async with kport.ServerPort("mix", runtime_dir=rundir) as port:
            client = await asyncio.to_thread(kport.connect, "mix", runtime_dir=rundir)
            conn = await first_connection(port)
            replies: list[Any] = []
            asks = 400

            def answer() -> tuple[list[int], int]:
                notes: list[int] = []
                lost = 0
                answered = 0
                ended = False
                while answered < 2 * asks or not ended:
                    msg = client.get_message(timeout=10)
                    if msg.needs_reply:
                        client.reply(msg, msg.data)
                        answered += 1
                    elif msg.is_lost:
                        lost += msg.data["count"]
                    elif "end" in msg.data:
                        ended = True
                    else:
                        notes.append(msg.data["note"])
                return notes, lost

            def asker(who: int) -> None:
                for i in range(asks):
                    port.request_from_thread(
                        conn,
                        {"who": who, "i": i, "pad": "x" * (i % 50)},
                        timeout=10,
                        on_done=lambda f: replies.append(f.exception() or f.result()),
                    )

            reader = asyncio.ensure_future(asyncio.to_thread(answer))
            askers = [asyncio.ensure_future(asyncio.to_thread(asker, w)) for w in (1, 2)]
            sent = 0
            while not all(a.done() for a in askers):
                # more than the client reads: the socket fills and the loop's writes are
                # partial, the moments a thread's write must not come in between
                for _ in range(200):
                    port.notify(conn, {"note": sent, "pad": "y" * (sent % 2000)})
                    sent += 1
                await asyncio.sleep(0.001)
            await asyncio.gather(*askers)
            await wait_for(lambda: len(replies) == 2 * asks)
            port.notify(conn, {"end": True})
            notes, lost = await reader
            assert sorted((r["who"], r["i"]) for r in replies) == sorted(
                (w, i) for w in (1, 2) for i in range(asks)
            )
            assert notes == sorted(notes)
            assert len(notes) + lost == sent
            await asyncio.to_thread(client.close)

    run(main())


def test_publish_from_a_thread_writes_idle_clients_there_and_queues_for_the_others(
    rundir: Path,
) -> None:
    """An idle client is written by the publishing thread itself; a paused one gets the
    queue's policy (bounded, the oldest dropped and reported); both see every seq in order."""
    total = 20_000

    async def main() -> dict[str, Any]:
        port = kport.ServerPort("pub", runtime_dir=rundir, queue_limit=500, one_way=True)
        await port.start()
        paused = spawn_client(PAUSED_CLIENT.replace('"flood"', '"pub"'), str(rundir), stdin=-1)
        assert paused.stdout is not None and paused.stdin is not None
        assert (await asyncio.to_thread(paused.stdout.readline)).strip() == "ready"
        await wait_for(lambda: len(port.connections) == 1)
        reader = await asyncio.to_thread(kport.connect, "pub", runtime_dir=rundir)
        await wait_for(lambda: len(port.connections) == 2)
        slow, idle = port.connections
        # the first one goes through the loop (the writer starts only after the
        # handshake); from then on the idle client's queue is empty when we publish
        port.publish([(1, protocol.pack({"i": 1}))])
        assert (await asyncio.to_thread(reader.get_message, 5)).seq == 1
        await wait_for(lambda: idle.queue_depth == 0 and not idle.writer.busy)

        def produce() -> list[int]:
            written_at_once = []
            seq = 1
            while seq < total:
                size = min(1 + seq % 7, total - seq)
                items = [(s, protocol.pack_new({"i": s})) for s in range(seq + 1, seq + 1 + size)]
                before = idle.sent
                port.publish(items)
                written_at_once.append(idle.sent - before)
                seq += size
                if seq % 500 < 7:
                    time.sleep(0.001)  # let the reader keep up now and then
            return written_at_once

        def read_all() -> list[int]:
            seqs = [1]
            while seqs[-1] < total:
                msg = reader.get_message(timeout=10)
                assert not msg.is_lost, "the reading client lost nothing"
                seqs.append(msg.seq)
            return seqs

        reading = asyncio.ensure_future(asyncio.to_thread(read_all))
        written_at_once = await asyncio.to_thread(produce)
        seqs = await reading
        assert port.seq == total
        assert seqs == list(range(1, total + 1))
        # most batches went out from the publishing thread, not through the loop
        assert sum(1 for n in written_at_once if n) > len(written_at_once) // 2
        await asyncio.to_thread(reader.close)
        return await resume_paused_client(port, slow, paused)

    result = run(main())
    check_paused_client(result, total)
    assert result["seqs"][-1] == total


def test_publishing_threads_never_interleave_with_the_loops_writes(rundir: Path) -> None:
    """A thread publishes while the loop sends requests to the same client, fast enough
    that writes are partial: every frame arrives whole, every seq in order or reported."""
    total = 30_000

    async def main() -> None:
        async with kport.ServerPort("pmix", runtime_dir=rundir, queue_limit=2000) as port:
            client = await asyncio.to_thread(kport.connect, "pmix", runtime_dir=rundir)
            conn = await first_connection(port)
            asks = 300

            def produce() -> None:
                seq = 0
                while seq < total:
                    size = min(1 + seq % 5, total - seq)
                    port.publish(
                        [
                            (s, protocol.pack_new({"note": s, "pad": "y" * (s % 3000)}))
                            for s in range(seq + 1, seq + 1 + size)
                        ]
                    )
                    seq += size

            def answer() -> tuple[list[int], int, int]:
                notes: list[int] = []
                lost = answered = 0
                while answered < asks or len(notes) + lost < total:
                    msg = client.get_message(timeout=10)
                    if msg.needs_reply:
                        client.reply(msg, msg.data)
                        answered += 1
                    elif msg.is_lost:
                        lost += msg.data["count"]
                    else:
                        notes.append(msg.seq)
                        assert msg.data["note"] == msg.seq
                return notes, lost, answered

            reading = asyncio.ensure_future(asyncio.to_thread(answer))
            producing = asyncio.ensure_future(asyncio.to_thread(produce))
            replies = await asyncio.gather(
                *(
                    port.request(conn, {"i": i, "pad": "x" * (i % 4000)}, timeout=30)
                    for i in range(asks)
                )
            )
            await producing
            notes, lost, answered = await reading
            assert [r["i"] for r in replies] == list(range(asks))
            assert answered == asks
            assert notes == sorted(notes) and len(set(notes)) == len(notes)
            assert len(notes) + lost == total
            await asyncio.to_thread(client.close)

    run(main())


def test_killed_client_ends_its_pending_request_at_once(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("victim", runtime_dir=rundir) as port:
            child = spawn_client(
                """
                import sys, time, kport
                conn = kport.connect("victim", runtime_dir=sys.argv[1])
                print("ready", flush=True)
                time.sleep(60)
                """,
                str(rundir),
            )
            await wait_for(lambda: bool(port.connections))
            task = asyncio.create_task(port.request(port.connections[0], "q", timeout=60))
            await asyncio.sleep(0.1)
            os.kill(child.pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(kport.PortClosed, match="ended"):
                await task
            assert time.monotonic() - started < SLACK_S  # not at its 60 s deadline
            await asyncio.to_thread(child.communicate)
            assert not port.connections

    run(main())


PAUSED_CLIENT = """
    import json, sys, kport
    received, lost, ranges, seqs = 0, 0, [], []
    with kport.connect("flood", runtime_dir=sys.argv[1]) as conn:
        print("ready", flush=True)
        sys.stdin.readline()  # paused until the server has sent everything
        for msg in conn:
            if msg.is_lost:
                lost += msg.data["count"]
                ranges.append([msg.data["first_seq"], msg.data["last_seq"], msg.data["count"]])
            else:
                received += 1
                seqs.append(msg.seq)
    print(json.dumps({"received": received, "lost": lost, "ranges": ranges,
                      "seqs_sorted": seqs == sorted(seqs), "seqs": seqs[:3] + seqs[-3:],
                      "unique": len(set(seqs)) == len(seqs), "conn_lost": conn.lost}))
"""


async def resume_paused_client(
    port: kport.ServerPort, conn: kport.ServerConnection, child: Any
) -> dict[str, Any]:
    """Let PAUSED_CLIENT read, shut the port down once its queue is empty, and return
    what it saw, with what the server counted lost for it."""
    child.stdin.write("go\n")
    child.stdin.flush()
    await wait_for(lambda: conn.queue_depth == 0, timeout=30)
    server_lost = conn.lost
    await port.shutdown(grace=10)
    out, err = await asyncio.to_thread(child.communicate, timeout=30)
    assert child.returncode == 0, err
    result: dict[str, Any] = json.loads(out)
    result["server_lost"] = server_lost
    return result


def check_paused_client(result: dict[str, Any], total: int) -> None:
    """What PAUSED_CLIENT saw: something dropped, every seq received or reported lost,
    the same loss counted by server and client, seqs in order and never twice."""
    assert result["lost"] > 0, "the client paused: something must have been dropped"
    assert result["received"] + result["lost"] == total
    assert result["lost"] == result["server_lost"] == result["conn_lost"]
    assert result["seqs_sorted"] and result["unique"]


def test_paused_client_accounts_for_every_notification(rundir: Path) -> None:
    total = 200_000

    async def main() -> dict[str, Any]:
        port = kport.ServerPort("flood", runtime_dir=rundir, queue_limit=1000, one_way=True)
        await port.start()
        child = spawn_client(PAUSED_CLIENT, str(rundir), stdin=-1)
        assert child.stdout is not None and child.stdin is not None
        assert (await asyncio.to_thread(child.stdout.readline)).strip() == "ready"
        conn = await first_connection(port)
        for i in range(total):
            port.notify(conn, {"i": i})
            if i % 1000 == 999:
                await asyncio.sleep(0)
        assert port.seq == total
        return await resume_paused_client(port, conn, child)

    result = run(main())
    check_paused_client(result, total)
    # One connection saw every seq: each lost range is contiguous and exactly its count.
    for first, last, count in result["ranges"]:
        assert last - first + 1 == count
    assert result["seqs"][-1] == total  # the newest are kept, the oldest dropped


def test_garbage_and_oversized_frames_drop_only_their_sender(rundir: Path) -> None:
    def raw_client(path: Path) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.connect(str(path))
        proto = protocol.Connection(protocol.Role.CLIENT)
        sock.sendall(proto.send(protocol.Hello(protocol.PROTOCOL_VERSION, "shared", 1)))
        proto.receive_data(sock.recv(4096))
        assert isinstance(proto.next_event(), protocol.Welcome)
        return sock

    def read_error(sock: socket.socket) -> protocol.Error | None:
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        conn = protocol.Connection(protocol.Role.CLIENT)
        conn.state = protocol.State.OPEN
        conn.receive_data(data)
        conn.receive_data(b"")
        errors = [e for e in conn.events() if isinstance(e, protocol.Error)]
        return errors[0] if errors else None

    async def main() -> None:
        async with kport.ServerPort("shared", runtime_dir=rundir, max_frame=1 << 20) as port:
            good = await kport.aconnect("shared", runtime_dir=rundir)
            garbage = await asyncio.to_thread(raw_client, port.path)
            oversized = await asyncio.to_thread(raw_client, port.path)
            await wait_for(lambda: len(port.connections) == 3)
            garbage.sendall(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")
            oversized.sendall(struct.pack(">I", 100 << 20))
            err1 = await asyncio.to_thread(read_error, garbage)
            err2 = await asyncio.to_thread(read_error, oversized)
            assert err1 is not None and "not valid msgpack" in err1.message
            assert err2 is not None and "exceeds the limit" in err2.message
            await wait_for(lambda: len(port.connections) == 1)
            port.broadcast("after")
            assert (await good.get_message(timeout=5)).data == "after"
            with pytest.raises(kport.KportError, match="takes no messages"):
                await good.send(1)  # no on_message: a clear error, and the connection goes on
            port.broadcast("still")
            assert (await good.get_message(timeout=5)).data == "still"
            await good.close()
            garbage.close()
            oversized.close()

    run(main())


def test_send_errors_reach_the_client_and_the_server_goes_on(rundir: Path) -> None:
    async def main() -> None:
        def on_message(conn: kport.ServerConnection, data: Any) -> Any:
            if data == "boom":
                raise ValueError("bad input")
            if data == "deny":
                raise kport.AccessDenied("not you")
            return data

        async with kport.ServerPort("h", runtime_dir=rundir, on_message=on_message):
            async with kport.aconnect("h", runtime_dir=rundir) as conn:
                with pytest.raises(kport.KportError, match="ValueError: bad input"):
                    await conn.send("boom")
                with pytest.raises(kport.AccessDenied, match="not you"):
                    await conn.send("deny")
                assert await conn.send("ok") == "ok"

    run(main())


def test_queue_full_of_requests_refuses_the_next(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("full", runtime_dir=rundir, queue_limit=4) as port:
            client = await asyncio.to_thread(kport.connect, "full", runtime_dir=rundir)
            conn = await first_connection(port)
            big = "x" * 60_000
            # The client does not read: fill the socket buffer, then the queue.
            while conn.queue_depth < 4:
                port.notify(conn, big)
                await asyncio.sleep(0.01)
            lost_before = conn.lost
            tasks = [asyncio.create_task(port.request(conn, i, timeout=30)) for i in range(4)]
            await asyncio.sleep(0.05)
            assert conn.lost == lost_before + 4  # each request evicted one notification
            with pytest.raises(kport.QueueFull, match="full of requests"):
                await port.request(conn, "one too many", timeout=30)
            client.close()
            for task in tasks:
                with pytest.raises(kport.PortClosed):
                    await task

    run(main())


def test_shutdown_resolves_everything(rundir: Path) -> None:
    async def main() -> None:
        port = kport.ServerPort("bye", runtime_dir=rundir)
        await port.start()
        clients = [await kport.aconnect("bye", runtime_dir=rundir) for _ in range(3)]
        await wait_for(lambda: len(port.connections) == 3)
        pending = [asyncio.create_task(port.request(c, "q", timeout=60)) for c in port.connections]
        port.broadcast("last words")
        await asyncio.sleep(0.05)
        await port.shutdown(reason="maintenance")
        for task in pending:
            with pytest.raises(kport.PortClosed, match="shut down"):
                await task
        for client in clients:
            got = [msg async for msg in client]  # ends cleanly at BYE
            assert [m.data for m in got if m.kind == "notify"] == ["last words"]
            with pytest.raises(kport.PortClosed, match="maintenance"):
                await client.get_message(timeout=1)
            await client.close()
        assert not port.path.exists()
        assert list(rundir.iterdir()) == []
        with pytest.raises(kport.PortNotFound):
            await kport.aconnect("bye", runtime_dir=rundir)

    run(main())


def test_close_keeps_existing_connections(rundir: Path) -> None:
    async def main() -> None:
        async with kport.ServerPort("c", runtime_dir=rundir) as port:
            client = await kport.aconnect("c", runtime_dir=rundir)
            await wait_for(lambda: bool(port.connections))
            port.close()
            with pytest.raises(kport.PortNotFound, match="does not exist"):
                await kport.aconnect("c", runtime_dir=rundir)
            port.broadcast("still here")
            assert (await client.get_message(timeout=5)).data == "still here"
            await client.close()

    run(main())


def test_stale_socket_is_replaced_and_live_one_is_not_stolen(rundir: Path) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(rundir / "s.sock"))
    stale.close()  # a socket file with no server: what a crashed server leaves

    async def main() -> None:
        with pytest.raises(kport.PortNotFound, match="stale"):
            await kport.aconnect("s", runtime_dir=rundir)
        async with kport.ServerPort("s", runtime_dir=rundir) as port:
            async with kport.aconnect("s", runtime_dir=rundir):
                pass
            with pytest.raises(kport.NameCollision, match="live process"):
                await kport.ServerPort("s", runtime_dir=rundir).start()
            assert port.path.is_socket()
        (rundir / "f.sock").write_text("not a socket")
        with pytest.raises(kport.NameCollision, match="not a socket"):
            await kport.ServerPort("f", runtime_dir=rundir).start()

    run(main())


def test_live_server_in_another_process_is_not_stolen(rundir: Path) -> None:
    child = spawn_client(
        """
        import asyncio, sys, kport
        async def main():
            async with kport.ServerPort("taken", runtime_dir=sys.argv[1]):
                print("up", flush=True)
                await asyncio.sleep(60)
        asyncio.run(main())
        """,
        str(rundir),
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "up"

        async def main() -> None:
            with pytest.raises(kport.NameCollision):
                await kport.ServerPort("taken", runtime_dir=rundir).start()

        run(main())
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()

        async def after() -> None:  # the dead server's socket is stale now: replaced
            async with kport.ServerPort("taken", runtime_dir=rundir) as port:
                async with kport.aconnect("taken", runtime_dir=rundir):
                    await wait_for(lambda: bool(port.connections))

        run(after())
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
