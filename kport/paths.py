"""Where kport keeps its sockets and its state, by the rules of DESIGN.md §3."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

SOCKET_SUFFIX = ".sock"


def runtime_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else $KPORT_RUNTIME_DIR, else /run/kport (root) or $XDG_RUNTIME_DIR/kport."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("KPORT_RUNTIME_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/kport")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        return Path(xdg) / "kport"
    return Path(f"/tmp/kport-{os.geteuid()}")


def state_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else $KPORT_STATE_DIR, else /var/lib/kport (root) or $XDG_STATE_HOME/kport."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get("KPORT_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/kport")
    xdg = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(xdg) / "kport"


def port_path(
    name_or_path: str | os.PathLike[str], runtime: str | os.PathLike[str] | None = None
) -> Path:
    """The socket path of a port: a name maps to ``<runtime dir>/<name>.sock``; a path is kept."""
    text = os.fspath(name_or_path)
    if "/" in text:
        return Path(text)
    validate_port_name(text)
    return runtime_dir(runtime) / f"{text}{SOCKET_SUFFIX}"


def port_name_of(path: Path) -> str:
    """The port name a socket path stands for (its file name without ``.sock``)."""
    name = path.name
    return name[: -len(SOCKET_SUFFIX)] if name.endswith(SOCKET_SUFFIX) else name


_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def validate_port_name(name: str) -> None:
    """A port name: 1-64 letters, digits, ``-``, ``_`` and ``.``, not starting with ``.``."""
    if not name or len(name) > 64:
        raise ValueError(f"port name {name!r} must be 1 to 64 characters long")
    bad = sorted(set(name) - _NAME_CHARS)
    if bad:
        raise ValueError(
            f"port name {name!r} may hold only letters, digits, '-', '_' and '.', "
            f"not {''.join(bad)!r}"
        )
    if name.startswith("."):
        raise ValueError(f"port name {name!r} may not start with '.'")


def try_lock(path: Path) -> int | None:
    """An exclusive flock on ``path`` (created 0600): its fd, or None if another process
    holds it. The lock goes when the fd is closed, or with the process."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
