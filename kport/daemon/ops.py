"""The daemon's answers to requests on its ports: the journal port (history queries, and
the process tree), the control port (status, and file watches changed while running),
and a decision port's rules editor.

A request that reads the disk or /proc runs on a small pool of its own, off the event
loop, so that a slow one holds up neither delivery nor replays.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from typing import Any, Final

from kport.daemon.redact import Redactor
from kport.errors import BadRequest
from kport.journal.query import Query
from kport.journal.store import Journal
from kport.port.server import ServerConnection
from kport.rules import RulesError, RuleSet
from kport.sources import file as file_source
from kport.sources import procinfo
from kport.sources.file import FileSource

#: one reply of the journal port holds at most this many events, this many bytes of them,
#: and this much scanning: a client pages on with the ``next`` query it gets back
QUERY_PAGE = 5000
QUERY_BYTES = 4 * 1024 * 1024
QUERY_BUDGET_S = 1.0
#: what the process tree shows of each process
TREE_FIELDS: Final = ("ppid", "start_time", "comm", "argv", "exe", "uid", "user")


def process_tree(redactor: Redactor | None = None) -> list[dict[str, Any]]:
    """Every process, with the :data:`TREE_FIELDS` of each, read from /proc (it blocks);
    command lines redacted by ``redactor``, as events are."""
    out = []
    for pid in procinfo.all_pids():
        info = procinfo.describe(pid)  # one process's reads, or None: never two mixed
        if info is None:
            continue
        entry = {"pid": pid, **{k: info[k] for k in TREE_FIELDS}}
        if redactor is not None:
            redactor.event(entry)
        out.append(entry)
    return out


class JournalOps:
    """The journal port's requests: ``query``; ``processes`` for the web UI's process
    tree (the UI reads nothing of the machine itself: its privileges are the ports');
    ``identity``, the journal's, for an exporter to name events by."""

    def __init__(self, journal: Journal, pool: Executor, redactor: Redactor | None = None) -> None:
        self.journal = journal
        self.pool = pool
        self.redactor = redactor

    async def handle(self, conn: ServerConnection, data: Any) -> Any:
        op = data.get("op") if isinstance(data, dict) else None
        if op == "query":
            return await self._query(data)
        if op == "processes":
            return await asyncio.get_running_loop().run_in_executor(
                self.pool, process_tree, self.redactor
            )
        if op == "identity":
            # the journal's identity and where it stands: an exporter names events by it
            return {"journal": f"{self.journal.identity:x}", "last_seq": self.journal.last_seq()}
        raise ValueError(
            f"unknown journal request {data!r:.60}; known ops: query, processes, identity"
        )

    async def _query(self, data: dict[str, Any]) -> dict[str, Any]:
        """``{"op": "query", ...Query fields}`` → ``{"events": [...], "next": {...} | None}``.

        One bounded page: at most QUERY_PAGE events, QUERY_BYTES of them, QUERY_BUDGET_S
        of scanning, on the pool, so that no query holds up replays or runs on after its
        client gave up. ``next`` is the query that goes on from there.
        """
        query = Query.from_mapping({k: v for k, v in data.items() if k != "op"})
        wanted = query.limit
        page = dataclasses.replace(query, limit=min(wanted, QUERY_PAGE))
        reader = self.journal.reader
        events, rest = await asyncio.get_running_loop().run_in_executor(
            self.pool,
            lambda: reader.scan(page, max_bytes=QUERY_BYTES, budget_s=QUERY_BUDGET_S),
        )
        if rest is not None:
            rest.limit = wanted - len(events)
        if rest is None or rest.limit <= 0:
            return {"events": events, "next": None}
        return {"events": events, "next": dataclasses.asdict(rest)}


class ControlOps:
    """The control port's requests: ``status``, ``watch`` and ``unwatch``."""

    def __init__(self, status: Callable[[], dict[str, Any]], sources: Mapping[str, object]) -> None:
        self.status = status
        #: the daemon's sources, by name (the file source is the one watches change)
        self.sources = sources

    def handle(self, conn: ServerConnection, data: Any) -> Any:
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


async def rules_request(rules: RuleSet, remembered: str, conn: ServerConnection, data: Any) -> Any:
    """A decision port's requests for a rules editor: ``{"op": "rules"}`` lists them
    (:meth:`RuleSet.listing`); ``{"op": "save", "rules": [...], "version": V}`` replaces
    kport's own rules file (:meth:`RuleSet.save`) and lists them again."""
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
