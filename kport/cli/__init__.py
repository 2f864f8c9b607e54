"""The `kport` command line: parses the arguments and hands each subcommand to its face,
a module of this package (``kport.cli.tail`` for ``kport tail``...) with a ``command(args)``.
A face is imported only when its subcommand runs."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kport.errors import KportError
from kport.version import __version__

#: the modules of bench/ that `kport bench` runs
FLEET_CONFIG_HELP = (
    "with --fleet: a TOML configuration whose [export] gives the credentials and TLS"
)
BENCHMARKS = ("port", "proc", "journal", "objects", "file", "net", "ui", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kport",
        description="Kernel events to user-mode programs, and their answers back.",
    )
    parser.add_argument("--version", action="version", version=f"kport {__version__}")
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
    demo.set_defaults(face="demo")

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
        "--export",
        metavar="URL",
        help="also export this host's events to NATS JetStream at URL (kport export)",
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
    serve.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics on http://HOST:PORT/metrics (loopback unless "
        "--metrics-public)",
    )
    serve.add_argument(
        "--metrics-public",
        action="store_true",
        help="allow a --metrics address beyond this machine (warned about)",
    )
    serve.add_argument("--log-format", choices=("text", "json"))
    serve.set_defaults(face="serve")

    tail = sub.add_parser("tail", help="print a source's events as they happen")
    tail.add_argument(
        "source", nargs="?", help="the port to follow, e.g. proc (with --fleet: all if none)"
    )
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
        metavar="SEQ",
        help="first replay the journal's events after SEQ, then go on live (no gap, no "
        "repeat); with --fleet, from a stream sequence or a time (10m, 2h, ISO 8601)",
    )
    tail.add_argument(
        "--fleet", metavar="URL", help="follow the fleet's stream at this NATS URL instead"
    )
    tail.add_argument("--host", help="with --fleet: this host's events only")
    tail.add_argument("--config", help=FLEET_CONFIG_HELP)
    tail.add_argument("--runtime-dir", help="where the ports' sockets are")
    tail.set_defaults(face="tail")

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
    dec.set_defaults(face="decide")

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
    ui.add_argument(
        "--fleet",
        metavar="URL",
        help="show the fleet's log from the stream at this NATS URL instead of this host's",
    )
    ui.add_argument("--stream", help="with --fleet: the JetStream stream (default: KPORT)")
    ui.add_argument("--config", help=FLEET_CONFIG_HELP)
    ui.add_argument(
        "--since",
        metavar="SEQ|TIME",
        help="with --fleet: start at this stream sequence or time (10m, 2h, ISO 8601; default 10m)",
    )
    ui.set_defaults(face="ui")

    export = sub.add_parser(
        "export", help="stream this host's events to NATS JetStream (the fleet), exactly once"
    )
    export.add_argument(
        "--nats", metavar="URL", help="the broker, nats://HOST:PORT (credentials: [export])"
    )
    export.add_argument("--host", help="this host's name in the fleet (default: its host name)")
    export.add_argument("--stream", help="the JetStream stream (default: KPORT)")
    export.add_argument("--config", help="TOML configuration: [export] (and [daemon] dirs)")
    export.add_argument("--runtime-dir", help="where the daemon's ports are")
    export.add_argument("--state-dir", help="where the cursor and status files go")
    export.set_defaults(face="export")

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
    q.add_argument(
        "--why",
        type=int,
        metavar="SEQ",
        help="explain the verdict of event SEQ: the rule (and what it matched), the default, "
        "or the decision client that decided",
    )
    q.add_argument("--db", help="read this journal file directly instead of asking the daemon")
    q.add_argument("--runtime-dir", help="where the ports' sockets are")
    q.add_argument("--fleet", metavar="URL", help="answer from the fleet's stream at this URL")
    q.add_argument("--host", help="with --fleet: this host's events only")
    q.add_argument("--config", help=FLEET_CONFIG_HELP)
    q.add_argument(
        "--stream-seq", type=int, metavar="N", help="with --fleet: from this stream sequence"
    )
    q.set_defaults(face="query")

    status = sub.add_parser("status", help="the daemon's sources, ports and connections")
    status.add_argument("--json", action="store_true")
    status.add_argument("--runtime-dir", help="where the ports' sockets are")
    status.add_argument("--state-dir", help="where exporters keep their status (…/export)")
    status.set_defaults(face="status")

    watch = sub.add_parser("watch", help="watch file access under PATH now (root)")
    watch.add_argument("path", help="a file; a directory (its entries); a mount point (whole)")
    whole = watch.add_mutually_exclusive_group()
    whole.add_argument("--mount", action="store_true", help="the whole mount PATH is on")
    whole.add_argument(
        "--filesystem", action="store_true", help="the whole filesystem (all its mounts)"
    )
    watch.add_argument("--runtime-dir", help="where the ports' sockets are")
    watch.set_defaults(face="watch")
    unwatch = sub.add_parser("unwatch", help="stop watching PATH (root)")
    unwatch.add_argument("path")
    unwatch.add_argument("--runtime-dir", help="where the ports' sockets are")
    unwatch.set_defaults(face="watch")

    objects = sub.add_parser("objects", help="the named objects of a namespace (root)")
    objects.add_argument("--namespace", default="objects", help="the namespace's port")
    objects.add_argument("--json", action="store_true")
    objects.add_argument("--runtime-dir", help="where the ports' sockets are")
    objects.set_defaults(face="objects")

    install = sub.add_parser("install-service", help="install the systemd unit and groups")
    install.add_argument("--unit-dir", default="/etc/systemd/system")
    install.set_defaults(face="service")

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
    bench.set_defaults(face="bench")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "face", None):
        parser.print_help()
        return 2
    try:
        face = importlib.import_module(f"kport.cli.{args.face}")
        return int(face.command(args))
    except KportError as err:
        print(f"kport: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
