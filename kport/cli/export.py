"""`kport export`: this host's events to a NATS JetStream stream, until stopped (see
:mod:`kport.fleet.exporter`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

import uvloop

from kport.daemon import config as config_mod
from kport.fleet import exporter


def command(args: argparse.Namespace) -> int:
    """`kport export` with its parsed arguments."""
    try:
        cfg = config_mod.load(args.config)
        if args.nats:
            cfg.export.url = args.nats
        config_mod.check_export(cfg.export, "command line")
    except config_mod.ConfigError as err:
        print(f"kport export: {err}", file=sys.stderr)
        return 2
    if not cfg.export.url:
        print("kport export: no broker: give --nats URL, or [export] url", file=sys.stderr)
        return 2
    if args.runtime_dir:
        cfg.daemon.runtime_dir = args.runtime_dir
    if args.state_dir:
        cfg.daemon.state_dir = args.state_dir
    settings = exporter.settings_from(cfg, host=args.host, stream=args.stream)
    if args.state_dir:
        settings.state_dir = args.state_dir
    os.nice(max(0, cfg.export.nice - os.nice(0)))  # never less nice than it was started
    logging.getLogger("nats").setLevel(logging.CRITICAL)  # what matters, the exporter says
    return uvloop.run(_run(settings))  # libuv's loop, as the daemon's: see pyproject


async def _run(settings: exporter.Settings) -> int:
    export = exporter.Exporter(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, export.stop)
    print(
        f"kport export: {export.host} to {settings.export.url}, stream {settings.export.stream}; "
        f"cursor {export.cursor_path}",
        file=sys.stderr,
        flush=True,
    )
    try:
        await export.run()
    except exporter.ExportRefused as err:
        print(f"kport export: {err}", file=sys.stderr)
        return 1
    return 0
