"""Fixtures shared by the tests: a private runtime directory, client processes, and the
small asyncio helpers the port tests use."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.005)


@pytest.fixture
def rundir() -> Iterator[Path]:
    """A runtime directory that other users can traverse (mode 0755), removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="kport-test-") as tmp:
        os.chmod(tmp, 0o755)
        yield Path(tmp)


def spawn_client(code: str, *args: str, **popen: object) -> subprocess.Popen[str]:
    """Run ``code`` (dedented) in a fresh Python process: a real, separate client."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def run_as_nobody(action: Callable[[], str]) -> str:
    """Fork, drop to the user nobody, run ``action``; its result (or its error) as a line."""
    import pwd

    nobody = pwd.getpwnam("nobody")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no asyncio, no threads, just sync kport calls
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            try:
                line = action()
            except Exception as err:  # noqa: BLE001 - reported to the parent
                line = f"{type(err).__name__}: {err}"
            os.write(write_end, line.encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        out = f.read().decode()
    os.waitpid(pid, 0)
    return out


@contextlib.contextmanager
def mounted(point: Path, *how: str) -> Iterator[Path]:
    """``mount HOW... POINT`` (POINT made if missing), lazily unmounted afterwards."""
    point.mkdir(exist_ok=True)
    subprocess.run(["mount", *how, str(point)], check=True, capture_output=True)
    try:
        yield point
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def mount_tmpfs(point: Path, size: str = "8m") -> contextlib.AbstractContextManager[Path]:
    """A private tmpfs of ``size`` at ``point`` (see :func:`mounted`)."""
    return mounted(point, "-t", "tmpfs", "-o", f"size={size}", "tmpfs")
