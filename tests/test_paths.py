"""Runtime and state directories follow DESIGN.md §3; port names are validated."""

from __future__ import annotations

from pathlib import Path

import pytest

from kport import paths


def test_runtime_dir_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPORT_RUNTIME_DIR", "/tmp/x")
    assert paths.runtime_dir() == Path("/tmp/x")
    assert paths.runtime_dir("/elsewhere") == Path("/elsewhere")
    monkeypatch.delenv("KPORT_RUNTIME_DIR")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.runtime_dir() == Path("/run/kport")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1000")
    assert paths.runtime_dir() == Path("/run/user/1000/kport")


def test_state_dir_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPORT_STATE_DIR", "/tmp/s")
    assert paths.state_dir() == Path("/tmp/s")
    monkeypatch.delenv("KPORT_STATE_DIR")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 0)
    assert paths.state_dir() == Path("/var/lib/kport")
    monkeypatch.setattr(paths.os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", "/home/u/.state")
    assert paths.state_dir() == Path("/home/u/.state/kport")


def test_port_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KPORT_RUNTIME_DIR", "/tmp/r")
    assert paths.port_path("proc") == Path("/tmp/r/proc.sock")
    assert paths.port_path("/some/where.sock") == Path("/some/where.sock")
    assert paths.port_name_of(Path("/tmp/r/proc.sock")) == "proc"


@pytest.mark.parametrize(
    ("name", "rule"),
    [("", "1 to 64"), ("x" * 65, "1 to 64"), ("a b", "not ' '"), (".hidden", "start with")],
)
def test_bad_port_names_name_the_rule(name: str, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        paths.validate_port_name(name)
