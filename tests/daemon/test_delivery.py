"""The daemon's delivery path on its own: seqs, the daemon-side filters, the journal and
the port, and kport's own events on every event port."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgpack
import pytest

import kport
from kport.daemon.config import ProcConfig
from kport.daemon.delivery import Delivery, Rate
from kport.journal.store import Journal
from tests.conftest import run


def proc(kind: str, **fields: Any) -> dict[str, Any]:
    return {"source": "proc", "kind": kind, **fields}


def test_seqs_filters_journal_and_rate(tmp_path: Path) -> None:
    delivery = Delivery(ProcConfig(kinds=["exec"], exe=["/usr/bin/*"]), {})
    journal = delivery.journal = Journal(tmp_path / "j.db")
    delivery.seq = journal.open()
    delivery.rates["proc"] = Rate()
    try:
        delivery.deliver(
            [
                proc("exec", exe="/usr/bin/true"),
                proc("exit", exe="/usr/bin/true"),  # not a kind asked for
                proc("exec", exe="/tmp/x"),  # not a path asked for
                proc("lost", count=3),  # loss is never filtered away
                proc("exec", exe="/usr/bin/env"),
            ]
        )
        assert delivery.seq == 3 and delivery.filtered == 2
        assert delivery.rates["proc"].total == 3
        page = journal.tail(0, 3)
        assert page is not None
        events = [msgpack.unpackb(item) for _, item in page.items]
        assert [(e["seq"], e["kind"]) for e in events] == [(1, "exec"), (2, "lost"), (3, "exec")]
        assert len({e["ts"] for e in events}) == 1  # one batch, one time
    finally:
        journal.close()


def test_kport_own_events_go_out_on_every_event_port_and_none_other(rundir: Path) -> None:
    async def main() -> None:
        ports = {
            name: kport.ServerPort(name, runtime_dir=rundir, one_way=True)
            for name in ("proc", "file", "control")
        }
        delivery = Delivery(ProcConfig(), ports)
        delivery.loop = asyncio.get_running_loop()
        for port in ports.values():
            await port.start()
        try:
            async with (
                kport.aconnect("file", runtime_dir=rundir) as file,
                kport.aconnect("control", runtime_dir=rundir) as control,
            ):
                delivery.journal_state(False, "disk full")  # the journal writer's call
                msg = await file.get_message(timeout=5)
                assert msg.data["kind"] == "journal" and msg.data["durable"] is False
                assert msg.data["seq"] == delivery.seq == 1
                with pytest.raises(kport.Timeout):
                    await control.get_message(timeout=0.3)
        finally:
            for port in ports.values():
                await port.shutdown()

    run(main())
