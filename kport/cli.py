"""The `kport` command line: parses arguments, hands each subcommand to the module owning it."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import kport
from kport.errors import KportError

BENCHMARKS = ("port", "proc", "journal", "objects", "file", "net", "ui")


def _bench(args: argparse.Namespace) -> int:
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "__init__.py").exists():
        print(
            "kport bench: the benchmarks run from a source checkout (bench/ not found)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    module = importlib.import_module(f"bench.{args.name}")
    options = {
        k: v for k, v in vars(args).items() if k in ("count", "rounds", "repeat") and v is not None
    }
    module.run(**options, json_dir=args.json_dir)
    return 0


def _demo(args: argparse.Namespace) -> int:
    import uvloop

    from kport import demo

    return uvloop.run(demo.run(runtime_dir=args.runtime_dir, count=args.count))


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from kport import config as config_mod
    from kport import daemon

    try:
        cfg = config_mod.load(args.config)
    except config_mod.ConfigError as err:
        print(f"kport serve: {err}", file=sys.stderr)
        return 2
    if args.runtime_dir:
        cfg.daemon.runtime_dir = args.runtime_dir
    if args.state_dir:
        cfg.daemon.state_dir = args.state_dir
    if args.watch:
        cfg.file.enabled = True
        cfg.file.paths += [os.path.abspath(p) for p in args.watch]
        cfg.file.default_action = "ask"
    if args.firewall:
        cfg.net.enabled = True
        cfg.net.default_action = "ask"
    if args.decision_deadline is not None:
        cfg.file.decision_deadline_s = args.decision_deadline
        cfg.net.decision_deadline_s = args.decision_deadline
    if args.default_verdict:
        cfg.file.default_verdict = args.default_verdict
        cfg.net.default_verdict = args.default_verdict
    try:
        config_mod.check_file(cfg.file, "command line")
        config_mod.check_net(cfg.net, "command line")
    except config_mod.ConfigError as err:
        print(f"kport serve: {err}", file=sys.stderr)
        return 2
    if args.log_format:
        cfg.daemon.log_format = args.log_format
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    if os.geteuid() != 0:
        print(
            "kport serve: must run as root (the proc connector needs CAP_NET_ADMIN)",
            file=sys.stderr,
        )
        return 1
    handler = logging.StreamHandler()
    if cfg.daemon.log_format == "json":
        handler.setFormatter(daemon.JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.verbose else cfg.daemon.log_level.upper())
    ui = _start_ui(args.ui, cfg.daemon.runtime_dir) if args.ui else None
    try:
        uvloop.run(daemon.Daemon(cfg).run())  # the daemon's loop: see pyproject
    except KportError as err:
        print(f"kport serve: {err}", file=sys.stderr)
        return 1
    finally:
        if ui is not None:
            ui.terminate()
            try:
                ui.wait(timeout=10)
            except subprocess.TimeoutExpired:
                ui.kill()
                ui.wait()
    return 0


def _start_ui(listen: str, runtime_dir: str) -> subprocess.Popen[bytes]:
    """`kport serve --ui`: the web UI beside the daemon, as its own process (it gives up
    root at once), stopped with it. It waits for the ports by itself."""
    from kport import paths

    where = str(paths.runtime_dir(runtime_dir or None))
    command = [sys.executable, "-m", "kport.cli", "ui", "--listen", listen, "--runtime-dir", where]
    return subprocess.Popen(command, start_new_session=True)


def _tail(args: argparse.Namespace) -> int:
    from kport import tail

    try:
        return tail.run(
            args.source,
            as_json=args.json,
            terms=args.filter or [],
            runtime_dir=args.runtime_dir,
            count=args.count,
            since=args.since,
        )
    except ValueError as err:
        print(f"kport tail: {err}", file=sys.stderr)
        return 2


def _query(args: argparse.Namespace) -> int:
    from kport import query

    try:
        filters: dict[str, Any] = {
            "limit": args.limit or 2**62,
            "newest_first": args.newest_first,
        }
        for key, value in (
            ("sources", args.source),
            ("kinds", args.kind),
            ("pids", args.pid),
            ("exe", args.exe),
            ("text", args.text),
            ("first", args.first),
            ("last", args.last),
        ):
            if value:
                filters[key] = value
        if args.user:
            filters["uids"] = [query.uid_of(user) for user in args.user]
        if args.since:
            filters["since_ns"] = query.parse_time(args.since)
        if args.until:
            filters["until_ns"] = query.parse_time(args.until)
        return query.run(filters, as_json=args.json, db=args.db, runtime_dir=args.runtime_dir)
    except ValueError as err:
        print(f"kport query: {err}", file=sys.stderr)
        return 2


def _decide(args: argparse.Namespace) -> int:
    from kport import decide

    try:
        return decide.run(
            policy=args.policy, runtime_dir=args.runtime_dir, count=args.count, ports=args.port
        )
    except ValueError as err:
        print(f"kport decide: {err}", file=sys.stderr)
        return 2


def _ui(args: argparse.Namespace) -> int:
    from kport.ui import serve

    return serve.run(listen=args.listen, runtime_dir=args.runtime_dir, user=args.user)


def _status(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    with kport.connect("control", runtime_dir=args.runtime_dir) as conn:
        status = conn.send({"op": "status"}, timeout=5)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    console = Console()
    console.print(
        f"kport {status['version']} pid {status['pid']} up {status['uptime_s']} s, "
        f"seq {status['seq']}, runtime dir {status['runtime_dir']}"
    )
    sources = Table(
        "source",
        "events/s",
        "events",
        "lost",
        "resyncs",
        "processes",
        "backlog",
        title="Sources",
        title_justify="left",
    )
    for name, s in status["sources"].items():
        sources.add_row(
            name,
            f"{s['rate']:.1f}",
            str(s["events"]),
            str(s["lost"]),
            str(s.get("resyncs", "-")),
            str(s.get("table", "-")),
            str(s.get("backlog", "-")),
        )
    console.print(sources)
    proc = status["sources"].get("proc")
    if proc and proc.get("backend") == "bpf":
        console.print(
            f"processes: eBPF ({proc['programs']} programs), {proc['kernel_records']} records "
            f"in the kernel, {proc['kernel_dropped']} dropped by a full ring",
            soft_wrap=True,
        )
    elif proc and proc.get("backend"):
        why = proc.get("fallback_reason")
        console.print(
            "processes: the proc connector" + (f" (eBPF cannot load: {why})" if why else ""),
            soft_wrap=True,
        )
    file = status["sources"].get("file")
    if file:
        console.print(
            f"file access: {file['allowed']} allowed, {file['denied']} denied, " + _decided(file),
            soft_wrap=True,
        )
        _rules_error(console, file)
        for watch in file["watches"]:
            console.print(f"  watching {watch['path']} ({watch['mark']})", soft_wrap=True)
    net = status["sources"].get("net")
    if net:
        mode = "fail-open" if net["fail_open"] else "fail-closed"
        first, count = net["queue"], net.get("queues", 1)
        queues = f"queue {first}" if count == 1 else f"queues {first}-{first + count - 1}"
        console.print(
            f"firewall: {queues} ({net['backend']}, {mode}): "
            f"{net['allowed']} allowed, {net['denied']} denied, {net['rejected']} rejected, "
            + _decided(net)
            + f"; {net['without_process']} without a known process; "
            f"rules put back {net['rules_reinstalled']} times",
            soft_wrap=True,
        )
        _rules_error(console, net)
    journal = status.get("journal")
    if journal and "path" not in journal:
        console.print(f"journal: NOT DURABLE: {journal['error']}")
    elif journal:
        state = "durable" if journal["durable"] else f"NOT DURABLE: {journal['error']}"
        console.print(
            f"journal {journal['path']}: {state}; committed through seq {journal['committed']}, "
            f"{journal['queued']} queued, {journal['dropped']} dropped, "
            f"{journal['pruned']} removed by retention"
        )
    else:
        console.print("journal: off")
    ports = Table(
        "port", "one-way", "clients", "queued", "lost", title="Ports", title_justify="left"
    )
    conns = Table(
        "port", "pid", "uid", "queue", "lost", "sent", title="Connections", title_justify="left"
    )
    for name, p in status["ports"].items():
        ports.add_row(
            name,
            "yes" if p["one_way"] else "no",
            str(len(p["connections"])),
            str(sum(c["queue_depth"] for c in p["connections"])),
            str(p["lost"]),
        )
        for c in p["connections"]:
            conns.add_row(
                name,
                str(c["pid"]),
                str(c["uid"]),
                str(c["queue_depth"]),
                str(c["lost"]),
                str(c["sent"]),
            )
    console.print(ports)
    console.print(conns)
    return 0


def _decided(source: dict[str, Any]) -> str:
    """What a deciding source's status says about asks, defaults, rules and cache."""
    cache = source["cache"]
    return (
        f"{source['asked']} asked ({source['asks_in_flight']} in flight), "
        f"{source['defaulted']} given the default verdict; rules: {source['rules']}, "
        f"decision cache {cache['hits']} hits / {cache['misses']} misses"
    )


def _rules_error(console: Any, source: dict[str, Any]) -> None:
    if source["rules_error"]:
        console.print(
            f"  RULES NOT RELOADED (the ones in force stay): {source['rules_error']}",
            soft_wrap=True,
        )


def _watch(args: argparse.Namespace) -> int:
    """Add (or remove) a file watch in the running daemon, and list what is watched."""
    if args.command == "unwatch":
        request = {"op": "unwatch", "path": os.path.abspath(args.path)}
    else:
        mark = "mount" if args.mount else "filesystem" if args.filesystem else "path"
        request = {"op": "watch", "path": os.path.abspath(args.path), "mark": mark}
    with kport.connect("control", runtime_dir=args.runtime_dir) as conn:
        result = conn.send(request, timeout=10)
    for watch in result["watches"]:
        print(f"{watch['mark']:<10} {watch['path']}")
    if not result["watches"]:
        print("nothing is watched", file=sys.stderr)
    return 0


def _objects(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    with kport.connect(args.namespace, runtime_dir=args.runtime_dir) as conn:
        entries = conn.send({"op": "list"}, timeout=5)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    table = Table("name", "type", "state", "refs", "permanent", "creator", "admits", box=None)
    for e in entries:
        mode = "manual" if e["manual_reset"] else "auto"
        admits = ", ".join([f"uid {u}" for u in e["uids"]] + [f"gid {g}" for g in e["gids"]])
        table.add_row(
            e["name"],
            f"{e['type']} ({mode})",
            "set" if e["set"] else "clear",
            str(e["references"]),
            "yes" if e["permanent"] else "no",
            f"pid {e['creator_pid']} uid {e['creator_uid']}",
            admits or "creator and root",
        )
    Console().print(table)
    if not entries:
        print("no named objects", file=sys.stderr)
    return 0


def _install_service(args: argparse.Namespace) -> int:
    import shutil
    import subprocess

    if os.geteuid() != 0:
        print("kport install-service: must run as root", file=sys.stderr)
        return 1
    unit = Path(__file__).resolve().parent.parent / "contrib" / "kport.service"
    exe = shutil.which("kport") or str(Path(sys.argv[0]).resolve())
    target = Path(args.unit_dir) / "kport.service"
    target.write_text(unit.read_text().replace("@KPORT@", exe))
    for group in ("kport", "kport-admin"):
        subprocess.run(["groupadd", "--system", "-f", group], check=True)
    print(f"installed {target} (ExecStart={exe} serve); groups kport and kport-admin exist")
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("start it with: systemctl enable --now kport")
    else:
        print("systemd is not running here: start the daemon with `kport serve`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kport",
        description="Kernel events to user-mode programs, and their answers back.",
    )
    parser.add_argument("--version", action="version", version=f"kport {kport.__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="serve a demo port and watch it with a client")
    demo.add_argument("--runtime-dir", help="where the port's socket goes (default: see README)")
    demo.add_argument(
        "--count",
        type=int,
        default=0,
        help="stop after this many events (default: run until Ctrl-C)",
    )
    demo.set_defaults(func=_demo)

    serve = sub.add_parser("serve", help="run the daemon (root): sources → ports")
    serve.add_argument("--config", help="TOML configuration (default: built-in defaults)")
    serve.add_argument(
        "--print-config", action="store_true", help="print the effective configuration and exit"
    )
    serve.add_argument("--runtime-dir", help="where the ports' sockets go")
    serve.add_argument("--state-dir", help="where the journal goes (default: see README)")
    serve.add_argument(
        "--watch",
        action="append",
        metavar="PATH",
        help="watch file access under PATH and ask a decision client (repeatable)",
    )
    serve.add_argument(
        "--ui",
        metavar="HOST:PORT",
        help="also serve the web UI here (kport ui, as the user nobody), and print its URL",
    )
    serve.add_argument(
        "--firewall",
        action="store_true",
        help="ask a decision client about every new outbound connection (NFQUEUE)",
    )
    serve.add_argument(
        "--decision-deadline", type=float, metavar="SECONDS", help="how long a decider has"
    )
    serve.add_argument(
        "--default-verdict",
        choices=("allow", "deny"),
        help="the verdict when no decider answers in time (default: allow, fail-open)",
    )
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.set_defaults(func=_serve)

    tail = sub.add_parser("tail", help="print a source's events as they happen")
    tail.add_argument("source", help="the port to follow, e.g. proc")
    tail.add_argument("--json", action="store_true", help="one JSON object per line")
    tail.add_argument(
        "--filter",
        action="append",
        metavar="KEY=GLOB",
        help="show only events whose KEY matches (repeatable; all must match)",
    )
    tail.add_argument("--count", type=int, default=0, help="stop after this many events")
    tail.add_argument(
        "--since",
        type=int,
        metavar="SEQ",
        help="first replay the journal's events after SEQ, then go on live (no gap, no repeat)",
    )
    tail.add_argument("--runtime-dir", help="where the ports' sockets are")
    tail.set_defaults(func=_tail)

    dec = sub.add_parser(
        "decide", help="answer file access and connection prompts (a terminal, or a policy)"
    )
    dec.add_argument(
        "--policy", metavar="allow|deny|FILE.py", help="answer by this, not at the terminal"
    )
    dec.add_argument("--count", type=int, default=0, help="stop after this many answers")
    dec.add_argument(
        "--port",
        action="append",
        choices=("file-decide", "net-decide"),
        help="answer only this decision port (repeatable; default: every one kport serves)",
    )
    dec.add_argument("--runtime-dir", help="where the ports' sockets are")
    dec.set_defaults(func=_decide)

    ui = sub.add_parser("ui", help="the web UI: live log, process tree, prompts, rules and stats")
    ui.add_argument(
        "--listen",
        default="127.0.0.1:8787",
        metavar="HOST:PORT",
        help="where to serve (default 127.0.0.1:8787; port 0 picks a free one)",
    )
    ui.add_argument(
        "--user", default="nobody", help="the user to become when started as root (nobody)"
    )
    ui.add_argument("--runtime-dir", help="where the ports' sockets are")
    ui.set_defaults(func=_ui)

    q = sub.add_parser("query", help="print the journal's history, filtered")
    q.add_argument("--source", action="append", help="proc, file, net or kport (repeatable)")
    q.add_argument("--kind", action="append", help="exec, exit, fork, ... (repeatable)")
    q.add_argument("--pid", action="append", type=int, help="process id (repeatable)")
    q.add_argument("--user", action="append", help="user name or uid (repeatable)")
    q.add_argument("--exe", metavar="GLOB", help="executable path, a glob: '/usr/bin/*'")
    q.add_argument("--text", help="a substring of any field, case-insensitive")
    q.add_argument("--since", metavar="TIME", help="from TIME: 10m, 2h, 3d ago, ISO, or epoch s")
    q.add_argument("--until", metavar="TIME", help="before TIME (same forms as --since)")
    q.add_argument("--first", type=int, metavar="SEQ", help="from this seq (inclusive)")
    q.add_argument("--last", type=int, metavar="SEQ", help="up to this seq (inclusive)")
    q.add_argument("--limit", type=int, default=1000, help="at most this many (0: all)")
    q.add_argument("--newest-first", action="store_true", help="newest events first")
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.add_argument("--db", help="read this journal file directly instead of asking the daemon")
    q.add_argument("--runtime-dir", help="where the ports' sockets are")
    q.set_defaults(func=_query)

    status = sub.add_parser("status", help="the daemon's sources, ports and connections")
    status.add_argument("--json", action="store_true")
    status.add_argument("--runtime-dir", help="where the ports' sockets are")
    status.set_defaults(func=_status)

    watch = sub.add_parser("watch", help="watch file access under PATH now (root)")
    watch.add_argument("path", help="a file; a directory (its entries); a mount point (whole)")
    whole = watch.add_mutually_exclusive_group()
    whole.add_argument("--mount", action="store_true", help="the whole mount PATH is on")
    whole.add_argument(
        "--filesystem", action="store_true", help="the whole filesystem (all its mounts)"
    )
    watch.add_argument("--runtime-dir", help="where the ports' sockets are")
    watch.set_defaults(func=_watch)
    unwatch = sub.add_parser("unwatch", help="stop watching PATH (root)")
    unwatch.add_argument("path")
    unwatch.add_argument("--runtime-dir", help="where the ports' sockets are")
    unwatch.set_defaults(func=_watch)

    objects = sub.add_parser("objects", help="the named objects of a namespace (root)")
    objects.add_argument("--namespace", default="objects", help="the namespace's port")
    objects.add_argument("--json", action="store_true")
    objects.add_argument("--runtime-dir", help="where the ports' sockets are")
    objects.set_defaults(func=_objects)

    install = sub.add_parser("install-service", help="install the systemd unit and groups")
    install.add_argument("--unit-dir", default="/etc/systemd/system")
    install.set_defaults(func=_install_service)

    bench = sub.add_parser("bench", help="run a benchmark against its baselines and peers")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--count", type=int, help="messages in the throughput run")
    bench.add_argument(
        "--rounds", type=int, help="round trips (port) or interleaved rounds (journal)"
    )
    bench.add_argument(
        "--repeat", type=int, help="times the whole set of runs is repeated (file; default 3)"
    )
    bench.add_argument("--json-dir", help="where to save the JSON results (default bench/results)")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except KportError as err:
        print(f"kport: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
