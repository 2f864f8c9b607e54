"""`kport ui`: the web UI, served until stopped (see :mod:`kport.ui.serve`)."""

from __future__ import annotations

import argparse

from kport.ui import serve


def command(args: argparse.Namespace) -> int:
    """`kport ui` with its parsed arguments."""
    return serve.run(listen=args.listen, runtime_dir=args.runtime_dir, user=args.user)
