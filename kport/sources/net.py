"""The network source: a personal firewall on NFQUEUE, decided by rules or by a client.

kport's own filter rules (:mod:`kport.sources.firewall`) send each new connection's
first packet to an NFQUEUE, one per CPU: a reader thread on that CPU takes it, so the
sender's CPU switches straight to the reader instead of waking another one, and the
readers take turns on the shared state. For each packet: who sent it (the socket
through sock_diag, its process through /proc, see :mod:`kport.sources.sockets`), what
the rules say (cached per process identity, destination and protocol), and the verdict,
written before anything is reported. An ``ask`` holds the packet and goes to the
daemon's ``ask`` callback with a deadline; other traffic goes on meanwhile, and a
retransmitted SYN of a connection already being asked about waits on the same answer
instead of asking twice. ``reject`` marks the packet and sends it back through kport's
chain, which answers it with a TCP reset or ICMP unreachable: the program learns at
once, where ``deny`` (a drop) leaves it waiting.

Every decision is reported (kind ``allowed``, ``denied``, ``rejected``, or ``asked``
while a client is asked), with the process, the addresses, and the host name the
address was looked up as, from DNS answers seen on the way in. A watchdog thread puts
kport's filter rules back if they vanish. Stopping removes exactly those rules.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Final

from kport.rules import RuleSet, Subject
from kport.sources import firewall, nfqueue
from kport.sources import packet as packets
from kport.sources.ask import Ask, Asking, outcome
from kport.sources.hashes import Hasher
from kport.sources.nfqueue import NF_ACCEPT, NF_DROP, NF_REPEAT, QueuedPacket
from kport.sources.sockets import Candidates, Owners, SocketDiag, all_processes
from kport.sources.subjects import ProcessTableView, Subjects

log = logging.getLogger("kport.net")

Event = dict[str, Any]
Emit = Callable[[list[Event]], None]
#: events are handed on in batches: at most this late, or this many at once. One
#: hand-over per connection would wake the event loop (a syscall, and a thread that then
#: competes for the GIL) just as the next packet is due.
FLUSH_S: Final = 0.002
FLUSH_EVENTS: Final = 256
#: how often the watchdog checks that kport's filter rules are in place
WATCHDOG_S: Final = 2.0
#: addresses remembered from DNS answers
DNS_CACHE: Final = 8192
VERDICTS: Final = ("allow", "deny", "reject")
#: a flow's verdict stands for its retransmissions this long (a dropped SYN comes back
#: after 1, 3, 7... s); flows remembered at most
FLOW_TTL_S: Final = 60.0
FLOWS: Final = 8192
#: NFQUEUEs read at most; ``queues = 0`` means one per CPU, up to AUTO_QUEUES
MAX_QUEUES: Final = 64
AUTO_QUEUES: Final = 16


def queue_count(configured: int) -> int:
    """How many queues ``net.queues = configured`` means on this machine."""
    return configured or max(1, min(os.cpu_count() or 1, AUTO_QUEUES))


def cpus_of(index: int, count: int) -> set[int]:
    """The CPUs whose packets go to queue ``index`` of ``count`` (the kernel's fanout
    takes the sending CPU's number modulo ``count``), of those this process may use."""
    try:
        allowed = os.sched_getaffinity(0)
    except OSError:
        return set()
    return {cpu for cpu in allowed if cpu % count == index}


class NetSource:
    """NFQUEUEs ``plan.queue`` on, with kport's filter rules (see the module docstring)."""

    name: Final = "net"

    def __init__(
        self,
        emit: Emit,
        *,
        plan: firewall.Plan,
        rules: RuleSet,
        ask: Ask | None,
        max_asks: int,
        default_verdict: str,
        backend: str = "auto",
        trusted: Callable[[], frozenset[int]] = frozenset,
        processes: ProcessTableView | None = None,
        candidates: Candidates = all_processes,
        queue_length: int = 4096,
        hasher: Hasher | None = None,
    ) -> None:
        if default_verdict not in VERDICTS:
            raise ValueError(f"default verdict must be one of {VERDICTS}, not {default_verdict!r}")
        self.emit = emit
        self.plan = plan
        self.rules = rules
        self.asking = Asking(ask, max_asks)
        self.default_verdict = default_verdict
        self.prefer = backend
        self.trusted = trusted
        self.queue_length = queue_length
        self.subjects = Subjects(processes, hasher)
        self.hasher = hasher
        self.owners = Owners(candidates)
        self.diag: SocketDiag | None = None
        self.backend: firewall.Backend | None = None
        #: queue number → the bound queue; filled by start()
        self.queues: dict[int, nfqueue.Queue] = {}
        self.own_pid = os.getpid()
        self.packets = 0
        self.allowed = 0
        self.denied = 0
        self.rejected = 0
        self.unreadable = 0
        self.unowned = 0
        self.reinstalled = 0
        self.dns_answers = 0
        self.lost = 0
        #: the kernel's drop counters of our queues when last read (queue full, socket full)
        self._dropped = (0, 0)
        self._hosts: OrderedDict[str, str] = OrderedDict()
        self._ifnames: dict[int, str] = {}
        #: cache key → the packets waiting on that ask
        self._pending: dict[Any, list[QueuedPacket]] = {}
        #: flow → (verdict, until when): a retransmission gets its flow's verdict again,
        #: quietly, instead of a second prompt or a second event
        self._flows: OrderedDict[tuple[Any, ...], tuple[str, float]] = OrderedDict()
        self.repeated = 0
        self._lock = threading.Lock()
        #: held by the reader handling packets: the readers share caches and counters
        self._handling = threading.Lock()
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Bind the queues, install the rules, start reading. The queues are bound
        first: a queue another process holds is an error before any rule of ours exists."""
        plan = self.plan
        try:
            for number in range(plan.queue, plan.queue + plan.queues):
                self.queues[number] = nfqueue.Queue(
                    number, maxlen=self.queue_length, fail_open=plan.fail_open
                )
            self.diag = SocketDiag()
            self.backend = firewall.choose(plan, self.prefer)
            self.backend.install()
        except BaseException:
            for queue in self.queues.values():
                queue.close()
            self.queues.clear()
            if self.diag is not None:
                self.diag.close()
            raise
        log.info(
            "net: queue %s, %s rules installed (%s, %s)",
            plan.queue if plan.queues == 1 else f"{plan.queue}-{plan.queue + plan.queues - 1}",
            self.backend.name,
            "outbound" + (" and inbound" if plan.inbound else ""),
            "fail-open" if plan.fail_open else "fail-closed",
        )
        threads = [
            threading.Thread(target=self._run, args=(queue, index), name=f"kport-net-{index}")
            for index, queue in enumerate(self.queues.values())
        ]
        threads.append(threading.Thread(target=self._watchdog, name="kport-net-rules"))
        for thread in threads:
            thread.daemon = True
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop reading, answer what waits with the default, remove exactly our rules."""
        self._stopping.set()
        os.write(self._stop_w, b"x")
        for thread in self._threads:
            thread.join(5)
        with self._lock:
            pending = list(self._pending.values())
            self._pending.clear()
        for waiting in pending:
            for pkt in waiting:
                self._verdict(pkt, self.default_verdict)
        if self.backend is not None:
            self.backend.remove()
        for queue in self.queues.values():
            queue.close()
        if self.diag is not None:
            self.diag.close()
        self.subjects.close()
        for fd in (self._stop_r, self._stop_w):
            os.close(fd)

    def _watchdog(self) -> None:
        while not self._stopping.wait(WATCHDOG_S):
            self._check_drops()
            backend = self.backend
            if backend is None or backend.intact():
                continue
            log.warning("net: kport's filter rules were changed or removed; putting them back")
            try:
                backend.install()
                self.reinstalled += 1
            except firewall.FirewallUnavailable as err:
                log.error("net: could not put the filter rules back: %s", err)

    def _check_drops(self) -> None:
        """Report what the kernel dropped or let through unread since the last look."""
        counts = [nfqueue.drop_counts(number) for number in self.queues]
        dropped = (
            sum(c[0] for c in counts if c is not None),
            sum(c[1] for c in counts if c is not None),
        )
        full, unread = (now - before for now, before in zip(dropped, self._dropped, strict=True))
        self._dropped = dropped
        if full or unread:
            self.lost += full + unread
            policy = "let through unread" if self.plan.fail_open else "dropped"
            self.emit(
                [
                    {
                        "source": "net",
                        "kind": "lost",
                        "count": full + unread,
                        "reason": f"kport's queue was full ({full}) or its socket was "
                        f"({unread}): the kernel {policy} those packets",
                        "ktime": time.monotonic_ns(),
                    }
                ]
            )

    def status(self) -> dict[str, Any]:
        return {
            "events": self.packets,
            "lost": self.lost,
            "queue": self.plan.queue,
            "queues": self.plan.queues,
            "backend": self.backend.name if self.backend is not None else None,
            "fail_open": self.plan.fail_open,
            "inbound": self.plan.inbound,
            "packets": self.packets,
            "allowed": self.allowed,
            "denied": self.denied,
            "rejected": self.rejected,
            "asked": self.asking.asked,
            "defaulted": self.asking.defaulted,
            "asks_in_flight": len(self._pending),
            "unreadable": self.unreadable,
            "without_process": self.unowned,
            "rules_reinstalled": self.reinstalled,
            "dns_answers": self.dns_answers,
            "retransmissions": self.repeated,
            **self.rules.status(),
            "sockets": {"hits": self.owners.hits, "scans": self.owners.scans},
        }

    # --- the reader thread -------------------------------------------------------------

    def _run(self, queue: nfqueue.Queue, index: int) -> None:
        cpus = cpus_of(index, len(self.queues)) if len(self.queues) > 1 else set()
        if cpus:
            try:  # this thread alone: the CPUs whose packets come to this queue
                os.sched_setaffinity(threading.get_native_id(), cpus)
            except OSError as err:
                log.debug("net: queue %d's reader stays on any CPU: %s", queue.number, err)
        poller = select.poll()
        poller.register(queue.fileno(), select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        batch: list[Event] = []
        due = 0.0  # when the oldest event in ``batch`` must be handed on
        first = True  # the first read takes what came while the queue was configured
        while True:
            if first:
                ready, first = [queue.fileno()], False
            else:
                wait_ms = 1000 if not batch else max(0, int((due - time.monotonic()) * 1000) + 1)
                ready = [fd for fd, _ in poller.poll(wait_ms)]
            if self._stop_r in ready:
                if batch:
                    self.emit(batch)
                return
            # The packets first: handing events on and checking the rules file wait
            # until every packet that woke us has its verdict.
            with self._handling:
                if ready:
                    try:
                        queued = queue.read()
                    except OSError as err:  # ENOBUFS: the kernel applied its fail-open setting
                        self._lost(err)
                        queued = []
                    except ValueError:
                        log.exception("net: a malformed message from the kernel")
                        queued = []
                    for pkt in queued:
                        try:
                            event = self._handle(pkt)
                        except Exception:  # one odd packet must not stop the firewall
                            log.exception("net: handling a packet failed; applying the default")
                            self._verdict(pkt, self.default_verdict)
                            event = None
                        if event is not None:
                            if not batch:
                                due = time.monotonic() + FLUSH_S
                            batch.append(event)
                now = time.monotonic()
                self.rules.reload_if_due(now)
            if batch and (now >= due or len(batch) >= FLUSH_EVENTS):
                self.emit(batch)
                batch = []

    def _lost(self, err: OSError) -> None:
        log.warning("net: packets were lost: %s", err)
        self.lost += 1
        policy = "let through" if self.plan.fail_open else "dropped"
        self.emit(
            [
                {
                    "source": "net",
                    "kind": "lost",
                    "count": None,
                    "reason": f"kport's NFQUEUE socket overflowed ({err.strerror}); "
                    f"the kernel {policy} what did not fit",
                    "ktime": time.monotonic_ns(),
                }
            ]
        )

    def _settle(self, flow: packets.Flow, verdict: str) -> None:
        """Remember ``flow``'s verdict for its retransmissions."""
        key = (flow.protocol, flow.src, flow.sport, flow.dst, flow.dport)
        with self._lock:
            self._flows[key] = (verdict, time.monotonic() + FLOW_TTL_S)
            self._flows.move_to_end(key)
            while len(self._flows) > FLOWS:
                self._flows.popitem(last=False)

    def _settled(self, flow: packets.Flow) -> str | None:
        key = (flow.protocol, flow.src, flow.sport, flow.dst, flow.dport)
        found = self._flows.get(key)
        if found is None:
            return None
        verdict, until = found
        if time.monotonic() > until:
            return None
        return verdict

    def _verdict(self, pkt: QueuedPacket, verdict: str) -> None:
        queue = self.queues.get(pkt.queue)  # only the socket bound to it may answer
        if queue is None:
            return
        try:
            if verdict == "allow":
                queue.verdict(pkt, NF_ACCEPT)
                self.allowed += 1
            elif verdict == "reject":
                queue.verdict(pkt, NF_REPEAT, mark=pkt.mark | self.plan.reject_mark)
                self.rejected += 1
            else:
                queue.verdict(pkt, NF_DROP)
                self.denied += 1
        except OSError as err:  # the queue is gone: the kernel decided already
            log.debug("net: verdict on packet %d not written: %s", pkt.id, err)

    def _handle(self, pkt: QueuedPacket) -> Event | None:
        self.packets += 1
        try:
            flow = packets.parse(pkt.payload)
        except ValueError as err:
            self.unreadable += 1
            log.debug("net: unreadable packet (%s); applying the default", err)
            self._verdict(pkt, self.default_verdict)
            return None
        inbound = pkt.hook in ("input", "prerouting")
        if inbound and self.plan.dns and flow.protocol == "udp" and flow.sport == 53:
            self._verdict(pkt, "allow")  # a DNS answer: through at once, then read
            self._snoop(pkt.payload)
            return None
        settled = self._settled(flow) if self._flows else None
        if settled is not None:
            self.repeated += 1
            self._verdict(pkt, settled)
            return None
        remote, port = (flow.src, flow.sport) if inbound else (flow.dst, flow.dport)
        pid, uid, info = self._owner(flow, inbound, pkt.uid)
        if pid is not None and (pid == self.own_pid or pid in self.trusted()):
            self._verdict(pkt, "allow")
            return None
        direction = "in" if inbound else "out"
        key = (
            (
                pid,
                info["start_time"],
                info["exe"],
                info.get("exe_sha256"),  # one still pending is not what a rule decides on
                remote,
                port,
                flow.protocol,
                direction,
            )
            if info
            else None
        )
        info = info or {}
        decision = None if key is None else self.rules.cached(key)
        # the DNS name and interface matter to a rule, else only to the record: looked up
        # before the verdict only when the decision is not cached
        where: tuple[str | None, str | None] | None = None
        if decision is None:
            where = host, interface = self._where(remote, pkt, inbound)
            argv = info.get("argv")
            subject = Subject(
                kind="connect" if not inbound else "accept",
                exe=info.get("exe"),
                uid=info.get("uid", uid),
                gid=info.get("gid", pkt.gid),
                ancestors=tuple(info.get("ancestors") or ()),
                cmdline=" ".join(argv) if argv else None,
                host=host,
                address=remote,
                port=port,
                protocol=flow.protocol,
                interface=interface,
                direction=direction,
                exe_sha256=info.get("exe_sha256"),
            )
            decision = self.rules.decide_afresh(subject, key)
        action = decision.action
        if action == "ask":
            host, interface = where or self._where(remote, pkt, inbound)
            record = self._record(
                flow, direction, pid=pid, uid=uid, info=info, host=host, interface=interface
            )
            record["rule"] = decision.rule
            return self._ask(pkt, flow, key, record)
        verdict = "allow" if action == "log" else action
        self._verdict(pkt, verdict)  # the verdict first, everything else after
        if verdict != "allow":
            self._settle(flow, verdict)
        host, interface = where or self._where(remote, pkt, inbound)
        record = self._record(
            flow, direction, pid=pid, uid=uid, info=info, host=host, interface=interface
        )
        record["kind"] = _KIND[verdict]
        record["verdict"] = verdict
        record["rule"] = decision.rule
        record["decided_by"] = "rule" if decision.rule != "default" else "default"
        record["why"] = decision.why
        return record

    def _owner(
        self, flow: packets.Flow, inbound: bool, uid: int | None
    ) -> tuple[int | None, int | None, dict[str, Any] | None]:
        """(pid, uid, details) of the local socket's process; pid None when it cannot be
        told, details None when it is gone."""
        diag = self.diag
        found = diag.lookup(flow, inbound=inbound) if diag is not None else None
        if found is None:
            self.unowned += 1
            return None, uid, None
        inode, socket_uid = found
        uid = socket_uid if uid is None else uid
        pid = self.owners.pid_of(inode, uid)
        info = self.subjects.get(pid) if pid is not None else None
        if pid is not None and (info is None or info.get("gone")):
            self.owners.forget(inode)  # it exited since: someone else has the socket now
            pid = self.owners.pid_of(inode, uid)
            info = self.subjects.get(pid) if pid is not None else None
        if pid is None:
            self.unowned += 1
        return pid, uid, info

    def _where(
        self, remote: str, pkt: QueuedPacket, inbound: bool
    ) -> tuple[str | None, str | None]:
        """The DNS name last seen for ``remote``, and the packet's interface."""
        return self._hosts.get(remote), self._ifname(pkt.indev if inbound else pkt.outdev)

    def _ifname(self, index: int) -> str | None:
        if not index:
            return None
        name = self._ifnames.get(index)
        if name is None:
            try:
                name = self._ifnames[index] = socket.if_indextoname(index)
            except OSError:
                return None
        return name

    def _snoop(self, payload: bytes) -> None:
        try:
            answers = packets.dns_answers(packets.udp_payload(payload))
        except (ValueError, IndexError):
            return  # not DNS, or not one we can read: it went through anyway
        for address, name in answers:
            self.dns_answers += 1
            self._hosts[address] = name.lower()
            self._hosts.move_to_end(address)
        while len(self._hosts) > DNS_CACHE:
            self._hosts.popitem(last=False)

    def _ask(self, pkt: QueuedPacket, flow: packets.Flow, key: Any, record: Event) -> Event | None:
        # an unknown process has no key: its packet is asked about on its own
        slot = key if key is not None else ("packet", pkt.id)
        with self._lock:
            waiting = self._pending.get(slot)
            if waiting is not None:
                waiting.append(pkt)  # a retransmission: it waits on the same answer
                return None
            why = self.asking.reserve()
            if why is None:
                self._pending[slot] = [pkt]
        if why is not None:
            if self.default_verdict != "allow":
                self._settle(flow, self.default_verdict)
            record["why"] = outcome(why, None, self.default_verdict, record.get("rule"))
            return self._finish([pkt], record, self.default_verdict, f"default: {why}")

        def answered(verdict: str, why: str, client: Mapping[str, Any] | None = None) -> None:
            with self._lock:
                held = self._pending.pop(slot, [])
            if verdict not in VERDICTS:
                verdict = self.default_verdict
            decided = dict(record, why=outcome(why, client, verdict, record.get("rule")))
            if why != "decided":
                why = f"default: {why}"
            if verdict != "allow":
                self._settle(flow, verdict)
            self.emit([self._finish(held, decided, verdict, why)])

        request = {
            k: record.get(k)
            for k in (
                "direction",
                "protocol",
                "src",
                "sport",
                "dst",
                "dport",
                "host",
                "interface",
                "pid",
                "start_time",
                "exe",
                "uid",
                "user",
                "ancestors",
                "exe_sha256",
            )
        }
        if self.hasher is not None:
            request["hash_changed"] = self.hasher.decided(record["exe"], record.get("exe_sha256"))
        request["kind"] = "connect" if record["direction"] == "out" else "accept"
        request["cmdline"] = record.get("argv")
        request["verdicts"] = list(VERDICTS)
        asked = dict(record, kind="asked")
        self.asking.send(request, answered)
        return asked

    def _finish(self, held: list[QueuedPacket], record: Event, verdict: str, why: str) -> Event:
        for pkt in held:
            self._verdict(pkt, verdict)
        record["kind"] = _KIND[verdict]
        record["verdict"] = verdict
        record["decided_by"] = why if why != "decided" else "client"
        record["ktime"] = time.monotonic_ns()
        return record

    @staticmethod
    def _record(
        flow: packets.Flow,
        direction: str,
        *,
        pid: int | None,
        uid: int | None,
        info: dict[str, Any],
        host: str | None,
        interface: str | None,
    ) -> Event:
        return {
            "source": "net",
            "kind": "connect",
            "direction": direction,
            "protocol": flow.protocol,
            "src": flow.src,
            "sport": flow.sport,
            "dst": flow.dst,
            "dport": flow.dport,
            "host": host,
            "interface": interface,
            "pid": pid,
            "start_time": info.get("start_time"),
            "exe": info.get("exe"),
            "argv": info.get("argv"),
            "uid": info.get("uid", uid),
            "user": info.get("user"),
            "ancestors": info.get("ancestors"),
            "ktime": time.monotonic_ns(),
            **{k: info[k] for k in _HASH_FIELDS if k in info},
        }


_KIND: Final = {"allow": "allowed", "deny": "denied", "reject": "rejected"}
#: what a record carries of its executable's hash (see kport.sources.hashes)
_HASH_FIELDS: Final = ("exe_sha256", "exe_sha256_by", "exe_sha256_pending", "exe_sha256_error")


def rule_for(request: dict[str, Any]) -> dict[str, Any]:
    """The rule an answer to ``request`` stands for, when the client names none: this
    program, to this host (or address), port and protocol, this way."""
    rule: dict[str, Any] = {"protocols": [request["protocol"]]}
    if request.get("exe"):
        rule["exe"] = [request["exe"]]
    inbound = request.get("direction") == "in"
    if inbound:
        rule["ports"] = [request["dport"]]
    else:
        if request.get("host"):
            rule["hosts"] = [request["host"]]
        else:
            rule["addresses"] = [request["dst"]]
        rule["ports"] = [request["dport"]]
    rule["direction"] = request.get("direction", "out")
    return rule
