"""kport's version, on its own: what the command line, the daemon and the web UI show,
without importing the package's whole API."""

from __future__ import annotations

__version__ = "0.1.0"
