"""The `kport` command in a real process: help, version, refusals, and each subcommand's
face imported only when it runs."""

from __future__ import annotations

import subprocess
import sys

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


def test_parsing_imports_no_face() -> None:
    """Parsing loads none of the faces (nor the daemon, rich, SQLite): `kport tail` starts
    without paying for `kport serve`."""
    code = (
        "import sys; from kport import cli; cli.build_parser().parse_args(['status']); "
        "print(sorted(m for m in sys.modules if m.startswith('kport.cli.') or m in "
        "('kport.daemon', 'rich', 'sqlite3')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.strip() == "[]"
