"""Benchmarks of kport against baselines and peers, run with `kport bench NAME`."""
