"""The fleet on a 3-node nats-server cluster: two hosts export to a stream of three
replicas, the stream's leader is killed mid-stream and later started again; after each,
the stream holds exactly each host's events, none missing and none twice, read through
whichever servers are up.

The killed server is checked both ways: while it is down (two of three are a quorum, and
must be enough), and once it is back (it catches up from the new leader while the
exporters go on, which must neither disturb them nor store anything twice)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import free_port
from tests.fleet.hosts import NATS_SERVER, Activity, Host, check_exactly

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(os.geteuid() != 0, reason="kport serve needs root"),
]

if NATS_SERVER is None:  # scripts/setup-system.sh --tests installs it: say so, never silently
    pytestmark.append(
        pytest.mark.skip(reason="nats-server is not installed (scripts/setup-system.sh --tests)")
    )

#: events each exporter has had acknowledged before the leader is killed: mid-stream
ACKED_BEFORE_KILL = 500
#: processes started after the kill (the cluster has two servers), and again after the
#: restart, before the stream is read
PROCESSES_AFTER = 1000
#: how long any one wait may take on a busy 2-CPU machine; a stuck exporter or a cluster
#: that never elects a leader waits for ever, far beyond
DEADLINE_S = 300.0


class Node:
    """One nats-server of the cluster on 127.0.0.1: its client, route and monitoring
    ports and its store in ``where``; killed and started again on the same ports and store."""

    def __init__(self, name: str, where: Path) -> None:
        self.name = name
        self.where = where
        self.port = free_port()
        self.route_port = free_port()
        self.monitor_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.route = f"nats://127.0.0.1:{self.route_port}"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, cluster_name: str, routes: list[str]) -> None:
        assert NATS_SERVER is not None
        with open(self.where / "nats.log", "ab") as log:  # the child keeps its own copy
            self.proc = subprocess.Popen(
                [
                    *(NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(self.port)),
                    *("-sd", str(self.where), "--server_name", self.name),
                    *("-m", str(self.monitor_port), "--cluster_name", cluster_name),
                    *("--cluster", self.route, "--routes", ",".join(routes)),
                ],
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + DEADLINE_S
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            assert self.alive, self.log()
            assert time.monotonic() < deadline, f"{self.name} did not listen on {self.port}"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def monitor(self, page: str) -> Any:
        """One page of this server's monitoring port (connz, jsz, ...), as JSON."""
        url = f"http://127.0.0.1:{self.monitor_port}/{page}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            return json.load(answer)

    def clients(self) -> list[str]:
        """The names of the clients connected to this server now."""
        return [c.get("name", "") for c in self.monitor("connz").get("connections") or []]

    def meta_leader(self) -> str:
        """The JetStream meta leader as this server knows it ("" while there is none)."""
        return str((self.monitor("jsz").get("meta_cluster") or {}).get("leader") or "")

    def log(self) -> str:
        return (self.where / "nats.log").read_text()[-3000:]


class Cluster:
    """Three nats-servers with JetStream, routed to each other; ``url`` names them all, as
    the exporters and readers are given it."""

    def __init__(self, where: Path, name: str = "kport-test") -> None:
        self.name = name
        self.nodes: list[Node] = []
        for node_name in ("n1", "n2", "n3"):
            (where / node_name).mkdir()
            self.nodes.append(Node(node_name, where / node_name))
        self.url = ",".join(node.url for node in self.nodes)

    def start(self) -> None:
        for node in self.nodes:
            self.start_node(node)
        self.wait_ready()

    def start_node(self, node: Node) -> None:
        node.start(self.name, [other.route for other in self.nodes if other is not node])

    def node(self, name: str) -> Node:
        (found,) = [node for node in self.nodes if node.name == name]
        return found

    def wait_ready(self) -> None:
        """Until every live server answers JetStream's account info: the cluster has a
        meta leader, and each server knows it."""
        import nats
        import nats.errors

        async def answers(url: str) -> bool:
            try:
                nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
            except (nats.errors.Error, OSError, TimeoutError):
                return False
            try:
                await nc.jetstream(timeout=2).account_info()
                return True
            except (nats.errors.Error, OSError, TimeoutError):
                return False
            finally:
                await nc.close()

        def ready() -> bool:
            return all(asyncio.run(answers(n.url)) for n in self.nodes if n.alive)

        wait_for("the cluster has no JetStream meta leader", ready)

    def stream_info(self, stream: str = "KPORT") -> Any:
        """The stream as its leader says, asked through any server that is up (None while
        it is not made, or has no leader to answer)."""
        import nats
        import nats.errors

        async def info() -> Any:
            live = [n.url for n in self.nodes if n.alive]
            nc = await nats.connect(servers=live, allow_reconnect=False, connect_timeout=2)
            try:
                return await nc.jetstream(timeout=5).stream_info(stream)
            except (nats.errors.Error, OSError, TimeoutError):
                return None
            finally:
                await nc.close()

        return asyncio.run(info())

    def stop(self) -> None:
        for node in self.nodes:
            if node.alive:
                node.kill()


def wait_for(what: str, check: Callable[[], object]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.2)


def acked(host: Host) -> int:
    """The newest seq of this host the stream has acknowledged, as its exporter says."""
    return int(host.status().get("cursor") or 0)


def retries(host: Host) -> list[str]:
    """The exporter's lines about broker trouble, each followed by a new try."""
    lines = (host.where / "exporter.log").read_text().splitlines()
    return [line for line in lines if "trying again" in line]


@pytest.fixture
def cluster_fleet(tmp_path: Path) -> Iterator[tuple[Cluster, list[Host]]]:
    (tmp_path / "cluster").mkdir()
    cluster = Cluster(tmp_path / "cluster")
    hosts = []
    for name in ("h1", "h2"):  # each daemon sees every process of the machine: two are load enough
        (tmp_path / name).mkdir()
        hosts.append(Host(name, tmp_path / name, cluster, "[export]\nreplicas = 3\n"))
    try:
        cluster.start()
        for host in hosts:
            host.start_daemon()
            host.start_exporter()
        yield cluster, hosts
    finally:
        for host in hosts:
            host.stop()
        cluster.stop()


def test_the_stream_leader_killed_mid_stream_loses_nothing_and_doubles_nothing(
    cluster_fleet: tuple[Cluster, list[Host]],
) -> None:
    cluster, hosts = cluster_fleet
    with Activity() as activity:
        wait_for(
            "the exporters did not get going",
            lambda: all(acked(h) >= ACKED_BEFORE_KILL for h in hosts),
        )
        info = cluster.stream_info()
        assert info is not None and info.config.num_replicas == 3, info
        leader = cluster.node(info.cluster.leader)
        on_leader = sorted(name for name in leader.clients() if name.startswith("kport-export"))
        meta_leader = leader.meta_leader()
        started_at_kill = activity.started
        killed_at = time.monotonic()
        leader.kill()
        # what each daemon had once the leader was gone: a later event is acknowledged
        # only by a leader the two servers left elect
        at_kill = {h.name: h.last_seq() for h in hosts}

        # keep going: each exporter has an event newer than the kill acknowledged
        caught_up_s: dict[str, float] = {}

        def caught_up() -> bool:
            for host in hosts:
                assert host.exporter is not None and host.exporter.poll() is None, host.log(
                    "exporter"
                )
                if host.name not in caught_up_s and acked(host) > at_kill[host.name]:
                    caught_up_s[host.name] = round(time.monotonic() - killed_at, 1)
            return len(caught_up_s) == len(hosts)

        def new_leader() -> bool:
            caught_up()
            info = cluster.stream_info()
            return info is not None and info.cluster.leader not in (None, leader.name)

        wait_for(f"no new stream leader after {leader.name} was killed", new_leader)
        elected_s = round(time.monotonic() - killed_at, 1)
        wait_for(f"the exporters did not go on after {leader.name} was killed", caught_up)
        cluster.wait_ready()  # a meta leader too: the reader's consumer is made by it
        wait_for(
            "too few processes after the kill",
            lambda: activity.started >= started_at_kill + PROCESSES_AFTER,
        )
    # read through the url that names all three: the client finds a server that is up
    check_exactly(hosts, cluster, f"stream leader {leader.name} killed", DEADLINE_S)
    after = cluster.stream_info()
    assert after is not None and after.cluster.leader not in (None, leader.name), after.cluster
    retries_while_down = {h.name: len(retries(h)) for h in hosts}

    # started again: it catches up from the new leader, and the exporters do not notice
    cluster.start_node(leader)
    cluster.wait_ready()
    with Activity() as activity:
        at_restart = {h.name: h.last_seq() for h in hosts}
        started_at_restart = activity.started
        wait_for(
            f"the exporters did not go on after {leader.name} came back",
            lambda: all(acked(h) > at_restart[h.name] for h in hosts),
        )
        wait_for(
            "too few processes after the restart",
            lambda: activity.started >= started_at_restart + PROCESSES_AFTER,
        )

    def replicas_current() -> bool:
        info = cluster.stream_info()
        peers = (info.cluster.replicas or []) if info is not None else []
        back = leader.name in {p.name for p in peers}
        return back and len(peers) == 2 and all(p.current and not p.offline for p in peers)

    wait_for(f"{leader.name} did not catch up with the stream", replicas_current)
    check_exactly(hosts, cluster, f"{leader.name} started again", DEADLINE_S)

    for host in hosts:
        host.stop_exporter()
    report = {
        "killed": leader.name,
        "meta leader then": meta_leader,
        "exporters on it": on_leader,
        "new leader": after.cluster.leader,
        "new leader elected after (s)": elected_s,
        "caught up with the kill (s)": caught_up_s,
        "retries while down": retries_while_down,
        "retries in all": {h.name: len(retries(h)) for h in hosts},
        "first retries": {h.name: retries(h)[:3] for h in hosts},
        "exported": {
            h.name: {
                name: {k: s[k] for k in ("acked", "published", "resends", "duplicates")}
                for name, s in h.status()["sources"].items()
                if s["published"]
            }
            for h in hosts
        },
    }
    for key, value in report.items():  # the leader kill as it went: shown with -rP
        print(f"{key}: {json.dumps(value)}")
    for host in hosts:
        status = host.status()
        assert status["host"] == host.name and status["sources"]["proc"]["acked"] > 0
