"""The firewall end to end: `kport serve` with the network source in a client namespace,
real connections to a server namespace, rules, prompts, crashes and clean stops."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import kport
from tests.conftest import Netns
from tests.daemon.test_daemon import kport_status, wait_until

SERVER = """
import socket, sys, threading
def serve(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((sys.argv[1], port)); s.listen(128)
    while True:
        c, _ = s.accept(); c.close()
def dns():
    # answers every A question with the server's own address
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind((sys.argv[1], 53))
    addr = socket.inet_aton(sys.argv[1])
    while True:
        q, peer = u.recvfrom(512)
        end = q.index(b"\\0", 12) + 5
        head = q[:2] + b"\\x81\\x80\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x00"
        answer = b"\\xc0\\x0c\\x00\\x01\\x00\\x01\\x00\\x00\\x00\\x3c\\x00\\x04" + addr
        u.sendto(head + q[12:end] + answer, peer)
for port in (8080, 8081, 8082, 8083):
    threading.Thread(target=serve, args=(port,), daemon=True).start()
threading.Thread(target=dns, daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""

CONNECT = """
import socket, sys, time, json
host, port, timeout, marker = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
t = time.monotonic()
try:
    socket.create_connection((host, port), timeout=timeout).close(); out = "ok"
except ConnectionRefusedError: out = "refused"
except (TimeoutError, socket.timeout): out = "timeout"
print(json.dumps({"result": out, "s": time.monotonic() - t}))
"""

RESOLVE = """
import socket, sys
q = b"\\x12\\x34\\x01\\x00\\x00\\x01\\x00\\x00\\x00\\x00\\x00\\x00"
q += b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[2].split("."))
q += b"\\0\\x00\\x01\\x00\\x01"
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(5)
u.sendto(q, (sys.argv[1], 53)); print(len(u.recv(512)))
"""


@pytest.fixture
def server(netns: Netns) -> Netns:
    proc = netns.popen(netns.server, [sys.executable, "-c", SERVER, netns.server_ip])
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return netns


def connect(ns: Netns, port: int, timeout: float = 2.0, marker: str = "-") -> dict[str, Any]:
    done = ns.python(ns.client, CONNECT, ns.server_ip, str(port), str(timeout), marker)
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def rules_of(ns: Netns) -> str:
    """kport's part of the client namespace's filter table."""
    save = ns.run(ns.client, ["iptables-save", "-t", "filter"]).stdout
    return "\n".join(line for line in save.splitlines() if "KPORT" in line)


@contextlib.contextmanager
def net_daemon(
    ns: Netns, rundir: Path, rules: str = "", *extra: str, net: str = ""
) -> Iterator[subprocess.Popen[str]]:
    """`kport serve` in the client namespace with only the network source on."""
    (rundir / "rules.toml").write_text(rules)
    (rundir / "kport.toml").write_text(
        "[proc]\nenabled = false\n"
        f'[net]\nenabled = true\nrules = ["{rundir / "rules.toml"}"]\n{net}\n'
    )
    proc = ns.popen(
        ns.client,
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--config", str(rundir / "kport.toml")),
            *("--runtime-dir", str(rundir), "--state-dir", str(rundir / "state"), *extra),
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: ready(rundir) or proc.poll() is not None)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=20)


def ready(rundir: Path) -> bool:
    """Is a daemon answering there, with its firewall rules in place? (A killed one's
    socket files may still be there.)"""
    try:
        return kport_status(rundir)["sources"]["net"]["backend"] is not None
    except subprocess.CalledProcessError:
        return False


def events(rundir: Path, kind: str | None = None) -> list[dict[str, Any]]:
    found = kport.history(sources=["net"], runtime_dir=str(rundir), limit=10_000)
    return [e for e in found if kind is None or e["kind"] == kind]


def decider(rundir: Path, code: str) -> subprocess.Popen[str]:
    """A net-decide client (in the first namespace: the port is a path, not an address)
    answering each request with ``answer(request)``."""
    script = (
        "import json, sys, time, kport\n"
        f"{code}\n"
        "conn = kport.connect('net-decide', runtime_dir=sys.argv[1])\n"
        "print('connected', flush=True)\n"
        "for msg in conn:\n"
        "    print(json.dumps(msg.data), flush=True)\n"
        "    if msg.needs_reply:\n"
        "        reply = answer(msg.data)\n"
        "        if reply is not None:\n"
        "            conn.reply(msg, reply)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(rundir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "connected"
    wait_until(lambda: len(kport_status(rundir)["ports"]["net-decide"]["connections"]) == 1)
    return proc


def test_rules_allow_deny_and_reject_and_every_decision_is_reported(
    server: Netns, rundir: Path
) -> None:
    rules = (
        'default = "allow"\n'
        '[[rule]]\nname = "no 8081"\naction = "reject"\nports = [8081]\n'
        '[[rule]]\nname = "no 8082"\naction = "deny"\nports = ["8082-8082"]\n'
    )
    with net_daemon(server, rundir, rules):
        assert connect(server, 8080, marker="m-allowed")["result"] == "ok"
        refused = connect(server, 8081)
        assert refused["result"] == "refused" and refused["s"] < 1.0  # at once: a reset
        assert connect(server, 8082, timeout=1.5)["result"] == "timeout"  # dropped
        wait_until(lambda: len(events(rundir, "denied")) >= 1)
        allowed = next(e for e in events(rundir, "allowed") if e["dport"] == 8080)
        assert allowed["verdict"] == "allow" and allowed["decided_by"] == "default"
        assert allowed["argv"][-1] == "m-allowed"  # the very process that connected
        assert allowed["exe"] and allowed["start_time"] and allowed["uid"] == 0
        assert (allowed["dst"], allowed["protocol"]) == (server.server_ip, "tcp")
        assert allowed["interface"] == f"{server.client}0"
        rejected = events(rundir, "rejected")
        assert rejected[0]["rule"] == "no 8081" and rejected[0]["dport"] == 8081
        assert events(rundir, "denied")[0]["rule"] == "no 8082"
        # and why: the rule, where it is and its fields; or the default, no rule matching
        why = rejected[0]["why"]
        assert (why["by"], why["rule"], why["action"]) == ("rule", "no 8081", "reject")
        assert why["line"] == 2 and why["fields"] == {"ports": [8081]}
        assert allowed["why"] == {"by": "default", "action": "allow", "reason": "no rule matched"}
        net = kport_status(rundir)["sources"]["net"]
        assert net["allowed"] >= 1 and net["rejected"] >= 1 and net["denied"] >= 1
        assert net["without_process"] == 0


def queue_lines(ns: Netns) -> dict[int, list[str]]:
    """The client namespace's bound NFQUEUEs: number → the kernel's fields for it."""
    text = ns.run(ns.client, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    return {int(line.split()[0]): line.split() for line in text.splitlines()}


def test_each_cpu_sends_to_its_own_queue_and_each_queue_is_decided(
    server: Netns, rundir: Path
) -> None:
    cpus = sorted(os.sched_getaffinity(0))
    rules = 'default = "reject"\n[[rule]]\nname = "8080"\naction = "allow"\nports = [8080]\n'
    with net_daemon(server, rundir, rules, net="queues = 0\n"):
        net = kport_status(rundir)["sources"]["net"]
        assert net["queues"] == min(len(os.sched_getaffinity(0)), 16)
        assert sorted(queue_lines(server)) == list(range(4747, 4747 + net["queues"]))
        for cpu in cpus:
            pinned = ["taskset", "-c", str(cpu), sys.executable, "-c", CONNECT]
            for port, expected in ((8080, "ok"), (8081, "refused")):
                done = server.run(server.client, [*pinned, server.server_ip, str(port), "2", "-"])
                assert json.loads(done.stdout)["result"] == expected, (cpu, port, done.stderr)
        # every queue got packets (the kernel's last packet id of each), and answered them
        used = {n: int(fields[7]) for n, fields in queue_lines(server).items()}
        assert all(used[4747 + cpu % net["queues"]] > 0 for cpu in cpus), used
        status = kport_status(rundir)["sources"]["net"]
        assert status["allowed"] >= len(cpus) and status["rejected"] >= len(cpus)


def test_an_ask_is_answered_by_a_client_both_ways(server: Netns, rundir: Path) -> None:
    with net_daemon(server, rundir, 'default = "ask"\n', "--decision-deadline", "10"):
        client = decider(
            rundir,
            "def answer(r):\n    return {'verdict': 'allow' if r['dport'] == 8080 else 'reject'}\n",
        )
        try:
            assert connect(server, 8080, marker="m-ask")["result"] == "ok"
            assert connect(server, 8081)["result"] == "refused"
            wait_until(lambda: len(events(rundir, "rejected")) == 1)
            asked = events(rundir, "asked")
            assert {e["dport"] for e in asked} == {8080, 8081}
            allowed = next(e for e in events(rundir, "allowed") if e["dport"] == 8080)
            assert allowed["decided_by"] == "client" and allowed["argv"][-1] == "m-ask"
            why = allowed["why"]  # which client answered
            assert why["by"] == "client" and why["client"]["pid"] == client.pid
        finally:
            client.kill()
            out, _ = client.communicate()
        request = json.loads(out.splitlines()[0])
        assert request["kind"] == "connect" and request["protocol"] == "tcp"
        assert request["cmdline"][-1] == "m-ask" and request["dst"] == server.server_ip


def test_an_always_answer_becomes_a_rule_and_once_does_not(server: Netns, rundir: Path) -> None:
    with net_daemon(server, rundir, 'default = "ask"\n', "--decision-deadline", "10"):
        client = decider(
            rundir,
            "def answer(r):\n"
            "    if r['dport'] == 8080: return {'verdict': 'allow', 'duration': 'always'}\n"
            "    return {'verdict': 'allow', 'duration': 'once'}\n",
        )
        try:
            for port in (8080, 8081):
                assert connect(server, port)["result"] == "ok"
            remembered_file = rundir / "state" / "net-remembered.toml"
            wait_until(remembered_file.exists)
            client.kill()  # no one answers any more: the default (allow) for anything asked
            client.communicate()
            assert connect(server, 8080)["result"] == "ok"
            assert connect(server, 8081)["result"] == "ok"
        finally:
            if client.poll() is None:
                client.kill()
                client.communicate()
            wait_until(lambda: len(events(rundir, "allowed")) == 4)
        remembered = remembered_file.read_text()
        assert "8080" in remembered and "8081" not in remembered
        allowed = [e for e in events(rundir, "allowed") if e["dport"] == 8080]
        assert allowed[-1]["rule"] == "remembered"  # the second time, the written rule
        later = [e for e in events(rundir, "allowed") if e["dport"] == 8081]
        assert later[-1]["decided_by"].startswith("default")  # "once" wrote nothing


def test_a_stuck_client_gets_the_default_at_the_deadline_and_is_told_it_missed(
    server: Netns, rundir: Path
) -> None:
    rules = 'default = "ask"\n[[rule]]\naction = "allow"\nports = [8080]\n'
    with net_daemon(
        server, rundir, rules, "--decision-deadline", "1.5", "--default-verdict", "deny"
    ):
        client = decider(rundir, "def answer(r):\n    return None\n")  # never answers
        try:
            pending = server.popen(
                server.client,
                [sys.executable, "-c", CONNECT, server.server_ip, "8081", "5", "-"],
            )
            wait_until(lambda: kport_status(rundir)["sources"]["net"]["asks_in_flight"] == 1)
            # other traffic goes on while a prompt is open
            assert connect(server, 8080)["result"] == "ok"
            out, _ = pending.communicate(timeout=15)
            assert json.loads(out)["result"] == "timeout"  # dropped at the deadline: no reset
            wait_until(lambda: len(events(rundir, "denied")) == 1)
            denied = events(rundir, "denied")[0]
            assert denied["decided_by"].startswith("default: no answer within 1.5 s")
            assert denied["why"]["by"] == "deadline" and denied["why"]["verdict"] == "deny"
            net = kport_status(rundir)["sources"]["net"]
            # the SYN sent again while asked, and after, got the same answer: one prompt
            assert net["asked"] == 1 and net["retransmissions"] >= 1
        finally:
            client.kill()
            out, _ = client.communicate()
        notices = [json.loads(line) for line in out.splitlines()[1:]]
        assert any(n.get("kind") == "missed" and n["verdict"] == "deny" for n in notices)


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_killed_daemon_leaves_traffic_as_configured(
    server: Netns, rundir: Path, fail_open: bool
) -> None:
    with net_daemon(
        server, rundir, 'default = "allow"\n', net=f"fail_open = {str(fail_open).lower()}\n"
    ) as proc:
        assert connect(server, 8080)["result"] == "ok"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert "KPORT-OUT" in rules_of(server)  # a killed daemon removes nothing
        after = connect(server, 8080, timeout=3)
        assert after["result"] == ("ok" if fail_open else "timeout")
    # The next start takes over what the killed one left, and a clean stop removes it.
    with net_daemon(server, rundir, 'default = "allow"\n'):
        assert connect(server, 8080)["result"] == "ok"
        assert rules_of(server).count("-A OUTPUT -j KPORT-OUT") == 1
    assert rules_of(server) == ""


def test_a_clean_stop_removes_exactly_its_own_rules(server: Netns, rundir: Path) -> None:
    # someone else's rule, before and after
    server.run(
        server.client, ["iptables", "-A", "OUTPUT", "-p", "tcp", "--dport", "9", "-j", "DROP"]
    )
    before = server.run(server.client, ["iptables-save", "-t", "filter"]).stdout
    with net_daemon(server, rundir, 'default = "allow"\n', net="inbound = true\n"):
        during = rules_of(server)
        assert "-A OUTPUT -j KPORT-OUT" in during and "-A INPUT -j KPORT-IN" in during
        assert "--queue-bypass" in during
    after = server.run(server.client, ["iptables-save", "-t", "filter"]).stdout

    def body(save: str) -> list[str]:
        return [line for line in save.splitlines() if not line.startswith("#")]

    assert body(after) == body(before)
    assert "--dport 9 -j DROP" in after


def test_vanished_rules_are_put_back(server: Netns, rundir: Path) -> None:
    rules = '[[rule]]\naction = "reject"\nports = [8081]\n'
    with net_daemon(server, rundir, rules):
        server.run(server.client, ["iptables", "-F", "KPORT-OUT"])
        wait_until(lambda: kport_status(rundir)["sources"]["net"]["rules_reinstalled"] >= 1)
        assert connect(server, 8081)["result"] == "refused"


def test_a_queue_held_by_another_process_is_refused_clearly(server: Netns, rundir: Path) -> None:
    holder = server.popen(
        server.client,
        [
            sys.executable,
            "-c",
            "from kport.sources import nfqueue; import time; q = nfqueue.Queue(4747); "
            "print('held', flush=True); time.sleep(60)",
        ],
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    (rundir / "kport.toml").write_text("[proc]\nenabled = false\n[net]\nenabled = true\n")
    done = server.run(
        server.client,
        [
            *(sys.executable, "-m", "kport.cli", "serve", "--config", str(rundir / "kport.toml")),
            *("--runtime-dir", str(rundir), "--state-dir", str(rundir / "state")),
        ],
    )
    assert done.returncode != 0
    assert "NFQUEUE 4747 is held by another process" in done.stderr
    assert "Traceback" not in done.stderr
    assert rules_of(server) == ""


def test_dns_answers_name_the_host_for_events_and_rules(server: Netns, rundir: Path) -> None:
    rules = '[[rule]]\nname = "no example"\naction = "reject"\nhosts = ["*.example.test"]\n'
    with net_daemon(server, rundir, rules):
        resolved = server.python(server.client, RESOLVE, server.server_ip, "www.example.test")
        assert resolved.returncode == 0, resolved.stderr
        wait_until(lambda: kport_status(rundir)["sources"]["net"]["dns_answers"] >= 1)
        assert connect(server, 8080)["result"] == "refused"
        wait_until(lambda: len(events(rundir, "rejected")) == 1)
        rejected = events(rundir, "rejected")[0]
        assert rejected["host"] == "www.example.test" and rejected["rule"] == "no example"


def test_udp_is_decided_and_attributed(server: Netns, rundir: Path) -> None:
    rules = '[[rule]]\nname = "no udp 9999"\naction = "deny"\nprotocols = ["udp"]\nports = [9999]\n'
    with net_daemon(server, rundir, rules):
        sent = server.python(
            server.client,
            # The socket stays open a moment: a packet whose socket is already closed
            # when kport looks is reported without a process (a race no firewall wins).
            "import socket, sys, time\n"
            "u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
            "u.sendto(b'x', (sys.argv[1], 9999)); print('sent'); time.sleep(1)\n",
            server.server_ip,
            "m-udp",
        )
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: len(events(rundir, "denied")) == 1)
        denied = events(rundir, "denied")[0]
        assert denied["protocol"] == "udp" and denied["dport"] == 9999
        assert denied["argv"][-1] == "m-udp" and denied["rule"] == "no udp 9999"
