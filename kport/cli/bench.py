"""`kport bench NAME`: the benchmarks of a source checkout (bench/), run by name."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


def command(args: argparse.Namespace) -> int:
    """`kport bench NAME`: run that benchmark module's ``run``."""
    root = Path(__file__).resolve().parents[2]
    if not (root / "bench" / "__init__.py").exists():
        print(
            "kport bench: the benchmarks run from a source checkout (bench/ not found)",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(root))
    module = importlib.import_module(f"bench.{args.name}")
    options = {
        k: v for k, v in vars(args).items() if k in ("count", "rounds", "repeat") and v is not None
    }
    module.run(**options, json_dir=args.json_dir)
    return 0
