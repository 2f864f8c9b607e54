"""`kport bench proc`: a spawn storm captured at once by kport (daemon → port → client) and
by forkstat; accounting, delivery latency and daemon CPU; and the proc parser against
pyroute2's.

Run as root. forkstat comes from Debian (installed here if missing).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from typing import Any

from bench.common import Table, percentile, save_results

SPAWNERS = 2

#: exit(0) as machine code, by architecture: the body of the storm's tiny program
_EXIT_CODE: dict[str, tuple[int, bytes]] = {
    # mov eax, 60 (exit); xor edi, edi; syscall
    "x86_64": (0x3E, bytes.fromhex("b83c000000 31ff 0f05")),
    # mov x0, #0; mov x8, #93 (exit); svc #0
    "aarch64": (0xB7, bytes.fromhex("000080d2 a80b80d2 010000d4")),
}


def tiny_program(directory: str) -> str:
    """A static ELF of 129 or 132 bytes that exits at once, written into ``directory``:
    no loader, no libc, so a spawn costs the kernel's fork, exec and exit alone and the
    storm runs at the highest rate this machine can produce (here ~4x /bin/true's).
    /bin/true on an architecture not listed in _EXIT_CODE."""
    machine = platform.machine()
    if machine not in _EXIT_CODE:
        return "/bin/true"
    e_machine, code = _EXIT_CODE[machine]
    base, ehdr_size, phdr_size = 0x400000, 64, 56
    size = ehdr_size + phdr_size + len(code)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)  # 64-bit, little-endian, version 1
    ehdr = ident + struct.pack(
        "<HHIQQQIHHHHHH",
        2,  # ET_EXEC
        e_machine,
        1,
        base + ehdr_size + phdr_size,  # entry: the code after the one program header
        ehdr_size,
        0,
        0,
        ehdr_size,
        phdr_size,
        1,
        0,
        0,
        0,
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X
    path = os.path.join(directory, "kport-bench-tiny")
    with open(path, "wb") as f:
        f.write(ehdr + phdr + code)
    os.chmod(path, 0o755)
    return path


def _client(rundir: str, ready: Any, stop: Any, out: Any) -> None:
    import kport

    conn = kport.connect("proc", runtime_dir=rundir)
    ready.set()
    execs: dict[int, int] = {}
    lost = 0
    lost_events = 0
    while not stop.is_set() or conn.pending:
        try:
            batch = conn.get_messages(4096, timeout=0.2)
        except kport.Timeout:
            continue
        now = time.monotonic_ns()
        for msg in batch:
            if msg.is_lost:
                lost += msg.data["count"]
                continue
            ev = msg.data
            if ev["kind"] == "exec":
                execs[ev["pid"]] = now - ev["ktime"]
            elif ev["kind"] == "lost":
                lost_events += 1
                lost += ev.get("count") or 0
    conn.close()
    out.send({"execs": execs, "lost": lost, "lost_events": lost_events})


def _spawner(program: str, count: int, rate: float, out: Any) -> None:
    # The load generator must not starve what it loads: on a small machine the spawners
    # alone can fill every core, and then the measured latency is the scheduler's.
    os.nice(19)
    pids: list[int] = []
    env = dict(os.environ)
    interval = 1.0 / rate if rate else 0.0
    start = time.perf_counter()
    for i in range(count):
        if interval:
            delay = start + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        pid = os.posix_spawn(program, [os.path.basename(program), "kport-bench"], env)
        pids.append(pid)
        os.waitpid(pid, 0)
    out.send(pids)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _storm(rundir: str, daemon_pid: int, program: str, count: int, rate: float) -> dict[str, Any]:
    """One storm of ``count`` execs (``rate`` per second in all, 0 = as fast as possible)."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    recv_end, send_end = ctx.Pipe(duplex=False)
    client = ctx.Process(target=_client, args=(rundir, ready, stop, send_end))
    client.start()
    ready.wait(30)
    # forkstat writes to a file: a pipe read only at the end would fill and stall it.
    fs_log = tempfile.NamedTemporaryFile("w+", prefix="forkstat-", suffix=".log")  # noqa: SIM115
    forkstat = subprocess.Popen(
        ["forkstat", "-e", "exec", "-l"],
        stdout=fs_log,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    time.sleep(1.0)
    cpu0 = _cpu_seconds(daemon_pid)
    pipes = []
    spawners = []
    started = time.perf_counter()
    for _ in range(SPAWNERS):
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_spawner, args=(program, count // SPAWNERS, rate / SPAWNERS, w))
        p.start()
        pipes.append(r)
        spawners.append(p)
    pids: list[int] = []
    for r in pipes:
        pids.extend(r.recv())
    elapsed = time.perf_counter() - started
    for p in spawners:
        p.join()
    time.sleep(2.0)  # let both drain
    cpu = _cpu_seconds(daemon_pid) - cpu0
    forkstat.send_signal(signal.SIGINT)
    forkstat.wait(timeout=30)
    fs_log.seek(0)
    fs_out = fs_log.read()
    fs_log.close()
    stop.set()
    result = recv_end.recv()
    client.join(30)
    wanted = set(pids)
    got = set(result["execs"]) & wanted
    fs_pids = {int(m.group(1)) for m in re.finditer(r"\bexec\s+(\d+)", fs_out)}
    latencies = [result["execs"][pid] / 1000 for pid in got]
    return {
        "spawned": len(wanted),
        "rate": len(wanted) / elapsed,
        "kport_delivered": len(got),
        "kport_missing": len(wanted - got),
        "kport_lost_reported": result["lost"],
        "kport_accounts_for_all": len(wanted - got) <= result["lost"],
        "forkstat_captured": len(fs_pids & wanted),
        "forkstat_missing": len(wanted - fs_pids),
        "latency_us": {
            "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99),
            "max": max(latencies, default=0.0),
        },
        "daemon_cpu_s": cpu,
        "daemon_cpu_s_per_1000_execs": cpu / len(wanted) * 1000,
    }


def parser_speed(rounds: int = 50_000) -> dict[str, float]:
    """µs per parsed exec message: kport's struct parser vs pyroute2's ProcEventMarshal."""
    from pyroute2.netlink.connector.cn_proc import (  # type: ignore[import-untyped]
        ProcEventMarshal,
    )

    from kport.sources import netlink_proc as n
    from kport.sources.netlink import NLMSG_DONE

    event = struct.pack("=IIQ", n.EV_EXEC, 0, 1) + struct.pack("=II", 11, 11)
    cn = struct.pack("=IIIIHH", n.CN_IDX_PROC, n.CN_VAL_PROC, 1, 0, len(event), 0) + event
    message = struct.pack("=IHHII", 16 + len(cn), NLMSG_DONE, 0, 0, 0) + cn
    marshal = ProcEventMarshal()
    return {
        "kport_us": timeit.timeit(lambda: n.parse(message), number=rounds) / rounds * 1e6,
        "pyroute2_us": timeit.timeit(lambda: list(marshal.parse(message)), number=rounds)
        / rounds
        * 1e6,
    }


def run(count: int = 20_000, rounds: int = 5_000, json_dir: str | None = None) -> dict[str, Any]:
    if os.geteuid() != 0:
        raise SystemExit("kport bench proc: run as root (the proc connector needs it)")
    if shutil.which("forkstat") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "forkstat"], check=True)
    with (
        tempfile.TemporaryDirectory() as rundir,
        tempfile.TemporaryDirectory(prefix="kport-bench-proc-") as bindir,
    ):
        program = tiny_program(bindir)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "kport.cli", "serve", "--runtime-dir", rundir],
            stderr=subprocess.DEVNULL,
        )
        try:
            while not (Path(rundir) / "proc.sock").exists():
                time.sleep(0.05)
            storm = _storm(rundir, daemon.pid, program, count, 0)
            paced = _storm(rundir, daemon.pid, program, rounds, 1000.0)
        finally:
            daemon.terminate()
            daemon.wait(30)
    parse = parser_speed()

    table = Table(
        f"Spawn storms of {'a tiny static program' if program != '/bin/true' else program}:"
        " kport and forkstat capturing the same execs",
        [
            "run",
            "spawned",
            "execs/s",
            "kport got",
            "kport missing",
            "kport lost rep.",
            "forkstat got",
            "forkstat missing",
        ],
    )
    for name, r in (("storm (max rate)", storm), ("paced 1000/s", paced)):
        table.row(
            name,
            f"{r['spawned']:,}",
            f"{r['rate']:,.0f}",
            f"{r['kport_delivered']:,}",
            f"{r['kport_missing']:,}",
            f"{r['kport_lost_reported']:,}",
            f"{r['forkstat_captured']:,}",
            f"{r['forkstat_missing']:,}",
        )
    table.show()
    table = Table(
        "kport delivery latency (kernel timestamp → client) and daemon CPU",
        ["run", "p50 µs", "p99 µs", "max µs", "CPU s / 1000 execs"],
    )
    for name, r in (("storm (max rate)", storm), ("paced 1000/s", paced)):
        lat = r["latency_us"]
        table.row(
            name,
            f"{lat['p50']:.0f}",
            f"{lat['p99']:.0f}",
            f"{lat['max']:.0f}",
            f"{r['daemon_cpu_s_per_1000_execs']:.3f}",
        )
    table.show()
    table = Table("Proc event parser, µs per message", ["parser", "µs"])
    table.row("kport (struct)", f"{parse['kport_us']:.2f}")
    table.row("pyroute2 ProcEventMarshal", f"{parse['pyroute2_us']:.2f}")
    table.show()
    targets = {
        "kport accounts for every exec (storm)": storm["kport_accounts_for_all"],
        "forkstat misses some at that rate": storm["forkstat_missing"] > 0,
        "p99 <= 2 ms at 1000 execs/s": paced["latency_us"]["p99"] <= 2000,
        "<= 0.3 CPU s per 1000 execs": storm["daemon_cpu_s_per_1000_execs"] <= 0.3,
    }
    table = Table("Targets", ["target", "met"])
    for name, met in targets.items():
        table.row(name, "yes" if met else "NO")
    table.show()
    result = {
        "bench": "proc",
        "program": "tiny static ELF" if program != "/bin/true" else program,
        "spawners": SPAWNERS,
        "storm": storm,
        "paced": paced,
        "parser": parse,
        "targets": targets,
    }
    save_results("proc", result, json_dir)
    return result
