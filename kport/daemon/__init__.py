"""`kport serve`'s daemon: wires the kernel sources to the journal and their ports, and
runs them until SIGTERM, SIGINT or SIGHUP, then shuts down cleanly.

The wiring and the lifecycle are here. The delivery path (seq, filters, journal, ports)
is :mod:`~kport.daemon.delivery`; the answers to requests on the journal, control and
rules ports are :mod:`~kport.daemon.ops`; asking decision clients is
:mod:`~kport.daemon.decisions`; the configuration is :mod:`~kport.daemon.config`.
"""

from __future__ import annotations

import asyncio
import functools
import grp
import logging
import os
import signal
import sqlite3
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kport import paths
from kport.daemon.config import Config, PortConfig
from kport.daemon.decisions import MAX_ASKS, Decisions, remember_file, remember_net
from kport.daemon.delivery import Delivery, Rate
from kport.daemon.ops import ControlOps, JournalOps, rules_request
from kport.daemon.redact import Redactor
from kport.journal.store import Journal, SourceHistory
from kport.objects import Namespace
from kport.port.security import Security
from kport.port.server import ServerPort
from kport.rules import RuleSet
from kport.sources import file as file_source
from kport.sources import net as net_source
from kport.sources.file import FileSource
from kport.sources.firewall import Plan
from kport.sources.hashes import Hasher
from kport.sources.net import NetSource
from kport.sources.proc import ProcSource
from kport.sources.sockets import all_processes
from kport.version import __version__

log = logging.getLogger("kport.daemon")


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


class Daemon:
    """The sources, the ports, and the glue between them."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.runtime_dir = paths.runtime_dir(config.daemon.runtime_dir or None)
        self.state_dir = paths.state_dir(config.daemon.state_dir or None)
        self.ports: dict[str, ServerPort] = {}
        self.delivery = Delivery(config.proc, self.ports)
        #: secrets taken out of command lines before events, requests and the process
        #: tree leave the daemon; None when [redact] is off
        self.redactor = (
            Redactor(defaults=config.redact.defaults, patterns=config.redact.patterns)
            if config.redact.enabled
            else None
        )
        self.delivery.redactor = self.redactor
        #: executables' sha256 for the sources' events; None when [hash] is off
        hcfg = config.hash
        self.hasher = (
            Hasher(
                cache_entries=hcfg.cache_entries,
                inline_max_bytes=int(hcfg.inline_max_mb * (1 << 20)),
                inline_budget_s=hcfg.inline_budget_ms / 1000,
                queue_limit=hcfg.queue_limit,
                late=self.delivery.from_thread,
            )
            if hcfg.enabled
            else None
        )
        if config.journal.enabled:
            jcfg = config.journal
            self.delivery.journal = Journal(
                jcfg.path or self.state_dir / "journal.db",
                max_age_s=jcfg.max_age_days * 86400,
                max_bytes=jcfg.max_size_mb * 1024 * 1024,
                queue_limit=jcfg.queue_limit,
                commit_interval_s=jcfg.commit_interval_ms / 1000,
                on_state=self.delivery.journal_state,
            )
        self.journal_error: str | None = None
        self.namespace: Namespace | None = None
        self.started = time.time()
        self.sources: dict[str, ProcSource | FileSource | NetSource] = {}
        #: decision port name → its asks
        self.decisions: dict[str, Decisions] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queries = ThreadPoolExecutor(2, thread_name_prefix="kport-query")
        self._stop = asyncio.Event()

    @property
    def journal(self) -> Journal | None:
        """The journal, while there is one (None if it is off or could not be opened)."""
        return self.delivery.journal

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
        """Serve until SIGTERM/SIGINT/SIGHUP or :meth:`stop`."""
        # The sources' threads and the event loop share the GIL. With the default 5 ms
        # switch interval a thread waking from I/O queues behind a busy one (the convoy
        # effect), which put milliseconds onto every delivery.
        sys.setswitchinterval(0.0005)
        self._loop = self.delivery.loop = asyncio.get_running_loop()
        # SIGHUP too: a daemon started at a terminal that closes would otherwise die at
        # once, leaving its sockets, and its firewall rules for a fail-closed queue.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.add_signal_handler(sig, self.stop)
        journal = self.journal
        if journal is not None:
            try:
                self.delivery.seq = await asyncio.to_thread(journal.open)
            except (sqlite3.Error, OSError) as err:
                # Delivery matters more than history: serve without a journal, loudly.
                self.journal_error = f"cannot open the journal {journal.path}: {err}"
                log.error("%s; serving without history (durability is off)", self.journal_error)
                journal = self.delivery.journal = None
        if journal is not None:
            journal.start()
            ops = JournalOps(journal, self._queries, self.redactor)
            self._port("journal", on_message=ops.handle)
        self._port("control", on_message=ControlOps(self.status, self.sources).handle)
        cfg = self.config.ports.get("objects", PortConfig())
        self.namespace = Namespace(
            "objects",
            security=port_security("objects", cfg),
            max_connections=cfg.max_connections,
            runtime_dir=self.runtime_dir,
        )
        self.ports["objects"] = self.namespace.port
        if self.config.proc.enabled:
            history = SourceHistory(journal, ("proc", "kport")) if journal else None
            self._port("proc", one_way=True, history=history)
            self.delivery.rates["proc"] = Rate()
            self.sources["proc"] = ProcSource(
                self.delivery.from_thread,
                threads=self.config.proc.threads,
                batch_window_s=self.config.proc.batch_window_ms / 1000,
                batch_above=self.config.proc.batch_above,
                backend=self.config.proc.backend,
                argv_max=self.config.proc.argv_max,
                ring_bytes=self.config.proc.ring_kb * 1024,
                hasher=self.hasher,
            )
        if self.config.file.enabled:
            self._setup_file(journal)
        if self.config.net.enabled:
            self._setup_net(journal)
        for name, decisions in self.decisions.items():
            decisions.attach(self.ports[name], self._loop)
        started: list[ServerPort] = []
        try:
            for port in self.ports.values():
                await port.start()
                started.append(port)
            if self.hasher is not None:
                self.hasher.start()
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
            if self.hasher is not None:
                self.hasher.stop()
            for decisions in self.decisions.values():
                decisions.cancel()  # each answers its opener with the default on the way out
            for port in started:
                await port.shutdown(reason="kport serve stopped")
            self._queries.shutdown(wait=False, cancel_futures=True)
            if self.namespace is not None:
                self.namespace.close_objects()
            if journal is not None:
                await asyncio.to_thread(journal.close)

    def stop(self) -> None:
        self._stop.set()

    # --- deciding sources --------------------------------------------------------------

    def _deciding_ports(
        self,
        source: str,
        journal: Journal | None,
        decisions: Decisions,
        rules: RuleSet,
        remembered: str,
    ) -> Decisions:
        """A deciding source's two ports: its events (one-way, with history) and its
        decision port (asks, and rules requests for an editor)."""
        history = SourceHistory(journal, (source, "kport")) if journal else None
        self._port(source, one_way=True, history=history)
        self.delivery.rates[source] = Rate()
        self.decisions[f"{source}-decide"] = decisions
        self._port(
            f"{source}-decide",
            on_connect=decisions.changed,
            on_disconnect=decisions.changed,
            on_message=functools.partial(rules_request, rules, remembered),
        )
        return decisions

    # --- file access ---------------------------------------------------------------------

    def _setup_file(self, journal: Journal | None) -> None:
        cfg = self.config.file
        remembered = cfg.remembered or str(self.state_dir / "file-remembered.toml")
        rules = RuleSet(
            [remembered, *cfg.rules],
            default=cfg.default_action,
            kinds=tuple(file_source.PERMISSION_KINDS),
        )
        decisions = self._deciding_ports(
            "file",
            journal,
            Decisions(
                deadline_s=cfg.decision_deadline_s,
                default_verdict=cfg.default_verdict,
                on_reply=functools.partial(remember_file, rules, remembered),
                redactor=self.redactor,
            ),
            rules,
            remembered,
        )
        proc = self.sources.get("proc")
        self.sources["file"] = FileSource(
            self.delivery.from_thread,
            watches=file_source.watches_of(cfg.paths, cfg.mounts, cfg.filesystems),
            permissions=cfg.permissions,
            events=cfg.events,
            processes=proc.table if isinstance(proc, ProcSource) else None,
            rules=rules,
            ask=decisions.ask_from_thread,
            max_asks=MAX_ASKS,
            default_verdict=cfg.default_verdict == "allow",
            trusted=lambda: decisions.deciders,
            hasher=self.hasher,
        )

    # --- the firewall ------------------------------------------------------------------

    def _setup_net(self, journal: Journal | None) -> None:
        cfg = self.config.net
        remembered = cfg.remembered or str(self.state_dir / "net-remembered.toml")
        rules = RuleSet([remembered, *cfg.rules], default=cfg.default_action, domain="net")
        decisions = self._deciding_ports(
            "net",
            journal,
            Decisions(
                deadline_s=cfg.decision_deadline_s,
                default_verdict=cfg.default_verdict,
                verdicts=net_source.VERDICTS,
                on_reply=functools.partial(remember_net, rules, remembered),
                redactor=self.redactor,
            ),
            rules,
            remembered,
        )
        proc = self.sources.get("proc")
        table = proc.table if isinstance(proc, ProcSource) else None
        plan = Plan(
            queue=cfg.queue,
            queues=net_source.queue_count(cfg.queues),
            inbound=cfg.inbound,
            loopback=cfg.loopback,
            fail_open=cfg.fail_open,
            dns=cfg.dns,
        )
        self.sources["net"] = NetSource(
            self.delivery.from_thread,
            plan=plan,
            backend=cfg.backend,
            rules=rules,
            ask=decisions.ask_from_thread,
            max_asks=MAX_ASKS,
            default_verdict=cfg.default_verdict,
            trusted=lambda: decisions.deciders,
            processes=table,
            candidates=table.candidates if table is not None else all_processes,
            queue_length=cfg.queue_length,
            hasher=self.hasher,
        )

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "seq": self.delivery.seq,
            "filtered": self.delivery.filtered,
            "runtime_dir": str(self.runtime_dir),
            "journal": (
                self.journal.status()
                if self.journal is not None
                else {"durable": False, "error": self.journal_error}
                if self.journal_error
                else None
            ),
            "sources": {
                name: {**source.status(), "rate": round(self.delivery.rates[name].per_second(), 1)}
                for name, source in self.sources.items()
            },
            "hashes": self.hasher.status() if self.hasher is not None else None,
            "objects": len(self.namespace.entries) if self.namespace is not None else 0,
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
