"""Fixtures shared by the tests: a private runtime directory, and client processes."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
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
