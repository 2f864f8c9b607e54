"""How kport signs in to NATS: the connect options for [export]'s credentials and TLS,
the same for the exporter and for every face that reads the fleet."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kport.daemon.config import ExportConfig


def connect_options(cfg: ExportConfig) -> dict[str, Any]:
    """nats-py's connect options for the user and password, token, .creds file or nkey
    seed, and TLS (a CA to trust, a client certificate) that ``cfg`` gives."""
    options: dict[str, Any] = {}
    if cfg.user:
        options["user"], options["password"] = cfg.user, cfg.password
    if cfg.token:
        options["token"] = cfg.token
    if cfg.creds:
        options["user_credentials"] = cfg.creds
    if cfg.nkey:
        options["nkeys_seed"] = cfg.nkey
    if cfg.tls_ca or cfg.tls_cert:
        context = ssl.create_default_context(cafile=cfg.tls_ca or None)
        if cfg.tls_cert:
            context.load_cert_chain(cfg.tls_cert, cfg.tls_key or None)
        options["tls"] = context
    return options
