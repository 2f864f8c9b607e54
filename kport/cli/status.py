"""`kport status`: the daemon's sources, journal, ports and connections, from its
control port, as tables (or JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rich.console import Console
from rich.table import Table

import kport
from kport.fleet import state as export_state


def command(args: argparse.Namespace) -> int:
    """`kport status` with its parsed arguments."""
    with kport.connect("control", runtime_dir=args.runtime_dir) as conn:
        status = conn.send({"op": "status"}, timeout=5)
    if args.json:
        print(json.dumps({**status, "exports": export_state.read_status(args.state_dir)}, indent=2))
        return 0
    console = Console()
    console.print(
        f"kport {status['version']} pid {status['pid']} up {status['uptime_s']} s, "
        f"seq {status['seq']}, runtime dir {status['runtime_dir']}"
    )
    sources = Table(
        "source",
        "events/s",
        "events",
        "lost",
        "resyncs",
        "processes",
        "backlog",
        title="Sources",
        title_justify="left",
    )
    for name, s in status["sources"].items():
        sources.add_row(
            name,
            f"{s['rate']:.1f}",
            str(s["events"]),
            str(s["lost"]),
            str(s.get("resyncs", "-")),
            str(s.get("table", "-")),
            str(s.get("backlog", "-")),
        )
    console.print(sources)
    proc = status["sources"].get("proc")
    if proc and proc.get("backend") == "bpf":
        console.print(
            f"processes: eBPF ({proc['programs']} programs), {proc['kernel_records']} records "
            f"in the kernel, {proc['kernel_dropped']} dropped by a full ring",
            soft_wrap=True,
        )
    elif proc and proc.get("backend"):
        why = proc.get("fallback_reason")
        console.print(
            "processes: the proc connector" + (f" (eBPF cannot load: {why})" if why else ""),
            soft_wrap=True,
        )
    file = status["sources"].get("file")
    if file:
        console.print(
            f"file access: {file['allowed']} allowed, {file['denied']} denied, " + _decided(file),
            soft_wrap=True,
        )
        _rules_error(console, file)
        for watch in file["watches"]:
            console.print(f"  watching {watch['path']} ({watch['mark']})", soft_wrap=True)
    net = status["sources"].get("net")
    if net:
        mode = "fail-open" if net["fail_open"] else "fail-closed"
        first, count = net["queue"], net.get("queues", 1)
        queues = f"queue {first}" if count == 1 else f"queues {first}-{first + count - 1}"
        console.print(
            f"firewall: {queues} ({net['backend']}, {mode}): "
            f"{net['allowed']} allowed, {net['denied']} denied, {net['rejected']} rejected, "
            + _decided(net)
            + f"; {net['without_process']} without a known process; "
            f"rules put back {net['rules_reinstalled']} times",
            soft_wrap=True,
        )
        _rules_error(console, net)
    journal = status.get("journal")
    if journal and "path" not in journal:
        console.print(f"journal: NOT DURABLE: {journal['error']}")
    elif journal:
        state = "durable" if journal["durable"] else f"NOT DURABLE: {journal['error']}"
        console.print(
            f"journal {journal['path']}: {state}; committed through seq {journal['committed']}, "
            f"{journal['queued']} queued, {journal['dropped']} dropped, "
            f"{journal['pruned']} removed by retention"
        )
    else:
        console.print("journal: off")
    ports = Table(
        "port", "one-way", "clients", "queued", "lost", title="Ports", title_justify="left"
    )
    conns = Table(
        "port", "pid", "uid", "queue", "lost", "sent", title="Connections", title_justify="left"
    )
    for name, p in status["ports"].items():
        ports.add_row(
            name,
            "yes" if p["one_way"] else "no",
            str(len(p["connections"])),
            str(sum(c["queue_depth"] for c in p["connections"])),
            str(p["lost"]),
        )
        for c in p["connections"]:
            conns.add_row(
                name,
                str(c["pid"]),
                str(c["uid"]),
                str(c["queue_depth"]),
                str(c["lost"]),
                str(c["sent"]),
            )
    console.print(ports)
    console.print(conns)
    for export in export_state.read_status(args.state_dir):
        _export_line(console, export)
    return 0


def _export_line(console: Any, export: dict[str, Any]) -> None:
    """One exporter's state: connected or not, cursor, lag, resends, duplicates refused."""
    sources = export.get("sources", {}).values()
    state = "connected" if export.get("connected") else f"NOT CONNECTED: {export.get('error')}"
    console.print(
        f"export {export['host']} to {export['url']} ({export['stream']}): {state}; "
        f"cursor seq {export['cursor']}, lag {export['lag_events']} events "
        f"({export['lag_s']} s), {sum(s['resends'] for s in sources)} resends, "
        f"{sum(s['duplicates'] for s in sources)} duplicates refused, "
        f"{sum(s['lost'] for s in sources)} lost",
        soft_wrap=True,
    )


def _decided(source: dict[str, Any]) -> str:
    """What a deciding source's status says about asks, defaults, rules and cache."""
    cache = source["cache"]
    return (
        f"{source['asked']} asked ({source['asks_in_flight']} in flight), "
        f"{source['defaulted']} given the default verdict; rules: {source['rules']}, "
        f"decision cache {cache['hits']} hits / {cache['misses']} misses"
    )


def _rules_error(console: Any, source: dict[str, Any]) -> None:
    if source["rules_error"]:
        console.print(
            f"  RULES NOT RELOADED (the ones in force stay): {source['rules_error']}",
            soft_wrap=True,
        )
