"""Executables known by their content: the sha256 of a process's program, cached by file.

The cache is keyed by what changes when a file's content may have: (device, inode, size,
mtime, ctime). A binary rewritten in place keeps its inode but gets a new mtime and ctime,
so it is hashed again; one replaced by a rename is another inode. A hit costs one stat
and a lookup, so an exec storm of the same few programs pays almost nothing.

The file hashed is the process's own, through ``/proc/<pid>/exe`` (right even when its
path was replaced or deleted since). A process gone before it is looked at (a short-lived
command in a storm) has no ``/proc/<pid>/exe``: its exe path is hashed instead and the
result says ``exe_sha256_by: "path"`` (the file at that path then, in the daemon's mount
namespace). What cannot be hashed says why in ``exe_sha256_error``, never a wrong hash.

Delivery is never stalled by a large binary: a file above ``inline_max_bytes``, or one
whose inline hashing passes ``inline_budget_s``, is finished by one worker thread, and the
event says ``exe_sha256_pending: true``; the hash then arrives as an event of its own,
``kind: "hash"``, naming the event it completes (``of_seq``), through ``late``. The
worker's queue is bounded (``queue_limit`` files): when it is full the event says
``exe_sha256_error`` and the refusal is counted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Final

log = logging.getLogger("kport.hashes")

Event = dict[str, Any]
#: (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns): a file's content, as far as the
#: kernel tells it without reading it
Key = tuple[int, int, int, int, int]

CACHE_ENTRIES: Final = 4096
INLINE_MAX_BYTES: Final = 4 << 20
INLINE_BUDGET_S: Final = 0.02
QUEUE_LIMIT: Final = 64
#: waiting events a pending file completes, at most (the rest get no late hash event)
WAITERS_MAX: Final = 64
#: exe paths whose last decided hash is remembered (hash_changed), the least recent first
DECIDED_MAX: Final = 4096
CHUNK: Final = 1 << 20
_DELETED: Final = " (deleted)"


def file_key(st: os.stat_result) -> Key:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Hasher:
    """sha256 of processes' executables, cached by file (see the module docstring).
    Safe to call from several sources' threads at once."""

    def __init__(
        self,
        *,
        cache_entries: int = CACHE_ENTRIES,
        inline_max_bytes: int = INLINE_MAX_BYTES,
        inline_budget_s: float = INLINE_BUDGET_S,
        queue_limit: int = QUEUE_LIMIT,
        late: Callable[[list[Event]], None] | None = None,
    ) -> None:
        self.cache_entries = cache_entries
        self.inline_max_bytes = inline_max_bytes
        self.inline_budget_s = inline_budget_s
        self.late = late
        self._lock = threading.Lock()
        #: key → (sha256 hex, the exe paths it was verified under)
        self._cache: OrderedDict[Key, tuple[str, frozenset[str]]] = OrderedDict()
        #: keys the worker has in hand → the events waiting for them
        self._waiting: dict[Key, list[Event]] = {}
        self._queue: queue.Queue[tuple[int, Any, Key, str | None] | None] = queue.Queue(queue_limit)
        self._decided: OrderedDict[str, str] = OrderedDict()
        self._thread: threading.Thread | None = None
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.hashed_bytes = 0
        self.deferred = 0
        self.refused = 0
        self.errors = 0

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="kport-hash", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)  # the worker ends after what it holds
            self._thread.join(5)
            self._thread = None

    def status(self) -> dict[str, Any]:
        return {
            "cache": {
                "entries": len(self._cache),
                "limit": self.cache_entries,
                "hits": self.hits,
                "misses": self.misses,
                "evictions": self.evictions,
            },
            "hashed_bytes": self.hashed_bytes,
            "deferred": self.deferred,
            "refused": self.refused,
            "errors": self.errors,
            "queue": self._queue.qsize(),
        }

    # --- lookups -----------------------------------------------------------------------

    def of_process(self, pid: int, exe: str | None, event: Event | None = None) -> Event:
        """The fields to put on an event about ``pid`` running ``exe``: ``exe_sha256``
        (with ``exe_sha256_by: "path"`` when the process was gone), or
        ``exe_sha256_pending`` (the worker finishes it; ``event``, if given, is the one a
        late ``hash`` event completes), or ``exe_sha256_error``."""
        proc_exe = f"/proc/{pid}/exe"
        try:
            st = os.stat(proc_exe)
            by_path = False
        except OSError:
            if not exe:
                return {"exe_sha256_error": "the process is gone and its exe is unknown"}
            try:
                st = os.stat(exe)
            except OSError as err:
                return {"exe_sha256_error": f"the process is gone; {exe}: {err.strerror}"}
            by_path = True
        key = file_key(st)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and (by_path or exe is None or exe in hit[1]):
                self.hits += 1
                self._cache.move_to_end(key)
                if by_path:
                    return {"exe_sha256": hit[0], "exe_sha256_by": "path"}
                return {"exe_sha256": hit[0]}
        return self._miss(proc_exe, exe, by_path, event)

    def _miss(self, proc_exe: str, exe: str | None, by_path: bool, event: Event | None) -> Event:
        opened = exe if by_path else proc_exe
        assert opened is not None
        try:
            fd = os.open(opened, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError as err:
            if by_path or not exe:
                self.errors += 1
                return {"exe_sha256_error": f"{opened}: {err.strerror}"}
            return self._miss(proc_exe, exe, True, event)  # gone meanwhile
        try:
            if not by_path and exe:
                now = os.readlink(proc_exe)
                if now.endswith(_DELETED) and not exe.endswith(_DELETED):
                    now = now[: -len(_DELETED)]
                if now != exe:  # it exec'd again: this fd is its next program's
                    os.close(fd)
                    return self._miss(proc_exe, exe, True, event)
            st = os.fstat(fd)  # the key of what is read: the same open file
        except OSError:
            os.close(fd)
            if by_path:
                return {"exe_sha256_error": f"{opened}: cannot be read"}
            return self._miss(proc_exe, exe, True, event)
        key = file_key(st)
        by = {"exe_sha256_by": "path"} if by_path else {}
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:  # known under another path (a hard link): the same content
                self.hits += 1
                self._remember(key, hit[0], exe)
                os.close(fd)
                return {"exe_sha256": hit[0], **by}
            self.misses += 1
        digest = hashlib.sha256()
        if st.st_size <= self.inline_max_bytes:
            deadline = time.monotonic() + self.inline_budget_s
            try:
                while True:
                    chunk = os.read(fd, CHUNK)
                    if not chunk:
                        break
                    digest.update(chunk)
                    self.hashed_bytes += len(chunk)
                    if time.monotonic() > deadline:
                        return {**self._defer(fd, digest, key, exe, event), **by}
            except OSError as err:
                os.close(fd)
                self.errors += 1
                return {"exe_sha256_error": f"{opened}: {err.strerror}"}
            os.close(fd)
            hexdigest = digest.hexdigest()
            with self._lock:
                self._remember(key, hexdigest, exe)
            return {"exe_sha256": hexdigest, **by}
        return {**self._defer(fd, digest, key, exe, event), **by}

    def _remember(self, key: Key, hexdigest: str, exe: str | None) -> None:
        """Cache ``hexdigest`` for ``key`` (the lock held), ``exe`` among its paths."""
        old = self._cache.get(key)
        paths = old[1] if old is not None else frozenset()
        if exe and exe not in paths:
            paths = paths | {exe}
        self._cache[key] = (hexdigest, paths)
        self._cache.move_to_end(key)
        while len(self._cache) > self.cache_entries:
            self._cache.popitem(last=False)
            self.evictions += 1

    def _defer(self, fd: int, digest: Any, key: Key, exe: str | None, event: Event | None) -> Event:
        """Hand the rest of the file to the worker; the event says so, or why not."""
        with self._lock:
            waiting = self._waiting.get(key)
            if waiting is not None:  # the worker has this file in hand already
                os.close(fd)
                if event is not None and len(waiting) < WAITERS_MAX:
                    waiting.append(event)
                self.deferred += 1
                return {"exe_sha256_pending": True}
            try:
                self._queue.put_nowait((fd, digest, key, exe))
            except queue.Full:
                os.close(fd)
                self.refused += 1
                return {"exe_sha256_error": "the hash worker's queue was full"}
            self._waiting[key] = [event] if event is not None else []
            self.deferred += 1
        return {"exe_sha256_pending": True}

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            fd, digest, key, exe = job
            hexdigest: str | None = None
            error: str | None = None
            try:
                while chunk := os.read(fd, CHUNK):
                    digest.update(chunk)
                    self.hashed_bytes += len(chunk)
                hexdigest = digest.hexdigest()
            except OSError as err:
                error = f"{exe}: {err.strerror}"
                self.errors += 1
            finally:
                os.close(fd)
            with self._lock:
                if hexdigest is not None:
                    self._remember(key, hexdigest, exe)
                waiting = self._waiting.pop(key, [])
            updates = [self._update(event, hexdigest, error) for event in waiting]
            if updates and self.late is not None:
                try:
                    self.late(updates)
                except Exception:  # the worker goes on: a bad moment must not end it
                    log.exception("hashes: handing on a late hash failed")

    @staticmethod
    def _update(event: Event, hexdigest: str | None, error: str | None) -> Event:
        update: Event = {
            "source": event.get("source"),
            "kind": "hash",
            "of_seq": event.get("seq"),
            "pid": event.get("pid"),
            "start_time": event.get("start_time"),
            "exe": event.get("exe"),
            "ktime": time.monotonic_ns(),
        }
        if hexdigest is not None:
            update["exe_sha256"] = hexdigest
        else:
            update["exe_sha256_error"] = error
        return update

    # --- prompts -----------------------------------------------------------------------

    def decided(self, exe: str | None, sha256: str | None) -> bool:
        """Remember ``sha256`` as the hash of ``exe`` at a decision about it; True if the
        last decision about that path saw another hash (the program changed since)."""
        if not exe or not sha256:
            return False
        with self._lock:
            before = self._decided.pop(exe, None)
            self._decided[exe] = sha256
            if len(self._decided) > DECIDED_MAX:
                self._decided.popitem(last=False)
        return before is not None and before != sha256
