"""`kport install-service`: the systemd unit (contrib/kport.service) and kport's groups."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path


def command(args: argparse.Namespace) -> int:
    """`kport install-service` with its parsed arguments."""
    if os.geteuid() != 0:
        print("kport install-service: must run as root", file=sys.stderr)
        return 1
    unit = Path(__file__).resolve().parents[2] / "contrib" / "kport.service"
    exe = shutil.which("kport") or str(Path(sys.argv[0]).resolve())
    target = Path(args.unit_dir) / "kport.service"
    target.write_text(unit.read_text().replace("@KPORT@", exe))
    for group in ("kport", "kport-admin"):
        subprocess.run(["groupadd", "--system", "-f", group], check=True)
    print(f"installed {target} (ExecStart={exe} serve); groups kport and kport-admin exist")
    if Path("/run/systemd/system").is_dir():
        subprocess.run(["systemctl", "daemon-reload"], check=False)
        print("start it with: systemctl enable --now kport")
    else:
        print("systemd is not running here: start the daemon with `kport serve`")
    return 0
