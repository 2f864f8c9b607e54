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
#: how much later than intended a timed thing may come on a machine whose CPUs are busy or
#: taken by the hypervisor. A test's time bound leaves at least this much, so it never
#: flakes, and is set against the outcome it rules out (a deadline never started, a wait
#: that lasts until the 60 s timeout it was given), which lies far beyond. How fast things
#: are is measured by `kport bench`, not asserted here.
SLACK_S = 10.0
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


class Netns:
    """Two network namespaces joined by a veth pair: ``client`` (10.77.N.1) where kport's
    firewall runs, and ``server`` (10.77.N.2) with whatever listens there. Nothing the
    tests send leaves them."""

    def __init__(self, tag: str, subnet: int) -> None:
        self.client = f"kt{tag}c"
        self.server = f"kt{tag}s"
        self.client_ip = f"10.77.{subnet}.1"
        self.server_ip = f"10.77.{subnet}.2"
        self.procs: list[subprocess.Popen[str]] = []

    def setup(self) -> None:
        veth_c, veth_s = f"{self.client}0", f"{self.server}0"
        for argv in (
            ["ip", "netns", "add", self.client],
            ["ip", "netns", "add", self.server],
            ["ip", "link", "add", veth_c, "type", "veth", "peer", "name", veth_s],
            ["ip", "link", "set", veth_c, "netns", self.client],
            ["ip", "link", "set", veth_s, "netns", self.server],
            ["ip", "-n", self.client, "addr", "add", f"{self.client_ip}/24", "dev", veth_c],
            ["ip", "-n", self.server, "addr", "add", f"{self.server_ip}/24", "dev", veth_s],
            ["ip", "-n", self.client, "link", "set", veth_c, "up"],
            ["ip", "-n", self.server, "link", "set", veth_s, "up"],
            ["ip", "-n", self.client, "link", "set", "lo", "up"],
            ["ip", "-n", self.server, "link", "set", "lo", "up"],
        ):
            subprocess.run(argv, check=True, capture_output=True)

    def teardown(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)
        for name in (self.client, self.server):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)

    def popen(self, where: str, argv: list[str], **kw: object) -> subprocess.Popen[str]:
        """Start ``argv`` in namespace ``where``; it is killed at teardown if still running."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc: subprocess.Popen[str] = subprocess.Popen(  # type: ignore[call-overload]
            ["ip", "netns", "exec", where, *argv],
            text=True,
            env=env,
            **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw},
        )
        self.procs.append(proc)
        return proc

    def run(
        self, where: str, argv: list[str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return subprocess.run(
            ["ip", "netns", "exec", where, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=False,
        )

    def python(
        self, where: str, code: str, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.run(where, [sys.executable, "-c", textwrap.dedent(code), *args], timeout)


_subnets = iter(range(1, 250))


@pytest.fixture
def netns() -> Iterator[Netns]:
    """A client and a server namespace (see Netns), removed afterwards."""
    ns = Netns(f"{os.getpid() % 10000}n{next(_subnets)}", next(_subnets))
    try:
        ns.setup()
        yield ns
    finally:
        ns.teardown()
