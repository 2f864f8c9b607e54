"""Builds the eBPF object into the package (see scripts/build-bpf.sh); the rest is in
pyproject.toml."""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

OBJECT = Path(__file__).parent / "kport" / "sources" / "proc_bpf.bpf.o"


class BuildPyWithBpf(build_py):
    """build_py that first builds the eBPF object where it is missing (an sdist carries
    the source and the script; a clone has neither object nor stale one to trust)."""

    def run(self) -> None:
        # an editable install (make) leaves it to the Makefile, which builds it where the
        # kernel allows and says why not where it does not
        if not OBJECT.exists() and not getattr(self, "editable_mode", False):
            subprocess.run(["sh", "scripts/build-bpf.sh"], check=True, cwd=Path(__file__).parent)
        super().run()


setup(cmdclass={"build_py": BuildPyWithBpf})
