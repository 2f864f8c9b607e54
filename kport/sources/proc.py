"""The proc source: process events from the kernel, enriched and kept in a process table.

Two threads: the reader does nothing but receive and parse datagrams (so the socket's
buffer drains even while /proc is slow), the processor enriches each event from /proc,
keeps the table, and hands batches of finished events to ``emit``. Under load (more than
``batch_above`` events a second) the reader takes what has come at most once per batch
window: each wake-up of the two threads costs far more than an event, so a storm is
carried in batches, at up to one window more latency. Loss is never silent:
``ENOBUFS``, a per-CPU sequence gap and a full hand-off queue each become a ``lost``
event, followed by a resync of the table from /proc (synthetic events, flagged).
"""

from __future__ import annotations

import errno
import logging
import queue
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

from kport import procinfo
from kport.sources import netlink_proc

log = logging.getLogger("kport.proc")

HANDOFF_LIMIT: Final = 200_000
#: datagrams the reader takes per wake-up, at most; and how long it blocks in one read
DRAIN_DATAGRAMS: Final = 256
READ_WAIT_S: Final = 0.2
#: events per second above which the reader batches (see the module docstring); a
#: process run is three (fork, exec, exit): 4500 is 1500 runs a second
BATCH_ABOVE: Final = 4500
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
Event = dict[str, Any]
Emit = Callable[[list[Event]], None]


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
    ) -> None:
        self.emit = emit
        self.threads = threads
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
        return {
            "events": self.events,
            "lost": self.lost,
            "resyncs": self.resyncs,
            "batches": self.batches,
            "table": len(self.table),
            "backlog": self._handed - self._taken,
        }

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Subscribe (raises if the kernel or our privileges do not allow it), then run."""
        self._sock = netlink_proc.open_socket(self._rcvbuf)
        # Blocking reads that give up after READ_WAIT_S, so the reader notices stop():
        # one recv per wake-up (a Python-level timeout would poll() before every recv).
        self._sock.settimeout(None)
        self._sock.setsockopt(
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

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(5)
        if self._sock is not None:
            netlink_proc.unsubscribe(self._sock)
            self._sock.close()

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
        while not self._stop.is_set():
            batch: list[netlink_proc.RawEvent] = []
            flags = 0  # the first read waits (up to READ_WAIT_S), the others do not
            for _ in range(DRAIN_DATAGRAMS):
                try:
                    size = sock.recv_into(buf, 0, flags)
                except BlockingIOError:
                    break
                except OSError as err:
                    if err.errno == errno.ENOBUFS:
                        batch.append(self._lost_marker(None, "the kernel dropped events (ENOBUFS)"))
                    elif not self._stop.is_set():
                        log.error("proc connector read failed: %s", err)
                        time.sleep(0.1)
                    break
                flags = socket.MSG_DONTWAIT
                for raw in parse(view[:size]):
                    cpu, seq = raw[1], raw[2]
                    prev = last_seq.get(cpu)
                    last_seq[cpu] = seq
                    if prev is not None and seq > prev + 1:
                        gap = seq - prev - 1
                        batch.append(self._lost_marker(gap, f"sequence gap on cpu {cpu}"))
                    if raw[0] not in ("none", "unknown"):  # those only count in the sequence
                        batch.append(raw)
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
        missing = [k for k in ("exe", "argv") if not event.get(k)]
        if missing:
            event["missing"] = missing
        return event

    def _on_exit(self, event: Event, fields: dict[str, Any], thread: bool) -> Event:
        pid, tgid = fields["pid"], fields["tgid"]
        status = fields["exit_code"]
        event.update(
            code=(status >> 8) & 0xFF if status & 0x7F == 0 else None,
            signal=status & 0x7F or None,
            core=bool(status & 0x80),
            thread=thread,
        )
        if thread:
            event["tid"] = pid
            self._identify(event, tgid, self.table.get(tgid))
            return event
        entry = self.table.remove(pid)
        self._identify(event, pid, entry)
        start = event.get("start_time")
        if start is not None:
            uptime_ns = event["ktime"]
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
            if pid not in current or procinfo.start_time(pid) != entry.get("start_time"):
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
