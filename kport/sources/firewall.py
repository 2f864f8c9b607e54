"""kport's own packet-filter rules: which packets go to its NFQUEUE, installed and removed
as one piece, and put back if something takes them away.

Two backends, chosen by what the kernel and the machine have: nftables' ``queue``
statement in a table of kport's own (``inet kport``), or, where the kernel lacks that
expression, ``iptables-nft`` with the xtables NFQUEUE target in chains of kport's own
(``KPORT-OUT``, ``KPORT-IN``) that the built-in chains jump to first. Either way kport
touches nothing else: removing is deleting its table, or its jumps and its chains.

What is queued: new outbound connections (TCP SYN; UDP and ICMP echo new by conntrack),
new inbound ones if asked, and DNS answers (always let through at once) when names are
wanted. A packet whose verdict carries the reject bit in its mark comes back through the
chain (``NF_REPEAT``) and is rejected: TCP with a reset, the rest with ICMP unreachable.
``fail_open`` adds ``--queue-bypass``: with no reader, packets pass instead of dropping.
With several queues (``Plan.queues``), each packet goes to the queue of the CPU it was
sent from (``--queue-cpu-fanout``; nft's ``fanout``), so a reader that runs on that CPU
takes it without waking another CPU.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass
from typing import Final

from kport.errors import KportError

log = logging.getLogger("kport.net")

CHAIN_OUT: Final = "KPORT-OUT"
CHAIN_IN: Final = "KPORT-IN"
NFT_TABLE: Final = "kport"
#: the mark bit that asks for a reject when the packet comes back
REJECT_MARK: Final = 0x10000000
COMMAND_TIMEOUT_S: Final = 10.0


class FirewallUnavailable(KportError):
    """Neither nftables with queue support nor iptables can send packets to kport."""


@dataclass(frozen=True)
class Plan:
    """What to queue; the same for either backend."""

    #: the first NFQUEUE number; the plan uses ``queue`` to ``queue + queues - 1``
    queue: int
    queues: int = 1
    outbound: bool = True
    inbound: bool = False
    loopback: bool = False
    fail_open: bool = True
    dns: bool = True
    reject_mark: int = REJECT_MARK


def _iptables_target(plan: Plan, *, bypass: bool) -> list[str]:
    """The NFQUEUE target: one queue, or the queue of the sending CPU among several."""
    target = ["-j", "NFQUEUE"]
    if plan.queues > 1:
        last = plan.queue + plan.queues - 1
        target += ["--queue-balance", f"{plan.queue}:{last}", "--queue-cpu-fanout"]
    else:
        target += ["--queue-num", str(plan.queue)]
    return target + (["--queue-bypass"] if bypass else [])


def _nft_queue(plan: Plan, *, bypass: bool) -> str:
    """nft's queue statement, as :func:`_iptables_target`."""
    flags = (["bypass"] if bypass else []) + (["fanout"] if plan.queues > 1 else [])
    numbers = f"{plan.queue}-{plan.queue + plan.queues - 1}" if plan.queues > 1 else plan.queue
    return f"queue num {numbers}" + (f" {','.join(flags)}" if flags else "")


def _run(argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )


# --- iptables-nft (xtables NFQUEUE target) ----------------------------------------------


def iptables_rules(plan: Plan, family: int) -> dict[str, list[str]]:
    """chain → its rules (iptables arguments after ``-A CHAIN``), for IPv4 (4) or IPv6."""
    queue = _iptables_target(plan, bypass=plan.fail_open)
    mark = f"0x{plan.reject_mark:x}/0x{plan.reject_mark:x}"
    unreachable = "icmp-port-unreachable" if family == 4 else "icmp6-port-unreachable"
    icmp = ["-p", "icmp", "--icmp-type", "echo-request"]
    if family == 6:
        icmp = ["-p", "ipv6-icmp", "--icmpv6-type", "echo-request"]
    reject = [
        ["-p", "tcp", "-m", "mark", "--mark", mark, "-j", "REJECT", "--reject-with", "tcp-reset"],
        ["-m", "mark", "--mark", mark, "-j", "REJECT", "--reject-with", unreachable],
    ]
    new = ["-m", "conntrack", "--ctstate", "NEW"]
    #: the new connections that go to the queue, either way
    queued = [
        ["-p", "tcp", "--syn", *new, *queue],
        ["-p", "udp", *new, *queue],
        [*icmp, *new, *queue],
    ]
    out: dict[str, list[str]] = {}
    if plan.outbound:
        rules = [*reject]
        if not plan.loopback:
            rules.append(["-o", "lo", "-j", "RETURN"])
        rules += queued
        out[CHAIN_OUT] = [" ".join(r) for r in rules]
    if plan.inbound or plan.dns:
        rules = []
        if plan.dns:  # answers are let through at once, so always with bypass
            dns_queue = _iptables_target(plan, bypass=True)
            rules.append(["-p", "udp", "--sport", "53", *dns_queue])
        if plan.inbound:
            rules += reject
            if not plan.loopback:
                rules.append(["-i", "lo", "-j", "RETURN"])
            rules += queued
        out[CHAIN_IN] = [" ".join(r) for r in rules]
    return out


_HOOK_OF: Final = {CHAIN_OUT: "OUTPUT", CHAIN_IN: "INPUT"}


class Iptables:
    """kport's chains through ``iptables``/``ip6tables`` (the nf_tables variants)."""

    name: Final = "iptables"

    def __init__(self, plan: Plan, *, ipv6: bool = True) -> None:
        self.plan = plan
        self.families = (4, 6) if ipv6 and shutil.which("ip6tables") else (4,)

    @staticmethod
    def _tool(family: int, kind: str = "") -> str:
        return ("iptables" if family == 4 else "ip6tables") + kind

    def script(self, family: int) -> str:
        """The iptables-restore input that installs kport's chains and jumps."""
        chains = iptables_rules(self.plan, family)
        lines = ["*filter"]
        lines += [f":{chain} - [0:0]" for chain in chains]
        lines += [f"-I {_HOOK_OF[chain]} 1 -j {chain}" for chain in chains]
        for chain, rules in chains.items():
            lines += [f"-A {chain} {rule}" for rule in rules]
        return "\n".join([*lines, "COMMIT", ""])

    def install(self) -> None:
        self.remove()  # what a killed daemon left behind
        for family in self.families:
            done = _run([self._tool(family, "-restore"), "-w", "--noflush"], self.script(family))
            if done.returncode:
                self.remove()
                raise FirewallUnavailable(
                    f"{self._tool(family, '-restore')} could not install kport's rules: "
                    f"{done.stderr.strip() or done.stdout.strip()}"
                )

    def remove(self) -> None:
        """Take away kport's jumps and chains, and nothing else."""
        for family in self.families:
            tool = self._tool(family)
            for chain, hook in _HOOK_OF.items():
                for _ in range(64):  # every jump, however many were left behind
                    if _run([tool, "-w", "-D", hook, "-j", chain]).returncode:
                        break
                _run([tool, "-w", "-F", chain])
                _run([tool, "-w", "-X", chain])

    def intact(self) -> bool:
        """Are kport's chains, their rules and the jumps to them all in place?"""
        for family in self.families:
            done = _run([self._tool(family, "-save"), "-t", "filter"])
            if done.returncode:
                return False
            lines = done.stdout.splitlines()
            for chain, rules in iptables_rules(self.plan, family).items():
                if f"-A {_HOOK_OF[chain]} -j {chain}" not in lines:
                    return False
                if sum(line.startswith(f"-A {chain} ") for line in lines) != len(rules):
                    return False
        return True


# --- nftables (the queue statement) -----------------------------------------------------


def nft_script(plan: Plan) -> str:
    """kport's table for ``nft -f``: created whole, replaced whole."""
    queue = _nft_queue(plan, bypass=plan.fail_open)
    mark = f"meta mark & 0x{plan.reject_mark:x} == 0x{plan.reject_mark:x}"
    reject = [
        f"{mark} meta l4proto tcp reject with tcp reset",
        f"{mark} reject",
    ]
    new = "ct state new"
    matches = [
        f"tcp flags & (syn | ack) == syn {new} {queue}",
        f"meta l4proto udp {new} {queue}",
        f"icmp type echo-request {new} {queue}",
        f"icmpv6 type echo-request {new} {queue}",
    ]
    lines = [f"table inet {NFT_TABLE} {{"]
    if plan.outbound:
        lines.append("  chain out {")
        lines.append("    type filter hook output priority -1; policy accept;")
        lines += [f"    {r}" for r in reject]
        if not plan.loopback:
            lines.append('    oifname "lo" return')
        lines += [f"    {r}" for r in matches]
        lines.append("  }")
    if plan.inbound or plan.dns:
        lines.append("  chain in {")
        lines.append("    type filter hook input priority -1; policy accept;")
        if plan.dns:
            lines.append(f"    udp sport 53 {_nft_queue(plan, bypass=True)}")
        if plan.inbound:
            lines += [f"    {r}" for r in reject]
            if not plan.loopback:
                lines.append('    iifname "lo" return')
            lines += [f"    {r}" for r in matches]
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


class Nftables:
    """kport's table through ``nft``."""

    name: Final = "nft"

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def install(self) -> None:
        self.remove()
        done = _run(["nft", "-f", "-"], nft_script(self.plan))
        if done.returncode:
            raise FirewallUnavailable(f"nft could not install kport's table: {done.stderr.strip()}")

    def remove(self) -> None:
        _run(["nft", "delete", "table", "inet", NFT_TABLE])

    def intact(self) -> bool:
        done = _run(["nft", "list", "table", "inet", NFT_TABLE])
        expected = nft_script(self.plan).count(" queue ")
        return done.returncode == 0 and done.stdout.count(" queue ") == expected


def nft_can_queue() -> bool:
    """Does this kernel have nftables' queue expression? (Tried on a throwaway table.)"""
    if shutil.which("nft") is None:
        return False
    probe = "table inet kport-probe {\n  chain c {\n    queue num 65535 bypass\n  }\n}\n"
    done = _run(["nft", "-f", "-"], probe)
    _run(["nft", "delete", "table", "inet", "kport-probe"])
    return done.returncode == 0


Backend = Iptables | Nftables


def choose(plan: Plan, prefer: str = "auto") -> Backend:
    """The backend to use: ``prefer`` (nft | iptables), or what works here (auto)."""
    if prefer == "nft" or (prefer == "auto" and nft_can_queue()):
        return Nftables(plan)
    if shutil.which("iptables-restore") is None:
        raise FirewallUnavailable(
            "this kernel has no nftables queue expression and iptables is not installed: "
            "install Debian's iptables package"
        )
    return Iptables(plan)
