"""`kport bench proc`: exec storms captured at the same time by kport's two proc backends
(bpf and the proc connector, one daemon each), by forkstat and by a bpftrace one-liner;
kport at a steady 1,000 execs/s with its journal on, both daemons together, then each
alone (three times, the backends taking turns); the /bin/true storm into an eBPF daemon
with [hash] off and one with it on, in turn (what ``exe_sha256`` costs); and the proc
connector parser against pyroute2's.

The storms: a tiny static program (no loader, no libc) from 2 spawners and from 4
(``--count`` execs each, 20,000 by default), and /bin/true from 2 (a quarter of that).
Each storm runs one program again and again from several spawner processes, each exec
with a unique marker in its argv (``[name, "kport-bench-<storm>.<spawner>-<i>"]``). For
each tool the bench reports the execs of the storm it captured, those captured with their
exact argv, the loss it reported, the latency from the kernel's timestamp to the client
(CLOCK_MONOTONIC at receipt minus the event's CLOCK_MONOTONIC timestamp) and the CPU it
spent: the daemon's (the tool itself) and its client's, apart. An exec counts as
delivered only if its client received it before the drain ended: once the spawners are
done, each tool's count is watched until it has every exec or has not moved for
``QUIET_S`` (and the daemon holds nothing back), at most ``DRAIN_DEADLINE_S``.

The taps:

- kport, backend bpf and backend connector: a daemon each (own runtime and state
  directories, journal on as by default) and one client each, ``kport.connect("proc")``.
- forkstat (Debian): ``forkstat -e exec -l`` into a file, its pids and command lines
  parsed; it has no kernel timestamp, so no latency.
- bpftrace (Debian): ``tracepoint:sched:sched_process_exec`` printing nsecs, pid and the
  filename, unbuffered (``-B none``) into a pipe read by a collector process that
  timestamps each line. That tracepoint carries the filename, not argv: no argv is
  reported for it. Where tracefs is not mounted (bpftrace then finds no tracepoint), it
  runs in a mount namespace of its own with tracefs mounted there, the system's mounts
  untouched; if it still cannot run, the reason is recorded and shown.

Two daemons, four tools, their clients and the spawners share this machine's CPUs, so
each run also records the CPU the hypervisor stole and the execs of other programs
meanwhile. Run as root. forkstat and bpftrace come from Debian (installed here if
missing).
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import platform
import re
import select
import shlex
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import timeit
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

import tomli_w

from bench.common import Table, percentile, save_results

MARKER = "kport-bench"
#: the paced runs' rate, execs per second in all
PACED_RATE = 1000.0
PACED_SPAWNERS = 2
#: each backend's paced run alone is repeated, the backends taking turns, so that a
#: moment of the hypervisor's stealing weighs on neither alone: the target takes the median
PACED_ALONE_ROUNDS = 3
#: a drain ends for a tool once its count has not moved for this long ...
QUIET_S = 3.0
#: ... or at this deadline after the spawners finished, whatever it still lacks
DRAIN_DEADLINE_S = 120.0
DRAIN_POLL_S = 0.1
READY_TIMEOUT_S = 90.0
START_TIMEOUT_S = 30.0
#: the target: the bpf daemon's CPU per exec at most this share of the connector's
CPU_SHARE_TARGET = 0.5
P99_TARGET_US = 2000.0
BPFTRACE_PROGRAM = (
    'tracepoint:sched:sched_process_exec { printf("%llu %d %s\\n", nsecs, pid, '
    "str(args->filename)); }"
)
TRACEFS = "/sys/kernel/tracing"
#: the hashing comparison: pairs of rounds (off, then on), and the most CPU it may add
HASH_PAIRS = 4
HASH_TARGET = 0.10
BACKENDS = ("bpf", "connector")

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


# --- the load ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Storm:
    """One run of execs: ``count`` in all from ``spawners`` processes, at ``rate`` per
    second in all (0: as fast as they go)."""

    key: str
    label: str
    program: str
    count: int
    spawners: int
    rate: float = 0.0


def _argv(program: str, tag: str, i: int) -> list[str]:
    return [os.path.basename(program), f"{MARKER}-{tag}-{i}"]


def _spawner(program: str, count: int, rate: float, tag: str, out: Pipe) -> None:
    # The load generator must not starve what it loads: on a small machine the spawners
    # alone can fill every core, and then the measured latency is the scheduler's.
    os.nice(19)
    pids: list[int] = []
    env = dict(os.environ)
    interval = 1.0 / rate if rate else 0.0
    start = time.monotonic()
    for i in range(count):
        if interval:
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        pid = os.posix_spawn(program, _argv(program, tag, i), env)
        pids.append(pid)
        os.waitpid(pid, 0)
    out.send((pids, start, time.monotonic()))


def _spawn(storm: Storm) -> tuple[dict[int, list[str]], float]:
    """Run the storm; every exec's pid with the argv it was given, and the seconds from
    the first spawn to the last exit (a spawner's own start-up left out)."""
    ctx = mp.get_context("spawn")
    each = storm.count // storm.spawners
    spawners = []
    for s in range(storm.spawners):
        recv_end, send_end = ctx.Pipe(duplex=False)
        tag = f"{storm.key}.{s}"
        rate = storm.rate / storm.spawners
        p = ctx.Process(target=_spawner, args=(storm.program, each, rate, tag, send_end))
        p.start()
        send_end.close()
        spawners.append((p, tag, recv_end))
    wanted: dict[int, list[str]] = {}
    starts, ends = [], []
    for p, tag, recv_end in spawners:
        pids, start, end = recv_end.recv()
        starts.append(start)
        ends.append(end)
        for i, pid in enumerate(pids):
            wanted[pid] = _argv(storm.program, tag, i)
        p.join()
    if len(wanted) != each * storm.spawners:
        raise RuntimeError(f"{storm.label}: a pid was used twice within the storm")
    return wanted, max(ends) - min(starts)


def _sentinel() -> None:
    """One exec that no tap is asked about: the taps without a ready signal of their own
    are ready once they have seen one."""
    pid = os.posix_spawn("/bin/true", ["true", f"{MARKER}-sentinel"], dict(os.environ))
    os.waitpid(pid, 0)


def _cpu_seconds(pid: int | None) -> float | None:
    """user + system CPU of the process ``pid`` (all its threads); None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine so far, from /proc/stat: steal is
    time the hypervisor gave this VM's CPUs to others."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _others() -> list[str]:
    """Other kport daemons and test runs on the machine (they load it while we measure)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        line = b" ".join(argv).decode(errors="replace").strip()
        if "kport.cli serve" in line or "kport serve" in line or "pytest" in line:
            found.append(f"{entry}: {line[:120]}")
    return found


# --- the client processes (kport's client, bpftrace's collector) --------------------------

#: slots of a client's shared progress array
OURS, LOST, SEEN, ENDED, TOOL_PID = range(5)


@dataclass(frozen=True)
class Channels:
    """A client process's ends: ``ready`` (an Event), ``progress`` (a shared array, slots
    above), ``commands`` (pid → argv of the storm's execs, then None: stop) and ``out``
    (its report)."""

    ready: Any
    progress: Any
    commands: Pipe
    out: Pipe


def _kport_client(rundir: str, ch: Channels) -> None:
    """Receive every proc event, keeping each exec's latency and argv by pid. Told the
    storm's execs (pid → argv), count those received as they come (``progress[OURS]``);
    told to stop (None), report on them: what is received by then is all that counts."""
    import kport

    ready, progress, commands, out = ch.ready, ch.progress, ch.commands, ch.out
    conn = kport.connect("proc", runtime_dir=rundir)
    ready.set()
    execs: dict[int, tuple[int, list[str] | None]] = {}
    wanted: dict[int, list[str]] = {}
    ours = lost = lost_unknown = messages = exec_events = 0
    stopping = False
    while not stopping:
        if commands.poll():
            command = commands.recv()
            if command is None:
                stopping = True
            else:
                wanted = command
                ours = sum(1 for pid in execs if pid in wanted)
                progress[OURS] = ours
        try:
            if stopping:  # only what is in the inbox already: nothing more is read
                batch = conn.get_messages(1 << 30, timeout=0) if conn.pending else []
            else:
                batch = conn.get_messages(4096, timeout=0.1)
        except kport.Timeout:
            continue
        now = time.monotonic_ns()
        messages += len(batch)
        for msg in batch:
            if msg.is_lost:
                lost += msg.data["count"]
                continue
            ev = msg.data
            kind = ev.get("kind")
            if kind == "exec":
                exec_events += 1
                pid = ev["pid"]
                if pid not in execs and pid in wanted:
                    ours += 1
                execs[pid] = (now - ev["ktime"], ev.get("argv"))
            elif kind == "lost":
                if ev.get("count") is None:
                    lost_unknown += 1
                else:
                    lost += ev["count"]
        progress[OURS], progress[LOST], progress[SEEN] = ours, lost, messages
    conn.close()
    got = {pid: execs[pid] for pid in wanted if pid in execs}
    out.send(
        {
            "captured": len(got),
            "exact_argv": sum(1 for pid, (_, argv) in got.items() if argv == wanted[pid]),
            "latencies_us": [latency / 1000 for latency, _ in got.values()],
            "lost": lost,
            "lost_unknown": lost_unknown,
            "messages": messages,
            "exec_events": exec_events,
        }
    )


def _bpftrace_collector(command: list[str], stderr_path: str, ch: Channels) -> None:
    """Run bpftrace with its output in a pipe and timestamp each line at receipt; ready
    once a line from the probe came. Counting and commands as in :func:`_kport_client`;
    the stop ends bpftrace (SIGINT) and is answered once its output has ended."""
    ready, progress, commands, out = ch.ready, ch.progress, ch.commands, ch.out
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err)
    assert proc.stdout is not None
    progress[TOOL_PID] = proc.pid
    fd = proc.stdout.fileno()
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    poller.register(commands.fileno(), select.POLLIN)
    seen: dict[int, int] = {}
    wanted: dict[int, list[str]] = {}
    rest = b""
    ours = lost = lines = 0
    other: list[str] = []
    stopped = ended = False
    while not (stopped and ended):
        for ready_fd, _ in poller.poll(200):
            if ready_fd == commands.fileno():
                told = commands.recv()
                if told is None:
                    stopped = True
                    poller.unregister(ready_fd)
                    if not ended:
                        proc.send_signal(signal.SIGINT)
                else:
                    wanted = told
                    ours = sum(1 for pid in seen if pid in wanted)
                    progress[OURS] = ours
                continue
            data = os.read(fd, 1 << 20)
            if not data:
                ended = True
                poller.unregister(fd)
                progress[ENDED] = 1
                continue
            now = time.monotonic_ns()
            chunk = (rest + data).split(b"\n")
            rest = chunk.pop()
            for line in chunk:
                parts = line.split(b" ", 2)
                if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
                    pid = int(parts[1])
                    if pid not in seen and pid in wanted:
                        ours += 1
                    seen[pid] = now - int(parts[0])
                    lines += 1
                    ready.set()
                elif m := re.match(rb"Lost (\d+) events", line):
                    lost += int(m.group(1))
                elif line.strip():
                    other.append(line.decode(errors="replace"))
            progress[OURS], progress[LOST], progress[SEEN] = ours, lost, lines
    code = proc.wait()
    got = [seen[pid] for pid in wanted if pid in seen]
    out.send(
        {
            "captured": len(got),
            "latencies_us": [latency / 1000 for latency in got],
            "lost": lost,
            "lines": lines,
            "exit_code": code,
            "other_output": other[-10:],
        }
    )


# --- the taps: one tool each, started before a storm and ended after its drain -----------


class Tap:
    """One tool capturing a storm; see the subclasses."""

    name = ""

    def tool_pid(self) -> int | None:
        """The tool's own process (kport's daemon)."""
        return None

    def client_pid(self) -> int | None:
        """Its client's process, where it has one of its own."""
        return None

    def ready(self) -> bool:
        return True

    def failure(self) -> str | None:
        """Why the tool cannot take part, once that is known."""
        return None

    def tell(self, wanted: dict[int, list[str]]) -> None:
        """The spawners are done: these are the storm's execs (pid → argv)."""

    def progress(self) -> tuple[int, int]:
        """(the storm's execs captured, loss reported) so far: what the drain watches."""
        return (0, 0)

    def idle(self) -> bool:
        """Nothing is held back on the tool's side (a drain ends only then)."""
        return True

    def finish(self) -> dict[str, Any]:
        """Stop capturing; what was captured."""
        return {}

    def close(self) -> None:
        """Make sure every process of the tap is gone."""


class _ClientTap(Tap):
    """A tap whose events reach a client process of the bench, ``target``."""

    def __init__(self, target: Any, args: tuple[Any, ...]) -> None:
        ctx = mp.get_context("spawn")
        self._ready = ctx.Event()
        self._progress = ctx.RawArray("q", 5)
        their_commands, self._commands = ctx.Pipe(duplex=False)
        self._results, their_results = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=target,
            args=(*args, Channels(self._ready, self._progress, their_commands, their_results)),
        )
        self._process.start()
        their_commands.close()
        their_results.close()

    def client_pid(self) -> int | None:
        return self._process.pid

    def ready(self) -> bool:
        return self._ready.is_set()

    def failure(self) -> str | None:
        if not self._process.is_alive() and not self._ready.is_set():
            return f"its client exited ({self._process.exitcode}) before it was ready"
        return None

    def tell(self, wanted: dict[int, list[str]]) -> None:
        self._commands.send(wanted)

    def progress(self) -> tuple[int, int]:
        return (self._progress[OURS], self._progress[LOST])

    def finish(self) -> dict[str, Any]:
        with contextlib.suppress(OSError):
            self._commands.send(None)
        if not self._results.poll(60):
            raise RuntimeError(f"{self.name}: its client did not report")
        result: dict[str, Any] = self._results.recv()
        self._process.join(30)
        return result

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)


class Daemon:
    """``kport serve`` with ``[proc] backend = BACKEND`` (the journal on, as by default),
    in its own runtime and state directories under ``workdir``."""

    def __init__(self, workdir: Path, backend: str, hashing: bool = True) -> None:
        self.backend = backend
        base = workdir / f"kport-{backend}-{time.monotonic_ns()}"
        self.rundir, statedir = base / "run", base / "state"
        self.rundir.mkdir(parents=True)
        statedir.mkdir()
        config = base / "kport.toml"
        config.write_text(
            tomli_w.dumps({"proc": {"backend": backend}, "hash": {"enabled": hashing}})
        )
        self.log = base / "serve.log"
        serve = ["serve", "--runtime-dir", str(self.rundir), "--state-dir", str(statedir)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "kport.cli", *serve, "--config", str(config)],
                stdout=out,
                stderr=out,
            )
        self.pid = self.process.pid
        try:
            self._wait_started()
        except BaseException:
            self.stop()
            raise

    def _wait_started(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"kport serve ({self.backend}) exited ({self.process.returncode}): "
                    f"{self._tail()}"
                )
            backend = None
            if (self.rundir / "control.sock").exists():
                with contextlib.suppress(Exception):  # not answering yet
                    backend = self.status()["sources"]["proc"]["backend"]
            if backend == self.backend:
                return
            if backend is not None:
                raise RuntimeError(f"kport serve: proc backend {backend}, not {self.backend}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"kport serve ({self.backend}) not ready: {self._tail()}")
            time.sleep(0.05)

    def _tail(self) -> str:
        text = self.log.read_text(errors="replace").strip() if self.log.exists() else ""
        return "\n".join(text.splitlines()[-15:]) or "(no output)"

    def status(self) -> dict[str, Any]:
        import kport

        with kport.connect("control", runtime_dir=self.rundir) as conn:
            status: dict[str, Any] = conn.send({"op": "status"}, timeout=5)
        return status

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


class KportTap(_ClientTap):
    """A client of one kport daemon's proc port."""

    def __init__(self, daemon: Daemon) -> None:
        self.name = f"kport {daemon.backend}"
        self.daemon = daemon
        super().__init__(_kport_client, (str(daemon.rundir),))

    def tool_pid(self) -> int | None:
        return self.daemon.pid

    def idle(self) -> bool:
        status = self.daemon.status()
        source = status["sources"]["proc"]
        mine = [c for c in status["ports"]["proc"]["connections"] if c["pid"] == self.client_pid()]
        return source.get("backlog", 0) == 0 and all(c["queue_depth"] == 0 for c in mine)


def _tracefs_missing() -> bool:
    return not any(
        os.path.isdir(f"{root}/events") for root in (TRACEFS, "/sys/kernel/debug/tracing")
    )


def bpftrace_command() -> tuple[list[str], str]:
    """The bpftrace command line, and a note on how it runs here."""
    command = ["bpftrace", "-B", "none", "-e", BPFTRACE_PROGRAM]
    if not _tracefs_missing():
        return command, "bpftrace as is"
    # Without tracefs bpftrace finds no tracepoint. Mounted in a mount namespace of its
    # own, nothing outside it changes; unshare and sh exec, so the pid is bpftrace's.
    script = f"mount -t tracefs tracefs {TRACEFS} && exec {shlex.join(command)}"
    return (
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        f"tracefs is not mounted here ({TRACEFS} is empty, and without it bpftrace says "
        "'tracepoint not found: sched:sched_process_exec'): bpftrace runs in a mount "
        "namespace of its own with tracefs mounted there",
    )


class BpftraceTap(_ClientTap):
    """bpftrace's one-liner, its output read by a collector process (the client)."""

    name = "bpftrace"

    def __init__(self, workdir: Path) -> None:
        self._stderr = workdir / f"bpftrace-{time.monotonic_ns()}.err"
        command, _ = bpftrace_command()
        super().__init__(_bpftrace_collector, (command, str(self._stderr)))

    def tool_pid(self) -> int | None:
        return self._progress[TOOL_PID] or None

    def failure(self) -> str | None:
        if self._progress[ENDED] and not self._ready.is_set():
            text = self._stderr.read_text(errors="replace").strip()
            return f"bpftrace exited before its probe reported anything: {text}"
        return super().failure()

    def stderr(self) -> str:
        return self._stderr.read_text(errors="replace").strip() if self._stderr.exists() else ""

    def close(self) -> None:
        pid = self.tool_pid()
        if pid and self._progress[ENDED] == 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGINT)
        super().close()


_FORKSTAT_EXEC = re.compile(r"^\S+ exec\s+(\d+)\s+(.*)$")


class ForkstatTap(Tap):
    """``forkstat -e exec -l`` writing into a file (a pipe read only at the end would fill
    and stall it), read by the bench as it grows."""

    name = "forkstat"

    def __init__(self, workdir: Path) -> None:
        self._path = workdir / f"forkstat-{time.monotonic_ns()}.log"
        self._out = self._path.open("wb")
        self._process = subprocess.Popen(
            ["forkstat", "-e", "exec", "-l"], stdout=self._out, stderr=subprocess.STDOUT
        )
        self._reader = self._path.open("rb")
        self._rest = b""
        #: each exec line's command line, by pid (the last, should one pid exec twice)
        self.lines: dict[int, str] = {}
        self.nobufs = 0
        self._wanted: dict[int, list[str]] = {}
        self._ours = 0

    def tool_pid(self) -> int | None:
        return self._process.pid

    def _read(self) -> None:
        data = self._reader.read()
        if not data:
            return
        chunk = (self._rest + data).split(b"\n")
        self._rest = chunk.pop()
        for raw in chunk:
            line = raw.decode(errors="replace")
            m = _FORKSTAT_EXEC.match(line)
            if m:
                pid = int(m.group(1))
                if pid not in self.lines and pid in self._wanted:
                    self._ours += 1
                self.lines[pid] = m.group(2)
            elif " nobufs " in line:
                self.nobufs += 1

    def ready(self) -> bool:
        self._read()
        return bool(self.lines)

    def failure(self) -> str | None:
        if self._process.poll() is not None:
            return f"forkstat exited ({self._process.returncode}): {self._path.read_text()[-500:]}"
        return None

    def tell(self, wanted: dict[int, list[str]]) -> None:
        self._wanted = wanted
        self._ours = sum(1 for pid in self.lines if pid in wanted)

    def progress(self) -> tuple[int, int]:
        self._read()
        return (self._ours, self.nobufs)

    def finish(self) -> dict[str, Any]:
        self._process.send_signal(signal.SIGINT)
        self._process.wait(30)
        self._read()
        got = {pid: self.lines[pid] for pid in self._wanted if pid in self.lines}
        return {
            "captured": len(got),
            # its command line as it shows it: argv joined by spaces, from /proc at the
            # time it read it
            "exact_argv": sum(1 for pid, text in got.items() if text.split() == self._wanted[pid]),
            "nobufs": self.nobufs,
        }

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(10)
        self._out.close()
        self._reader.close()


# --- one storm, every tap at once --------------------------------------------------------


def _await_ready(taps: list[Tap]) -> dict[str, str]:
    """Wait until each tap is ready (one exec seen where that is the signal); the taps that
    failed or are not ready in time, with why."""
    failed: dict[str, str] = {}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        for tap in taps:
            reason = tap.failure() if tap.name not in failed else None
            if reason:
                failed[tap.name] = reason
        waiting = [t for t in taps if t.name not in failed and not t.ready()]
        if not waiting:
            return failed
        if time.monotonic() > deadline:
            for tap in waiting:
                failed[tap.name] = f"not ready after {READY_TIMEOUT_S:g} s"
            return failed
        _sentinel()
        time.sleep(0.1)


def _drain(taps: list[Tap], wanted: int) -> dict[str, dict[str, Any]]:
    """After the spawners: wait until each tap has every exec, or its count and loss have
    not moved for QUIET_S with nothing held back, or DRAIN_DEADLINE_S. For each, how long
    after the spawners its last exec came, and how its drain ended."""
    done = time.monotonic()
    deadline = done + DRAIN_DEADLINE_S
    last = {t.name: (t.progress(), done) for t in taps}
    out: dict[str, dict[str, Any]] = {}
    while len(out) < len(taps):
        now = time.monotonic()
        for tap in taps:
            if tap.name in out:
                continue
            progress = tap.progress()
            if progress != last[tap.name][0]:
                last[tap.name] = (progress, now)
            changed = last[tap.name][1]
            if progress[0] >= wanted:
                out[tap.name] = {"ended": "complete", "drain_s": now - done}
            elif now - changed >= QUIET_S and tap.idle():
                out[tap.name] = {"ended": "quiet", "drain_s": changed - done}
            elif now > deadline:
                out[tap.name] = {"ended": "deadline", "drain_s": now - done}
        time.sleep(DRAIN_POLL_S)
    return out


def _status_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What the daemon's proc source and port counted during the storm."""
    src0, src1 = before["sources"]["proc"], after["sources"]["proc"]
    delta = {
        k: src1[k] - src0[k]
        for k in ("events", "lost", "resyncs", "kernel_records", "kernel_dropped")
        if k in src1
    }
    delta["port_lost"] = after["ports"]["proc"]["lost"] - before["ports"]["proc"]["lost"]
    return delta


def _capture(storm: Storm, taps: list[Tap]) -> dict[str, Any]:
    """Run ``storm`` with every tap capturing it; per tap, what it captured and cost."""
    results: dict[str, Any] = {}
    machine: dict[str, Any] = {}
    try:
        failed = _await_ready(taps)
        for name, reason in failed.items():
            results[name] = {"failed": reason}
        active = [t for t in taps if t.name not in failed]
        daemons = [t.daemon for t in active if isinstance(t, KportTap)]
        before = {d.backend: d.status() for d in daemons}
        cpu0 = {t.name: (_cpu_seconds(t.tool_pid()), _cpu_seconds(t.client_pid())) for t in active}
        machine0 = _machine_cpu()
        wanted, elapsed = _spawn(storm)
        for tap in active:
            tap.tell(wanted)
        drains = _drain(active, len(wanted))
        cpu1 = {t.name: (_cpu_seconds(t.tool_pid()), _cpu_seconds(t.client_pid())) for t in active}
        machine1 = _machine_cpu()
        after = {d.backend: d.status() for d in daemons}
        spawned = len(wanted)
        for tap in active:
            got = tap.finish()
            lat = got.pop("latencies_us", None)
            row: dict[str, Any] = {
                "spawned": spawned,
                "rate": spawned / elapsed,
                **drains[tap.name],
                **got,
                "missing": spawned - got["captured"],
            }
            if lat is not None:
                row["latency_us"] = {
                    "p50": percentile(lat, 50),
                    "p99": percentile(lat, 99),
                    "max": max(lat, default=0.0),
                }
            for i, who in enumerate(("tool", "client")):
                start, end = cpu0[tap.name][i], cpu1[tap.name][i]
                if start is not None and end is not None:
                    row[f"{who}_cpu_s"] = end - start
                    row[f"{who}_cpu_s_per_1000"] = (end - start) / spawned * 1000
            if isinstance(tap, KportTap):
                row["daemon"] = _status_delta(before[tap.daemon.backend], after[tap.daemon.backend])
                # every exec came with its argv, or the loss reported covers it
                row["accounts_for_all"] = (
                    spawned - row["exact_argv"] <= row["lost"] and not row["lost_unknown"]
                ) or row["exact_argv"] == spawned
            if isinstance(tap, BpftraceTap):
                row["stderr"] = tap.stderr()
            results[tap.name] = row
        busy, steal = (b - a for a, b in zip(machine0, machine1, strict=True))
        others = [r["exec_events"] - r["captured"] for r in results.values() if "exec_events" in r]
        machine = {
            "busy_cpu_s": busy,
            "steal_cpu_s": steal,
            # execs of other programs on the machine meanwhile (seen by a kport client)
            "other_execs": max(others, default=None),
        }
    finally:
        for tap in taps:
            tap.close()
    return {"storm": storm.label, "spawners": storm.spawners, "tools": results, "machine": machine}


# --- hashing executables -------------------------------------------------------------------


def hashing(workdir: Path, program: str, count: int, pairs: int = HASH_PAIRS) -> dict[str, Any]:
    """What ``exe_sha256`` costs: the same storm (``count`` execs of ``program`` from 2
    spawners) into a bpf daemon with [hash] off and one with it on, ``pairs`` times in
    turn (off first, then on first), each daemon fresh. With it on the program is hashed
    at its first exec and every other is a cache hit (warm); what a miss costs (cold) is
    timed in this process, through a live process's /proc/<pid>/exe and by path, with the
    cache emptied before each."""
    rounds: list[dict[str, Any]] = []
    for n in range(1, pairs + 1):
        # off-on, then on-off: whatever drifts in a run weighs on both alike
        for on in (False, True) if n % 2 else (True, False):
            with _daemons(workdir, ("bpf",), hashing=on) as (daemon,):
                storm = Storm(
                    f"h{int(on)}{n}", f"hash {'on' if on else 'off'} #{n}", program, count, 2
                )
                got = _capture(storm, [KportTap(daemon)])
                row = got["tools"]["kport bpf"]
                hashes = daemon.status().get("hashes")
            rounds.append(
                {
                    "hash": on,
                    "round": n,
                    "spawned": row.get("spawned"),
                    "captured": row.get("captured"),
                    "cpu_s_per_1000": row.get("tool_cpu_s_per_1000"),
                    "p99_us": row.get("latency_us", {}).get("p99"),
                    "steal_cpu_s": got["machine"].get("steal_cpu_s"),
                    "hashes": hashes,
                }
            )

    def median(on: bool, key: str) -> float | None:
        values = [r[key] for r in rounds if r["hash"] is on and r[key] is not None]
        return statistics.median(values) if values else None

    off_cpu, on_cpu = median(False, "cpu_s_per_1000"), median(True, "cpu_s_per_1000")
    overhead = on_cpu / off_cpu - 1 if on_cpu is not None and off_cpu else None
    lookup = lookup_cost(program)
    # the same share from the lookup's own cost, which the machine's noise moves less
    estimate = lookup["live_warm"] / (off_cpu * 1000) if off_cpu else None
    return {
        "program": program,
        "execs": count,
        "rounds": rounds,
        "cpu_s_per_1000": {"off": off_cpu, "on_warm": on_cpu},
        "p99_us": {"off": median(False, "p99_us"), "on_warm": median(True, "p99_us")},
        "overhead": overhead,
        "overhead_from_lookup": estimate,
        "target": HASH_TARGET,
        "met": overhead is not None and overhead <= HASH_TARGET,
        "lookup_us": lookup,
    }


def lookup_cost(program: str, n: int = 2000) -> dict[str, float]:
    """µs per Hasher.of_process: a cache hit and a miss (cold: the cache emptied first),
    through a live process's exe, and by path for ``program`` (a process gone already)."""
    from kport.sources.hashes import Hasher

    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        exe = os.readlink(f"/proc/{sleeper.pid}/exe")
        gone = 2**22 + 1  # above any pid_max: looked up by path
        out: dict[str, float] = {}
        for label, pid, path in (("live", sleeper.pid, exe), ("by_path", gone, program)):
            hasher = Hasher()
            hasher.of_process(pid, path)
            warm = timeit.timeit(lambda: hasher.of_process(pid, path), number=n)  # noqa: B023
            clear = hasher._cache.clear  # (a bench may: nothing else empties it)
            cold = timeit.timeit(lambda: (clear(), hasher.of_process(pid, path)), number=n // 10)  # noqa: B023
            out[f"{label}_warm"] = warm / n * 1e6
            out[f"{label}_cold"] = cold / (n // 10) * 1e6
            out[f"{label}_bytes"] = float(os.stat(path).st_size)
        return out
    finally:
        sleeper.kill()
        sleeper.wait()


def _show_hashing(result: dict[str, Any]) -> None:
    print(f"\nexe_sha256 in a storm of {result['execs']:,} execs of {result['program']} (bpf):")
    for r in result["rounds"]:
        print(
            f"  hash {'on ' if r['hash'] else 'off'} #{r['round']}: "
            f"daemon CPU {_fmt_num(r['cpu_s_per_1000'], 3)} s per 1,000 execs, "
            f"p99 {_fmt_num(r['p99_us'])} µs, captured {_fmt_int(r['captured'])} of "
            f"{_fmt_int(r['spawned'])}, steal {_fmt_num(r['steal_cpu_s'], 2)} s"
        )
    cpu, p99, lookup = result["cpu_s_per_1000"], result["p99_us"], result["lookup_us"]
    overhead = result["overhead"]
    print(
        f"  medians: off {_fmt_num(cpu['off'], 3)} s, on (warm cache) "
        f"{_fmt_num(cpu['on_warm'], 3)} s per 1,000 execs; p99 off {_fmt_num(p99['off'])} µs, "
        f"on {_fmt_num(p99['on_warm'])} µs"
    )
    print(
        f"  one lookup, warm / cold: through /proc/<pid>/exe {lookup['live_warm']:.1f} / "
        f"{lookup['live_cold']:.0f} µs ({lookup['live_bytes'] / 1024:.0f} KiB), by path "
        f"{lookup['by_path_warm']:.1f} / {lookup['by_path_cold']:.0f} µs "
        f"({lookup['by_path_bytes'] / 1024:.1f} KiB)"
    )
    verdict = "met" if result["met"] else "NOT met"
    shown = "?" if overhead is None else f"{overhead * 100:+.1f} %"
    print(
        f"  target: hashing with a warm cache costs <= 10 % more CPU per exec: {shown}, {verdict}"
    )
    estimate = result["overhead_from_lookup"]
    if estimate is not None:
        print(
            f"  (a warm lookup is {estimate * 100:.1f} % of the daemon's CPU per exec with "
            "hashing off: the rest of any difference above is this machine's noise)"
        )


# --- the parser ---------------------------------------------------------------------------


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


# --- the whole bench -----------------------------------------------------------------------


def _install(tool: str) -> None:
    if shutil.which(tool) is None:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", tool],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


@contextlib.contextmanager
def _daemons(
    workdir: Path, backends: tuple[str, ...], hashing: bool = True
) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    try:
        for backend in backends:
            started.append(Daemon(workdir, backend, hashing))
        yield started
    finally:
        for daemon in started:
            daemon.stop()


def _fmt_int(value: Any) -> str:
    return "n/a" if value is None else f"{value:,}"


def _fmt_num(value: Any, digits: int = 0) -> str:
    return "n/a" if value is None else f"{value:,.{digits}f}"


def _paced_label(tool: str, run: dict[str, Any]) -> str:
    return f"{tool}, {run['mode']}" + (f" #{run['round']}" if "round" in run else "")


def _show(storms: list[dict[str, Any]], paced: list[dict[str, Any]], parse: dict[str, float],
          targets: dict[str, dict[str, Any]], bpftrace_note: str) -> None:  # fmt: skip
    table = Table(
        "Exec storms, every tool capturing the same execs at once (tiny: a static ELF of"
        " ~130 bytes that exits at once; xN: N spawners at nice 19; drain: how it ended and"
        " when the tool's last exec came after the spawners were done)",
        [
            "storm",
            "tool",
            "spawned",
            "execs/s",
            "captured",
            "exact argv",
            "missing",
            "loss reported",
            "drain",
        ],
    )
    for storm in storms:
        for name, r in storm["tools"].items():
            if "failed" in r:
                table.row(storm["storm"], name, "did not run: " + r["failed"][:90], *[""] * 6)
                continue
            if name.startswith("kport"):
                loss = f"{r['lost']:,}" + (
                    f" +{r['lost_unknown']} unknown" if r["lost_unknown"] else ""
                )
            elif name == "forkstat":
                loss = f"{r['nobufs']} ENOBUFS (count n/a)" if r["nobufs"] else "0"
            else:
                loss = f"{r['lost']:,}"
            argv = "n/a (filename only)" if name == "bpftrace" else _fmt_int(r.get("exact_argv"))
            table.row(
                storm["storm"],
                name,
                f"{r['spawned']:,}",
                f"{r['rate']:,.0f}",
                f"{r['captured']:,}",
                argv,
                f"{r['missing']:,}",
                loss,
                f"{r['ended']} {r['drain_s']:.1f} s",
            )
    table.show()
    table = Table(
        "Storms: latency kernel → client (µs) and CPU s per 1,000 execs "
        "(tool = daemon / forkstat / bpftrace; client = kport client / bpftrace's reader)",
        ["storm", "tool", "p50 µs", "p99 µs", "max µs", "tool CPU", "client CPU"],
    )
    for storm in storms:
        for name, r in storm["tools"].items():
            if "failed" in r:
                continue
            lat = r.get("latency_us") or {}
            table.row(
                storm["storm"],
                name,
                _fmt_num(lat.get("p50")),
                _fmt_num(lat.get("p99")),
                _fmt_num(lat.get("max")),
                _fmt_num(r.get("tool_cpu_s_per_1000"), 3),
                "n/a (none)" if name == "forkstat" else _fmt_num(r.get("client_cpu_s_per_1000"), 3),
            )
    table.show()
    table = Table(
        f"Paced {PACED_RATE:,.0f} execs/s, journal on: together (both daemons capturing the"
        " same execs), then alone (one daemon running), the backends taking turns",
        [
            "run",
            "spawned",
            "execs/s",
            "captured",
            "exact argv",
            "lost",
            "p50 µs",
            "p99 µs",
            "max µs",
            "daemon CPU",
            "client CPU",
        ],
    )
    for run in paced:
        for name, r in run["tools"].items():
            if "failed" in r:
                table.row(_paced_label(name, run), "did not run: " + r["failed"][:90])
                continue
            lat = r["latency_us"]
            table.row(
                _paced_label(name, run),
                f"{r['spawned']:,}",
                f"{r['rate']:,.0f}",
                f"{r['captured']:,}",
                f"{r['exact_argv']:,}",
                f"{r['lost']:,}",
                f"{lat['p50']:.0f}",
                f"{lat['p99']:.0f}",
                f"{lat['max']:.0f}",
                _fmt_num(r.get("tool_cpu_s_per_1000"), 3),
                _fmt_num(r.get("client_cpu_s_per_1000"), 3),
            )
    table.show()
    table = Table(
        "The machine during each run: CPU busy and stolen by the hypervisor (s), and execs"
        " of other programs that kport saw meanwhile",
        ["run", "seconds busy", "seconds stolen", "other execs"],
    )
    for run in [*storms, *paced]:
        m = run.get("machine") or {}
        table.row(
            run["storm"],
            _fmt_num(m.get("busy_cpu_s"), 1),
            _fmt_num(m.get("steal_cpu_s"), 1),
            _fmt_int(m.get("other_execs")),
        )
    table.show()
    table = Table("Proc connector event parser, µs per message", ["parser", "µs"])
    table.row("kport (struct)", f"{parse['kport_us']:.2f}")
    table.row("pyroute2 ProcEventMarshal", f"{parse['pyroute2_us']:.2f}")
    table.show()
    table = Table("Targets", ["target", "met", "figures"])
    for name, t in targets.items():
        table.row(name, "yes" if t["met"] else "NO", t["figures"])
    table.show()
    print(f"bpftrace: {bpftrace_note}")


def _targets(
    storms: list[dict[str, Any]], paced: list[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    targets: dict[str, dict[str, Any]] = {}
    figures, met = [], True
    for storm in storms:
        r = storm["tools"].get("kport bpf", {})
        if "failed" in r or not r:
            figures.append(f"{storm['storm']}: did not run")
            met = False
            continue
        met = met and r["accounts_for_all"]
        figures.append(
            f"{storm['storm']}: {r['exact_argv']:,}/{r['spawned']:,} with argv, lost {r['lost']:,}"
        )
    targets["bpf: every exec delivered with its argv, or counted lost (every storm)"] = {
        "met": met,
        "figures": "; ".join(figures),
    }
    figures, met = [], True
    for storm in storms:
        bpf = storm["tools"].get("kport bpf", {}).get("tool_cpu_s_per_1000")
        conn = storm["tools"].get("kport connector", {}).get("tool_cpu_s_per_1000")
        if bpf is None or conn is None:
            figures.append(f"{storm['storm']}: n/a")
            met = False
            continue
        met = met and bpf <= CPU_SHARE_TARGET * conn
        share = f"{bpf / conn:.2f}x" if conn else "n/a"
        figures.append(f"{storm['storm']}: {bpf:.3f} vs {conn:.3f} s ({share})")
    targets[f"bpf daemon CPU per 1,000 execs <= {CPU_SHARE_TARGET}x connector's (same storm)"] = {
        "met": met,
        "figures": "; ".join(figures),
    }
    runs = [
        (p["tools"]["kport bpf"], (p.get("machine") or {}).get("steal_cpu_s"))
        for p in paced
        if p["mode"] == "alone" and "latency_us" in p["tools"].get("kport bpf", {})
    ]
    name = f"bpf p99 <= {P99_TARGET_US / 1000:g} ms at {PACED_RATE:,.0f} execs/s, journal on, alone"
    if not runs:
        targets[name] = {"met": False, "figures": "n/a"}
        return targets
    p99 = statistics.median(r["latency_us"]["p99"] for r, _ in runs)
    delivered = all(r["captured"] == r["spawned"] for r, _ in runs)
    each = ", ".join(
        f"{r['latency_us']['p99']:,.0f} µs"
        + ("" if stolen is None else f" ({stolen:.1f} s stolen)")
        for r, stolen in runs
    )
    targets[name] = {
        "met": p99 <= P99_TARGET_US and delivered,
        "figures": f"median p99 {p99:,.0f} µs of {len(runs)} runs ({each}); "
        + ("every exec delivered" if delivered else "NOT every exec delivered"),
    }
    return targets


def run(count: int = 20_000, rounds: int = 5_000, json_dir: str | None = None) -> dict[str, Any]:
    """``count`` execs per storm of the tiny program (a quarter of it of /bin/true), and
    ``rounds`` execs in each paced run."""
    if os.geteuid() != 0:
        raise SystemExit("kport bench proc: run as root (eBPF and the proc connector need it)")
    _install("forkstat")
    _install("bpftrace")
    started = time.monotonic()
    bpftrace_note = bpftrace_command()[1]
    others = _others()
    if others:
        print("kport bench proc: other kport daemons or test runs are loading this machine;")
        print("the figures will show it:\n  " + "\n  ".join(others))
    with tempfile.TemporaryDirectory(prefix="kport-bench-proc-") as tmp:
        workdir = Path(tmp)
        program = tiny_program(tmp)
        tiny = "tiny" if program != "/bin/true" else "/bin/true"
        true_count = max(count // 4, 1000)
        plan = [
            Storm("t2", f"{tiny} x2 ({count:,})", program, count, 2),
            Storm("t4", f"{tiny} x4 ({count:,})", program, count, 4),
            Storm("bt", f"/bin/true x2 ({true_count:,})", "/bin/true", true_count, 2),
        ]
        storms: list[dict[str, Any]] = []
        paced: list[dict[str, Any]] = []
        bpftrace_failed: str | None = None

        def paced_storm(key: str) -> Storm:
            return Storm(key, "paced", program, rounds, PACED_SPAWNERS, PACED_RATE)

        with _daemons(workdir, BACKENDS) as daemons:
            for storm in plan:
                taps: list[Tap] = [KportTap(d) for d in daemons]
                taps.append(ForkstatTap(workdir))
                if bpftrace_failed is None:
                    taps.append(BpftraceTap(workdir))
                result = _capture(storm, taps)
                if bpftrace_failed is not None:
                    result["tools"]["bpftrace"] = {"failed": bpftrace_failed}
                bpftrace_failed = result["tools"].get("bpftrace", {}).get("failed")
                storms.append(result)
            together = _capture(paced_storm("p2"), [KportTap(d) for d in daemons])
            together["storm"] = "paced, together"
            paced.append({"mode": "together", **together})
        for n in range(1, PACED_ALONE_ROUNDS + 1):
            for backend in BACKENDS:
                with _daemons(workdir, (backend,)) as (daemon,):
                    alone = _capture(paced_storm(f"p{backend[0]}{n}"), [KportTap(daemon)])
                    alone["storm"] = f"paced, {backend} alone #{n}"
                    paced.append({"mode": "alone", "round": n, **alone})
        hashed = hashing(workdir, "/bin/true", true_count)
    parse = parser_speed()
    targets = _targets(storms, paced)
    if bpftrace_failed:
        bpftrace_note = f"did not run: {bpftrace_failed}"
    else:
        said = next((s["tools"]["bpftrace"].get("stderr") for s in storms), "")
        bpftrace_note += f"; it ran, its stderr: {said!r}" if said else "; it ran"
    _show(storms, paced, parse, targets, bpftrace_note)
    _show_hashing(hashed)
    seconds = time.monotonic() - started
    print(f"the bench took {seconds:.0f} s")
    result = {
        "bench": "proc",
        "program": "tiny static ELF" if tiny == "tiny" else tiny,
        "storm_execs": count,
        "true_execs": true_count,
        "paced_execs": rounds,
        "paced_rate": PACED_RATE,
        "quiet_s": QUIET_S,
        "drain_deadline_s": DRAIN_DEADLINE_S,
        "bpftrace": {"command": bpftrace_command()[0], "note": bpftrace_note},
        "storms": storms,
        "paced": paced,
        "parser": parse,
        "hashing": hashed,
        "targets": targets,
        "seconds": seconds,
        "others_at_start": others,
    }
    save_results("proc", result, json_dir)
    return result
