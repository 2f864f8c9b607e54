"""What every benchmark shares: percentiles, a printed table, JSON results on disk, and the
two ends of a kport notify stream (flow control on the producer, counting on the consumer)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table as RichTable

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], pct: float) -> float:
    """The nearest-rank percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


class Table:
    """A titled table printed with rich."""

    def __init__(self, title: str, columns: list[str]) -> None:
        self._table = RichTable(title=title, title_justify="left")
        for i, column in enumerate(columns):
            self._table.add_column(column, justify="left" if i == 0 else "right")

    def row(self, *cells: str) -> None:
        self._table.add_row(*cells)

    def show(self) -> None:
        Console().print(self._table)


def save_results(name: str, result: dict[str, Any], directory: str | None = None) -> Path:
    """Write ``result`` and machine facts to ``<dir>/<name>-<UTC time>.json``; return its path."""
    out_dir = Path(directory) if directory else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = {
        **result,
        "machine": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
        },
        "utc": stamp,
    }
    path = out_dir / f"{name}-{stamp}.json"
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    Console().print(f"results saved to {path}")
    return path


async def flow_control(port: Any, conn: Any) -> None:
    """Once the client's queue is half full, let the writer drain it to a quarter: a
    producer that outruns its consumer measures drops, not throughput."""
    high = port.queue_limit // 2
    if conn.queue_depth >= high:
        while conn.queue_depth >= high // 2:
            await asyncio.sleep(0)


async def drained(conn: Any) -> None:
    """Wait until everything queued for ``conn`` is written (or it has gone)."""
    while conn.queue_depth and not conn.closed:
        await asyncio.sleep(0.001)


def count_notifications(port_name: str, rundir: str, count: int, timeout: float) -> dict[str, Any]:
    """Receive ``count`` notifications (lost ones count too); timed from first to last."""
    import kport

    received = lost = 0
    first = last = 0.0
    with kport.connect(port_name, runtime_dir=rundir) as conn:
        while received + lost < count:
            for msg in conn.get_messages(4096, timeout=timeout):
                if msg.kind == "notify":
                    if not received:
                        first = time.perf_counter()
                    received += 1
                else:
                    lost += msg.data["count"]
            last = time.perf_counter()
    return {"received": received, "lost": lost, "seconds": last - first}


def apt_install_without_starting(package: str) -> None:
    """Install a Debian package without letting its service start even once (a
    policy-rc.d that refuses every start, for the install only)."""
    import subprocess

    policy = Path("/usr/sbin/policy-rc.d")
    ours = not policy.exists()
    if ours:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", package],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    finally:
        if ours:
            policy.unlink()
