"""`kport ui`: the web UI, served until stopped (see :mod:`kport.ui.serve`); with
``--fleet URL``, over the fleet's stream (see :mod:`kport.ui.fleet`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from kport.ui import serve

if TYPE_CHECKING:
    from kport.ui.fleet import FleetBridge


def command(args: argparse.Namespace) -> int:
    """`kport ui` with its parsed arguments."""
    try:
        fleet = _fleet(args)
    except ValueError as err:
        print(f"kport ui: {err}", file=sys.stderr)
        return 2
    return serve.run(listen=args.listen, runtime_dir=args.runtime_dir, user=args.user, fleet=fleet)


def _fleet(args: argparse.Namespace) -> FleetBridge | None:
    """The fleet's side for ``--fleet URL``, or None; ValueError for what does not fit."""
    if not args.fleet:
        if args.stream or args.since or args.config:
            raise ValueError("--stream, --since and --config are for --fleet URL")
        return None
    from kport.cli.query import fleet_options, parse_time
    from kport.fleet import subjects
    from kport.ui.fleet import FleetBridge  # NATS is loaded for --fleet alone

    if "@" in args.fleet.split("//", 1)[-1].split("/", 1)[0]:
        # as for [export] url: a password in a URL shows in ps, in logs and on the page
        raise ValueError("--fleet URL must not hold credentials (user:password@)")
    since_seq = since_ns = None
    if args.since is not None:
        if args.since.isdigit():
            since_seq = int(args.since)
        else:
            since_ns = parse_time(args.since)
    return FleetBridge(
        args.fleet,
        stream=args.stream or subjects.DEFAULT_STREAM,
        since_seq=since_seq,
        since_ns=since_ns,
        options=fleet_options(args.config),
    )
