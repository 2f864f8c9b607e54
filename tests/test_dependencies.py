"""Which part of kport may import which: every module under kport/ parsed with ``ast``
(every import, those inside functions too), the import graph built, and the layering
rules checked on it, with the import cycles at module level.

The rules, each a reason:

1. a kernel source (kport.sources) imports neither the port, nor the daemon, nor a
   decisions module: a source hands events to whoever started it and knows no client;
2. the port (kport.port) imports no kernel source: it carries anything, for anyone;
3. the journal (kport.journal) does not import the port: it provides a history
   (kport.replay) that a port, or anything else, replays from;
4. the web UI (kport.ui) imports only the port, the protocol, the errors, the paths, the
   version and itself: what it learns of the machine comes over the daemon's ports, so
   its privileges are the ports' and nothing more; and, for `kport ui --fleet`, the
   fleet's reader and subjects, which read the stream as any NATS client may (never the
   exporter, nor anything of the fleet that touches this host);
5. the protocol imports no I/O (sockets, event loops, threads, processes, files) and no
   kport module but the errors: it is sans-IO, tested and fuzzed byte by byte;
6. no import cycle among kport's modules (imports at module level);
7. the port imports nothing built on it (the objects it carries, the journal, the
   daemon, the faces) except for type checking: that is how it stays out of a circle.

The same checker runs on small synthetic packages first, so that each rule is seen to
fail when it is broken.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kport"

#: modules that do I/O or run concurrently: none of them in the sans-IO protocol
IO_MODULES = frozenset(
    {
        "socket",
        "asyncio",
        "select",
        "selectors",
        "threading",
        "_thread",
        "os",
        "subprocess",
        "ssl",
        "multiprocessing",
        "concurrent",
    }
)
#: what the web UI may import of kport
UI_MAY_IMPORT = ("kport.port", "kport.protocol", "kport.errors", "kport.paths", "kport.version")
#: what the web UI may import of the fleet, for `kport ui --fleet`: modules, not packages
UI_MAY_IMPORT_OF_THE_FLEET = ("kport.fleet.reader", "kport.fleet.subjects")
#: what is built on the port: it must not import them but for type checking
ABOVE_THE_PORT = (
    "kport.objects",
    "kport.journal",
    "kport.history",
    "kport.daemon",
    "kport.cli",
    "kport.ui",
)


@dataclass(frozen=True)
class Import:
    """One imported module, as one import statement names it."""

    importer: str
    target: str  # a kport module, or another top-level module (sqlite3, os...)
    where: str  # file:line
    module_level: bool  # run at import time (not inside a function)
    type_only: bool  # inside ``if TYPE_CHECKING:``

    @property
    def runtime(self) -> bool:
        return self.module_level and not self.type_only

    def __str__(self) -> str:
        line = f"{self.where}: {self.importer} imports {self.target}"
        if self.type_only:
            return f"{line} (type checking only)"
        return line if self.module_level else f"{line} (in a function)"


def within(module: str, *packages: str) -> bool:
    """Whether ``module`` is one of ``packages`` or inside one."""
    return any(module == p or module.startswith(p + ".") for p in packages)


def module_name(path: str) -> str:
    """``kport/a/b.py`` → ``kport.a.b``; a package's ``__init__.py`` is the package."""
    parts = Path(path).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_in(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
    """Every import statement with (module level, type checking only)."""

    def visit(
        node: ast.AST, module_level: bool, type_only: bool
    ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool, bool]]:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, module_level, type_only
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            module_level = False
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from visit(child, module_level, True)
            for child in node.orelse:
                yield from visit(child, module_level, type_only)
            return
        for child in ast.iter_child_nodes(node):
            yield from visit(child, module_level, type_only)

    yield from visit(tree, True, False)


def imports_of(name: str, source: str, where: str, modules: frozenset[str]) -> list[Import]:
    """The modules one module's source imports (``modules``: every kport module there is)."""
    is_package = where.endswith("__init__.py")
    found: list[Import] = []
    for node, module_level, type_only in _imports_in(ast.parse(source, where)):
        at = f"{where}:{node.lineno}"
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".") if is_package else name.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, base] if base else package)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                targets.append(candidate if candidate in modules else base)
        kept = [t if within(t, "kport") else t.split(".")[0] for t in targets]
        for target in dict.fromkeys(kept):  # once per statement, in order
            found.append(Import(name, target, at, module_level, type_only))
    return found


def graph_of(sources: dict[str, str]) -> dict[str, list[Import]]:
    """module → its imports, from {path like kport/a/b.py: source}."""
    names = {path: module_name(path) for path in sources}
    modules = frozenset(names.values())
    return {
        names[path]: imports_of(names[path], text, path, modules) for path, text in sources.items()
    }


def package_graph() -> dict[str, list[Import]]:
    return graph_of(
        {
            str(path.relative_to(PACKAGE.parent)): path.read_text()
            for path in sorted(PACKAGE.rglob("*.py"))
        }
    )


# --- the rules -------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    number: int
    says: str
    broken_by: Callable[[Import], bool]

    def violations(self, graph: dict[str, list[Import]]) -> list[Import]:
        return [imp for imports in graph.values() for imp in imports if self.broken_by(imp)]


def _kport(imp: Import) -> bool:
    return within(imp.target, "kport")


RULES = [
    Rule(
        1,
        "a kernel source imports neither the port nor the daemon (nor any decisions module)",
        lambda i: (
            within(i.importer, "kport.sources")
            and (within(i.target, "kport.port", "kport.daemon") or i.target.endswith(".decisions"))
        ),
    ),
    Rule(
        2,
        "the port imports no kernel source",
        lambda i: within(i.importer, "kport.port") and within(i.target, "kport.sources"),
    ),
    Rule(
        3,
        "the journal does not import the port (it provides kport.replay's History)",
        lambda i: within(i.importer, "kport.journal") and within(i.target, "kport.port"),
    ),
    Rule(
        4,
        "the web UI imports of kport only "
        + ", ".join((*UI_MAY_IMPORT, *UI_MAY_IMPORT_OF_THE_FLEET))
        + " and kport.ui",
        lambda i: (
            within(i.importer, "kport.ui")
            and _kport(i)
            and not within(i.target, *UI_MAY_IMPORT, "kport.ui")
            and i.target not in UI_MAY_IMPORT_OF_THE_FLEET
        ),
    ),
    Rule(
        5,
        "the protocol imports no I/O module and no kport module but kport.errors",
        lambda i: (
            i.importer == "kport.protocol"
            and (i.target in IO_MODULES or (_kport(i) and i.target != "kport.errors"))
        ),
    ),
    Rule(
        7,
        "the port imports nothing built on it (" + ", ".join(ABOVE_THE_PORT) + ", kport) "
        "but for type checking",
        lambda i: (
            within(i.importer, "kport.port")
            and not i.type_only
            and (within(i.target, *ABOVE_THE_PORT) or i.target == "kport")
        ),
    ),
]


def cycles(graph: dict[str, list[Import]]) -> list[list[str]]:
    """The import cycles among the modules of ``graph`` (runtime imports at module level):
    each strongly connected set of modules, as one cycle through them."""
    edges = {
        name: sorted({i.target for i in imports if i.runtime and i.target in graph})
        for name, imports in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                found.append(_path_through(sorted(component), edges))

    for name in sorted(edges):
        if name not in index:
            connect(name)
    return found


def _path_through(component: list[str], edges: dict[str, list[str]]) -> list[str]:
    """The shortest cycle inside a strongly connected set, from its first module back to it."""
    start = component[0]
    members = set(component)
    came_from: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for target in edges[node]:
            if target == start:
                path = [node]
                while path[-1] != start:
                    path.append(came_from[path[-1]])
                return [*reversed(path), start]
            if target in members and target not in came_from:
                came_from[target] = node
                queue.append(target)
    raise AssertionError(f"no cycle through {component}")  # a component always has one


def report(rule: Rule, broken: Iterable[Import]) -> str:
    lines = "\n".join(f"  {imp}" for imp in broken)
    return f"rule {rule.number} ({rule.says}) is broken:\n{lines}"


# --- the checker fails where it should ---------------------------------------------------

SYNTHETIC = {
    "kport/__init__.py": "",
    "kport/errors.py": "",
    "kport/protocol.py": "import threading\nfrom kport import errors, paths\n",
    "kport/paths.py": "",
    "kport/sources/__init__.py": "",
    "kport/sources/file.py": "def ask():\n    from kport.daemon.decisions import MAX_ASKS\n",
    "kport/sources/net.py": "from kport import decisions, port\n",
    "kport/decisions.py": "",
    "kport/port/__init__.py": "",
    "kport/port/server.py": (
        "from typing import TYPE_CHECKING\nfrom . import handles\n"
        "from kport.sources import procinfo\n"
        "if TYPE_CHECKING:\n    from kport.objects.event import Event\n"
    ),
    "kport/port/handles.py": "from kport.objects import event\n",
    "kport/objects/__init__.py": "from kport.objects import event\n",
    "kport/objects/event.py": "from kport.port import server\n",
    "kport/sources/procinfo.py": "",
    "kport/journal/__init__.py": "",
    "kport/journal/store.py": "from ..port.server import ServerPort\n",
    "kport/ui/__init__.py": "",
    "kport/ui/bridge.py": "from kport.sources import procinfo\nfrom kport.port import server\n",
    "kport/ui/fleet.py": (
        "from kport.fleet import reader, subjects\nfrom kport.fleet import exporter\n"
        "import kport.fleet\n"
    ),
    "kport/fleet/__init__.py": "",
    "kport/fleet/reader.py": "",
    "kport/fleet/subjects.py": "",
    "kport/fleet/exporter.py": "",
    "kport/daemon/__init__.py": "",
    "kport/daemon/decisions.py": "",
}


def test_the_checker_names_each_broken_rule_and_the_import_that_breaks_it() -> None:
    graph = graph_of(SYNTHETIC)
    broken = {rule.number: [str(imp) for imp in rule.violations(graph)] for rule in RULES}
    assert broken == {
        1: [
            "kport/sources/file.py:2: kport.sources.file imports kport.daemon.decisions"
            " (in a function)",
            "kport/sources/net.py:1: kport.sources.net imports kport.decisions",
            "kport/sources/net.py:1: kport.sources.net imports kport.port",
        ],
        2: ["kport/port/server.py:3: kport.port.server imports kport.sources.procinfo"],
        3: ["kport/journal/store.py:1: kport.journal.store imports kport.port.server"],
        4: [
            "kport/ui/bridge.py:1: kport.ui.bridge imports kport.sources.procinfo",
            "kport/ui/fleet.py:2: kport.ui.fleet imports kport.fleet.exporter",
            "kport/ui/fleet.py:3: kport.ui.fleet imports kport.fleet",
        ],
        5: [
            "kport/protocol.py:1: kport.protocol imports threading",
            "kport/protocol.py:2: kport.protocol imports kport.paths",
        ],
        7: ["kport/port/handles.py:1: kport.port.handles imports kport.objects.event"],
    }
    # the circle the objects package broke, found with its modules; the import for type
    # checking alone is no part of one
    assert cycles(graph) == [
        ["kport.objects.event", "kport.port.server", "kport.port.handles", "kport.objects.event"]
    ]


def test_a_cycle_through_a_package_and_its_own_import_are_found() -> None:
    graph = graph_of(
        {
            "kport/__init__.py": "from kport import a\n",
            "kport/a.py": "import kport.b\n",
            "kport/b.py": "from kport import __version__\n",
            "kport/c.py": "import kport.c\n",
        }
    )
    assert cycles(graph) == [["kport", "kport.a", "kport.b", "kport"], ["kport.c", "kport.c"]]


# --- kport itself ------------------------------------------------------------------------


def test_the_graph_sees_every_module_and_its_imports() -> None:
    graph = package_graph()
    assert {"kport", "kport.protocol", "kport.port.server", "kport.ui.bridge"} <= set(graph)
    daemon = {imp.target for imp in graph["kport.daemon"]}
    assert {"kport.daemon.delivery", "kport.sources.proc", "sqlite3"} <= daemon
    calls = [imp for imp in graph["kport.objects.event"] if imp.target == "kport.objects.calls"]
    assert calls and not any(imp.module_level for imp in calls)  # inside Event's methods


@pytest.mark.parametrize("rule", RULES, ids=lambda rule: f"rule{rule.number}")
def test_kport_keeps_the_rule(rule: Rule) -> None:
    broken = rule.violations(package_graph())
    assert not broken, report(rule, broken)


def test_kport_has_no_import_cycle() -> None:
    found = cycles(package_graph())
    assert not found, "import cycles (rule 6):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in found
    )


def test_import_kport_loads_no_storage_and_no_terminal_ui() -> None:
    """A client pays for the ports alone: the journal's SQLite and zstd are the daemon's,
    rich is the command line's."""
    code = (
        "import kport, sys; "
        "print(sorted(m for m in ('sqlite3', 'zstandard', 'rich') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
