"""`kport serve`: the daemon's configuration from its file and the command line, its
logging, and the daemon run on uvloop, with the web UI (and the metrics) beside it if
asked."""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys

import uvloop

from kport import daemon, paths
from kport.daemon import config as config_mod
from kport.daemon import metrics
from kport.errors import KportError


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


def command(args: argparse.Namespace) -> int:
    """`kport serve` with its parsed arguments."""
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
    if args.metrics:
        cfg.metrics.listen = args.metrics
    if args.metrics_public:
        cfg.metrics.public = True
    listen = None
    if cfg.metrics.listen:
        try:
            listen = metrics.parse_listen(cfg.metrics.listen, public=cfg.metrics.public)
        except metrics.MetricsAddressError as err:
            print(f"kport serve: {err}", file=sys.stderr)
            return 2
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
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if args.verbose else cfg.daemon.log_level.upper())
    the_daemon = daemon.Daemon(cfg)
    metrics_server = metrics.MetricsServer(the_daemon, listen) if listen is not None else None
    if metrics_server is not None:
        try:
            metrics_server.start()
        except OSError as err:
            print(
                f"kport serve: cannot serve metrics on {cfg.metrics.listen}: {err.strerror}",
                file=sys.stderr,
            )
            return 1
    helpers = []
    if args.ui:
        helpers.append(_start_ui(args.ui, cfg.daemon.runtime_dir))
    if args.export or cfg.export.url:
        helpers.append(_start_export(args, cfg))
    try:
        uvloop.run(the_daemon.run())  # the daemon's loop: see pyproject
    except KportError as err:
        print(f"kport serve: {err}", file=sys.stderr)
        return 1
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        for helper in helpers:
            helper.terminate()
            try:
                helper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
    return 0


def _start_ui(listen: str, runtime_dir: str) -> subprocess.Popen[bytes]:
    """`kport serve --ui`: the web UI beside the daemon, as its own process (it gives up
    root at once), stopped with it. It waits for the ports by itself."""
    where = str(paths.runtime_dir(runtime_dir or None))
    command = [sys.executable, "-m", "kport.cli", "ui", "--listen", listen, "--runtime-dir", where]
    return subprocess.Popen(command, start_new_session=True)


def _start_export(args: argparse.Namespace, cfg: config_mod.Config) -> subprocess.Popen[bytes]:
    """`kport serve --export URL` (or [export] url): the exporter beside the daemon, as its
    own process, a client of the ports like any other, stopped with it."""
    where = str(paths.runtime_dir(cfg.daemon.runtime_dir or None))
    command = [sys.executable, "-m", "kport.cli", "export", "--runtime-dir", where]
    if args.export:
        command += ["--nats", args.export]
    if args.config:
        command += ["--config", args.config]
    if cfg.daemon.state_dir:
        command += ["--state-dir", str(paths.state_dir(cfg.daemon.state_dir) / "export")]
    return subprocess.Popen(command, start_new_session=True)
