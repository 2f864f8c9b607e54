"""A port's listening socket: the name's lock, bind-then-rename, stale sockets, and the
accept loop that never goes deaf."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Final

from kport import paths
from kport.errors import NameCollision
from kport.port.security import ResolvedSecurity

log = logging.getLogger("kport.port")

#: how long the accept loop waits after an error it did not expect before it tries again
ACCEPT_BACKOFF_S: Final = 0.5
_ACCEPT_RETRY_ERRNOS: Final = frozenset(
    {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO}
)


class Listener:
    """The socket at a port's path, owned by this process while it holds the name's lock."""

    def __init__(self, name: str, path: Path, security: ResolvedSecurity) -> None:
        self.name = name
        self.path = path
        self.security = security
        self.closed = False
        self._sock: socket.socket | None = None
        self._lock_fd: int | None = None
        self._lock_path: Path | None = None
        self._inode: int | None = None

    @property
    def listening(self) -> bool:
        return self._sock is not None

    def open(self) -> None:
        """Take the name's lock and create the socket, with its permissions in place
        before its path exists."""
        self._take_lock()
        try:
            self._sock = self._bind()
        except BaseException:
            self.release_lock()
            raise

    async def accept_loop(self, on_accept: Callable[[socket.socket], None]) -> None:
        """Hand every accepted socket to ``on_accept`` until closed. Errors are logged and
        retried: a port never stays up deaf."""
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as err:
                if self.closed:
                    return
                if err.errno in _ACCEPT_RETRY_ERRNOS:
                    log.warning("port %s: accept failed (%s); retrying", self.name, err)
                    await asyncio.sleep(0.1)
                else:  # never a deaf port that looks up: say it, and keep listening
                    log.exception("port %s: accept failed unexpectedly; retrying", self.name)
                    await asyncio.sleep(ACCEPT_BACKOFF_S)
                continue
            on_accept(sock)

    def close(self) -> None:
        """Stop listening; the socket file goes (if it is still ours)."""
        self.closed = True
        if self._sock is not None:
            self._sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)

    def _take_lock(self) -> None:
        rundir = self.path.parent
        rundir.mkdir(parents=True, exist_ok=True, mode=0o755)
        lock_path = rundir / f".{self.path.name}.lock"
        while True:
            fd = paths.try_lock(lock_path)
            if fd is None:
                raise NameCollision(
                    f"port {self.name!r} is already served by a live process (it holds {lock_path})"
                )
            # The lock file may have been unlinked by a server that was stopping while we
            # waited: then lock the new file instead.
            try:
                same = os.stat(lock_path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._lock_fd = fd
                self._lock_path = lock_path
                return
            os.close(fd)

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            assert self._lock_path is not None
            with contextlib.suppress(OSError):
                os.unlink(self._lock_path)
            os.close(self._lock_fd)
            self._lock_fd = None

    def _bind(self) -> socket.socket:
        path = self.path
        if path.exists() or path.is_symlink():
            self._check_stale(path)
        sec = self.security
        # Bind inside a private directory, set owner and mode there, then rename into
        # place: the socket is never reachable with the wrong permissions.
        tmpdir = tempfile.mkdtemp(prefix=f".{self.name}.", dir=path.parent)
        tmp_path = os.path.join(tmpdir, "s")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(tmp_path)
            if (sec.owner, sec.group) != (os.geteuid(), os.getegid()):
                os.chown(tmp_path, sec.owner, sec.group)
            os.chmod(tmp_path, sec.mode)
            sock.listen(128)
            sock.setblocking(False)
            os.rename(tmp_path, path)
        except BaseException:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp_path)
            raise
        finally:
            os.rmdir(tmpdir)
        self._inode = os.stat(path).st_ino
        return sock

    def _check_stale(self, path: Path) -> None:
        """A leftover socket of a dead server is replaced; anything alive or foreign is not."""
        if not path.is_socket():
            raise NameCollision(f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("port %s: replacing the stale socket %s", self.name, path)
            return
        except OSError as err:
            raise NameCollision(
                f"{path} exists and cannot be checked ({err}); not replacing it"
            ) from err
        finally:
            probe.close()
        raise NameCollision(f"port {self.name!r} is already served at {path} by a live process")
