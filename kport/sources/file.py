"""The file source: fanotify events, permission decisions by rules or by a decision client.

Two fanotify groups: a content group for the permission events (and the notifications
that carry an fd: open, access, modify, close_write, close_nowrite, open_exec), and a
name-reporting group for the events that name a directory entry (create, delete, move,
attrib). A reader thread takes each permission event, decides, and writes the verdict
before anything else happens to it (no logging, no journal, no delivery first). The
daemon's own process and the decision clients' processes are allowed at once, so a
decision client that opens a watched file while it decides never waits on itself; the
daemon's own notifications are dropped (its journal may live on a watched filesystem).
A notification from a process that has exited is held back, with the ones after it, until
the proc source's table has learnt that process's name (at most SETTLE_S); permission
events wait for none of them.
Rules decide in the thread (cached per process identity, path and kind); an ``ask`` goes
to the daemon's ``ask`` callback, which must answer through ``done`` by its deadline, and
the number of asks in flight is bounded: beyond it the default verdict is written at
once. ``allow`` is silent, ``log`` allows and reports, ``deny`` and asks are reported.
When the source stops, its groups close and the kernel lets every pending opener
through, so a stopping or crashing daemon never leaves an opener hanging.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from kport.rules import RuleSet, Subject
from kport.sources import fanotify as fan
from kport.sources.ask import Ask, Asking, outcome
from kport.sources.hashes import Hasher
from kport.sources.subjects import Pending, ProcessTableView, Subjects

log = logging.getLogger("kport.file")

Event = dict[str, Any]
Emit = Callable[[list[Event]], None]

#: permission kinds → event bits (the content group)
PERMISSION_KINDS: Final[dict[str, int]] = {
    "open_perm": fan.FAN_OPEN_PERM,
    "open_exec_perm": fan.FAN_OPEN_EXEC_PERM,
    "access_perm": fan.FAN_ACCESS_PERM,
}
#: notifications that carry an fd (the content group)
FD_KINDS: Final[dict[str, int]] = {
    "open": fan.FAN_OPEN,
    "open_exec": fan.FAN_OPEN_EXEC,
    "access": fan.FAN_ACCESS,
    "modify": fan.FAN_MODIFY,
    "close_write": fan.FAN_CLOSE_WRITE,
    "close_nowrite": fan.FAN_CLOSE_NOWRITE,
}
#: notifications that name a directory entry (the name-reporting group)
NAME_KINDS: Final[dict[str, int]] = {
    "create": fan.FAN_CREATE,
    "delete": fan.FAN_DELETE,
    "move": fan.FAN_RENAME,
    "attrib": fan.FAN_ATTRIB,
}
NOTIFY_KINDS: Final = {**FD_KINDS, **NAME_KINDS}
DEFAULT_PERMISSIONS: Final = ("open_perm", "open_exec_perm")
DEFAULT_EVENTS: Final = ("close_write", "create", "delete", "move", "attrib")

#: a merged event is named by the first of its kinds in this order (create + attrib:
#: create); all of them are in its "kinds"
_PRECEDENCE: Final = (
    "create",
    "move",
    "delete",
    "close_write",
    "modify",
    "attrib",
    "close_nowrite",
    "open_exec",
    "open",
    "access",
)

MarkOf = Literal["path", "mount", "filesystem"]
#: what a record carries of its executable's hash (see kport.sources.hashes)
_HASH_FIELDS: Final = ("exe_sha256", "exe_sha256_by", "exe_sha256_pending", "exe_sha256_error")

#: reads of one group in a row, while each finds events, before polling again. When the
#: opener shares a CPU with the daemon, its next open is queued by the time the answer to
#: the last one is written: reading again at once saves a poll per event.
READS_BEFORE_POLL: Final = 64
#: how long a notification from a gone process is held back, at most, for the proc
#: source's table to learn its name (kport.sources.subjects); the notifications after it are held
#: with it, so that they stay in order; and how often the reader looks again meanwhile
SETTLE_S: Final = 0.02
HELD_POLL_MS: Final = 1
#: notifications held back at once, at most; beyond it the oldest goes on as it is
HELD_MAX: Final = 4096


@dataclass(frozen=True)
class Watch:
    """What is watched: a file, a directory's entries, a mount, or a whole filesystem."""

    path: str
    mark: MarkOf = "path"

    def content_mark(self) -> tuple[fan.MarkKind, int]:
        """The mark kind in the content group, and the extra mask bits it needs."""
        if self.mark == "filesystem":
            return "filesystem", 0
        if self.mark == "mount" or os.path.ismount(self.path):
            return "mount", 0
        return "inode", fan.FAN_EVENT_ON_CHILD if os.path.isdir(self.path) else 0

    def names_mark(self) -> tuple[fan.MarkKind, int]:
        """The mark kind in the name group and its extra mask bits. A mount is marked as
        its filesystem (the kernel refuses name events on mount marks), so the events of
        its other mounts must be dropped: see :meth:`scope`."""
        kind, extra = self.content_mark()
        if kind in ("mount", "filesystem"):
            return "filesystem", fan.FAN_ONDIR
        return "inode", extra | fan.FAN_ONDIR

    def scope(self) -> str | None:
        """What a name event's path must start with to be this watch's (None: anything)."""
        kind, _ = self.content_mark()
        if kind == "filesystem":
            return None
        if kind == "mount" or os.path.isdir(self.path):
            return self.path.rstrip("/") + "/"
        return self.path


def watches_of(
    paths: Iterable[str], mounts: Iterable[str] = (), filesystems: Iterable[str] = ()
) -> list[Watch]:
    return [
        *(Watch(os.path.abspath(p)) for p in paths),
        *(Watch(os.path.abspath(p), "mount") for p in mounts),
        *(Watch(os.path.abspath(p), "filesystem") for p in filesystems),
    ]


def _mask(kinds: Iterable[str], table: dict[str, int]) -> int:
    mask = 0
    for kind in kinds:
        mask |= table.get(kind, 0)
    return mask


class FileSource:
    """fanotify on the watched paths, decided by ``rules`` (see the module docstring)."""

    name: Final = "file"

    def __init__(
        self,
        emit: Emit,
        *,
        paths: Iterable[str] = (),
        watches: Iterable[Watch] = (),
        rules: RuleSet,
        ask: Ask | None,
        max_asks: int,
        default_verdict: bool,
        trusted: Callable[[], frozenset[int]] = frozenset,
        permissions: Iterable[str] = DEFAULT_PERMISSIONS,
        events: Iterable[str] = DEFAULT_EVENTS,
        processes: ProcessTableView | None = None,
        hasher: Hasher | None = None,
    ) -> None:
        unknown = [k for k in permissions if k not in PERMISSION_KINDS]
        unknown += [k for k in events if k not in NOTIFY_KINDS]
        if unknown:
            raise ValueError(
                f"unknown file event kinds {unknown}: permission kinds are "
                f"{', '.join(PERMISSION_KINDS)}; notifications are {', '.join(NOTIFY_KINDS)}"
            )
        self.emit = emit
        self.watches: list[Watch] = [*watches_of(paths), *watches]
        self.rules = rules
        self.asking = Asking(ask, max_asks)
        self.default_verdict = default_verdict
        self.trusted = trusted
        self.permissions = tuple(permissions)
        self.events_reported = tuple(events)
        self.subjects = Subjects(processes, hasher)
        self.hasher = hasher
        self.own_pid = os.getpid()
        self._content_mask = _mask(self.permissions, PERMISSION_KINDS) | _mask(events, FD_KINDS)
        self._names_mask = _mask(events, NAME_KINDS)
        self.events = 0
        self.allowed = 0
        self.denied = 0
        self.lost = 0
        #: (deadline in monotonic ns, notification), in the order they were read
        self._held: deque[tuple[int, fan.FanotifyEvent]] = deque()
        #: the last subject the rules saw, and the process details it was made from
        self._last_subject: Subject | None = None
        self._last_info: dict[str, Any] | None = None
        self._marks_lock = threading.Lock()
        self._content: fan.FanotifyGroup | None = None
        self._names: fan.FanotifyGroup | None = None
        #: watches whose filesystem cannot report names (no file handles)
        self.unnamed: set[str] = set()
        #: name events must be under one of these (None: no need to check)
        self._scopes: tuple[str, ...] | None = None
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        try:
            if self._names_mask:
                self._names = fan.FanotifyGroup(permissions=False, report_names=True)
            if self._content_mask:
                self._content = fan.FanotifyGroup(permissions=True)
                if self._names is not None:
                    # An opener waiting for a permission answer pins every group's marks
                    # on that file, and closing a group waits for those pins to go. So the
                    # permission group must close first, or a killed daemon deadlocks the
                    # opener and itself in the kernel: stop() closes it first, and a dying
                    # process closes its fds from the highest number down.
                    self._content.move_above(self._names.fileno())
            for watch in self.watches:
                self._mark(watch)
            self._rescope()
        except BaseException:
            self._close_groups()
            raise
        self._thread = threading.Thread(target=self._run, name="kport-file", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reading and close the groups: the kernel lets pending openers through."""
        os.write(self._stop_w, b"x")
        if self._thread is not None:
            self._thread.join(5)
        self._close_groups()
        self.subjects.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def _close_groups(self) -> None:
        for group in (self._content, self._names):
            if group is not None:
                group.close()
        self._content = self._names = None

    # --- marks, added and removed while running -------------------------------------

    def watch(self, watch: Watch) -> None:
        """Start watching ``watch`` (now, while running). Raises OSError naming the path."""
        with self._marks_lock:
            if watch in self.watches:
                return
            try:
                self._mark(watch)
            except OSError:
                self._mark(watch, remove=True)  # no half-made watch: neither group keeps it
                self._renew()
                raise
            self.watches.append(watch)
            self._rescope()

    def unwatch(self, path: str) -> list[Watch]:
        """Stop watching ``path`` (whichever way it is watched); the watches removed."""
        path = os.path.abspath(path)
        with self._marks_lock:
            gone = [w for w in self.watches if w.path == path]
            if not gone:
                raise ValueError(f"{path} is not watched (watched: {self.paths or 'nothing'})")
            self.watches = [w for w in self.watches if w.path != path]
            for watch in gone:
                self._mark(watch, remove=True)
            self._renew()
            self._rescope()
        return gone

    def _renew(self) -> None:
        """Mark every watch again: a filesystem mark just removed may have been shared."""
        for watch in self.watches:
            try:
                self._mark(watch)
            except OSError as err:  # its path is gone since: the kernel dropped it too
                log.warning("file: could not renew the marks of %s: %s", watch.path, err)

    @property
    def paths(self) -> list[str]:
        return [w.path for w in self.watches]

    def _mark(self, watch: Watch, *, remove: bool = False) -> None:
        verb = "no longer watching" if remove else "watching"
        if self._content is not None:
            kind, extra = watch.content_mark()
            self._try_mark(self._content, watch.path, self._content_mask | extra, kind, remove)
            log.info("file: %s %s (%s mark)", verb, watch.path, kind)
        if self._names is not None:
            kind, extra = watch.names_mark()
            mask = self._names_mask | extra
            if kind == "inode" and not os.path.isdir(watch.path):
                mask = (self._names_mask & fan.FAN_ATTRIB) and fan.FAN_ATTRIB
            if not mask:
                return
            try:
                self._try_mark(self._names, watch.path, mask, kind, remove)
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EXDEV, errno.ENODEV):
                    raise
                # A filesystem without file handles (ramfs, some FUSE) cannot name
                # entries: its opens are still decided and reported, its names are not.
                self.unnamed.add(watch.path)
                log.warning("file: no create/delete/move/attrib events for %s: %s", watch, err)
            else:
                if remove:
                    self.unnamed.discard(watch.path)

    def _rescope(self) -> None:
        scopes = [w.scope() for w in self.watches]
        if None in scopes or not any(w.content_mark()[0] == "mount" for w in self.watches):
            self._scopes = None  # no filesystem mark stands in for a mount: nothing extra
        else:
            self._scopes = tuple(s for s in scopes if s is not None)

    @staticmethod
    def _try_mark(
        group: fan.FanotifyGroup, path: str, mask: int, kind: fan.MarkKind, remove: bool
    ) -> None:
        try:
            group.mark(path, mask, kind=kind, remove=remove)
        except OSError:
            if not remove:
                raise  # removing a mark that is gone already (the file was deleted) is done

    def _in_scope(self, path: str | None) -> bool:
        """Is a name event inside what is watched? (A mount's filesystem mark reports
        every mount of that filesystem.)"""
        scopes = self._scopes
        if scopes is None:
            return True
        return path is not None and (path.startswith(scopes) or path + "/" in scopes)

    def status(self) -> dict[str, Any]:
        return {
            "watching": self._content is not None or self._names is not None,
            "events": self.events,
            "allowed": self.allowed,
            "denied": self.denied,
            "asked": self.asking.asked,
            "defaulted": self.asking.defaulted,
            "asks_in_flight": self.asking.in_flight,
            "lost": self.lost,
            "paths": self.paths,
            "watches": [{"path": w.path, "mark": w.mark} for w in self.watches],
            "permissions": list(self.permissions),
            "without_names": sorted(self.unnamed),
            "reported": list(self.events_reported),
            **self.rules.status(),
            "processes": {
                "hits": self.subjects.hits,
                "misses": self.subjects.misses,
                "unsettled": self.subjects.unsettled,
            },
        }

    # --- the reader thread ------------------------------------------------------------

    def _run(self) -> None:
        groups = {g.fileno(): g for g in (self._content, self._names) if g is not None}
        poller = select.poll()
        for fd in groups:
            poller.register(fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        stop = self._stop_r
        while True:
            ready = poller.poll(HELD_POLL_MS if self._held else 1000)
            self.rules.reload_if_due()
            for fd, _ in ready:
                if fd == stop:
                    self._release(everything=True)
                    return
                group = groups[fd]
                for _ in range(READS_BEFORE_POLL):
                    if not self._read(group):
                        break
            if self._held:
                self._release()

    def _read(self, group: fan.FanotifyGroup) -> int:
        try:
            events = group.read_events()
        except (OSError, ValueError):
            log.exception("file: reading fanotify events failed")
            return 0
        batch: list[Event] = []
        for event in events:
            try:
                out = self._handle(group, event)
            except Exception:  # one odd event must not stop the source; answer it
                log.exception("file: handling an event failed; answering the default")
                if event.permission:
                    self._answer(group, event, self.default_verdict)
                event.close()
                out = None
            if out is not None:
                batch.append(out)
        if batch:
            self.emit(batch)
        return len(events)

    def _handle(self, group: fan.FanotifyGroup, event: fan.FanotifyEvent) -> Event | None:
        self.events += 1
        if event.overflow:
            self.lost += 1
            which = "permission" if group is self._content else "name"
            return {
                "source": "file",
                "kind": "lost",
                "count": None,
                "reason": f"the kernel's fanotify queue ({which} group) overflowed",
                "ktime": time.monotonic_ns(),
            }
        if not event.permission:
            event.close()
            if event.pid == self.own_pid:
                return None  # our own writes (the journal): reporting them would feed back
            if group is self._names and not self._in_scope(event.path):
                return None
            return self._notification(event)
        # its one permission bit's name: the kernel never merges permission events
        kind = fan.KINDS[event.mask & fan.FAN_PERMISSION_EVENTS]
        pid = event.pid
        if pid == self.own_pid or pid in self.trusted():
            self._answer(group, event, True)  # never wait on ourselves or a decider
            return None
        path = event.path
        info = self.subjects.get(pid)
        # Unreadable (a kernel thread has no exe): rules still decide, on what is known,
        # and nothing is cached for it.
        # (the hash too: one still pending is not what a sha256 rule decides on)
        key = (
            (pid, info["start_time"], info["exe"], info.get("exe_sha256"), path, kind)
            if info
            else None
        )
        info = info or {}
        decision = None if key is None else self.rules.cached(key)
        if decision is None:
            decision = self.rules.decide_afresh(self._subject(kind, path, info), key)
        if decision.action == "allow":
            self._answer(group, event, True)
            return None
        record = self._record(kind, path, pid, info)
        record["rule"] = decision.rule
        if decision.action == "ask":
            self._ask(group, event, record)
            return None
        allow = decision.action == "log"
        self._answer(group, event, allow)  # the verdict first, everything else after
        record["verdict"] = "allow" if allow else "deny"
        record["why"] = decision.why
        return record

    def _subject(self, kind: str, path: str | None, info: dict[str, Any]) -> Subject:
        """The rules' view of this access. The last one is kept and only its kind and
        path change while the same process asks again (``info`` is the same cached
        mapping then): the rules keep no subject once they have answered."""
        subject = self._last_subject
        if subject is None or info is not self._last_info:
            subject = self._last_subject = Subject(
                kind,
                path,
                info.get("exe"),
                info.get("uid"),
                info.get("gid"),
                ancestors=tuple(info.get("ancestors") or ()),
                exe_sha256=info.get("exe_sha256"),
            )
            self._last_info = info
        else:
            subject.kind = kind
            subject.path = path
            subject.exe_sha256 = info.get("exe_sha256")  # a pending one may be known now
        return subject

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
        why = self.asking.reserve()
        if why is not None:
            record["why"] = outcome(
                why, None, "allow" if self.default_verdict else "deny", record.get("rule")
            )
            self._finish(group, event, record, self.default_verdict, why)
            return

        def answered(verdict: str, why: str, client: Mapping[str, Any] | None = None) -> None:
            allow = verdict == "allow"
            record["why"] = outcome(why, client, "allow" if allow else "deny", record.get("rule"))
            self._finish(group, event, record, allow, why)

        request = {
            "kind": record["kind"],
            "path": record["path"],
            "pid": record["pid"],
            "start_time": record["start_time"],
            "exe": record["exe"],
            "uid": record["uid"],
            "user": record["user"],
            "cmdline": record["argv"],
            "ancestors": record["ancestors"],
            "exe_sha256": record.get("exe_sha256"),
        }
        if self.hasher is not None:
            request["hash_changed"] = self.hasher.decided(record["exe"], record.get("exe_sha256"))
        self.asking.send(request, answered)

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

    def _notification(self, event: fan.FanotifyEvent) -> Event | None:
        """The event's record, or None when it is held back: for its process's name, or
        behind one that is (so that they stay in order)."""
        if not self._held:
            info = self._process_of(event, final=False)
            if not isinstance(info, Pending):
                return self._notification_record(event, info)
        self._hold(event)
        return None

    def _process_of(
        self, event: fan.FanotifyEvent, *, final: bool
    ) -> dict[str, Any] | Pending | None:
        """Who made the event (see Subjects.get); None for an event with no process."""
        return self.subjects.get(event.pid, final=final) if event.pid > 0 else None

    def _hold(self, event: fan.FanotifyEvent) -> None:
        self._held.append((time.monotonic_ns() + int(SETTLE_S * 1e9), event))
        if len(self._held) > HELD_MAX:
            self._release(oldest=True)

    def _release(self, *, everything: bool = False, oldest: bool = False) -> None:
        """Report the held notifications whose process is named now, or whose time is up,
        from the oldest on (``everything``: all of them; ``oldest``: at least the first)."""
        held = self._held
        now = time.monotonic_ns()
        out = []
        while held:
            deadline, event = held[0]
            final = everything or oldest or now >= deadline
            try:
                info = self._process_of(event, final=final)
            except Exception:  # one odd lookup must not stop the source, nor lose the event
                log.exception("file: naming the process of pid %d failed", event.pid)
                info = None
            if isinstance(info, Pending):
                break
            held.popleft()
            oldest = False
            out.append(self._notification_record(event, info))
        if out:
            self.emit(out)

    def _notification_record(self, event: fan.FanotifyEvent, info: dict[str, Any] | None) -> Event:
        named = {"move" if k == "rename" else k for k in event.kinds}
        kinds = [k for k in _PRECEDENCE if k in named]
        record = self._record(kinds[0] if kinds else "?", event.path, event.pid, info or {})
        if len(kinds) > 1:  # the kernel merges events on one file that are still queued
            record["kinds"] = kinds
        if event.is_dir:
            record["dir"] = True
        if event.old_path is not None:
            record["from"] = event.old_path
        if event.deleted:
            record["deleted"] = True
        if info is None or info.get("gone"):
            record["gone"] = True  # exited before it was read: named from what was seen
        return record

    @staticmethod
    def _record(kind: str, path: str | None, pid: int, info: dict[str, Any]) -> Event:
        return {
            "source": "file",
            "kind": kind,
            "path": path,
            "pid": pid,
            "start_time": info.get("start_time"),
            "exe": info.get("exe"),
            "argv": info.get("argv"),
            "uid": info.get("uid"),
            "gid": info.get("gid"),
            "user": info.get("user"),
            "ancestors": info.get("ancestors"),
            "ktime": time.monotonic_ns(),
            **{k: info[k] for k in _HASH_FIELDS if k in info},
        }
