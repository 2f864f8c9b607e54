"""kport's filter rules: what each backend would install, and iptables for real in a
namespace of the test's own."""

from __future__ import annotations

import json

import pytest

from kport.sources import firewall
from tests.conftest import Netns

CHECK = """
import json, subprocess, sys
from kport.sources import firewall
def save():
    return subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True).stdout
plan = firewall.Plan(queue=9, queues=int(sys.argv[1]), inbound=True, fail_open=False)
backend = firewall.Iptables(plan)
backend.install()
backend.install()  # again: replaces, never doubles
out = {"intact": backend.intact(), "installed": save()}
subprocess.run(["iptables", "-D", "KPORT-IN", "1"], check=True)
out["broken"] = backend.intact()
backend.remove()
out["removed"] = save()
print(json.dumps(out))
"""


@pytest.mark.parametrize("queues", [1, 3])
def test_iptables_rules_go_in_whole_and_come_out_whole(netns: Netns, queues: int) -> None:
    done = netns.python(netns.client, CHECK, str(queues))
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["intact"] is True and out["broken"] is False
    installed = out["installed"]
    assert installed.count("-A OUTPUT -j KPORT-OUT") == 1
    assert installed.count("-A INPUT -j KPORT-IN") == 1
    queued = [line for line in installed.splitlines() if "NFQUEUE" in line]
    if queues == 1:
        assert queued and all("--queue-num 9" in line for line in queued)
    else:  # the sending CPU's queue, of 9 to 11
        assert queued and all(
            "--queue-balance 9:11" in line and "--queue-cpu-fanout" in line for line in queued
        )
    # fail-closed: no bypass, but for the DNS answers, which are only read
    assert [line for line in queued if "--queue-bypass" in line] == [
        line for line in queued if "--sport 53" in line
    ]
    assert "KPORT" not in out["removed"]


def test_the_plan_decides_what_is_queued() -> None:
    open_out = firewall.iptables_rules(firewall.Plan(queue=3, dns=False), 4)
    assert list(open_out) == [firewall.CHAIN_OUT]
    rules = open_out[firewall.CHAIN_OUT]
    assert "-o lo -j RETURN" in rules  # loopback is left alone unless asked
    assert all("--queue-bypass" in r for r in rules if "NFQUEUE" in r)
    assert any("tcp-reset" in r for r in rules) and any("--syn" in r for r in rules)
    both = firewall.iptables_rules(
        firewall.Plan(queue=3, inbound=True, loopback=True, fail_open=False), 6
    )
    assert "-i lo -j RETURN" not in both[firewall.CHAIN_IN]
    assert any("ipv6-icmp" in r and "echo-request" in r for r in both[firewall.CHAIN_IN])
    # DNS answers always pass, even fail-closed: they are only read
    assert (
        "--queue-bypass" in both[firewall.CHAIN_IN][0]
        and "--sport 53" in both[firewall.CHAIN_IN][0]
    )
    assert not any("--queue-bypass" in r for r in both[firewall.CHAIN_OUT] if "NFQUEUE" in r)


def test_the_nft_table_says_the_same() -> None:
    script = firewall.nft_script(firewall.Plan(queue=3, inbound=True))
    assert script.startswith("table inet kport {")
    assert "queue num 3 bypass" in script and 'oifname "lo" return' in script
    assert "reject with tcp reset" in script and "udp sport 53 queue num 3 bypass" in script
    closed = firewall.nft_script(firewall.Plan(queue=3, fail_open=False, dns=False))
    assert " bypass" not in closed and "chain in" not in closed
    fanned = firewall.nft_script(firewall.Plan(queue=3, queues=2))
    assert "queue num 3-4 bypass,fanout" in fanned
    assert "udp sport 53 queue num 3-4 bypass,fanout" in fanned
    assert "queue num 3-4 fanout" in firewall.nft_script(
        firewall.Plan(queue=3, queues=2, fail_open=False)
    )
