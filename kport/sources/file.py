"""The file source: fanotify events, permission decisions by rules or by a decision client.

A reader thread takes each permission event, decides, and writes the verdict before
anything else happens to it (no logging, no journal, no delivery first). The daemon's
own process and the decision clients' processes are allowed at once, so a decision
client that opens a watched file while it decides never waits on itself. Rules decide
in the thread (cached per process identity, path and kind); an ``ask`` goes to the
daemon's ``ask`` callback, which must answer through ``done`` by its deadline, and the
number of asks in flight is bounded: beyond it the default verdict is written at once.
When the source stops, its fanotify group closes and the kernel lets every pending
opener through, so a stopping or crashing daemon never leaves an opener hanging.
"""

from __future__ import annotations

import logging
import os
import select
import threading
import time
from collections.abc import Callable
from typing import Any, Final

from kport import procinfo
from kport.rules import RuleSet, Subject
from kport.sources import fanotify as fan

log = logging.getLogger("kport.file")

Event = dict[str, Any]
Emit = Callable[[list[Event]], None]
#: ask(request, done): done(allow, why) must be called exactly once, from any thread
Done = Callable[[bool, str], None]
Ask = Callable[[Event, Done], None]

#: permission requests waiting for a decision client at once, at most
MAX_ASKS: Final = 256
PERMISSION_MASK: Final = fan.FAN_OPEN_PERM | fan.FAN_OPEN_EXEC_PERM
NOTIFY_MASK: Final = fan.FAN_CLOSE_WRITE | fan.FAN_MODIFY
KINDS: Final = ("open_perm", "open_exec_perm", "access_perm", "modify", "close_write")


def mark_kind(path: str) -> str:
    """A mount point is marked whole; anything else as an inode (a directory's children)."""
    return "mount" if os.path.ismount(path) else "inode"


class FileSource:
    """fanotify on the watched paths, decided by ``rules`` (see the module docstring)."""

    name: Final = "file"

    def __init__(
        self,
        emit: Emit,
        *,
        paths: list[str],
        rules: RuleSet,
        ask: Ask | None,
        default_verdict: bool,
        trusted: Callable[[], frozenset[int]] = frozenset,
    ) -> None:
        self.emit = emit
        self.paths = list(paths)
        self.rules = rules
        self.ask = ask
        self.default_verdict = default_verdict
        self.trusted = trusted
        self.own_pid = os.getpid()
        self.events = 0
        self.allowed = 0
        self.denied = 0
        self.asked = 0
        self.defaulted = 0
        self.lost = 0
        self._asks = 0
        self._asks_lock = threading.Lock()
        self._group: fan.FanotifyGroup | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        group = fan.FanotifyGroup(permissions=True)
        try:
            for path in self.paths:
                kind = mark_kind(path)
                mask = PERMISSION_MASK | NOTIFY_MASK
                if kind == "inode" and os.path.isdir(path):
                    mask |= fan.FAN_EVENT_ON_CHILD
                group.mark(path, mask, kind=kind)  # type: ignore[arg-type]
                log.info("file: watching %s (%s mark)", path, kind)
        except BaseException:
            group.close()
            raise
        self._group = group
        self._thread = threading.Thread(target=self._run, name="kport-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and close the group: the kernel lets pending openers through."""
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        if self._group is not None:
            self._group.close()
            self._group = None
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def status(self) -> dict[str, Any]:
        return {
            "watching": self._group is not None,
            "events": self.events,
            "allowed": self.allowed,
            "denied": self.denied,
            "asked": self.asked,
            "defaulted": self.defaulted,
            "asks_in_flight": self._asks,
            "lost": self.lost,
            "paths": self.paths,
            "rules": len(self.rules.rules),
            "rules_error": self.rules.error,
            "cache": {"hits": self.rules.hits, "misses": self.rules.misses},
        }

    # --- the reader thread ------------------------------------------------------------

    def _run(self) -> None:
        group = self._group
        assert group is not None
        poller = select.poll()
        poller.register(group.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poller.poll(1000)}
            if self._stop_r in ready:
                return
            self.rules.reload_if_changed()
            if group.fileno() not in ready:
                continue
            try:
                events = group.read_events()
            except (OSError, ValueError):
                log.exception("file: reading fanotify events failed")
                continue
            batch: list[Event] = []
            for event in events:
                try:
                    out = self._handle(group, event)
                except Exception:  # one odd event must not stop the source; answer it
                    log.exception("file: handling an event failed; allowing it")
                    self._answer(group, event, self.default_verdict)
                    out = None
                if out is not None:
                    batch.append(out)
            if batch:
                self.emit(batch)

    def _handle(self, group: fan.FanotifyGroup, event: fan.FanotifyEvent) -> Event | None:
        self.events += 1
        if event.overflow:
            self.lost += 1
            return {"source": "file", "kind": "lost", "count": None, "reason": "fanotify overflow"}
        kind = next((k for k in event.kinds if k.endswith("_perm")), None)
        if kind is None:  # a notification: describe it, close its fd
            record = self._describe(event, event.kinds[0] if event.kinds else "?")
            event.close()
            return record
        pid = event.pid
        if pid == self.own_pid or pid in self.trusted():
            self._answer(group, event, True)  # never wait on ourselves or a decider
            return None
        record = self._describe(event, kind)
        subject = Subject(
            kind=kind,
            path=record["path"],
            exe=record.get("exe"),
            uid=record.get("uid"),
            gid=record.get("gid"),
            ancestors=tuple(record.get("ancestors") or ()),
        )
        decision = self.rules.decide(subject, (pid, record.get("start_time"), record["path"], kind))
        record["rule"] = decision.rule
        if decision.action == "ask":
            self._ask(group, event, record)
            return None
        allow = decision.action != "deny"
        self._answer(group, event, allow)  # the verdict first, everything else after
        record["verdict"] = "allow" if allow else "deny"
        return record

    def _answer(self, group: fan.FanotifyGroup, event: fan.FanotifyEvent, allow: bool) -> None:
        try:
            group.respond(event.fd, allow)
        except (OSError, ValueError) as err:  # the group closed: the kernel let it through
            log.debug("file: could not answer pid %d: %s", event.pid, err)
        finally:
            event.close()
        if allow:
            self.allowed += 1
        else:
            self.denied += 1

    def _ask(self, group: fan.FanotifyGroup, event: fan.FanotifyEvent, record: Event) -> None:
        with self._asks_lock:
            room = self.ask is not None and self._asks < MAX_ASKS
            if room:
                self._asks += 1
        if not room:
            self.defaulted += 1
            why = "no decision client" if self.ask is None else "too many asks in flight"
            self._finish(group, event, record, self.default_verdict, why)
            return
        self.asked += 1
        answered = threading.Lock()

        def done(allow: bool, why: str) -> None:
            if not answered.acquire(blocking=False):
                return  # answered already
            with self._asks_lock:
                self._asks -= 1
            if why != "decided":
                self.defaulted += 1
            self._finish(group, event, record, allow, why)

        assert self.ask is not None
        request = {k: record[k] for k in ("kind", "path", "pid", "start_time", "exe", "user")}
        request["uid"] = record.get("uid")
        request["cmdline"] = record.get("argv")
        self.ask(request, done)

    def _finish(
        self,
        group: fan.FanotifyGroup,
        event: fan.FanotifyEvent,
        record: Event,
        allow: bool,
        why: str,
    ) -> None:
        self._answer(group, event, allow)
        record["verdict"] = "allow" if allow else "deny"
        record["decided_by"] = why
        self.emit([record])

    def _describe(self, event: fan.FanotifyEvent, kind: str) -> Event:
        info = procinfo.describe(event.pid) or {}
        record: Event = {
            "source": "file",
            "kind": kind,
            "path": event.path,
            "pid": event.pid,
            "start_time": info.get("start_time"),
            "exe": info.get("exe"),
            "argv": info.get("argv"),
            "uid": info.get("uid"),
            "gid": info.get("gid"),
            "user": info.get("user"),
            "ktime": time.monotonic_ns(),
        }
        return record
