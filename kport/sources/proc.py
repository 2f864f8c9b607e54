"""The proc source: process events from the kernel, enriched and kept in a process table.

Two backends. ``bpf`` (proc_bpf.py): programs on the sched_process_* tracepoints read each
exec whole in the kernel, at the moment itself (ids, start time, exe, argv, cwd, cgroup),
into a ring buffer that one thread drains; nothing is read from /proc after the fact, so
a process that lives a millisecond arrives with its argv. The ring is the bounded queue:
when it is full the kernel refuses the record and counts it, per CPU, and the count
becomes a ``lost`` event. ``connector``: the netlink proc connector, enriched from /proc,
where eBPF cannot load; ``auto`` takes the first that works and says which.

The connector backend has two threads: the reader does nothing but receive and parse
datagrams (so the socket's buffer drains even while /proc is slow), the processor
enriches each event from /proc, keeps the table, and hands batches of finished events to
``emit``. Both backends, under load (more than ``batch_above`` events a second), take
what has come at most once per batch window: each wake-up costs far more than an event,
so a storm is carried in batches, at up to one window more latency. Loss is never
silent: a full ring, an overflow of the connector's socket (``ENOBUFS`` and the sequence
gaps after it are one loss, counted by the socket's drops) and a full hand-off queue each
become one ``lost`` event with its count, followed by a resync of the table from /proc
(synthetic events, flagged).

Given a hasher (kport.sources.hashes), each exec carries ``exe_sha256``, the content of the
program it runs, and the table keeps it (a fork inherits it; file and net events read it).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import logging
import queue
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from kport import identity
from kport.errors import KportError
from kport.sources import netlink_proc, proc_bpf, procinfo
from kport.sources.hashes import Hasher
from kport.sources.proc_bpf import BpfUnavailable, ProcBpf

log = logging.getLogger("kport.proc")

HANDOFF_LIMIT: Final = 200_000
#: datagrams the reader takes per wake-up, at most; and how long it blocks in one read
DRAIN_DATAGRAMS: Final = 256
READ_WAIT_S: Final = 0.2
#: events per second above which the reader batches (see the module docstring); a
#: process run is three (fork, exec, exit): 4500 is 1500 runs a second
BATCH_ABOVE: Final = 4500
#: why a connector loss happened, as a lost event says
_ENOBUFS: Final = "the kernel dropped events: the socket's buffer was full (ENOBUFS)"
#: how long the reader waits between reads while batching
BATCH_WINDOW_S: Final = 0.002
_RATE_SLICE_S: Final = 0.1
#: exited processes the table remembers, the most recent ones
EXITED: Final = 4096
_ENRICHED: Final = (
    "exe",
    "argv",
    "cwd",
    "uid",
    "gid",
    "user",
    "ppid",
    "start_time",
    "cgroup",
    "tty",
)
#: how often the eBPF reader reads the kernel's drop counters while records flow (it also
#: reads them whenever it waited in vain): a drop with no record after it is seen by then
COUNTERS_EVERY_S: Final = 1.0
BACKENDS: Final = ("auto", "bpf", "connector")
#: what the eBPF backend takes from the proc connector: the kinds no tracepoint gives
SIDE_EVENTS: Final = (
    netlink_proc.EV_UID
    | netlink_proc.EV_GID
    | netlink_proc.EV_SID
    | netlink_proc.EV_COMM
    | netlink_proc.EV_PTRACE
    | netlink_proc.EV_COREDUMP
)
Event = dict[str, Any]
Emit = Callable[[list[Event]], None]


def _wait_status(status: int) -> Event:
    """An exit's wait status as the event tells it: code, signal, core dump."""
    return {
        "code": (status >> 8) & 0xFF if status & 0x7F == 0 else None,
        "signal": status & 0x7F or None,
        "core": bool(status & 0x80),
    }


#: what an event says of a process the table does not know
_UNKNOWN: Final[Event] = dict.fromkeys(_ENRICHED)
_NS_PER_TICK: Final = procinfo.NS_PER_TICK


class ProcessTable:
    """Every process kport knows of, by pid, with the identity and details it reports."""

    def __init__(self) -> None:
        self.procs: dict[int, Event] = {}
        #: the last EXITED processes, by pid: an event read after its process exited
        #: (a file notification) can still name it
        self.exited: OrderedDict[int, Event] = OrderedDict()

    def __len__(self) -> int:
        return len(self.procs)

    def get(self, pid: int) -> Event | None:
        return self.procs.get(pid)

    def lookup(self, pid: int) -> Event | None:
        """The live process ``pid``, else the last one that exited with that pid."""
        entry = self.procs.get(pid)
        return entry if entry is not None else self.exited.get(pid)

    def exited_entry(self, pid: int) -> Event | None:
        """The last process ``pid`` named, once its exit has been applied here (while the
        pid names no live process in the table): an account that saw every exec of it."""
        return None if pid in self.procs else self.exited.get(pid)

    def candidates(self, uid: int | None) -> list[int]:
        """Every live pid, those of ``uid`` first and the most recently started first
        among them: who most likely owns a socket ``uid`` just opened."""
        entries = list(self.procs.items())  # the reader thread may add to it meanwhile
        entries.sort(key=lambda item: item[1].get("start_time") or 0, reverse=True)
        mine = [pid for pid, entry in entries if entry.get("uid") == uid]
        return mine + [pid for pid, entry in entries if entry.get("uid") != uid]

    def remove(self, pid: int) -> Event | None:
        """Take ``pid`` out of the table at its exit, keeping it among the recently exited."""
        entry = self.procs.pop(pid, None)
        if entry is not None:
            self.exited[pid] = entry
            self.exited.move_to_end(pid)
            if len(self.exited) > EXITED:
                self.exited.popitem(last=False)
        return entry

    def ancestry(self, pid: int, limit: int = 64) -> list[dict[str, Any]]:
        """The parent chain of ``pid``, nearest first: [{pid, start_time, exe}, ...]."""
        chain: list[dict[str, Any]] = []
        seen = {pid}
        entry = self.procs.get(pid)
        while entry is not None and len(chain) < limit:
            ppid = entry.get("ppid")
            if not ppid or ppid in seen:
                break
            seen.add(ppid)
            entry = self.procs.get(ppid)
            chain.append(
                {
                    "pid": ppid,
                    "start_time": entry.get("start_time") if entry else None,
                    "exe": entry.get("exe") if entry else None,
                }
            )
        return chain


class ProcSource:
    """Process events from the proc connector (see the module docstring)."""

    name: Final = "proc"

    def __init__(
        self,
        emit: Emit,
        *,
        threads: bool = False,
        rcvbuf: int = 64 << 20,
        batch_window_s: float = BATCH_WINDOW_S,
        batch_above: int = BATCH_ABOVE,
        backend: str = "auto",
        argv_max: int = 4096,
        ring_bytes: int = proc_bpf.RING_DEFAULT,
        hasher: Hasher | None = None,
    ) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"proc backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        self.emit = emit
        self.threads = threads
        self.hasher = hasher
        self.wanted = backend
        #: the backend in use once started, and why auto did not take eBPF
        self.backend: str | None = None
        self.fallback_reason: str | None = None
        self.argv_max = argv_max
        self.ring_bytes = ring_bytes
        self._bpf: ProcBpf | None = None
        #: per CPU, the kernel's drop count up to which losses have been reported
        self._drops: dict[int, int] = {}
        #: exits of one process reported twice by two of its threads ending at once
        self.duplicates = 0
        #: records taken from the kernel's ring (with the drops it counted: all it made)
        self.records = 0
        self._texts = proc_bpf.Texts()
        #: with eBPF: are uid, gid, sid, comm, ptrace and coredump events reported (from
        #: the proc connector), and if not, why
        self.side_events: str | None = None
        self.batch_window_s = batch_window_s
        self.batch_above = batch_above
        self.table = ProcessTable()
        self.events = 0
        self.lost = 0
        self.resyncs = 0
        #: batches the reader handed on (one per wake-up that found events)
        self.batches = 0
        self._rcvbuf = rcvbuf
        self._sock: socket.socket | None = None
        #: lists of raw events, one per reader wake-up; at most HANDOFF_LIMIT events in
        #: all (counted by the reader as handed, by the processor as taken)
        self._handoff: queue.SimpleQueue[list[netlink_proc.RawEvent]] = queue.SimpleQueue()
        self._handed = 0
        self._taken = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._last_seq: dict[int, int] = {}
        self._pending_lock = threading.Lock()
        self._pending_lost: int | None = None

    def status(self) -> dict[str, Any]:
        extra: dict[str, Any] = {}
        counters: list[tuple[int, int]] = []
        if self._bpf is not None:
            with contextlib.suppress(OSError):  # stopped: the last counts are all there is
                counters = self._bpf.counters()
            extra = {
                "programs": self._bpf.flavour,
                "kernel_records": sum(c[0] for c in counters),
                "kernel_dropped": sum(c[1] for c in counters),
                "records": self.records,
                "duplicates": self.duplicates,
                "side_events": self.side_events,
            }
        elif self.fallback_reason:
            extra = {"fallback_reason": self.fallback_reason}
        return {
            "backend": self.backend,
            **extra,
            "events": self.events,
            "lost": self.lost,
            "resyncs": self.resyncs,
            "batches": self.batches,
            "table": len(self.table),
            "backlog": self._handed - self._taken,
        }

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Attach to the kernel (raises if it or our privileges do not allow it), seed the
        table from /proc, then run."""
        if self.wanted in ("auto", "bpf"):
            try:
                self._bpf = ProcBpf(
                    argv_max=self.argv_max, threads=self.threads, ring_bytes=self.ring_bytes
                )
            except BpfUnavailable as err:
                if self.wanted == "bpf":
                    raise BpfUnavailable(f"proc.backend = bpf cannot load: {err}") from err
                self.fallback_reason = str(err)
                log.warning("proc: eBPF cannot load (%s); using the proc connector", err)
        if self._bpf is not None:
            self.backend = "bpf"
            log.info("proc: eBPF backend (%s programs)", self._bpf.flavour)
            side = self._side_socket()
            # Attached before seeding, so nothing falls between the two.
            self.emit(self._seed())
            thread = threading.Thread(
                target=self._bpf_loop, args=(side,), name="kport-proc-bpf", daemon=True
            )
            thread.start()
            self._threads.append(thread)
            return
        self.backend = "connector"
        log.info("proc: proc connector backend")
        self._sock = sock = netlink_proc.open_socket(self._rcvbuf)
        # Blocking reads that give up after READ_WAIT_S, so the reader notices stop():
        # one recv per wake-up (a Python-level timeout would poll() before every recv).
        sock.settimeout(None)
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, int(READ_WAIT_S * 1e6))
        )
        # Subscribe before seeding, so nothing falls between the two.
        self.emit(self._seed())
        for target, name in (
            (self._read_loop, "kport-proc-reader"),
            (self._process_loop, "kport-proc-processor"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def _side_socket(self) -> socket.socket | None:
        """With eBPF: the proc connector for uid, gid, sid, comm, ptrace and coredump,
        which no tracepoint gives, subscribed to those kinds alone (the kernel drops the
        rest for this socket), read by the eBPF thread beside its ring."""
        if not netlink_proc.can_filter():
            self.side_events = "no: this kernel cannot limit a subscription (Linux 6.6+)"
        else:
            try:
                sock = netlink_proc.open_socket(4 << 20, events=SIDE_EVENTS)
            except KportError as err:
                self.side_events = f"no: {err}"
            else:
                sock.setblocking(False)
                self._sock = sock  # unsubscribed and closed by stop()
                self.side_events = "yes"
                return sock
        log.warning("proc: uid, gid, sid, comm, ptrace and coredump events: %s", self.side_events)
        return None

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self._sock is not None:
            netlink_proc.unsubscribe(self._sock)
            self._sock.close()
        if self._bpf is not None:
            self._bpf.close()

    # --- the eBPF backend's thread ----------------------------------------------------

    def _bpf_loop(self, side: socket.socket | None) -> None:
        """Drain the ring as records come; in a storm (above batch_above events/s) once per
        batch window, with the programs told not to wake us meanwhile. The connector's
        events (``side``) are read in the same wake-up and put in their place by time."""
        bpf = self._bpf
        assert bpf is not None
        if side is not None:
            bpf.also_wake_on(side.fileno())
        side_buf = bytearray(65536)
        window = self.batch_window_s
        batch_above = self.batch_above
        slice_end = time.monotonic() + _RATE_SLICE_S
        counters_at = time.monotonic() + COUNTERS_EVERY_S
        in_slice = 0
        busy = False
        waited_in_vain = False
        while not self._stop.is_set():
            try:
                if busy:
                    time.sleep(window)  # the next ones gather: one wake-up for them all
                    waited_in_vain = False
                else:
                    # A timeout drains too: a record submitted quietly just before the
                    # programs were told to wake us again would otherwise wait for the next.
                    waited_in_vain = not bpf.wait(READ_WAIT_S)
                # the connector's first: what the ring holds after is all that came before them
                sides = self._side_events(side, side_buf) if side is not None else []
                try:
                    raws = bpf.drain()
                except OSError as err:
                    log.error("proc: %s", err)
                    time.sleep(0.1)
                    continue
                self.records += len(raws)
                batch: list[Event] = []
                for raw in raws:
                    try:
                        batch.extend(self._from_record(proc_bpf.parse(raw)))
                    except Exception:  # one odd record must not stop the source
                        log.exception("proc: ring record %r could not be handled", raw[:64])
                if sides:
                    batch = list(heapq.merge(batch, sides, key=lambda e: e["ktime"]))
                now = time.monotonic()
                if waited_in_vain or now >= counters_at:
                    counters_at = now + COUNTERS_EVERY_S
                    batch.extend(self._unreported_drops(bpf))
                if batch:
                    self.events += len(batch)
                    self.batches += 1
                    self.emit(batch)
                in_slice += len(raws)
                was = busy
                if now >= slice_end:
                    busy = window > 0 and in_slice > batch_above * (now - slice_end + _RATE_SLICE_S)
                    slice_end, in_slice = now + _RATE_SLICE_S, 0
                elif not busy and window > 0 and in_slice > batch_above * _RATE_SLICE_S:
                    busy = True  # a storm is one as soon as a slice holds too many
                if busy != was:
                    try:
                        bpf.set_quiet(busy)
                    except OSError as err:  # then it wakes us as before: only dearer
                        log.error("proc: %s", err)
            except Exception:  # the source goes on: a bad moment must not end it
                log.exception("proc: the eBPF reader failed; going on")
                time.sleep(0.1)

    def _side_events(self, sock: socket.socket, buf: bytearray) -> list[Event]:
        """Every connector event queued on ``sock`` now, handled (see _side_socket)."""
        out: list[Event] = []
        view = memoryview(buf)
        for _ in range(DRAIN_DATAGRAMS):
            try:
                size = sock.recv_into(buf)
            except BlockingIOError:
                break
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    out.extend(self._lost(None, "the kernel dropped connector events (ENOBUFS)"))
                else:
                    log.error("proc connector read failed: %s", err)
                break
            for raw in netlink_proc.parse(view[:size]):
                if raw[0] in ("none", "unknown"):
                    continue
                try:
                    out.extend(self._handle(raw))
                except Exception:  # one odd event must not stop the source
                    log.exception("proc event %r could not be handled", raw)
        return out

    def _unreported_drops(self, bpf: ProcBpf) -> list[Event]:
        """Drops the kernel counted that no record has reported yet (none came after)."""
        out: list[Event] = []
        for cpu, (_attempts, dropped) in enumerate(bpf.counters()):
            out.extend(self._drops_to(cpu, dropped))
        return out

    def _drops_to(self, cpu: int, dropped: int) -> list[Event]:
        seen = self._drops.get(cpu, 0)
        if dropped <= seen:
            return []
        self._drops[cpu] = dropped
        return self._lost(dropped - seen, f"the kernel's ring was full (cpu {cpu})")

    # Records become events in one dict literal each, with the table's entry spread in:
    # a storm brings tens of thousands a second, and each step per event shows in the
    # daemon's CPU (`kport bench proc`).

    def _from_record(self, rec: proc_bpf.Record) -> list[Event]:
        """One ring record as events, the table kept by it; a loss it reveals first."""
        out = self._drops_to(rec.cpu, rec.dropped) if rec.dropped else []
        kind = rec.kind
        if kind == proc_bpf.KIND_EXEC:
            out.append(self._bpf_exec(rec))
        elif kind == proc_bpf.KIND_FORK:
            out.append(self._bpf_fork(rec))
        else:
            exit_event = self._bpf_exit(rec)
            if exit_event is not None:
                out.append(exit_event)
        return out

    def _parent_exe(self, ppid: int | None) -> str | None:
        parent = self.table.procs.get(ppid) if ppid else None
        return parent.get("exe") if parent is not None else None

    def _bpf_fork(self, rec: proc_bpf.Record) -> Event:
        procs = self.table.procs
        if rec.flags & proc_bpf.FLAG_THREAD:
            clone: Event = {
                "source": "proc",
                "kind": "clone",
                "ktime": rec.ktime,
                "cpu": rec.cpu,
                "thread": True,
                "tid": rec.pid,
            }
            self._identify(clone, rec.tgid, procs.get(rec.tgid))
            return clone
        parent = procs.get(rec.b)
        entry = {
            **(parent if parent is not None else _UNKNOWN),
            "ppid": rec.b,
            "start_time": rec.start_boottime // _NS_PER_TICK,
            "uid": rec.euid,
            "gid": rec.egid,
            "user": procinfo.user_name(rec.euid),
        }
        procs[rec.tgid] = entry
        return {
            "source": "proc",
            "kind": "fork",
            "ktime": rec.ktime,
            "cpu": rec.cpu,
            "thread": False,
            "parent_pid": rec.b,
            **entry,
            "pid": rec.tgid,
            "parent_exe": parent.get("exe") if parent is not None else None,
        }

    def _bpf_exec(self, rec: proc_bpf.Record) -> Event:
        flags = rec.flags
        truncated = bool(flags & proc_bpf.FLAG_ARGV_TRUNCATED)
        argv: list[str] | None = None
        argv_bytes: list[bytes] | None = None
        if not flags & proc_bpf.FLAG_ARGV_UNREAD:
            raw = rec.argv or b""
            try:
                argv = proc_bpf.split_argv_text(raw.decode())
            except UnicodeDecodeError:
                # shown with U+FFFD where bytes are not UTF-8; the bytes as they are beside
                argv_bytes = proc_bpf.split_argv(raw)
                argv = [a.decode(errors="replace") for a in argv_bytes]
        texts = self._texts
        entry: Event = {
            "exe": texts.path(rec.exe),
            "argv": argv,
            "cwd": texts.path(rec.cwd),
            "uid": rec.euid,
            "gid": rec.egid,
            "user": procinfo.user_name(rec.euid),
            "ppid": rec.ppid,
            "start_time": rec.start_boottime // _NS_PER_TICK,
            "cgroup": texts.path(rec.cgroup),
            "tty": procinfo.tty_name(rec.b) if rec.b else None,
            "comm": texts.name(rec.comm),
        }
        self.table.procs[rec.tgid] = entry
        event: Event = {
            "source": "proc",
            "kind": "exec",
            "ktime": rec.ktime,
            "cpu": rec.cpu,
            "thread": False,
            "filename": texts.name(rec.filename),
            "ns_pid": rec.ns_pid,
            "ruid": rec.uid,
            "rgid": rec.gid,
            "cgroup_id": rec.cgroup_id,
            "argv_size": rec.argv_size,
            **entry,
            "pid": rec.tgid,
            "parent_exe": self._parent_exe(rec.ppid),
        }
        if self.hasher is not None:
            hashed = self.hasher.of_process(rec.tgid, entry["exe"], event)
            entry.update(hashed)
            event.update(hashed)
        if argv_bytes is not None:
            event["argv_bytes"] = argv_bytes
        if truncated:
            event["truncated"] = True
        if flags & proc_bpf.FLAG_PATH_TRUNCATED:
            event["path_truncated"] = True
        if not argv or entry["exe"] is None:
            event["missing"] = [k for k in ("exe", "argv") if not entry[k]]
        return event

    def _bpf_exit(self, rec: proc_bpf.Record) -> Event | None:
        head: Event = {
            "source": "proc",
            "kind": "exit",
            "ktime": rec.ktime,
            "cpu": rec.cpu,
            **_wait_status(rec.a),
        }
        procs = self.table.procs
        if rec.flags & proc_bpf.FLAG_THREAD:
            thread_exit: Event = {**head, "thread": True, "tid": rec.pid}
            self._identify(thread_exit, rec.tgid, procs.get(rec.tgid))
            return thread_exit
        if rec.tgid not in procs:
            before = self.table.exited.get(rec.tgid)
            if before is not None and before.get("start_time") == (
                rec.start_boottime // _NS_PER_TICK
            ):
                self.duplicates += 1  # its other thread's report came first
                return None
        entry = self.table.remove(rec.tgid)
        return {
            **head,
            "thread": False,
            **(entry if entry is not None else _UNKNOWN),
            "pid": rec.tgid,
            "parent_exe": self._parent_exe(entry.get("ppid") if entry else None),
            # both from the kernel's boot-time clock: the exit's and the start's
            "run_time_s": round((rec.boot_ns - rec.start_boottime) / 1e9, 6),
            **({} if entry is not None else {"gone": True}),
        }

    # --- the reader thread -------------------------------------------------------------

    def _read_loop(self) -> None:
        """Wait for a datagram, then take every one already queued: the processor is
        handed one list per wake-up, not one event at a time."""
        assert self._sock is not None
        sock = self._sock
        buf = bytearray(65536)
        view = memoryview(buf)
        parse = netlink_proc.parse
        last_seq = self._last_seq
        window = self.batch_window_s
        batch_above = self.batch_above
        # events in the current rate slice; whether the last slice was over batch_above
        slice_end = time.monotonic() + _RATE_SLICE_S
        in_slice = 0
        busy = False
        # One overflow is reported once, with its count. ENOBUFS says messages were
        # dropped, and each CPU's sequence gap says it again later; the socket's drops
        # counter says how many. So the first sign in a drain places one lost marker, and
        # when the drain ends its count is what the counter grew by since the last report:
        # the other signs of the same overflow say nothing more. (Where the counter cannot
        # be read, ENOBUFS is a loss of unknown count and each gap one of its own.)
        reported = netlink_proc.drops(sock)
        while not self._stop.is_set():
            batch: list[netlink_proc.RawEvent] = []
            marker: dict[str, Any] | None = None  # this drain's lost marker's fields
            flags = 0  # the first read waits (up to READ_WAIT_S), the others do not
            for _ in range(DRAIN_DATAGRAMS):
                try:
                    size = sock.recv_into(buf, 0, flags)
                except BlockingIOError:
                    break
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        if not self._stop.is_set():
                            log.error("proc connector read failed: %s", err)
                            time.sleep(0.1)
                        break
                    if marker is None:
                        batch.append(self._lost_marker(None, _ENOBUFS))
                        marker = batch[-1][4]
                    flags = socket.MSG_DONTWAIT  # the socket goes on: read what follows
                    continue
                flags = socket.MSG_DONTWAIT
                for raw in parse(view[:size]):
                    cpu, seq = raw[1], raw[2]
                    prev = last_seq.get(cpu)
                    last_seq[cpu] = seq
                    if prev is not None and seq > prev + 1:
                        if reported is None:
                            gap = seq - prev - 1
                            batch.append(self._lost_marker(gap, f"sequence gap on cpu {cpu}"))
                        elif marker is None:
                            batch.append(self._lost_marker(None, _ENOBUFS))
                            marker = batch[-1][4]
                    if raw[0] not in ("none", "unknown"):  # those only count in the sequence
                        batch.append(raw)
            if marker is not None and reported is not None:
                dropped = netlink_proc.drops(sock)
                if dropped is None:  # (the counter went away: the loss is of unknown count)
                    reported = None
                elif dropped > reported:
                    marker["count"], reported = dropped - reported, dropped
                else:  # a late sign of a loss already reported
                    batch = [raw for raw in batch if raw[4] is not marker]
            if batch:
                self._hand_off(batch)
                self.batches += 1
                in_slice += len(batch)
                now = time.monotonic()
                if now >= slice_end:
                    busy = in_slice > batch_above * (now - slice_end + _RATE_SLICE_S)
                    slice_end, in_slice = now + _RATE_SLICE_S, 0
                if busy and window > 0:
                    time.sleep(window)  # let the next ones gather: one wake-up for them all

    @staticmethod
    def _lost_marker(count: int | None, reason: str) -> netlink_proc.RawEvent:
        return ("lost", -1, 0, time.monotonic_ns(), {"count": count, "reason": reason})

    def _hand_off(self, batch: list[netlink_proc.RawEvent]) -> None:
        """Queue ``batch`` for the processor; what does not fit under HANDOFF_LIMIT is
        replaced by a lost marker, or counted here when not even that fits."""
        room = HANDOFF_LIMIT - (self._handed - self._taken)
        if len(batch) > room:
            keep = max(room - 1, 0)
            # a dropped marker of a loss carries its own count (unknown counts as one)
            dropped = sum((r[4]["count"] or 1) if r[0] == "lost" else 1 for r in batch[keep:])
            batch = batch[:keep]
            if room > 0:
                batch.append(self._lost_marker(dropped, "the processor fell behind"))
            else:
                with self._pending_lock:
                    self._pending_lost = (self._pending_lost or 0) + dropped
        if batch:
            self._handed += len(batch)
            self._handoff.put(batch)

    # --- the processor thread ------------------------------------------------------------

    def _process_loop(self) -> None:
        get = self._handoff.get
        while not self._stop.is_set():
            try:
                raws = get(timeout=0.2)
            except queue.Empty:
                continue
            batch: list[Event] = []
            while True:
                for raw in raws:
                    try:
                        batch.extend(self._handle(raw))
                    except Exception:  # one odd event must not stop the source
                        log.exception("proc event %r could not be handled", raw)
                self._taken += len(raws)
                if len(batch) >= 512:
                    break
                try:
                    raws = self._handoff.get_nowait()
                except queue.Empty:
                    break
            if self._pending_lost:
                with self._pending_lock:
                    count, self._pending_lost = self._pending_lost, None
                batch.extend(self._lost(count, "the hand-off queue was full"))
            if batch:
                self.events += len(batch)
                self.emit(batch)

    def _handle(self, raw: netlink_proc.RawEvent) -> list[Event]:
        kind, cpu, _seq, ktime, fields = raw
        if kind == "lost":
            return self._lost(fields["count"], fields["reason"])
        pid, tgid = fields["pid"], fields["tgid"]
        thread = pid != tgid
        if thread and not self.threads:
            return []
        if self._bpf is not None and kind in ("fork", "exec", "exit"):
            return []  # eBPF's own (a kernel that did not filter them out)
        event: Event = {"source": "proc", "kind": kind, "ktime": ktime, "cpu": cpu}
        if kind == "fork":
            return [self._on_fork(event, fields, thread)]
        if kind == "exec":
            return [self._on_exec(event, pid)]
        if kind == "exit":
            return [self._on_exit(event, fields, thread)]
        # uid, gid, sid, comm, ptrace, coredump: the process's state changed.
        event.update(fields)
        entry = self.table.get(tgid)
        if entry is not None:
            if kind == "uid":
                entry["uid"] = fields["euid"]
                entry["user"] = procinfo.user_name(fields["euid"])
            elif kind == "gid":
                entry["gid"] = fields["egid"]
            elif kind == "comm":
                entry["comm"] = fields["comm"]
        self._identify(event, tgid, entry)
        event["pid"], event["tid"], event["thread"] = tgid, pid, thread
        return [event]

    def _identify(self, event: Event, pid: int, entry: Event | None) -> None:
        """Copy the process's identity and details from the table onto the event."""
        if entry is None:
            event.update({k: None for k in _ENRICHED})
            event["pid"] = pid
            event["gone"] = True
            return
        for key in _ENRICHED:
            event.setdefault(key, entry.get(key))
        event["pid"] = pid
        parent = self.table.get(entry.get("ppid") or 0)
        event["parent_exe"] = parent.get("exe") if parent else None

    def _on_fork(self, event: Event, fields: dict[str, Any], thread: bool) -> Event:
        child, parent_pid = fields["tgid"], fields["parent_tgid"]
        parent = self.table.get(parent_pid)
        if thread:
            event.update(kind="clone", thread=True, tid=fields["pid"])
            self._identify(event, child, parent)
            return event
        stat = procinfo.read_stat(child)
        entry: Event = dict(parent) if parent else {k: None for k in _ENRICHED}
        entry["ppid"] = parent_pid
        if stat is not None:
            entry["start_time"] = stat.start_time
        else:
            # Gone already: the fork's kernel time is its start, on the boot-time clock
            # that /proc's start time counts in ticks.
            entry["start_time"] = procinfo.ticks_from_monotonic_ns(event["ktime"])
            entry["start_time_derived"] = True
        entry["tty"] = procinfo.tty_name(stat.tty_nr) if stat else entry.get("tty")
        self.table.procs[child] = entry
        event.update(thread=False, parent_pid=parent_pid)
        self._identify(event, child, entry)
        if stat is None:
            event["gone"] = True
        return event

    def _on_exec(self, event: Event, pid: int) -> Event:
        known = self.table.get(pid)
        expect = known.get("start_time") if known else None
        # None also when the pid names another process now: nothing of that one is reported.
        info = procinfo.describe(pid, expect)
        if info is not None and not info["argv"]:
            # Exiting already (its memory is gone; the kernel gives every exec an argv):
            # its identity is still readable, its command line is not.
            info.update(argv=None)
            event["gone"] = True
        if info is not None:
            entry = {**(known or {}), **info}
            self.table.procs[pid] = entry
        else:
            entry = known or {k: None for k in _ENRICHED}
            entry = {**entry, "exe": None, "argv": None, "cwd": None}
            if known is not None:
                # Gone before it could be read: what it inherited at fork is no longer its
                # program, and a later lookup of it must not be told that it is.
                self.table.procs[pid] = entry
            event["gone"] = True
        event["thread"] = False
        self._identify(event, pid, entry)
        if self.hasher is not None:
            hashed = self.hasher.of_process(pid, event.get("exe"), event)
            event.update(hashed)
            current = self.table.procs.get(pid)
            if current is not None:  # what it inherited at fork was its parent's program's
                kept = {k: v for k, v in current.items() if not k.startswith("exe_sha256")}
                self.table.procs[pid] = {**kept, **hashed}
        missing = [k for k in ("exe", "argv") if not event.get(k)]
        if missing:
            event["missing"] = missing
        return event

    def _on_exit(self, event: Event, fields: dict[str, Any], thread: bool) -> Event:
        pid, tgid = fields["pid"], fields["tgid"]
        status = fields["exit_code"]
        event.update(_wait_status(status), thread=thread)
        if thread:
            event["tid"] = pid
            self._identify(event, tgid, self.table.get(tgid))
            return event
        entry = self.table.remove(pid)
        self._identify(event, pid, entry)
        start = event.get("start_time")
        if start is not None:
            # on the boot-time clock, as the start: CLOCK_MONOTONIC stops while suspended
            uptime_ns = procinfo.boottime_ns_from_monotonic_ns(event["ktime"])
            event["run_time_s"] = round(uptime_ns / 1e9 - procinfo.ticks_to_seconds(start), 6)
        return event

    # --- seeding and resync ------------------------------------------------------------

    def _seed(self) -> list[Event]:
        out: list[Event] = []
        for pid in procinfo.all_pids():
            info = procinfo.describe(pid)
            if info is not None:
                self.table.procs[pid] = info
                out.append(self._from_proc("snapshot", pid, info, snapshot=True))
        return out

    def _from_proc(self, kind: str, pid: int, entry: Event, **flags: Any) -> Event:
        """An event kport made from /proc (seed, resync) rather than received from the kernel."""
        event: Event = {
            "source": "proc",
            "kind": kind,
            "thread": False,
            "ktime": time.monotonic_ns(),
            **flags,
        }
        self._identify(event, pid, entry)
        return event

    def _lost(self, count: int | None, reason: str) -> list[Event]:
        """A lost event, then the table made true again from /proc."""
        self.lost += count or 0
        self.resyncs += 1
        log.warning(
            "proc: lost %s events (%s); resyncing from /proc",
            "some" if count is None else count,
            reason,
        )
        out: list[Event] = [
            {
                "source": "proc",
                "kind": "lost",
                "count": count,
                "reason": reason,
                "ktime": time.monotonic_ns(),
            }
        ]
        current = set(procinfo.all_pids())
        for pid in list(self.table.procs):
            entry = self.table.procs[pid]
            if pid not in current or identity.start_time(pid) != entry.get("start_time"):
                del self.table.procs[pid]
                out.append(
                    self._from_proc("exit", pid, entry, synthetic=True, code=None, signal=None)
                )
        for pid in current - set(self.table.procs):
            info = procinfo.describe(pid)
            if info is not None:
                self.table.procs[pid] = info
                out.append(self._from_proc("snapshot", pid, info, synthetic=True))
        return out
