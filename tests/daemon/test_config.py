"""The daemon configuration: defaults, overrides, and errors that name file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from kport.daemon import config


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


def test_journal_section(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[journal]\nmax_age_days = 7\npath = "/srv/j.db"\ncommit_interval_ms = 50\n')
    cfg = config.load(path)
    assert cfg.journal.max_age_days == 7.0 and isinstance(cfg.journal.max_age_days, float)
    assert cfg.journal.path == "/srv/j.db" and cfg.journal.commit_interval_ms == 50
    assert cfg.journal.enabled and cfg.ports["journal"].groups == ["kport"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[proc]\nthread = true\n", "unknown key 'thread'"),
        ("[proc]\nthreads = 1\n", "proc.threads: expected bool"),
        ("[nope]\n", "unknown section"),
        ("[proc]\nkinds = ['bogus']\n", "unknown kinds"),
        ("[proc]\nbatch_window_ms = -1\n", "proc.batch_window_ms must be 0 to 100"),
        ("[proc]\nbatch_above = -5\n", "proc.batch_above must be >= 0"),
        ("[proc\n", "c.toml"),
        ("[journal]\nmax_age_days = 'week'\n", "journal.max_age_days: expected float"),
        ("[journal]\nmax_size_mb = 0\n", "must be > 0"),
        ("[journal]\ncommit_interval_ms = 0\n", "commit_interval_ms must be 1 to 60000"),
        ("[net]\nqueues = 65\n", "net.queues must be 0 \\(one per CPU\\) to 64"),
        ("[net]\nqueue = 65535\nqueues = 2\n", "go past NFQUEUE 65535"),
    ],
)
def test_errors_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)
