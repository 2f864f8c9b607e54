"""`kport serve`: wires the kernel sources to their ports, with daemon-wide seq and filters,
a control port for `kport status`, and a clean shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import grp
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

from kport import __version__, paths
from kport.config import Config, PortConfig
from kport.port.security import Security
from kport.port.server import ServerConnection, ServerPort
from kport.sources.proc import ProcSource

log = logging.getLogger("kport.daemon")


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for journald and log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def port_security(name: str, cfg: PortConfig) -> Security:
    """The port's Security; groups that do not exist on this machine are left out, loudly."""
    groups: list[str | int] = []
    for group in cfg.groups:
        if isinstance(group, str):
            try:
                grp.getgrnam(group)
            except KeyError:
                log.warning(
                    "port %s: group %r does not exist; it is left out "
                    "(create it, or run `kport install-service`)",
                    name,
                    group,
                )
                continue
        groups.append(group)
    return Security(uids=cfg.users, gids=groups)


class Rate:
    """Events per second over the last few seconds."""

    def __init__(self, window_s: float = 5.0) -> None:
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()
        self.total = 0

    def add(self, count: int) -> None:
        self.total += count

    def per_second(self) -> float:
        now = time.monotonic()
        self.samples.append((now, self.total))
        while self.samples and now - self.samples[0][0] > self.window_s:
            self.samples.popleft()
        first_t, first_n = self.samples[0]
        return (self.total - first_n) / (now - first_t) if now > first_t else 0.0


class Daemon:
    """The sources, the ports, and the glue between them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime_dir = paths.runtime_dir(config.daemon.runtime_dir or None)
        self.seq = 0
        self.started = time.time()
        self.ports: dict[str, ServerPort] = {}
        self.sources: dict[str, ProcSource] = {}
        self.rates: dict[str, Rate] = {}
        self.filtered = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()

    def _port(self, name: str, **kwargs: Any) -> ServerPort:
        cfg = self.config.ports.get(name, PortConfig())
        port = ServerPort(
            name,
            security=port_security(name, cfg),
            max_connections=cfg.max_connections,
            queue_limit=cfg.queue_limit,
            runtime_dir=self.runtime_dir,
            **kwargs,
        )
        self.ports[name] = port
        return port

    async def run(self) -> None:
        """Serve until SIGTERM/SIGINT or :meth:`stop`."""
        # The sources' threads and the event loop share the GIL. With the default 5 ms
        # switch interval a thread waking from I/O queues behind a busy one (the convoy
        # effect), which put milliseconds onto every delivery.
        sys.setswitchinterval(0.0005)
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self.stop)
        self._port("control", on_message=self._control)
        if self.config.proc.enabled:
            self._port("proc", one_way=True)
            self.rates["proc"] = Rate()
            self.sources["proc"] = ProcSource(self._from_thread, threads=self.config.proc.threads)
        started: list[ServerPort] = []
        try:
            for port in self.ports.values():
                await port.start()
                started.append(port)
            for source in self.sources.values():
                source.start()
            log.info(
                "kport %s serving %s in %s",
                __version__,
                ", ".join(sorted(self.ports)),
                self.runtime_dir,
            )
            await self._stop.wait()
        finally:
            log.info("stopping")
            for source in self.sources.values():
                source.stop()
            for port in started:
                await port.shutdown(reason="kport serve stopped")

    def stop(self) -> None:
        self._stop.set()

    # --- events ------------------------------------------------------------------------

    def _from_thread(self, batch: list[dict[str, Any]]) -> None:
        """Called by a source's thread: deliver on the event loop."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed while we were called
                loop.call_soon_threadsafe(self.deliver, batch)

    def _passes(self, event: dict[str, Any]) -> bool:
        cfg = self.config.proc
        if event.get("kind") == "lost":
            return True  # loss is never filtered away
        if cfg.kinds and event.get("kind") not in cfg.kinds:
            return False
        if cfg.uids and event.get("uid") not in cfg.uids:
            return False
        if cfg.exe:
            exe = event.get("exe") or ""
            if not any(fnmatch.fnmatchcase(exe, pattern) for pattern in cfg.exe):
                return False
        return True

    def deliver(self, batch: list[dict[str, Any]]) -> None:
        """Give each event its daemon-wide seq and wall-clock time, and send it out."""
        port = self.ports.get("proc")
        now = time.time_ns()
        sent = 0
        for event in batch:
            if not self._passes(event):
                self.filtered += 1
                continue
            self.seq += 1
            event["seq"] = self.seq
            event["ts"] = now
            sent += 1
            if port is not None:
                port.broadcast(event, seq=self.seq)
        self.rates["proc"].add(sent)

    # --- the control port --------------------------------------------------------------

    def _control(self, conn: ServerConnection, data: Any) -> Any:
        op = data.get("op") if isinstance(data, dict) else None
        if op == "status":
            return self.status()
        raise ValueError(f"unknown control request {data!r:.60}; known ops: status")

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "seq": self.seq,
            "filtered": self.filtered,
            "runtime_dir": str(self.runtime_dir),
            "sources": {
                name: {**source.status(), "rate": round(self.rates[name].per_second(), 1)}
                for name, source in self.sources.items()
            },
            "ports": {
                name: {
                    "path": str(port.path),
                    "one_way": port.one_way,
                    "lost": port.lost,
                    "connections": [c.info() for c in port.connections],
                }
                for name, port in self.ports.items()
            },
        }
