"""`kport bench port`: notification throughput and request/reply latency of a port, against
a raw Unix socket ceiling, multiprocessing.Queue, pyzmq PUSH/PULL and a gRPC unary call.

Every transport carries the same stream of ~100-byte event mappings from one process to
another, in the same run. Producer and consumer are separate processes (spawned). kport's
server side runs on uvloop, the event loop `kport serve` runs its ports on.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import socket
import statistics
import struct
import tempfile
import time
from multiprocessing.connection import Connection as Pipe
from typing import Any

import msgpack
import uvloop

from bench.common import Table, count_notifications, drained, flow_control, percentile, save_results

_HDR = struct.Struct(">I")


def event(i: int) -> dict[str, Any]:
    """A mapping shaped like a process event, ~100 bytes packed."""
    return {
        "seq": i,
        "ts": 1_795_000_000_000_000_000 + i,
        "source": "proc",
        "kind": "exec",
        "pid": 10_000 + i % 50_000,
        "start_time": 190_000 + i,
        "ppid": 1234,
        "uid": 1000,
        "exe": "/usr/bin/true",
        "argv": ["true", "--marker"],
    }


def events(count: int) -> list[dict[str, Any]]:
    """The stream, made before timing starts so that every transport is timed on itself."""
    return [event(i) for i in range(count)]


# --- throughput: producers and consumers ----------------------------------------------


def _kport_producer(rundir: str, count: int, ready: Any) -> None:
    import kport

    async def main() -> None:
        port = kport.ServerPort("bench", runtime_dir=rundir, one_way=True)
        await port.start()
        ready.set()
        while not port.connections:
            await asyncio.sleep(0.001)
        conn = port.connections[0]
        for ev in events(count):
            port.notify(conn, ev)
            await flow_control(port, conn)
        await drained(conn)
        while not conn.closed:
            await asyncio.sleep(0.005)
        await port.shutdown()

    uvloop.run(main())


def _kport_consumer(rundir: str, count: int, out: Pipe) -> None:
    out.send(count_notifications("bench", rundir, count, timeout=30))


def _raw_producer(sock: socket.socket, count: int) -> None:
    packb = msgpack.packb
    batch: list[bytes] = []
    for ev in events(count):
        body = packb(ev)
        batch.append(_HDR.pack(len(body)) + body)
        if len(batch) == 512:
            sock.sendall(b"".join(batch))
            batch.clear()
    if batch:
        sock.sendall(b"".join(batch))
    sock.close()


def _raw_consumer(sock: socket.socket, count: int, out: Pipe) -> None:
    unpackb = msgpack.unpackb
    buf = bytearray()
    received = 0
    first = 0.0
    while received < count:
        data = sock.recv(262144)
        if not data:
            break
        if not received:
            first = time.perf_counter()
        buf += data
        pos = 0
        end_buf = len(buf)
        while end_buf - pos >= 4:
            (size,) = _HDR.unpack_from(buf, pos)
            end = pos + 4 + size
            if end > end_buf:
                break
            unpackb(memoryview(buf)[pos + 4 : end])
            received += 1
            pos = end
        del buf[:pos]
    out.send({"received": received, "lost": 0, "seconds": time.perf_counter() - first})


def _mpq_producer(queue: Any, count: int) -> None:
    for ev in events(count):
        queue.put(ev)
    queue.close()
    queue.join_thread()


def _mpq_consumer(queue: Any, count: int, out: Pipe) -> None:
    queue.get()
    first = time.perf_counter()
    for _ in range(count - 1):
        queue.get()
    out.send({"received": count, "lost": 0, "seconds": time.perf_counter() - first})


def _zmq_producer(address: str, count: int) -> None:
    import zmq

    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    packb = msgpack.packb
    for ev in events(count):
        push.send(packb(ev))
    push.close(linger=-1)
    ctx.term()


def _zmq_consumer(address: str, count: int, out: Pipe, ready: Any) -> None:
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    ready.set()
    unpackb = msgpack.unpackb
    unpackb(pull.recv())
    first = time.perf_counter()
    for _ in range(count - 1):
        unpackb(pull.recv())
    out.send({"received": count, "lost": 0, "seconds": time.perf_counter() - first})
    pull.close()
    ctx.term()


def throughput(count: int) -> dict[str, dict[str, Any]]:
    ctx = mp.get_context("spawn")
    results: dict[str, dict[str, Any]] = {}

    def collect(name: str, procs: list[Any], pipe: Pipe) -> None:
        if not pipe.poll(120):
            for p in procs:
                p.kill()
            raise RuntimeError(f"{name}: the consumer did not finish within 120 s")
        result = pipe.recv()
        for p in procs:
            p.join(30)
        result["rate"] = result["received"] / result["seconds"] if result["seconds"] else 0.0
        results[name] = result

    # (a) kport
    with tempfile.TemporaryDirectory() as rundir:
        ready = ctx.Event()
        recv_end, send_end = ctx.Pipe(duplex=False)
        prod = ctx.Process(target=_kport_producer, args=(rundir, count, ready))
        prod.start()
        ready.wait(30)
        cons = ctx.Process(target=_kport_consumer, args=(rundir, count, send_end))
        cons.start()
        collect("kport notify", [cons, prod], recv_end)

    # (b) raw socket ceiling
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    recv_end, send_end = ctx.Pipe(duplex=False)
    cons = ctx.Process(target=_raw_consumer, args=(b, count, send_end))
    prod = ctx.Process(target=_raw_producer, args=(a, count))
    cons.start()
    prod.start()
    a.close()
    b.close()
    collect("raw socket (ceiling)", [prod, cons], recv_end)

    # (c) multiprocessing.Queue
    queue = ctx.Queue()
    recv_end, send_end = ctx.Pipe(duplex=False)
    cons = ctx.Process(target=_mpq_consumer, args=(queue, count, send_end))
    prod = ctx.Process(target=_mpq_producer, args=(queue, count))
    cons.start()
    prod.start()
    collect("multiprocessing.Queue", [prod, cons], recv_end)

    # (d) pyzmq PUSH/PULL over ipc
    with tempfile.TemporaryDirectory() as tmp:
        address = f"ipc://{tmp}/bench.ipc"
        ready = ctx.Event()
        recv_end, send_end = ctx.Pipe(duplex=False)
        cons = ctx.Process(target=_zmq_consumer, args=(address, count, send_end, ready))
        cons.start()
        ready.wait(30)
        prod = ctx.Process(target=_zmq_producer, args=(address, count))
        prod.start()
        collect("pyzmq PUSH/PULL ipc", [prod, cons], recv_end)
    return results


# --- request / reply latency ----------------------------------------------------------


def _kport_replier(rundir: str, ready: Any) -> None:
    import kport

    while True:
        try:
            conn = kport.connect("rr", runtime_dir=rundir)
            break
        except kport.PortNotFound:
            time.sleep(0.01)
    ready.set()
    with conn:
        for msg in conn:
            conn.reply(msg, msg.data)


def _kport_requester(rundir: str, rounds: int, out: Pipe) -> None:
    import kport

    async def main() -> list[float]:
        port = kport.ServerPort("rr", runtime_dir=rundir)
        await port.start()
        while not port.connections:
            await asyncio.sleep(0.001)
        conn = port.connections[0]
        data = event(0)
        times: list[float] = []
        clock = time.perf_counter_ns
        for _ in range(rounds):
            t0 = clock()
            await port.request(conn, data, timeout=5)
            times.append((clock() - t0) / 1000)
        await port.shutdown()
        return times

    out.send(uvloop.run(main()))


def _raw_replier(sock: socket.socket) -> None:
    buf = b""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        while len(buf) >= 4:
            (size,) = _HDR.unpack_from(buf)
            if len(buf) < 4 + size:
                break
            body = buf[4 : 4 + size]
            buf = buf[4 + size :]
            reply = msgpack.packb(msgpack.unpackb(body))
            sock.sendall(_HDR.pack(len(reply)) + reply)


def _raw_requester(sock: socket.socket, rounds: int, out: Pipe) -> None:
    data = event(0)
    times: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        body = msgpack.packb(data)
        sock.sendall(_HDR.pack(len(body)) + body)
        buf = sock.recv(65536)
        while len(buf) < 4 or len(buf) < 4 + _HDR.unpack_from(buf)[0]:
            buf += sock.recv(65536)
        msgpack.unpackb(buf[4:])
        times.append((clock() - t0) / 1000)
    sock.close()
    out.send(times)


def _grpc_server(address: str, ready: Any, stop: Any) -> None:
    from concurrent import futures

    import grpc

    def echo(request: bytes, context: Any) -> bytes:
        reply: bytes = msgpack.packb(msgpack.unpackb(request))
        return reply

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(address)
    server.start()
    ready.set()
    stop.wait()
    server.stop(0)


def _grpc_client(address: str, rounds: int, out: Pipe) -> None:
    import grpc

    channel = grpc.insecure_channel(address)
    call = channel.unary_unary("/bench.Echo/Echo")
    data = event(0)
    times: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(rounds):
        t0 = clock()
        msgpack.unpackb(call(msgpack.packb(data), timeout=5))
        times.append((clock() - t0) / 1000)
    channel.close()
    out.send(times)


def latency(rounds: int) -> dict[str, dict[str, float]]:
    ctx = mp.get_context("spawn")
    out: dict[str, dict[str, float]] = {}

    def summarize(name: str, times: list[float]) -> None:
        times = times[min(len(times) // 10, 1000) :]  # warm-up
        out[name] = {
            "p50_us": percentile(times, 50),
            "p99_us": percentile(times, 99),
            "mean_us": statistics.fmean(times),
            "rounds": len(times),
        }

    with tempfile.TemporaryDirectory() as rundir:
        ready = ctx.Event()
        recv_end, send_end = ctx.Pipe(duplex=False)
        req = ctx.Process(target=_kport_requester, args=(rundir, rounds, send_end))
        req.start()
        rep = ctx.Process(target=_kport_replier, args=(rundir, ready))
        rep.start()
        if not recv_end.poll(120):
            req.kill()
            rep.kill()
            raise RuntimeError("kport request/reply did not finish within 120 s")
        summarize("kport request/reply", recv_end.recv())
        req.join(10)
        rep.join(10)

    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    recv_end, send_end = ctx.Pipe(duplex=False)
    rep = ctx.Process(target=_raw_replier, args=(b,))
    req = ctx.Process(target=_raw_requester, args=(a, rounds, send_end))
    rep.start()
    req.start()
    a.close()
    b.close()
    summarize("raw socket ping-pong", recv_end.recv())
    req.join(10)
    rep.join(10)

    with tempfile.TemporaryDirectory() as tmp:
        address = f"unix:{tmp}/grpc.sock"
        ready, stop = ctx.Event(), ctx.Event()
        srv = ctx.Process(target=_grpc_server, args=(address, ready, stop))
        srv.start()
        ready.wait(30)
        recv_end, send_end = ctx.Pipe(duplex=False)
        cli = ctx.Process(target=_grpc_client, args=(address, rounds, send_end))
        cli.start()
        summarize("gRPC unary (unix socket)", recv_end.recv())
        cli.join(10)
        stop.set()
        srv.join(10)
    return out


def run(count: int = 300_000, rounds: int = 20_000, json_dir: str | None = None) -> dict[str, Any]:
    tput = throughput(count)
    time.sleep(3)  # let the throughput run's processes finish exiting before timing round trips
    lat = latency(rounds)
    kport_rate = tput["kport notify"]["rate"]
    raw_rate = tput["raw socket (ceiling)"]["rate"]
    best_other = max(tput["multiprocessing.Queue"]["rate"], tput["pyzmq PUSH/PULL ipc"]["rate"])
    ratios = {
        "kport / raw ceiling": kport_rate / raw_rate,
        "kport / best of mp.Queue, pyzmq": kport_rate / best_other,
        "kport rr p50 / raw p50": lat["kport request/reply"]["p50_us"]
        / lat["raw socket ping-pong"]["p50_us"],
    }
    targets = {
        "kport / raw ceiling": (">=", 0.6),
        "kport / best of mp.Queue, pyzmq": (">=", 3.0),
        "kport rr p50 / raw p50": ("<=", 2.0),
    }

    table = Table(
        f"Notification throughput, {count:,} events of ~100 bytes",
        ["transport", "messages/s", "received", "lost", "× raw"],
    )
    for name, r in tput.items():
        table.row(
            name,
            f"{r['rate']:,.0f}",
            f"{r['received']:,}",
            f"{r['lost']:,}",
            f"{r['rate'] / raw_rate:.2f}",
        )
    table.show()
    table = Table(
        f"Request/reply round trip, {rounds:,} rounds", ["transport", "p50 µs", "p99 µs", "mean µs"]
    )
    for name, r in lat.items():
        table.row(name, f"{r['p50_us']:.1f}", f"{r['p99_us']:.1f}", f"{r['mean_us']:.1f}")
    table.show()
    table = Table("Targets", ["ratio", "measured", "target", "met"])
    met_all = True
    for name, value in ratios.items():
        op, bound = targets[name]
        met = value >= bound if op == ">=" else value <= bound
        met_all &= met
        table.row(name, f"{value:.2f}", f"{op} {bound}", "yes" if met else "NO")
    table.show()
    result = {
        "bench": "port",
        "count": count,
        "rounds": rounds,
        "throughput": tput,
        "latency": lat,
        "ratios": ratios,
        "targets": {k: list(v) for k, v in targets.items()},
        "all_targets_met": met_all,
        "cpus": os.cpu_count(),
    }
    save_results("port", result, json_dir)
    return result
