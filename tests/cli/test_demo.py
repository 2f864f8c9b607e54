"""`kport demo` end to end in a real process: a port and its client in one process."""

from __future__ import annotations

from pathlib import Path

from tests.cli.test_cli import run_cli


def test_demo_announces_processes_to_its_client(rundir: Path) -> None:
    result = run_cli("demo", "--runtime-dir", str(rundir), "--count", "3")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("server: port 'demo'")
    assert lines[1].startswith("client: connected")
    assert len(lines) == 5 and all("snapshot" in line for line in lines[2:])
    assert list(rundir.iterdir()) == []  # socket and lock removed on the way out
