"""`kport serve --metrics HOST:PORT`: the daemon's counts as Prometheus metrics on
``/metrics``, read from what the daemon already keeps, at each scrape.

Nothing is counted for Prometheus on the delivery path: a :class:`DaemonCollector` asks
the event loop for one snapshot per scrape (the daemon's status, the delivery's counts
by kind, the decision and commit latencies), through ``run_coroutine_threadsafe``, the
one door from the HTTP server's thread, and turns it into metric families. The
process's own CPU and memory come from prometheus_client's ``ProcessCollector``.

The address is loopback unless the operator says otherwise (``--metrics-public`` or
``[metrics] public``): the metrics name the sources, ports and clients of this machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import start_http_server
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry

from kport.fleet import state as export_state
from kport.latency import Latencies

if TYPE_CHECKING:
    from kport.daemon import Daemon

log = logging.getLogger("kport.metrics")

#: how long a scrape waits for the event loop's snapshot
SNAPSHOT_TIMEOUT_S = 5.0
#: the verdict counters of a deciding source's status, by the verdict they count
VERDICT_KEYS = {"allowed": "allow", "denied": "deny", "rejected": "reject"}


class MetricsAddressError(ValueError):
    """The metrics address cannot be used as given; the message says what to do."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    #: not loopback: reachable beyond this machine (allowed, and warned about at start)
    beyond: bool = False


def parse_listen(text: str, *, public: bool) -> Listen:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) checked: a host that is not loopback is
    refused unless ``public``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise MetricsAddressError(f"metrics address {text!r} is not HOST:PORT")
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise MetricsAddressError(f"metrics address {text!r} names no host (127.0.0.1?)")
    beyond = not is_loopback(host)
    if beyond and not public:
        raise MetricsAddressError(
            f"metrics address {text} is not loopback: add --metrics-public (or "
            "[metrics] public = true) to serve metrics beyond this machine"
        )
    return Listen(host, int(port_text), beyond)


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(found) and all(
        ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in found
    )


def _histogram(
    name: str, documentation: str, label_names: list[str], latencies: dict[str, Latencies]
) -> HistogramMetricFamily:
    """A histogram family from :class:`Latencies`, one per value of the first label."""
    family = HistogramMetricFamily(name, documentation, labels=label_names)
    for first, latency in latencies.items():
        bounds = [f"{b:g}" for b in latency.buckets_s] + ["+Inf"]
        for labels, (cumulative, total) in sorted(latency.snapshot().items()):
            buckets = list(zip(bounds, cumulative, strict=True))
            family.add_metric([first, *labels][: len(label_names)], buckets, total)
    return family


class DaemonCollector(Collector):
    """The daemon's metric families, made from one snapshot of it per scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    async def _snapshot(self) -> dict[str, Any]:
        """What a scrape shows, read in the loop's thread, where the daemon's state is."""
        daemon = self.daemon
        seq, kinds = daemon.delivery.counts()
        return {
            "seq": seq,
            "kinds": kinds,
            "status": daemon.status(),
            "decisions": {
                name.removesuffix("-decide"): d.latency for name, d in daemon.decisions.items()
            },
        }

    def snapshot(self) -> dict[str, Any] | None:
        """The daemon's snapshot, or None while its loop is not running."""
        loop = self.daemon.delivery.loop
        if loop is None or loop.is_closed():
            return None
        try:
            future = asyncio.run_coroutine_threadsafe(self._snapshot(), loop)
        except RuntimeError:  # the loop closed meanwhile
            return None
        try:
            return future.result(SNAPSHOT_TIMEOUT_S)
        except TimeoutError:
            future.cancel()
            log.warning("metrics: the event loop gave no snapshot within %g s", SNAPSHOT_TIMEOUT_S)
            return None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        up = GaugeMetricFamily(
            "kport_up",
            "1 while the daemon's event loop answers scrapes",
            value=1 if snap is not None else 0,
        )
        yield up
        if snap is not None:
            yield from self._events(snap)
            yield from self._ports(snap["status"]["ports"])
            yield from self._decisions(snap)
            yield from self._journal(snap["status"]["journal"])
        yield from self._exports()

    def _events(self, snap: dict[str, Any]) -> Iterator[Metric]:
        status = snap["status"]
        events = CounterMetricFamily(
            "kport_events",
            "Events delivered (given a seq), by source and kind",
            labels=["source", "kind"],
        )
        for source, kinds in sorted(snap["kinds"].items()):
            for kind, count in sorted(kinds.items()):
                events.add_metric([source, kind], count)
        yield events
        yield GaugeMetricFamily(
            "kport_seq", "The last seq handed out: events_total counts to it", value=snap["seq"]
        )
        yield CounterMetricFamily(
            "kport_filtered",
            "Process events the daemon-side filters held back",
            value=status["filtered"],
        )
        lost = CounterMetricFamily(
            "kport_lost",
            "Events lost, by source and where: reason=source before delivery (a kernel "
            "queue or ring, the source's hand-off), reason=clients from full client "
            "queues of the source's port",
            labels=["source", "reason"],
        )
        backlog = GaugeMetricFamily(
            "kport_source_backlog",
            "Events a source has read and not yet handed on",
            labels=["source"],
        )
        for name, source in sorted(status["sources"].items()):
            lost.add_metric([name, "source"], source.get("lost", 0))
            port = status["ports"].get(name)
            if port is not None:
                lost.add_metric([name, "clients"], port["lost"])
            if "backlog" in source:
                backlog.add_metric([name], source["backlog"])
        yield lost
        yield backlog
        proc = status["sources"].get("proc", {})
        if "kernel_records" in proc:  # eBPF: what the kernel's programs made and dropped
            yield CounterMetricFamily(
                "kport_proc_kernel_records",
                "Records the eBPF programs made (taken + dropped)",
                value=proc["kernel_records"],
            )
            yield CounterMetricFamily(
                "kport_proc_kernel_dropped",
                "Records the full eBPF ring refused",
                value=proc["kernel_dropped"],
            )

    def _ports(self, ports: dict[str, Any]) -> Iterator[Metric]:
        clients = GaugeMetricFamily("kport_port_clients", "Clients connected", labels=["port"])
        depth = GaugeMetricFamily(
            "kport_port_queue_depth",
            "Messages queued for a port's clients, all of them",
            labels=["port"],
        )
        queued_bytes = GaugeMetricFamily(
            "kport_port_queue_bytes",
            "Bytes queued for a port's clients, all of them",
            labels=["port"],
        )
        lost = CounterMetricFamily(
            "kport_port_lost",
            "Notifications dropped from full client queues, gone clients included",
            labels=["port"],
        )
        for name, port in sorted(ports.items()):
            conns = port["connections"]
            clients.add_metric([name], len(conns))
            depth.add_metric([name], sum(c["queue_depth"] for c in conns))
            queued_bytes.add_metric([name], sum(c["queue_bytes"] for c in conns))
            lost.add_metric([name], port["lost"])
        yield from (clients, depth, queued_bytes, lost)

    def _decisions(self, snap: dict[str, Any]) -> Iterator[Metric]:
        verdicts = CounterMetricFamily(
            "kport_verdicts",
            "Verdicts a deciding source gave, by rule, client or default",
            labels=["source", "verdict"],
        )
        asks = CounterMetricFamily(
            "kport_asks", "Requests sent to decision clients", labels=["source"]
        )
        defaulted = CounterMetricFamily(
            "kport_asks_defaulted",
            "Asks given the default verdict: no client, too many in flight, or no answer",
            labels=["source"],
        )
        in_flight = GaugeMetricFamily(
            "kport_asks_in_flight", "Asks waiting for a decision client", labels=["source"]
        )
        for name, source in sorted(snap["status"]["sources"].items()):
            if "asked" not in source:
                continue  # not a deciding source
            for key, verdict in VERDICT_KEYS.items():
                if key in source:
                    verdicts.add_metric([name, verdict], source[key])
            asks.add_metric([name], source["asked"])
            defaulted.add_metric([name], source["defaulted"])
            in_flight.add_metric([name], source["asks_in_flight"])
        yield from (verdicts, asks, defaulted, in_flight)
        yield _histogram(
            "kport_decision_seconds",
            "From an ask to its verdict, by verdict and decider (client: a decision client "
            "answered; default: the default verdict was given)",
            ["source", "verdict", "decider"],
            snap["decisions"],
        )

    def _journal(self, journal: dict[str, Any] | None) -> Iterator[Metric]:
        if journal is None or "queued" not in journal:
            return  # no journal, or one that could not be opened
        gauges = {
            "kport_journal_queue_depth": ("Events waiting to be committed", journal["queued"]),
            "kport_journal_queue_limit": ("Events its queue holds at most", journal["queue_limit"]),
            "kport_journal_committed_seq": (
                "Every seq to this one is committed",
                journal["committed"],
            ),
            "kport_journal_durable": ("1 while commits succeed", int(journal["durable"])),
            "kport_journal_file_bytes": (
                "Its database and WAL on disk",
                _file_bytes(journal["path"]),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(name, doc, value=value)
        counters = {
            "kport_journal_written": ("Events committed", journal["written"]),
            "kport_journal_dropped": (
                "Events not journaled because the queue was full (still delivered)",
                journal["dropped"],
            ),
            "kport_journal_pruned": ("Events removed by retention", journal["pruned"]),
            "kport_journal_writer_cpu_seconds": (
                "CPU time of the journal's writer thread",
                journal["writer_cpu_s"],
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
        store = self.daemon.journal
        if store is not None:
            yield _histogram(
                "kport_journal_commit_seconds",
                "How long each successful commit took",
                [],
                {"": store.commit_latency},
            )

    def _exports(self) -> Iterator[Metric]:
        """The exporters' lag, from their status files, where there are any."""
        exports = export_state.read_status(self.daemon.state_dir / "export")
        if not exports:
            return
        connected = GaugeMetricFamily(
            "kport_export_connected", "1 while the exporter is connected to NATS", labels=["host"]
        )
        lag = GaugeMetricFamily(
            "kport_export_lag_events", "Events the broker has not yet acknowledged", labels=["host"]
        )
        lag_s = GaugeMetricFamily(
            "kport_export_lag_seconds",
            "Age of the oldest event not yet acknowledged",
            labels=["host"],
        )
        for export in exports:
            host = str(export.get("host", ""))
            connected.add_metric([host], 1 if export.get("connected") else 0)
            lag.add_metric([host], export.get("lag_events", 0))
            lag_s.add_metric([host], export.get("lag_s", 0.0))
        yield from (connected, lag, lag_s)


def _file_bytes(path: str) -> int:
    total = 0
    for name in (path, path + "-wal"):
        with contextlib.suppress(OSError):  # no WAL, or no file yet
            total += os.stat(name).st_size
    return total


class MetricsServer:
    """``/metrics`` over HTTP on its own thread (prometheus_client's server), stopped with
    the daemon."""

    def __init__(self, daemon: Daemon, listen: Listen) -> None:
        self.listen = listen
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total and the rest
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind and serve (raises OSError when the address cannot be bound)."""
        self._server, self._thread = start_http_server(
            self.listen.port, addr=self.listen.host, registry=self.registry
        )
        host, port = self._server.server_address[:2]
        url = f"http://{_url_host(str(host), int(port))}/metrics"
        if self.listen.beyond:
            log.warning(
                "metrics at %s, beyond this machine: whoever reaches it reads this host's "
                "sources, ports and clients (there is no authentication)",
                url,
            )
        else:
            log.info("metrics at %s", url)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
        self._server = self._thread = None


def _url_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
