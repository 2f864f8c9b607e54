"""`kport ui`: bind, give up root, print the URL with its token, and serve the web UI.

Started as root (as ``make run`` does), it binds first and then becomes an unprivileged
user (``nobody`` unless told otherwise) with the groups ``kport`` and ``kport-admin``
for this process alone: a web server has no business holding root, and the ports' own
security decides what it may see and answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import importlib
import ipaddress
import logging
import os
import pwd
import secrets
import socket
import sys
from typing import TYPE_CHECKING, Final

import uvicorn

from kport.ui.app import make_app
from kport.ui.bridge import Bridge
from kport.ui.guard import Guard, own_hosts

if TYPE_CHECKING:
    from kport.ui.fleet import FleetBridge

log = logging.getLogger("kport.ui")

DEFAULT_LISTEN: Final = "127.0.0.1:8787"
GROUPS: Final = ("kport", "kport-admin")


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT`` for IPv6) → (host, port); ValueError saying why not."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"--listen must be HOST:PORT, such as {DEFAULT_LISTEN}, not {text!r}")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"--listen needs an IP address (or localhost), not {host!r}") from None
        host = "127.0.0.1"
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"cannot listen on {host}:{port}: {err.strerror}") from err
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


#: modules the server imports only on its first requests: loaded before giving up root,
#: for an interpreter that the user given up to cannot read (one under /root, say)
LAZY_MODULES: Final = (
    "anyio._core._sockets",
    "anyio._core._streams",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "concurrent.futures.thread",
    "pydantic._internal._dataclasses",
)


def drop_root(user: str) -> str:
    """Become ``user`` with the groups kport and kport-admin (those that exist); returns
    what was done, for the log."""
    for module in LAZY_MODULES:
        importlib.import_module(module)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"--user {user!r} does not exist") from None
    gids = []
    for name in GROUPS:
        try:
            gids.append(grp.getgrnam(name).gr_gid)
        except KeyError:
            continue
    os.setgroups(gids)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    names = ", ".join(grp.getgrgid(g).gr_name for g in gids) or "none"
    return f"running as {user} (groups: {names})"


def run(
    *,
    listen: str,
    runtime_dir: str | None,
    user: str,
    token: str | None = None,
    open_print: bool = True,
    fleet: FleetBridge | None = None,
) -> int:
    """Serve the UI over this host's ports, or over the fleet's stream if ``fleet``."""
    try:
        host, port = parse_listen(listen)
        sock = bind(host, port)
    except (ValueError, OSError) as err:
        print(f"kport ui: {err}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    if not is_loopback(host):
        log.warning("kport ui listens on %s, which is not loopback: other hosts can reach it", host)
    token = token or os.environ.get("KPORT_UI_TOKEN") or secrets.token_urlsafe(24)
    name = f"[{host}]" if ":" in host else host  # as it stands in a Host header or URL
    hosts = own_hosts(name, port)
    bridge = Bridge(runtime_dir) if fleet is None else fleet
    app = Guard(make_app(bridge), token=token, hosts=hosts)
    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        ws_max_size=1 << 20,
        ws_ping_interval=20,
        lifespan="on",
    )
    config.load()
    if os.geteuid() == 0:
        try:
            log.info("%s", drop_root(user))
        except (ValueError, OSError) as err:
            print(f"kport ui: cannot give up root: {err}", file=sys.stderr)
            return 2
    shown = "127.0.0.1" if name in ("0.0.0.0", "[::]") else name
    if open_print:
        print(f"kport ui: http://{shown}:{port}/?token={token}", flush=True)
    server = uvicorn.Server(config)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(server.serve(sockets=[sock]))
    return 0
