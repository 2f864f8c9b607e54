"""`kport bench net`: what a firewall adds to a new TCP connection, by kport (rules; a
decision client) and by OpenSnitch's daemon (allow-all), against no firewall at all; and
the NFQUEUE reader alone, kport's raw netlink against NetfilterQueue (libnetfilter_queue).

Everything happens in two network namespaces the bench makes (a client and a server,
joined by a veth pair) and removes afterwards: no packet leaves them. A connector in the
client namespace opens and closes (with a reset, so no TIME_WAIT piles up) one TCP
connection after another to a listener in the server namespace, timing each connect().
Each firewall in turn is the only one in the client namespace.

kport runs with its network source alone (and its journal, as by default): the proc
connector answers only in the first network namespace, so processes are read from /proc.
OpenSnitch runs with its default action allow, no UI, and its /proc process monitor (as
kport). Run as root. OpenSnitch
comes from Debian (installed here if missing, its service never started);
NetfilterQueue from PyPI (pyproject's bench extra) with Debian's libnetfilter-queue-dev.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.common import Table, apt_install_without_starting, percentile, save_results

CLIENT_NS = "kbench-c"
SERVER_NS = "kbench-s"
CLIENT_IP = "10.78.0.1"
SERVER_IP = "10.78.0.2"
PORT = 8080
QUEUE = 4747
#: kport's rule-decided connection rate must be at least OpenSnitch's; the p50 it adds
#: to a connect at most this
ADDED_P50_TARGET_US = 200.0
REPO = Path(__file__).resolve().parent.parent

SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4096)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.close()
"""

CONNECTOR = """
import json, socket, struct, sys, time
host, port, count, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
linger = struct.pack("ii", 1, 0)
def one():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
    t = time.perf_counter_ns()
    s.connect((host, port))
    took = time.perf_counter_ns() - t
    s.close()
    return took
for _ in range(warmup):
    one()
start = time.perf_counter()
times = [one() for _ in range(count)]
elapsed = time.perf_counter() - start
print(json.dumps({"us": [t / 1000 for t in times], "elapsed_s": elapsed}))
"""

RAW_READER = """
import select, sys
from kport.sources import nfqueue
q = nfqueue.Queue(int(sys.argv[1]))
print("ready", flush=True)
poller = select.poll(); poller.register(q.fileno(), select.POLLIN)
while True:
    poller.poll()
    for packet in q.read():
        q.verdict(packet, nfqueue.NF_ACCEPT)
"""

NFQ_READER = """
import sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda packet: packet.accept())
print("ready", flush=True)
q.run()
"""


def _sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check)


@contextlib.contextmanager
def _namespaces() -> Iterator[None]:
    for name in (CLIENT_NS, SERVER_NS):
        _sh("ip", "netns", "del", name, check=False)  # a run killed before its cleanup
    try:
        _sh("ip", "netns", "add", CLIENT_NS)
        _sh("ip", "netns", "add", SERVER_NS)
        _sh("ip", "link", "add", "kbench-c0", "type", "veth", "peer", "name", "kbench-s0")
        _sh("ip", "link", "set", "kbench-c0", "netns", CLIENT_NS)
        _sh("ip", "link", "set", "kbench-s0", "netns", SERVER_NS)
        _sh("ip", "-n", CLIENT_NS, "addr", "add", f"{CLIENT_IP}/24", "dev", "kbench-c0")
        _sh("ip", "-n", SERVER_NS, "addr", "add", f"{SERVER_IP}/24", "dev", "kbench-s0")
        for ns, dev in ((CLIENT_NS, "kbench-c0"), (SERVER_NS, "kbench-s0")):
            _sh("ip", "-n", ns, "link", "set", dev, "up")
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield
    finally:
        for name in (CLIENT_NS, SERVER_NS):
            _sh("ip", "netns", "del", name, check=False)


def _in_ns(ns: str, argv: list[str], **kw: Any) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], text=True, env=env, **kw)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def _started(ns: str, argv: list[str], ready: str = "ready") -> Iterator[subprocess.Popen[str]]:
    """A process in ``ns`` that prints ``ready`` when it is."""
    proc = _in_ns(ns, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != ready:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"{argv[:3]} did not start: {line!r} {err[-500:]}")
        yield proc
    finally:
        _stop(proc)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _measure(count: int, warmup: int) -> dict[str, Any]:
    proc = _in_ns(
        CLIENT_NS,
        [sys.executable, "-c", CONNECTOR, SERVER_IP, str(PORT), str(count), str(warmup)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = proc.communicate(timeout=600)
    if proc.returncode:
        raise RuntimeError(f"the connector failed: {err[-800:]}")
    data = json.loads(out)
    us: list[float] = data["us"]
    return {
        "connections": count,
        "per_s": round(count / data["elapsed_s"], 1),
        "p50_us": round(percentile(us, 50), 1),
        "p99_us": round(percentile(us, 99), 1),
    }


def _wait_status(rundir: Path, proc: subprocess.Popen[str], timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"kport serve stopped: {proc.stderr.read() if proc.stderr else ''}")
        status = _status(rundir)
        if status is not None and status["sources"]["net"]["backend"]:
            return status
        time.sleep(0.1)
    raise RuntimeError("kport serve did not come up")


@contextlib.contextmanager
def _kport(workdir: Path, rules: str, *, decider: bool) -> Iterator[Path]:
    rundir = workdir / "run"
    shutil.rmtree(rundir, ignore_errors=True)
    rundir.mkdir()
    (workdir / "rules.toml").write_text(rules)
    (workdir / "kport.toml").write_text(
        "[proc]\nenabled = false\n"
        f'[net]\nenabled = true\nqueue = {QUEUE}\nrules = ["{workdir / "rules.toml"}"]\n'
    )
    serve = _in_ns(
        CLIENT_NS,
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--config", str(workdir / "kport.toml")),
            *("--runtime-dir", str(rundir), "--state-dir", str(workdir / "state")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    decide: subprocess.Popen[str] | None = None
    try:
        _wait_status(rundir, serve)
        if decider:
            decide = subprocess.Popen(
                [
                    *(sys.executable, "-m", "kport.cli", "decide", "--policy", "allow"),
                    *("--port", "net-decide", "--runtime-dir", str(rundir)),
                ],
                stdout=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                text=True,
            )
            deadline = time.monotonic() + 10
            while not _wait_status(rundir, serve)["ports"]["net-decide"]["connections"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("kport decide did not connect")
                time.sleep(0.1)
        yield rundir
    finally:
        if decide is not None:
            _stop(decide)
        _stop(serve)
        if serve.stderr is not None:
            serve.stderr.close()


def _install_opensnitch() -> None:
    """Its service must not start even once: it would queue the machine's own traffic."""
    if shutil.which("opensnitchd") is None:
        apt_install_without_starting("opensnitch")


@contextlib.contextmanager
def _opensnitch(workdir: Path) -> Iterator[None]:
    (workdir / "os-rules").mkdir(exist_ok=True)
    log = workdir / "opensnitchd.log"
    proc = _in_ns(
        CLIENT_NS,
        [
            *("opensnitchd", "-rules-path", str(workdir / "os-rules"), "-queue-num", "0"),
            *("-process-monitor-method", "proc", "-log-file", str(log)),
            *("-ui-socket", f"unix://{workdir / 'no-ui.sock'}"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while "Running on netfilter queue" not in (log.read_text() if log.exists() else ""):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"opensnitchd did not start: {log.read_text()[-800:]}")
            time.sleep(0.1)
        yield
    finally:
        _stop(proc)


def _netfilterqueue_ready() -> str | None:
    """Install NetfilterQueue if it is missing; None, or why it cannot be measured."""
    if importlib.util.find_spec("netfilterqueue") is not None:
        return None
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "libnetfilter-queue-dev"],
        check=False,
        env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
    )
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{REPO}[bench]"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if done.returncode == 0 else f"NetfilterQueue did not install: {done.stderr[-300:]}"


@contextlib.contextmanager
def _queue_rule() -> Iterator[None]:
    rule = ["OUTPUT", "-p", "tcp", "--syn", "-j", "NFQUEUE", "--queue-num", str(QUEUE)]
    _sh("ip", "netns", "exec", CLIENT_NS, "iptables", "-I", *rule)
    try:
        yield
    finally:
        _sh("ip", "netns", "exec", CLIENT_NS, "iptables", "-D", *rule, check=False)


def run(count: int = 3000, rounds: int = 300, json_dir: str | None = None) -> dict[str, Any]:
    """``count`` timed connections per run, after ``rounds`` warm-up ones."""
    if os.geteuid() != 0:
        raise SystemExit("kport bench net: run as root (namespaces and NFQUEUE need it)")
    if count < 1 or rounds < 1:
        raise SystemExit("kport bench net: --count and --rounds must be >= 1")
    _install_opensnitch()
    nfq_missing = _netfilterqueue_ready()
    runs: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kport-bench-net-") as tmp, _namespaces():
        workdir = Path(tmp)
        server = [sys.executable, "-c", SERVER, SERVER_IP, str(PORT)]
        with _started(SERVER_NS, server):
            runs["none"] = _measure(count, rounds)
            with _queue_rule():
                with _started(CLIENT_NS, [sys.executable, "-c", RAW_READER, str(QUEUE)]):
                    runs["reader: kport raw netlink"] = _measure(count, rounds)
                if nfq_missing is None:
                    with _started(CLIENT_NS, [sys.executable, "-c", NFQ_READER, str(QUEUE)]):
                        runs["reader: NetfilterQueue"] = _measure(count, rounds)
                else:
                    notes["reader: NetfilterQueue"] = nfq_missing
            rules = (
                'default = "ask"\n[[rule]]\nname = "python to the server"\naction = "allow"\n'
                f'exe = ["{os.path.realpath(sys.executable)}"]\nports = [{PORT}]\n'
            )
            with _kport(workdir, rules, decider=False) as rundir:
                runs["kport rule-decided"] = _measure(count, rounds)
                runs["kport rule-decided"]["status"] = _status_counts(rundir)
            with _kport(workdir, 'default = "ask"\n', decider=True) as rundir:
                runs["kport client-decided"] = _measure(count, rounds)
                runs["kport client-decided"]["status"] = _status_counts(rundir)
            try:
                with _opensnitch(workdir):
                    runs["opensnitch allow-all"] = _measure(count, rounds)
            except (RuntimeError, OSError) as err:
                notes["opensnitch allow-all"] = str(err)
    base = runs["none"]["p50_us"]
    table = Table(
        f"kport bench net: {count} new TCP connections in a namespace pair",
        ["firewall", "connections/s", "connect p50 µs", "p99 µs", "added p50 µs"],
    )
    for name, result in runs.items():
        result["added_p50_us"] = round(result["p50_us"] - base, 1)
        table.row(
            name,
            f"{result['per_s']:.0f}",
            f"{result['p50_us']:.1f}",
            f"{result['p99_us']:.1f}",
            f"{result['added_p50_us']:+.1f}" if name != "none" else "",
        )
    table.show()
    for name, why in notes.items():
        print(f"{name}: not measured: {why}")
    targets = _targets(runs)
    for line in targets["lines"]:
        print(line)
    result = {"runs": runs, "notes": notes, "targets": targets, "count": count, "warmup": rounds}
    save_results("net", result, json_dir)
    return result


def _status(rundir: Path) -> dict[str, Any] | None:
    """`kport status --json` of the daemon there, or None if none answers (yet)."""
    done = subprocess.run(
        [sys.executable, "-m", "kport.cli", "status", "--json", "--runtime-dir", str(rundir)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    return json.loads(done.stdout) if done.returncode == 0 else None


def _status_counts(rundir: Path) -> dict[str, Any]:
    status = _status(rundir)
    if status is None:
        raise RuntimeError("kport serve stopped answering")
    net = status["sources"]["net"]
    keys = ("queues", "allowed", "asked", "defaulted", "without_process", "cache")
    return {k: net[k] for k in keys}


def _targets(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    kport_run = runs["kport rule-decided"]
    lines = []
    added_met = kport_run["added_p50_us"] <= ADDED_P50_TARGET_US
    lines.append(
        f"target: kport rule-decided adds ≤ {ADDED_P50_TARGET_US:.0f} µs p50: "
        f"{kport_run['added_p50_us']:+.1f} µs → {'met' if added_met else 'MISSED'}"
    )
    peer = runs.get("opensnitch allow-all")
    rate_met = None
    if peer is not None:
        rate_met = kport_run["per_s"] >= peer["per_s"]
        lines.append(
            f"target: kport rule-decided rate ≥ OpenSnitch's: {kport_run['per_s']:.0f} vs "
            f"{peer['per_s']:.0f} connections/s → {'met' if rate_met else 'MISSED'}"
        )
    return {"added_p50_met": added_met, "rate_met": rate_met, "lines": lines}
