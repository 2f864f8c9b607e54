"""Fixtures shared by the tests: a private runtime directory, and client processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


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
