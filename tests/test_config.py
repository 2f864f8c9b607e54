"""The daemon configuration: defaults, overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kport import config


def test_defaults_round_trip_through_toml(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(config.Config().to_toml())
    assert config.load(path) == config.Config()


def test_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[proc]\nthreads = true\nkinds = ["exec"]\n[ports.proc]\nqueue_limit = 10\n')
    cfg = config.load(path)
    assert cfg.proc.threads and cfg.proc.kinds == ["exec"]
    assert cfg.ports["proc"].queue_limit == 10
    assert cfg.ports["proc"].groups == ["kport"]  # untouched defaults stay


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[proc]\nthread = true\n", "unknown key 'thread'"),
        ("[proc]\nthreads = 1\n", "proc.threads: expected bool"),
        ("[nope]\n", "unknown section"),
        ("[proc]\nkinds = ['bogus']\n", "unknown kinds"),
        ("[proc\n", "c.toml"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)
