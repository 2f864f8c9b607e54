"""`kport objects`: the named objects of a namespace, as a table (or JSON)."""

from __future__ import annotations

import argparse
import json
import sys

from rich.console import Console
from rich.table import Table

import kport


def command(args: argparse.Namespace) -> int:
    """`kport objects` with its parsed arguments."""
    with kport.connect(args.namespace, runtime_dir=args.runtime_dir) as conn:
        entries = conn.send({"op": "list"}, timeout=5)
    if args.json:
        print(json.dumps(entries, indent=2))
        return 0
    table = Table("name", "type", "state", "refs", "permanent", "creator", "admits", box=None)
    for e in entries:
        mode = "manual" if e["manual_reset"] else "auto"
        admits = ", ".join([f"uid {u}" for u in e["uids"]] + [f"gid {g}" for g in e["gids"]])
        table.add_row(
            e["name"],
            f"{e['type']} ({mode})",
            "set" if e["set"] else "clear",
            str(e["references"]),
            "yes" if e["permanent"] else "no",
            f"pid {e['creator_pid']} uid {e['creator_uid']}",
            admits or "creator and root",
        )
    Console().print(table)
    if not entries:
        print("no named objects", file=sys.stderr)
    return 0
