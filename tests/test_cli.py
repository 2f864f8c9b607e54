"""The `kport` command: help, version, and the demo end to end in a real process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kport

KPORT = [sys.executable, "-m", "kport.cli"]


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*KPORT, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kport {kport.__version__}"


def test_help_lists_the_commands() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("demo", "bench"):
        assert command in result.stdout


def test_no_command_prints_help_and_fails() -> None:
    result = run_cli()
    assert result.returncode == 2
    assert "usage: kport" in result.stdout


def test_unknown_benchmark_is_refused() -> None:
    result = run_cli("bench", "nonsense")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_demo_announces_processes_to_its_client(rundir: Path) -> None:
    result = run_cli("demo", "--runtime-dir", str(rundir), "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("server: port 'demo'")
    assert lines[1].startswith("client: connected")
    assert len(lines) == 5 and all("snapshot" in line for line in lines[2:])
    assert list(rundir.iterdir()) == []  # socket and lock removed on the way out
