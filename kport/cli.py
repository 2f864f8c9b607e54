"""The `kport` command line: parses arguments, hands each subcommand to the module owning it."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import kport
from kport.errors import KportError

BENCHMARKS = ("port",)


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
    options = {k: v for k, v in vars(args).items() if k in ("count", "rounds") and v is not None}
    module.run(**options, json_dir=args.json_dir)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kport import demo

    return asyncio.run(demo.run(runtime_dir=args.runtime_dir, count=args.count))


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

    bench = sub.add_parser("bench", help="run a benchmark against its baselines and peers")
    bench.add_argument("name", choices=BENCHMARKS)
    bench.add_argument("--count", type=int, help="messages in the throughput run")
    bench.add_argument("--rounds", type=int, help="round trips in the latency run")
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
