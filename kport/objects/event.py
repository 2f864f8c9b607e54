"""`kport.Event`: an event object on eventfd that processes set, reset and wait on.

The semantics are Windows': an **auto-reset** event releases exactly one waiter per
``set()`` and resets itself as it does (setting an event that is already set changes
nothing); a **manual-reset** event releases every waiter and stays set until
``reset()``. The eventfd's counter is the state: non-zero is set. An auto-reset waiter
consumes it with ``read`` (only one reader can win it; the others sleep on, or see
``EAGAIN`` and wait again); a manual-reset waiter only polls. A wait without a timeout
is one blocking ``read``, as fast as raw eventfd; a wait with a timeout polls, then
reads with ``RWF_NOWAIT``, so it never sleeps in ``read`` past its deadline.

There is no ``pulse()``. Seed 000's set-then-clear pulse loses wake-ups: a waiter that
is not yet waiting at the instant of the pulse misses it for good. The pattern that
does not lose anything is an auto-reset event beside a queue: the producer appends to
the queue, then sets the event; the consumer waits on the event, then drains the whole
queue. A set that comes while the consumer is draining leaves the event set, so the
next wait returns at once, and nothing is ever left behind::

    items, ready = collections.deque(), kport.Event()
    # producer                         # consumer
    items.append(item)                 while True:
    ready.set()                            ready.wait()
                                           while items:
                                               handle(items.popleft())
"""

from __future__ import annotations

import asyncio
import errno
import math
import os
import select
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from kport.port.security import Security

_EVENTFD_LINK: Final = "anon_inode:[eventfd]"


def is_eventfd(fd: int) -> bool:
    """Whether ``fd`` is an eventfd (its /proc link is ``anon_inode:[eventfd]``)."""
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == _EVENTFD_LINK
    except OSError:
        return False


class Event:
    """An auto-reset or manual-reset event; see the module docstring."""

    __slots__ = ("__weakref__", "_closed", "_fd", "_namespace", "manual_reset", "name")

    def __init__(self, manual_reset: bool = False, initial: bool = False) -> None:
        self.manual_reset = manual_reset
        self.name: str | None = None
        self._fd = os.eventfd(1 if initial else 0, os.EFD_CLOEXEC)
        self._closed = False
        #: (namespace connection, name, serial, pid) for a named event: close() gives the
        #: reference back
        self._namespace: tuple[Any, str, int, int] | None = None

    # --- named events (kport.objects) ------------------------------------------------

    @classmethod
    def create_named(
        cls,
        name: str,
        *,
        manual_reset: bool = False,
        initial: bool = False,
        security: Security | None = None,
        permanent: bool = False,
        namespace: str = "objects",
        runtime_dir: str | os.PathLike[str] | None = None,
    ) -> Event:
        """Create the event ``name`` in a namespace (the daemon's ``objects`` port).

        ``NameCollision`` if the name exists. ``security`` says who else may open it
        (its creator's uid and root always may). It lives while any process holds it
        open, or until removed if ``permanent``.
        """
        from kport.objects import calls

        return calls.create_named(
            name,
            manual_reset=manual_reset,
            initial=initial,
            security=security,
            permanent=permanent,
            namespace=namespace,
            runtime_dir=runtime_dir,
        )

    @classmethod
    def open_named(
        cls,
        name: str,
        *,
        namespace: str = "objects",
        runtime_dir: str | os.PathLike[str] | None = None,
    ) -> Event:
        """Open the existing event ``name``: ``NameNotFound`` if there is none,
        ``AccessDenied`` if its security does not admit this process."""
        from kport.objects import calls

        return calls.open_named(name, namespace=namespace, runtime_dir=runtime_dir)

    @classmethod
    def open_or_create(
        cls,
        name: str,
        *,
        manual_reset: bool = False,
        initial: bool = False,
        security: Security | None = None,
        namespace: str = "objects",
        runtime_dir: str | os.PathLike[str] | None = None,
    ) -> Event:
        """Open ``name`` if it exists, else create it: for when that is really meant."""
        from kport.objects import calls

        return calls.create_named(
            name,
            manual_reset=manual_reset,
            initial=initial,
            security=security,
            namespace=namespace,
            runtime_dir=runtime_dir,
            open_existing=True,
        )

    @classmethod
    def from_fd(cls, fd: int, *, manual_reset: bool) -> Event:
        """An Event that owns ``fd``, an eventfd received from another process.

        Its flags are left as they are (blocking or not, both work). Anything that is not
        an eventfd is a ``ValueError``.
        """
        if not is_eventfd(fd):
            raise ValueError(f"fd {fd} is not an eventfd")
        event = cls.__new__(cls)
        event.manual_reset = manual_reset
        event.name = None
        event._fd = fd
        event._closed = False
        event._namespace = None
        return event

    def __repr__(self) -> str:
        mode = "manual-reset" if self.manual_reset else "auto-reset"
        name = f" {self.name!r}" if self.name else ""
        state = "closed" if self._closed else ("set" if self.is_set() else "clear")
        return f"<kport.Event{name} {mode} {state}>"

    def fileno(self) -> int:
        self._check()
        return self._fd

    def _check(self) -> None:
        if self._closed:
            raise ValueError("the event is closed")

    def set(self) -> None:
        """Signal the event: one waiter goes (auto-reset), or all of them (manual-reset)."""
        self._check()
        os.eventfd_write(self._fd, 1)

    def reset(self) -> None:
        """Make the event non-signalled."""
        self._check()
        _read_now(self._fd)

    def is_set(self) -> bool:
        """Whether the event is signalled now (an auto-reset event stays so: not consumed)."""
        self._check()
        return bool(_poller(self._fd).poll(0))

    def _try_acquire(self) -> bool:
        """Take the signal if there is one: consume it (auto-reset) or see it (manual)."""
        if self.manual_reset:
            return self.is_set()
        return _read_now(self._fd)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until signalled; False if ``timeout`` seconds pass first."""
        self._check()
        poller = _poller(self._fd)
        if timeout is None:
            if self.manual_reset:
                poller.poll()
                return True
            try:
                os.eventfd_read(self._fd)  # the hot path: one blocking read, as raw eventfd
                return True
            except BlockingIOError:  # a non-blocking fd from elsewhere: poll, then read
                while True:
                    poller.poll()
                    if _read_now(self._fd):
                        return True
        deadline = time.monotonic() + timeout
        while True:
            if poller.poll(_wait_ms(deadline)) and self._try_acquire():
                return True
            if time.monotonic() >= deadline:
                return False

    async def wait_async(self, timeout: float | None = None) -> bool:
        """:meth:`wait` for asyncio: the loop watches the fd, no thread is used."""
        self._check()
        if self._try_acquire():
            return True
        loop = asyncio.get_running_loop()
        woken = asyncio.Event()
        # A loop has one reader per fd: every waiter of this loop on this fd shares it.
        watchers = _loop_watchers(loop)
        fd = self._fd
        waiting = watchers.get(fd)
        if waiting is None:
            waiting = watchers[fd] = set()
            loop.add_reader(fd, _wake_all, waiting)
        waiting.add(woken)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    await woken.wait()
                    woken.clear()
                    if self._try_acquire():
                        return True
        except TimeoutError:
            return False
        finally:
            waiting.discard(woken)
            if not waiting and watchers.get(fd) is waiting:
                del watchers[fd]
                loop.remove_reader(fd)

    def close(self) -> None:
        """Close this process's reference; the event lives on while others hold one."""
        if not self._closed:
            self._closed = True
            os.close(self._fd)
            if self._namespace is not None:
                from kport.objects import calls

                handle, self._namespace = self._namespace, None
                calls.release(handle)

    def __enter__(self) -> Event:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            self._closed = True
            try:
                os.close(self._fd)
            except OSError as err:
                if err.errno != errno.EBADF:
                    raise


_watchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, set[asyncio.Event]]]
_watchers = weakref.WeakKeyDictionary()


def _loop_watchers(loop: asyncio.AbstractEventLoop) -> dict[int, set[asyncio.Event]]:
    watchers = _watchers.get(loop)
    if watchers is None:
        watchers = _watchers[loop] = {}
    return watchers


def _wake_all(waiting: set[asyncio.Event]) -> None:
    for woken in waiting:
        woken.set()


_scratch = threading.local()


def _read_now(fd: int) -> bool:
    """Consume the counter if it is non-zero, never sleeping (``RWF_NOWAIT``)."""
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = bytearray(8)
    try:
        os.preadv(fd, [buf], -1, os.RWF_NOWAIT)
    except BlockingIOError:
        return False
    return True


_pollers = threading.local()


def _poller(fd: int) -> select.poll:
    """A poll object watching ``fd``, kept per thread (one may not be shared by threads).

    Registered by fd number, so one closed and reused stays right: poll looks the number
    up when it runs.
    """
    cache: dict[int, select.poll] | None = getattr(_pollers, "cache", None)
    if cache is None:
        cache = _pollers.cache = {}
    poller = cache.get(fd)
    if poller is None:
        if len(cache) >= 256:
            cache.clear()
        poller = cache[fd] = select.poll()
        poller.register(fd, select.POLLIN)
    return poller


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _wait_ms(deadline: float | None) -> int | None:
    """Milliseconds to the deadline for poll(), rounded up so that it never spins."""
    return None if deadline is None else max(0, math.ceil((deadline - time.monotonic()) * 1000))


def wait_any(events: Sequence[Event], timeout: float | None = None) -> int | None:
    """Wait until one of ``events`` is signalled; its index (the lowest), or None on timeout.

    Like ``WaitForMultipleObjects(bWaitAll=FALSE)``: an auto-reset event that is
    returned has been consumed; the others are left as they are.
    """
    if not events:
        raise ValueError("wait_any needs at least one event")
    poller = select.poll()
    for event in events:
        poller.register(event.fileno(), select.POLLIN)
    deadline = _deadline(timeout)
    while True:
        for index, event in enumerate(events):
            if event._try_acquire():
                return index
        if deadline is not None and time.monotonic() >= deadline:
            return None
        poller.poll(_wait_ms(deadline))


def wait_all(events: Sequence[Event], timeout: float | None = None) -> bool:
    """Wait until every one of ``events`` is signalled at once; False on timeout.

    Auto-reset events are consumed together: if another waiter takes one of them
    first, the ones already taken are set again (a set is never lost) and the wait
    goes on. Unlike Windows this is not one atomic kernel operation: another waiter
    may briefly see, and take, an event that is then given back.
    """
    if not events:
        raise ValueError("wait_all needs at least one event")
    if len({e.fileno() for e in events}) != len(events):
        raise ValueError("wait_all: the same event is passed twice")
    deadline = _deadline(timeout)
    while True:
        if all(event.is_set() for event in events):
            taken: list[Event] = []
            for event in events:
                if not event._try_acquire():
                    for back in taken:
                        if not back.manual_reset:
                            back.set()
                    break
                taken.append(event)
            else:
                return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        poller = select.poll()
        pending = [event for event in events if not event.is_set()]
        for event in pending:
            poller.register(event.fileno(), select.POLLIN)
        if pending:
            poller.poll(_wait_ms(deadline))
        else:  # all set, but another waiter won one: try again in a moment, never spin
            time.sleep(0.001)
