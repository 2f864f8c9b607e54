"""`kport serve`: wires the kernel sources to the journal and their ports, with daemon-wide
seq and filters, a journal port for history, a control port for `kport status`, and a clean
shutdown on SIGTERM, SIGINT or SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import functools
import grp
import json
import logging
import os
import signal
import sqlite3
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kport import __version__, paths, protocol
from kport.config import Config, PortConfig
from kport.decisions import MAX_ASKS, Decisions
from kport.errors import BadRequest
from kport.journal.chunks import Row, row_of
from kport.journal.query import Query
from kport.journal.store import Journal, SourceHistory
from kport.objects import Namespace
from kport.port.security import Security
from kport.port.server import ServerConnection, ServerPort
from kport.rules import RulesError, RuleSet
from kport.sources import file as file_source
from kport.sources import net as net_source
from kport.sources.file import FileSource
from kport.sources.firewall import Plan
from kport.sources.net import NetSource
from kport.sources.proc import ProcSource
from kport.sources.sockets import all_processes

log = logging.getLogger("kport.daemon")

#: one reply of the journal port holds at most this many events, this many bytes of them,
#: and this much scanning: a client pages on with the ``next`` query it gets back
QUERY_PAGE = 5000
QUERY_BYTES = 4 * 1024 * 1024
QUERY_BUDGET_S = 1.0


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
        self.state_dir = paths.state_dir(config.daemon.state_dir or None)
        self.journal: Journal | None = None
        if config.journal.enabled:
            jcfg = config.journal
            self.journal = Journal(
                jcfg.path or self.state_dir / "journal.db",
                max_age_s=jcfg.max_age_days * 86400,
                max_bytes=jcfg.max_size_mb * 1024 * 1024,
                queue_limit=jcfg.queue_limit,
                commit_interval_s=jcfg.commit_interval_ms / 1000,
                on_state=self._journal_state,
            )
        self.journal_error: str | None = None
        self.namespace: Namespace | None = None
        self.seq = 0
        #: held while events get their seqs and go to the journal and the ports: sources'
        #: threads and the loop deliver alike, and each port sees seqs in order
        self._deliver_lock = threading.Lock()
        self.started = time.time()
        self.ports: dict[str, ServerPort] = {}
        self.sources: dict[str, ProcSource | FileSource | NetSource] = {}
        #: decision port name → its asks
        self.decisions: dict[str, Decisions] = {}
        self.rates: dict[str, Rate] = {}
        self.filtered = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queries = ThreadPoolExecutor(2, thread_name_prefix="kport-query")
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
        """Serve until SIGTERM/SIGINT/SIGHUP or :meth:`stop`."""
        # The sources' threads and the event loop share the GIL. With the default 5 ms
        # switch interval a thread waking from I/O queues behind a busy one (the convoy
        # effect), which put milliseconds onto every delivery.
        sys.setswitchinterval(0.0005)
        self._loop = asyncio.get_running_loop()
        # SIGHUP too: a daemon started at a terminal that closes would otherwise die at
        # once, leaving its sockets, and its firewall rules for a fail-closed queue.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            self._loop.add_signal_handler(sig, self.stop)
        journal = self.journal
        if journal is not None:
            try:
                self.seq = await asyncio.to_thread(journal.open)
            except (sqlite3.Error, OSError) as err:
                # Delivery matters more than history: serve without a journal, loudly.
                self.journal_error = f"cannot open the journal {journal.path}: {err}"
                log.error("%s; serving without history (durability is off)", self.journal_error)
                journal = self.journal = None
        if journal is not None:
            journal.start()
            self._port("journal", on_message=self._journal_request)
        self._port("control", on_message=self._control)
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
            self.rates["proc"] = Rate()
            self.sources["proc"] = ProcSource(
                self._from_thread,
                threads=self.config.proc.threads,
                batch_window_s=self.config.proc.batch_window_ms / 1000,
                batch_above=self.config.proc.batch_above,
                backend=self.config.proc.backend,
                argv_max=self.config.proc.argv_max,
                ring_bytes=self.config.proc.ring_kb * 1024,
            )
        if self.config.file.enabled:
            self._setup_file(journal)
        if self.config.net.enabled:
            self._setup_net(journal)
        for name, decisions in self.decisions.items():
            decisions.attach(self.ports[name], self._loop)
        for port in self.ports.values():
            port.seq = self.seq  # a replay asked for before the first new event covers it all
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
        self.rates[source] = Rate()
        self.decisions[f"{source}-decide"] = decisions
        self._port(
            f"{source}-decide",
            on_connect=decisions.changed,
            on_disconnect=decisions.changed,
            on_message=functools.partial(self._rules_request, rules, remembered),
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
                on_reply=functools.partial(self._remember_file, rules, remembered),
            ),
            rules,
            remembered,
        )
        proc = self.sources.get("proc")
        self.sources["file"] = FileSource(
            self._from_thread,
            watches=file_source.watches_of(cfg.paths, cfg.mounts, cfg.filesystems),
            permissions=cfg.permissions,
            events=cfg.events,
            processes=proc.table if isinstance(proc, ProcSource) else None,
            rules=rules,
            ask=decisions.ask_from_thread,
            max_asks=MAX_ASKS,
            default_verdict=cfg.default_verdict == "allow",
            trusted=lambda: decisions.deciders,
        )

    @staticmethod
    async def _remember_file(
        rules: RuleSet, remembered: str, request: dict[str, Any], reply: dict[str, Any]
    ) -> None:
        """A file decision client's "remember": a rule for that path (and executable),
        written to ``remembered``."""
        if not reply.get("remember"):
            return
        rule = {"action": reply["verdict"], "path": request["path"], "name": "remembered"}
        if request.get("exe"):
            rule["exe"] = request["exe"]
        await asyncio.to_thread(rules.remember, remembered, rule)

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
                on_reply=functools.partial(self._remember_net, rules, remembered),
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
            self._from_thread,
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
        )

    @staticmethod
    async def _remember_net(
        rules: RuleSet, remembered: str, request: dict[str, Any], reply: dict[str, Any]
    ) -> None:
        """A network decision client's duration: "once" (nothing more), "restart" (a
        rule in memory), a number of minutes (a rule in memory that ends), or "always"
        (``remember``: a rule written to ``remembered``)."""
        duration = reply.get("duration", "always" if reply.get("remember") else "once")
        if duration == "once":
            return
        rule = reply.get("rule")
        if not isinstance(rule, dict):
            rule = net_source.rule_for(request)
        rule = {**rule, "action": reply["verdict"]}
        if duration == "always":
            rule.setdefault("name", "remembered")
            await asyncio.to_thread(rules.remember, remembered, rule)
        elif duration == "restart":
            rules.add_temporary({"name": "answered until restart", **rule})
        elif isinstance(duration, int | float) and not isinstance(duration, bool) and duration > 0:
            named = {"name": f"answered for {duration:g} minutes", **rule}
            rules.add_temporary(named, minutes=float(duration))
        else:
            raise ValueError(
                f"duration must be once, restart, always or minutes, not {duration!r:.40}"
            )

    @staticmethod
    async def _rules_request(
        rules: RuleSet, remembered: str, conn: ServerConnection, data: Any
    ) -> Any:
        """A decision port's requests for a rules editor: ``{"op": "rules"}`` lists
        them (:meth:`RuleSet.listing`); ``{"op": "save", "rules": [...], "version": V}``
        replaces kport's own rules file (:meth:`RuleSet.save`) and lists them again."""
        op = data.get("op") if isinstance(data, dict) else None
        try:
            if op == "save":
                version = data.get("version")
                if not isinstance(version, str) or not isinstance(data.get("rules"), list):
                    raise BadRequest("save needs rules (a list of rules) and version (a string)")
                await asyncio.to_thread(rules.save, remembered, data["rules"], version)
            elif op != "rules":
                raise BadRequest(f"unknown rules request {data!r:.60}; known ops: rules, save")
            return await asyncio.to_thread(rules.listing, remembered)
        except RulesError as err:
            raise BadRequest(str(err)) from err
        except OSError as err:
            raise BadRequest(f"{remembered}: {err.strerror or err}") from err

    # --- events ------------------------------------------------------------------------

    def _from_thread(self, batch: list[dict[str, Any]]) -> None:
        """Called by a source's thread (or the loop's: an answer from a decision client):
        deliver in that thread. Clients with nothing queued are written to from here, so
        an event costs no wake-up of the loop (see :meth:`ServerPort.publish`)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        self.deliver(batch)

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
        """Give each event its daemon-wide seq and wall-clock time, journal it, send it out.

        Any thread may call it. Each event is encoded once, for the journal and every
        client alike; the journal only queues it here, so a slow disk never slows delivery.
        """
        source = batch[0].get("source", "proc") if batch else "proc"
        port = self.ports.get(source)
        journal = self.journal
        pack = protocol.pack_new  # not the loop's shared packer: any thread may be here
        cfg = self.config.proc
        filtered = source == "proc" and (cfg.kinds or cfg.uids or cfg.exe)
        passes = self._passes if filtered else None  # a call per event saved in a storm
        now = time.time_ns()
        rows: list[Row] = []
        items: list[tuple[int, bytes]] = []
        with self._deliver_lock:
            seq = self.seq
            for event in batch:
                if passes is not None and not passes(event):
                    self.filtered += 1
                    continue
                seq += 1
                event["seq"] = seq
                event["ts"] = now
                item = pack(event)
                rows.append((seq, now, event.get("source", "proc"), item))
                items.append((seq, item))
            self.seq = seq
            # the journal first: a replay reads it up to the port's seq
            if journal is not None and rows:
                journal.append_many(rows)
            if port is not None:
                port.publish(items)
            rate = self.rates.get(source)
            if rate is not None:
                rate.add(len(rows))

    def _journal_state(self, durable: bool, reason: str) -> None:
        """Called by the journal's writer when durability goes off or comes back."""
        event = {"source": "kport", "kind": "journal", "durable": durable, "reason": reason}
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._deliver_own, event)

    def _deliver_own(self, event: dict[str, Any]) -> None:
        """An event of kport's own: to the journal and every event port."""
        with self._deliver_lock:
            self.seq += 1
            seq = self.seq
            event["seq"] = seq
            event["ts"] = time.time_ns()
            item = protocol.pack_new(event)
            if self.journal is not None:
                self.journal.append(row_of(seq, event, item))
            for name, port in self.ports.items():
                if name not in ("control", "journal"):
                    port.publish([(seq, item)])

    # --- the journal port --------------------------------------------------------------

    async def _journal_request(self, conn: ServerConnection, data: Any) -> Any:
        """``{"op": "query", ...Query fields}`` → ``{"events": [...], "next": {...} | None}``.

        One bounded page: at most QUERY_PAGE events, QUERY_BYTES of them, QUERY_BUDGET_S
        of scanning, on a small pool of its own, so that no query holds up replays or
        runs on after its client gave up. ``next`` is the query that goes on from there.
        """
        op = data.get("op") if isinstance(data, dict) else None
        if op != "query":
            raise ValueError(f"unknown journal request {data!r:.60}; known ops: query")
        journal = self.journal
        assert journal is not None
        query = Query.from_mapping({k: v for k, v in data.items() if k != "op"})
        wanted = query.limit
        page = dataclasses.replace(query, limit=min(wanted, QUERY_PAGE))
        events, rest = await asyncio.get_running_loop().run_in_executor(
            self._queries,
            lambda: journal.reader.scan(page, max_bytes=QUERY_BYTES, budget_s=QUERY_BUDGET_S),
        )
        if rest is not None:
            rest.limit = wanted - len(events)
        if rest is None or rest.limit <= 0:
            return {"events": events, "next": None}
        return {"events": events, "next": dataclasses.asdict(rest)}

    # --- the control port --------------------------------------------------------------

    def _control(self, conn: ServerConnection, data: Any) -> Any:
        op = data.get("op") if isinstance(data, dict) else None
        if op == "status":
            return self.status()
        if op in ("watch", "unwatch"):
            return self._watch(op, data)
        raise ValueError(f"unknown control request {data!r:.60}; known ops: status, watch, unwatch")

    def _watch(self, op: str, data: dict[str, Any]) -> dict[str, Any]:
        """Add or remove a file watch while running: ``{"op": "watch", "path": ABSOLUTE,
        "mark": "path" | "mount" | "filesystem"}``, ``{"op": "unwatch", "path": ...}``."""
        source = self.sources.get("file")
        if not isinstance(source, FileSource):
            raise BadRequest(
                "file access is not enabled in this daemon: set [file] enabled = true, "
                "or start it with kport serve --watch PATH"
            )
        path = data.get("path")
        if not isinstance(path, str) or not os.path.isabs(path):
            raise BadRequest(f"{op}: path must be an absolute path, not {path!r:.80}")
        if op == "unwatch":
            try:
                source.unwatch(path)
            except ValueError as err:
                raise BadRequest(f"unwatch: {err}") from err
        else:
            mark = data.get("mark", "path")
            if mark not in ("path", "mount", "filesystem"):
                raise BadRequest(f"watch: mark must be path, mount or filesystem, not {mark!r}")
            if not os.path.exists(path):
                raise BadRequest(f"watch: {path} does not exist")
            try:
                source.watch(file_source.Watch(path, mark))
            except OSError as err:
                raise BadRequest(f"watch: {err}") from err
        return {"watches": source.status()["watches"]}

    def status(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "seq": self.seq,
            "filtered": self.filtered,
            "runtime_dir": str(self.runtime_dir),
            "journal": (
                self.journal.status()
                if self.journal is not None
                else {"durable": False, "error": self.journal_error}
                if self.journal_error
                else None
            ),
            "sources": {
                name: {**source.status(), "rate": round(self.rates[name].per_second(), 1)}
                for name, source in self.sources.items()
            },
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
