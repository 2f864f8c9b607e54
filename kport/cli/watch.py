"""`kport watch PATH` and `kport unwatch PATH`: change the running daemon's file watches
over its control port, and list what is watched."""

from __future__ import annotations

import argparse
import os
import sys

import kport


def command(args: argparse.Namespace) -> int:
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
