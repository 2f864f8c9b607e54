"""`kport bench file`: what a file-access decision adds to open()+close(), by kport (rules,
cache hit and miss; a decision client) and by fapolicyd, against no monitor at all; and
the floor under a decision client's round trip on this machine: a bare Python daemon and
decision client (bench/chain.py).

An opener process (never the daemon, which allows its own opens) opens and closes files
on a tmpfs that the bench mounts itself: one file again and again, or a new file each
time. Each monitor in turn is the only one watching that mount. Each monitored run is
done twice, with the opener and the monitor pinned to one CPU and to two: an answer from
another CPU costs that CPU's wake-up, which in a VM is most of the latency. The whole set
of runs is repeated (three times by default) and each figure is the median over those
rounds, so that the machine's drift between one monitor's run and another's weighs less.

fapolicyd marks every mount of the types in its ``watch_fs``, and tmpfs is mounted
elsewhere too (/dev/shm, /run, other programs' mounts). So it runs in a mount namespace of
its own where the bench's tmpfs is the only one left (bar any holding fapolicyd's own
files), and the opener joins that namespace: nothing outside the bench is watched.

Run as root. fapolicyd comes from Debian (installed here if missing) and reads only
/etc/fapolicyd: its files there and in /var/lib/fapolicyd are put back afterwards, and
its systemd service is kept disabled.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any, NamedTuple

import tomli_w

from bench.chain import chain
from bench.common import Table, apt_install_without_starting, percentile, save_results

FSTYPE = "tmpfs"
CLONE_NEWNS = 0x00020000
CLIENT_TARGET_US = 250.0
#: kport's rule-decided added latency may be at most this many times fapolicyd's
FAPOLICYD_FACTOR = 2.0
#: after the last open, time for a monitor to finish what it does after the verdict
SETTLE_S = 0.5
OPENER_TIMEOUT_S = 600.0
START_TIMEOUT_S = 30.0

FAPOLICYD_ETC = Path("/etc/fapolicyd")
FAPOLICYD_STATE = Path("/var/lib/fapolicyd")
FAPOLICYD_RUN = Path("/run/fapolicyd")
FAPOLICYD_PIDFILE = Path("/run/fapolicyd.pid")
FAPOLICYD_STATEFILE = Path("/run/fapolicyd.state")
# The package's defaults, except: only our mount's type, trust from an empty file (not a
# package database, slow to build), no report file, and root: in a VM whose bounding set
# lacks CAP_SYS_RESOURCE, fapolicyd stopped at "Cannot change to uid" of its own user.
FAPOLICYD_CONF = """\
permissive = 0
nice_val = 14
q_size = 640
uid = 0
gid = 0
do_stat_report = 0
detailed_report = 0
db_max_size = 50
subj_cache_size = 1549
obj_cache_size = 8191
watch_fs = {fstype}
trust = file
integrity = none
syslog_format = rule,dec,perm,auid,pid,exe,:,path,ftype,trust
allow_filesystem_mark = 0
"""
FAPOLICYD_RULES = "allow perm=any all : all\n"
FAPOLICYD_TRUST = "# kport bench file: nothing is trusted; the one rule allows all\n"


# --- the opener ---------------------------------------------------------------------------


def _enter_mount_namespace(pid: int) -> None:
    """Join ``pid``'s mount namespace (os.setns is Python 3.12+)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNS) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into the mount namespace of pid {pid}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _opener(
    paths: list[str], warmup: list[str], cpu: int, namespace_of: int | None, pipe: Pipe
) -> None:
    """Open+close ``warmup`` (discarded), say so, wait for go, then time each of ``paths``;
    on ``cpu``, in the mount namespace of pid ``namespace_of`` if given."""
    os.sched_setaffinity(0, {cpu})
    if namespace_of is not None:
        _enter_mount_namespace(namespace_of)
    for path in warmup:
        os.close(os.open(path, os.O_RDONLY))
    pipe.send("warm")
    pipe.recv()
    gc.disable()
    clock = time.perf_counter_ns
    latencies = [0] * len(paths)
    started = clock()
    for i, path in enumerate(paths):
        t0 = clock()
        fd = os.open(path, os.O_RDONLY)
        os.close(fd)
        latencies[i] = clock() - t0
    elapsed = clock() - started
    pipe.send((latencies, elapsed))


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Placement(NamedTuple):
    """Where the opener and the monitor's processes run. A monitor's answer on another CPU
    costs that CPU's wake-up (in a VM, ~0.1 ms); left to the scheduler, runs land either
    way at random and their latencies differ by that much."""

    name: str
    opener_cpu: int
    monitor_cpu: int


def _placements() -> list[Placement]:
    cpus = sorted(os.sched_getaffinity(0))
    placements = [Placement("one", cpus[0], cpus[0])]
    if len(cpus) > 1:
        placements.append(Placement("two", cpus[0], cpus[1]))
    return placements


def _pin(pids: list[int], cpu: int) -> None:
    """Every thread of ``pids`` onto ``cpu`` (threads started later inherit it)."""
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(ProcessLookupError):  # a thread that has just ended
                os.sched_setaffinity(int(task.name), {cpu})


def _measure(
    paths: list[str],
    warmup: list[str],
    placement: Placement,
    monitor_pids: list[int] | None = None,
    namespace_of: int | None = None,
) -> dict[str, Any]:
    """One opener run; ``monitor_pids`` are the processes whose CPU time the run costs."""
    monitor_pids = monitor_pids or []
    _pin(monitor_pids, placement.monitor_cpu)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    opener = ctx.Process(
        target=_opener,
        args=(paths, warmup, placement.opener_cpu, namespace_of, theirs),
        name="kport-bench-opener",
    )
    opener.start()
    try:
        if not ours.poll(OPENER_TIMEOUT_S):
            raise RuntimeError(f"the opener did not finish {len(warmup)} warm-up opens in time")
        ours.recv()
        cpu0 = sum(_cpu_seconds(pid) for pid in monitor_pids)
        ours.send("go")
        if not ours.poll(OPENER_TIMEOUT_S):
            raise RuntimeError(f"the opener did not finish {len(paths)} opens in time")
        latencies_ns, elapsed_ns = ours.recv()
        time.sleep(SETTLE_S)
        cpu = sum(_cpu_seconds(pid) for pid in monitor_pids) - cpu0
        opener.join(30)
    finally:
        if opener.is_alive():
            opener.kill()
            opener.join(5)
    latencies = [ns / 1000 for ns in latencies_ns]
    return {
        "placement": placement.name,
        "opens": len(paths),
        "p50_us": percentile(latencies, 50),
        "p99_us": percentile(latencies, 99),
        "max_us": max(latencies, default=0.0),
        "opens_per_s": len(paths) / (elapsed_ns / 1e9),
        "cpu_s": cpu if monitor_pids else None,
        "cpu_s_per_1000_opens": cpu / len(paths) * 1000 if monitor_pids else None,
    }


# --- the mount ----------------------------------------------------------------------------


@contextlib.contextmanager
def _mount() -> Iterator[Path]:
    mnt = Path(tempfile.mkdtemp(prefix="kport-bench-file-"))
    try:
        subprocess.run(
            ["mount", "-t", FSTYPE, "-o", "size=16m,mode=0755", "kport-bench-file", mnt], check=True
        )
        try:
            yield mnt
        finally:
            if subprocess.run(["umount", mnt], check=False).returncode != 0:
                subprocess.run(["umount", "--lazy", mnt], check=False)
    finally:
        with contextlib.suppress(OSError):
            mnt.rmdir()


def _make_files(mnt: Path, count: int, warmup: int) -> dict[str, list[str]]:
    """The file opened again and again, ``count`` distinct ones, ``warmup`` more for warm-up."""
    same = mnt / "same"
    same.write_bytes(b"x")
    files: dict[str, list[str]] = {"same": [str(same)] * count, "same_warmup": [str(same)] * warmup}
    for name, n in (("distinct", count), ("distinct_warmup", warmup)):
        directory = mnt / name
        directory.mkdir()
        paths = [str(directory / f"{i:07d}") for i in range(n)]
        for path in paths:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        files[name] = paths
    return files


# --- kport --------------------------------------------------------------------------------


def _status(rundir: str) -> dict[str, Any]:
    import kport

    with kport.connect("control", runtime_dir=rundir) as conn:
        status: dict[str, Any] = conn.send({"op": "status"}, timeout=5)
    return status


def _wait(
    what: str, ready: Callable[[], object], process: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited ({process.returncode}): {_tail(log)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {START_TIMEOUT_S:g} s: {_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    text = log.read_text(errors="replace").strip() if log.exists() else ""
    return "\n".join(text.splitlines()[-15:]) or "(no output)"


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _spawn_kport(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``kport ARGS`` from this checkout, its output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "kport.cli", *args], stdout=out, stderr=out)


@contextlib.contextmanager
def _kport(workdir: Path, name: str, file_config: dict[str, Any]) -> Iterator[tuple[int, str]]:
    """A kport daemon watching file access as ``file_config`` says; yields (pid, rundir)."""
    base = workdir / name
    rundir, statedir = base / "run", base / "state"
    rundir.mkdir(parents=True)
    statedir.mkdir()
    config = base / "kport.toml"
    # The proc source is off: its work would be counted as the file path's CPU.
    config.write_text(
        tomli_w.dumps(
            {"proc": {"enabled": False}, "journal": {"enabled": True}, "file": file_config}
        )
    )
    log = base / "serve.log"
    serve = ["serve", "--runtime-dir", str(rundir), "--state-dir", str(statedir)]
    daemon = _spawn_kport([*serve, "--config", str(config)], log)
    try:
        _wait("kport serve", (rundir / "file.sock").exists, daemon, log)
        _wait(
            "kport's file source",
            lambda: _status(str(rundir))["sources"]["file"]["watching"],
            daemon,
            log,
        )
        yield daemon.pid, str(rundir)
    finally:
        _stop(daemon)


@contextlib.contextmanager
def _decider(rundir: str, workdir: Path) -> Iterator[int]:
    """``kport decide --policy allow``, connected; yields its pid."""
    log = workdir / "decide.log"
    decider = _spawn_kport(["decide", "--policy", "allow", "--runtime-dir", rundir], log)
    try:
        _wait(
            "kport decide",
            lambda: _status(rundir)["ports"]["file-decide"]["connections"],
            decider,
            log,
        )
        yield decider.pid
    finally:
        _stop(decider)


def _file_counts(rundir: str) -> dict[str, int]:
    source = _status(rundir)["sources"]["file"]
    counts = {k: int(source.get(k) or 0) for k in ("events", "allowed", "denied", "asked")}
    counts["defaulted"] = int(source.get("defaulted") or 0)
    cache = source.get("cache") or {}
    counts["cache_hits"] = int(cache.get("hits") or 0)
    counts["cache_misses"] = int(cache.get("misses") or 0)
    return counts


def _kport_run(
    rundir: str, paths: list[str], warmup: list[str], placement: Placement, pids: list[int]
) -> dict[str, Any]:
    """A measured run plus what kport's file source counted meanwhile (warm-up included)."""
    before = _file_counts(rundir)
    result = _measure(paths, warmup, placement, pids)
    after = _file_counts(rundir)
    result["kport_counts"] = {k: after[k] - before[k] for k in after}
    return result


# --- fapolicyd ----------------------------------------------------------------------------


def _fapolicyd_pids() -> list[int]:
    pids = []
    for comm in Path("/proc").glob("[0-9]*/comm"):
        with contextlib.suppress(OSError):
            if comm.read_text().strip() == "fapolicyd":
                pids.append(int(comm.parent.name))
    return pids


def _install_fapolicyd() -> None:
    """Its service must not start even once: its default rule denies executing anything
    untrusted, and with a Debian build's trust sources (no rpm) that is nearly everything."""
    apt_install_without_starting("fapolicyd")


def _fapolicyd_service_off() -> None:
    """The package enables its service on install; keep it stopped and disabled."""
    if shutil.which("systemctl") is None:
        return
    enabled = subprocess.run(
        ["systemctl", "is-enabled", "fapolicyd"], capture_output=True, text=True, check=False
    ).stdout.strip()
    booted = Path("/run/systemd/system").exists()
    if enabled == "enabled" or booted:
        subprocess.run(
            ["systemctl", "disable", *(["--now"] if booted else []), "fapolicyd"],
            capture_output=True,
            check=False,
        )


@contextlib.contextmanager
def _preserved(files: list[Path], directories: list[Path]) -> Iterator[None]:
    """Put ``files`` back as they were afterwards (removed if they did not exist), and the
    files in ``directories`` too; what appears in those directories meanwhile is removed."""
    backup = Path(tempfile.mkdtemp(prefix="kport-bench-fapolicyd-"))
    saved: dict[Path, Path | None] = {}
    listed: dict[Path, set[str]] = {}
    try:
        for directory in directories:
            listed[directory] = set(os.listdir(directory)) if directory.is_dir() else set()
            files = files + [d for n in listed[directory] if (d := directory / n).is_file()]
        for i, path in enumerate(files):
            saved[path] = backup / str(i) if path.is_file() else None
            if (copy := saved[path]) is not None:
                shutil.copy2(path, copy)
        yield
    finally:
        for directory, names in listed.items():
            for name in set(os.listdir(directory)) - names if directory.is_dir() else ():
                new = directory / name
                if new.is_dir() and not new.is_symlink():
                    shutil.rmtree(new, ignore_errors=True)
                else:
                    new.unlink(missing_ok=True)
        for path, copy in saved.items():
            if copy is None:
                path.unlink(missing_ok=True)
            else:
                shutil.copy2(copy, path)
        shutil.rmtree(backup, ignore_errors=True)


def _mounts() -> list[tuple[str, str]]:
    """(mount point, type) of every mount, in /proc/mounts order (parents first)."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[1])
        out.append((point, fields[2]))
    return out


def _within(path: Path, point: str) -> bool:
    return path == Path(point) or Path(point) in path.parents


def _fapolicyd_command(mnt: Path) -> list[str]:
    """fapolicyd in a new mount namespace, after unmounting there (only there) every other
    ``FSTYPE`` mount that neither holds the bench's mount nor fapolicyd's own files."""
    needed = [
        mnt,
        FAPOLICYD_ETC,
        FAPOLICYD_STATE,
        FAPOLICYD_RUN,
        FAPOLICYD_PIDFILE,
        Path("/var/log"),
    ]
    others = [
        point
        for point, fstype in _mounts()
        if fstype == FSTYPE and not any(_within(path, point) for path in needed)
    ]
    # Deepest first; a mount already gone with its parent fails quietly. --debug-deny: in
    # the foreground, writing only denials (there are none).
    script = "".join(f"umount --lazy {shlex.quote(p)} 2>/dev/null; " for p in reversed(others))
    script += "exec fapolicyd --debug-deny"
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script]


def _fapolicyd_report(log: str) -> dict[str, int]:
    """The counts fapolicyd writes as it exits."""
    wanted = {
        "Allowed accesses": "allowed",
        "Denied accesses": "denied",
        "Object hits": "cache_hits",
        "Object misses": "cache_misses",
    }
    counts = {}
    for line in log.splitlines():
        key, _, value = line.partition(":")
        if key in wanted and value.strip().isdigit():
            counts[wanted[key]] = int(value)
    return counts


@contextlib.contextmanager
def _fapolicyd(workdir: Path, mnt: Path) -> Iterator[dict[str, Any]]:
    """fapolicyd allowing everything on ``mnt`` (see the module docstring). Yields a dict:
    its ``pid`` (also the mount namespace to open in) and the mounts it ``marked``; once it
    has stopped, the ``counts`` it reported too."""
    if shutil.which("fapolicyd") is None:
        _install_fapolicyd()
    _fapolicyd_service_off()
    if running := _fapolicyd_pids():
        raise RuntimeError(f"fapolicyd is already running (pid {running}); stop it first")
    made_run = not FAPOLICYD_RUN.exists()
    FAPOLICYD_RUN.mkdir(mode=0o770, exist_ok=True)
    etc = [FAPOLICYD_ETC / n for n in ("fapolicyd.conf", "compiled.rules", "fapolicyd.trust")]
    try:
        with _preserved(
            [*etc, FAPOLICYD_PIDFILE, FAPOLICYD_STATEFILE], [FAPOLICYD_STATE, FAPOLICYD_RUN]
        ):
            etc[0].write_text(FAPOLICYD_CONF.format(fstype=FSTYPE))
            etc[1].write_text(FAPOLICYD_RULES)
            etc[2].write_text(FAPOLICYD_TRUST)
            check = subprocess.run(
                ["fapolicyd-cli", "--check-config"], capture_output=True, text=True, check=False
            )
            if check.returncode != 0:
                raise RuntimeError(f"fapolicyd-cli --check-config: {check.stdout}{check.stderr}")
            log = workdir / "fapolicyd.log"
            with log.open("wb") as out:
                # unshare and sh exec: the pid is fapolicyd's
                daemon = subprocess.Popen(_fapolicyd_command(mnt), stdout=out, stderr=out)
            try:
                _wait(
                    "fapolicyd",
                    lambda: "Starting to listen for events" in log.read_text(errors="replace"),
                    daemon,
                    log,
                )
                marked = [
                    line.split("added ", 1)[1].rsplit(" mount point", 1)[0]
                    for line in log.read_text(errors="replace").splitlines()
                    if line.startswith("added ") and line.endswith(" mount point")
                ]
                info: dict[str, Any] = {"pid": daemon.pid, "marked": marked}
                yield info
            finally:
                _stop(daemon)
            info["counts"] = _fapolicyd_report(log.read_text(errors="replace"))
    finally:
        if made_run:
            shutil.rmtree(FAPOLICYD_RUN, ignore_errors=True)


# --- the benchmark ------------------------------------------------------------------------


#: (run key, monitor, files, the no-monitor run it is compared with)
SCENARIOS = (
    ("kport_hit", "kport rule", "same", "baseline_same"),
    ("kport_miss", "kport rule", "distinct", "baseline_distinct"),
    ("kport_client", "kport client", "same", "baseline_same"),
    ("chain_client", "python chain", "same", "baseline_same"),
    ("fapolicyd_same", "fapolicyd", "same", "baseline_same"),
    ("fapolicyd_distinct", "fapolicyd", "distinct", "baseline_distinct"),
)


def _round(
    workdir: Path,
    mnt: Path,
    opens: dict[str, tuple[list[str], list[str]]],
    placements: list[Placement],
    marked: set[str],
) -> dict[str, dict[str, Any]]:
    """Every run once: no monitor, kport by rules, kport asking a client, the bare
    Python chain asking its client, fapolicyd."""
    runs: dict[str, dict[str, Any]] = {}
    for kind, (paths, warmup) in opens.items():
        runs[f"baseline_{kind}"] = _measure(paths, warmup, placements[0])

    rules = workdir / "rules.toml"
    rules.write_text(
        tomli_w.dumps(
            {
                "default": "allow",
                "rule": [{"name": "bench", "action": "allow", "path": [f"{mnt}/**"]}],
            }
        )
    )
    by_rules = {
        "enabled": True,
        "paths": [str(mnt)],
        "rules": [str(rules)],
        "default_action": "allow",
    }
    with _kport(workdir, "rules", by_rules) as (pid, rundir):
        for at in placements:
            # A new opener each run: its (pid, start time) is in no cache entry yet.
            runs[f"kport_hit/{at.name}"] = _kport_run(rundir, *opens["same"], at, [pid])
            runs[f"kport_miss/{at.name}"] = _kport_run(rundir, *opens["distinct"], at, [pid])

    by_client = {
        "enabled": True,
        "paths": [str(mnt)],
        "default_action": "ask",
        "decision_deadline_s": 10.0,
    }
    with (
        _kport(workdir, "client", by_client) as (pid, rundir),
        _decider(rundir, workdir) as decider,
    ):
        for at in placements:
            runs[f"kport_client/{at.name}"] = _kport_run(rundir, *opens["same"], at, [pid, decider])

    with chain(mnt) as pids:
        for at in placements:
            runs[f"chain_client/{at.name}"] = _measure(*opens["same"], at, pids)

    # One fapolicyd per run: it reports its counts as it exits, not before.
    for at in placements:
        for kind in ("same", "distinct"):
            with _fapolicyd(workdir, mnt) as fap:
                pid = fap["pid"]
                result = _measure(*opens[kind], at, [pid], namespace_of=pid)
            result["fapolicyd_counts"] = fap["counts"]
            runs[f"fapolicyd_{kind}/{at.name}"] = result
            marked.update(fap["marked"])

    for key, _, _, baseline in SCENARIOS:
        for at in placements:
            r = runs[f"{key}/{at.name}"]
            r["baseline"] = baseline
            r["added_p50_us"] = r["p50_us"] - runs[baseline]["p50_us"]
    return runs


#: what the summary of several rounds takes the median of
_MEDIANS = ("p50_us", "p99_us", "opens_per_s", "cpu_s_per_1000_opens", "added_p50_us")


def _summary(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each run's median over the rounds, and its counts added up."""
    runs: dict[str, dict[str, Any]] = {}
    for key, first in rounds[0].items():
        r: dict[str, Any] = {"rounds": len(rounds)}
        for field in _MEDIANS:
            values = [one[key][field] for one in rounds if one[key].get(field) is not None]
            if len(values) == len(rounds):
                r[field] = statistics.median(values)
            elif field in first:
                r[field] = None
        if "baseline" in first:
            r["baseline"] = first["baseline"]
        for counts in ("kport_counts", "fapolicyd_counts"):
            if counts in first:
                total: dict[str, int] = {}
                for one in rounds:
                    for name, n in one[key][counts].items():
                        total[name] = total.get(name, 0) + n
                r[counts] = total
        runs[key] = r
    return runs


def run(
    count: int = 20_000, rounds: int = 500, json_dir: str | None = None, repeat: int = 3
) -> dict[str, Any]:
    """``count`` timed opens per run, after ``rounds`` warm-up opens; every run is done
    ``repeat`` times, the whole set in turn, and each figure is the median of them."""
    if os.geteuid() != 0:
        raise SystemExit("kport bench file: run as root (fanotify and mount need it)")
    if count < 1 or rounds < 1 or repeat < 1:
        raise SystemExit("kport bench file: --count, --rounds and --repeat must be >= 1")
    placements = _placements()
    marked: set[str] = set()
    each: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="kport-bench-file-") as tmp, _mount() as mnt:
        workdir = Path(tmp)
        files = _make_files(mnt, count, rounds)
        opens = {
            "same": (files["same"], files["same_warmup"]),
            "distinct": (files["distinct"], files["distinct_warmup"]),
        }
        # Whole sets in turn, not each monitor's repeats together: the machine's drift
        # (noisy neighbours in a VM) then falls on kport and fapolicyd alike.
        for n in range(repeat):
            own = workdir / f"round-{n + 1}"  # fresh daemons, state and logs each round
            own.mkdir()
            each.append(_round(own, mnt, opens, placements, marked))
    runs = _summary(each)

    # Narrow enough for 80 columns, where rich wraps anything wider.
    table = Table(
        f"open()+close() on a {FSTYPE}: {count:,} timed per run, after {rounds:,} warm-up; "
        f"medians of {repeat} rounds",
        ["monitor", "files", "CPUs", "p50 µs", "p99 µs", "opens/s", "+p50", "CPU ms"],
    )
    rows = [(f"baseline_{kind}", "none", kind, "") for kind in opens]
    rows += [
        (f"{key}/{at.name}", label, kind, at.name)
        for key, label, kind, _ in SCENARIOS
        for at in placements
    ]
    for key, label, kind, cpus in rows:
        r = runs[key]
        cpu = r["cpu_s_per_1000_opens"]
        table.row(
            label,
            kind,
            cpus,
            f"{r['p50_us']:.1f}",
            f"{r['p99_us']:.1f}",
            f"{r['opens_per_s']:.0f}",
            f"{r['added_p50_us']:+.1f}" if "added_p50_us" in r else "",
            "" if cpu is None else f"{cpu:.3f}",
        )
    table.show()
    print(
        "files: the same file each time (kport rule: a cache hit) or a new one (a miss). "
        "CPUs: the opener and the monitor on one CPU, or on two. +p50: µs over the "
        "no-monitor p50 for those files. CPU ms: the monitor's CPU time per open (kport "
        "client: daemon and decider together). python chain: a bare Python daemon and "
        "decision client (bench/chain.py), the floor of any client-decided round trip "
        "made of Python processes on this machine."
    )
    print(f"fapolicyd marked: {', '.join(sorted(marked)) or 'nothing'}")
    if repeat > 1:
        table = Table("+p50 µs in each round", ["monitor", "files", "CPUs", "rounds"])
        for key, label, kind, cpus in rows[len(opens) :]:
            added = " / ".join(f"{one[key]['added_p50_us']:+.1f}" for one in each)
            table.row(label, kind, cpus, added)
        table.show()

    columns = ["allowed", "asked", "cache_hits", "cache_misses"]
    table = Table(
        f"Decisions each monitor counted (warm-up included, {repeat} rounds)",
        ["monitor", "files", "CPUs", "allowed", "asked", "hits", "misses"],
    )
    odd = []
    for key, label, kind, cpus in rows[len(opens) :]:
        counts = runs[key].get("kport_counts") or runs[key].get("fapolicyd_counts") or {}
        table.row(label, kind, cpus, *(f"{counts[c]}" if c in counts else "" for c in columns))
        odd += [f"{key}: {c} {counts[c]}" for c in ("denied", "defaulted") if counts.get(c)]
    table.show()
    if odd:
        print(f"NOT ALL ALLOWED AS ASKED: {'; '.join(odd)}")

    targets: dict[tuple[str, str], tuple[float, float]] = {}
    for at in placements:
        fap_same = runs[f"fapolicyd_same/{at.name}"]["added_p50_us"]
        fap_distinct = runs[f"fapolicyd_distinct/{at.name}"]["added_p50_us"]
        targets["kport rule, cache hit: +p50 <= 2x fapolicyd", at.name] = (
            runs[f"kport_hit/{at.name}"]["added_p50_us"],
            FAPOLICYD_FACTOR * fap_same,
        )
        targets["kport rule, cache miss: +p50 <= 2x fapolicyd", at.name] = (
            runs[f"kport_miss/{at.name}"]["added_p50_us"],
            FAPOLICYD_FACTOR * fap_distinct,
        )
        targets["kport client: round trip p50 <= 250 µs", at.name] = (
            runs[f"kport_client/{at.name}"]["p50_us"],
            CLIENT_TARGET_US,
        )
    met = {target: measured <= limit for target, (measured, limit) in targets.items()}
    table = Table("Targets", ["target", "CPUs", "µs", "limit", "met"])
    for (name, cpus), (measured, limit) in targets.items():
        table.row(name, cpus, f"{measured:.1f}", f"{limit:.1f}", "yes" if met[name, cpus] else "NO")
    table.show()
    floor = [
        f"{at.name} CPU{'s' if at.name != 'one' else ''}: "
        f"{runs[f'chain_client/{at.name}']['p50_us']:.1f} µs (kport client "
        f"{runs[f'kport_client/{at.name}']['p50_us']:.1f})"
        for at in placements
    ]
    print(f"The floor, a bare Python chain's round trip p50: {'; '.join(floor)}")

    result = {
        "bench": "file",
        "fstype": FSTYPE,
        "count": count,
        "warmup": rounds,
        "repeat": repeat,
        "placements": [at._asdict() for at in placements],
        "runs": runs,
        "rounds": each,
        "fapolicyd_marked": sorted(marked),
        "targets": {
            f"{name} ({cpus} CPU)": {"measured_us": m, "limit_us": lim, "met": met[name, cpus]}
            for (name, cpus), (m, lim) in targets.items()
        },
    }
    save_results("file", result, json_dir)
    return result
