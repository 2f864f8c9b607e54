"""An exporter's files: its cursor (the last seq the broker acknowledged, per source) and
its status, which `kport status` shows; written whole or not at all."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

from kport import paths


def directory(state_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where exporters keep their files: ``<state dir>/export`` unless told."""
    return Path(state_dir) if state_dir else paths.state_dir() / "export"


def read_status(state_dir: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Every exporter's last status on this machine."""
    out = []
    for path in sorted(directory(state_dir).glob("*.status.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append(json.loads(path.read_text()))
    return out


def write_atomically(path: Path, text: str, *, durable: bool = True) -> None:
    """``text`` to ``path``, all of it or the file as it was; ``durable``: on disk before
    it replaces the old one (a status, rewritten each second, need not be)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as out:
        out.write(text)
        if durable:
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)
