"""Rules that decide file and network access: ordered, first match wins, reloaded safely.

A rules file is TOML (file access)::

    default = "allow"            # when no rule matches: allow | deny | ask | log

    [[rule]]
    name = "ssh keys"            # shown in logs and prompts
    action = "deny"              # allow | deny | ask | log (log: allow, and record it)
    kinds = ["open_perm"]        # event kinds; empty or absent: any
    path = ["/home/*/.ssh/*"]    # globs (``*`` does not cross ``/``; ``**`` does)
    exe = ["/usr/bin/*"]         # the process's executable
    users = ["alice", 1001]      # names or uids
    groups = ["staff"]           # names or gids
    ancestors = ["/usr/sbin/sshd"]  # any process up the parent chain
    sha256 = ["9f86d0…"]          # the executable's content (64 hex digits each)

Network rules (``RuleSet(..., domain="net")``) add ``reject`` (refuse at once, where
``deny`` drops) and match on the connection::

    [[rule]]
    action = "allow"
    exe = ["/usr/bin/curl"]
    cmdline = ["*--insecure*"]   # the command line, joined by spaces (``*`` matches all)
    hosts = ["*.debian.org"]     # the DNS name the address was looked up as
    addresses = ["10.0.0.0/8", "2001:db8::1"]
    ports = [443, "8000-8100"]
    protocols = ["tcp"]          # tcp | udp | icmp | icmpv6 | ...
    interfaces = ["eth0"]
    direction = "out"            # out | in

Every field given must match; a rule with none matches everything. Loading is all or
nothing: a file with any error keeps the rules in force and the error names the file,
the line and what is wrong. Decisions are cached per (process identity, path, kind),
and the cache is dropped whenever the rules change.
"""

from __future__ import annotations

import fnmatch
import grp
import hashlib
import ipaddress
import logging
import os
import pwd
import re
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("kport.rules")

#: a compiled pattern's match, or several patterns' as one
Match = Callable[[str], "re.Match[str] | None"]

ACTIONS: Final = ("allow", "deny", "ask", "log")
NET_ACTIONS: Final = ("allow", "deny", "reject", "ask", "log")
_COMMON: Final = ("name", "action", "exe", "users", "groups", "ancestors", "sha256")
_FIELDS: Final = {
    "file": (*_COMMON, "kinds", "path"),
    "net": (
        *_COMMON,
        "cmdline",
        "hosts",
        "addresses",
        "ports",
        "protocols",
        "interfaces",
        "direction",
    ),
}
CACHE_SIZE: Final = 65536
#: how often the files are checked for changes, at most (a stat per file: not once per
#: decision)
CHECK_INTERVAL_S: Final = 0.5


class RulesError(ValueError):
    """A rules file that cannot be used; the message names the file, line and problem."""


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A path glob: ``*`` and ``?`` stay within one path part, ``**`` crosses parts,
    ``[...]`` is a class."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = pattern.find("]", i + 1)
            if end == -1:
                raise ValueError(f"glob {pattern!r} has a '[' with no ']'")
            body = pattern[i + 1 : end].replace("\\", "\\\\")
            if body.startswith("!"):
                body = "^" + body[1:]
            out.append(f"[{body}]")
            i = end
        else:
            out.append(re.escape(char))
        i += 1
    return re.compile("".join(out) + r"\Z")


@dataclass(slots=True)
class Subject:
    """What a rule looks at: the access and the process asking for it.

    Made for a question the cache cannot answer. Not frozen, because a frozen dataclass
    takes four times as long to make; the rules keep none once they have answered, so a
    source may reuse one for the same process's next question.
    """

    kind: str
    path: str | None = None
    exe: str | None = None
    uid: int | None = None
    gid: int | None = None
    groups: frozenset[int] = frozenset()
    #: the executables up the parent chain, nearest first
    ancestors: tuple[str, ...] = ()
    # a connection's
    cmdline: str | None = None
    host: str | None = None
    address: str | None = None
    port: int | None = None
    protocol: str | None = None
    interface: str | None = None
    direction: str | None = None
    #: the executable's sha256 (hex), None when it is not known (yet)
    exe_sha256: str | None = None


@dataclass
class Rule:
    action: str
    name: str = ""
    kinds: frozenset[str] = frozenset()
    path: tuple[re.Pattern[str], ...] = ()
    exe: tuple[re.Pattern[str], ...] = ()
    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()
    ancestors: tuple[re.Pattern[str], ...] = ()
    cmdline: tuple[re.Pattern[str], ...] = ()
    hosts: tuple[re.Pattern[str], ...] = ()
    addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()
    protocols: frozenset[str] = frozenset()
    interfaces: frozenset[str] = frozenset()
    direction: str | None = None
    #: the executable's content: its sha256, hex
    sha256: frozenset[str] = frozenset()
    #: a rule kept in memory only ("until restart", "for N minutes"): when it ends,
    #: as time.monotonic(); None: never
    expires: float | None = None
    #: where it came from, for messages: "file:line"
    origin: str = ""
    source: dict[str, Any] = field(default_factory=dict)
    #: (its index, what deciding by it says): made once, not on every cache miss
    _decision: tuple[int | None, Decision] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    #: each list of patterns as one regex's match (None: no such criterion), and whether
    #: any connection criterion is set: made once, so a cache miss runs one regex per
    #: criterion and skips the checks a file rule never has
    _path: Match | None = field(default=None, init=False, repr=False, compare=False)
    _exe: Match | None = field(default=None, init=False, repr=False, compare=False)
    _ancestor: Match | None = field(default=None, init=False, repr=False, compare=False)
    _net: bool = field(default=False, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._path = _one_match(self.path)
        self._exe = _one_match(self.exe)
        self._ancestor = _one_match(self.ancestors)
        self._net = bool(
            self.protocols
            or self.direction
            or self.ports
            or self.interfaces
            or self.hosts
            or self.addresses
            or self.cmdline
        )

    def decision(self, index: int | None) -> Decision:
        """What deciding by this rule says, named by its name, else by where it is
        (``index`` in the rules files; None for a rule kept in memory)."""
        made = self._decision
        if made is None or made[0] != index:
            where = self.origin if index is None else f"rule {index + 1} ({self.origin})"
            file, _, line = self.origin.rpartition(":")
            why = {
                "by": "rule",
                "rule": self.name or where,
                "action": self.action,
                # a rule from a file: its file and line; one kept in memory: for how long
                **({"file": file, "line": int(line)} if line.isdigit() else {"kept": self.origin}),
                "fields": {k: v for k, v in self.source.items() if k not in ("action", "name")},
            }
            made = self._decision = (index, Decision(self.action, self.name or where, why))
        return made[1]

    def matches(self, subject: Subject) -> bool:
        if self.kinds and subject.kind not in self.kinds:
            return False
        if self._path is not None and (subject.path is None or not self._path(subject.path)):
            return False
        if self._exe is not None and (subject.exe is None or not self._exe(subject.exe)):
            return False
        if self.uids and subject.uid not in self.uids:
            return False
        if self.sha256 and subject.exe_sha256 not in self.sha256:
            return False  # an unknown hash matches no sha256 rule
        if self.gids and not (self.gids & (subject.groups | {subject.gid})):
            return False
        ancestor = self._ancestor
        if ancestor is not None and not any(ancestor(exe) for exe in subject.ancestors):
            return False
        return not self._net or self._matches_net(subject)

    def _matches_net(self, subject: Subject) -> bool:
        if self.protocols and subject.protocol not in self.protocols:
            return False
        if self.direction and subject.direction != self.direction:
            return False
        if self.ports and not (
            subject.port is not None and any(lo <= subject.port <= hi for lo, hi in self.ports)
        ):
            return False
        if self.interfaces and subject.interface not in self.interfaces:
            return False
        if self.hosts and not (
            subject.host is not None and any(p.match(subject.host) for p in self.hosts)
        ):
            return False
        if self.addresses:
            if subject.address is None:
                return False
            address = ipaddress.ip_address(subject.address)
            if not any(address in net for net in self.addresses):
                return False
        return not self.cmdline or (
            subject.cmdline is not None and any(p.match(subject.cmdline) for p in self.cmdline)
        )


def _one_match(patterns: tuple[re.Pattern[str], ...]) -> Match | None:
    """Several anchored patterns as one regex's match: any of them, in one call."""
    if not patterns:
        return None
    if len(patterns) == 1:
        return patterns[0].match
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns)).match


@dataclass(frozen=True)
class Decision:
    action: str
    #: the rule that decided, or "default"
    rule: str
    #: why, for the event and `kport query --why`: ``by`` "rule" (its name, where it is,
    #: its fields) or "default" (the default action); made once per rule, never changed
    why: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


def _default(action: str) -> Decision:
    return Decision(
        action, "default", {"by": "default", "action": action, "reason": "no rule matched"}
    )


_DEFAULT_DECISIONS: Final = {action: _default(action) for action in NET_ACTIONS}


def _ids(values: Any, what: str, lookup: Any) -> frozenset[int]:
    out: set[int] = set()
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(f"{what} must be names or numbers, not {value!r}")
        if isinstance(value, int):
            out.add(value)
            continue
        try:
            out.add(lookup(value))
        except KeyError:
            raise ValueError(f"{what}: no such name {value!r} on this machine") from None
    return frozenset(out)


def _strings(data: Mapping[str, Any], key: str) -> list[str]:
    value = data.get(key, [])
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} must be a string or a list of strings")
    return value


def _ports(values: Any) -> tuple[tuple[int, int], ...]:
    if not isinstance(values, list):
        values = [values]
    out: list[tuple[int, int]] = []
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            low = high = value
        elif isinstance(value, str) and re.fullmatch(r"\d+(-\d+)?", value.strip()):
            low_s, _, high_s = value.strip().partition("-")
            low, high = int(low_s), int(high_s or low_s)
        else:
            raise ValueError(f'ports are numbers or ranges like "8000-8100", not {value!r}')
        if not 0 <= low <= high <= 65535:
            raise ValueError(f"port range {value!r} is outside 0-65535 or backwards")
        out.append((low, high))
    return tuple(out)


def _networks(values: list[str]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    out = []
    for value in values:
        try:
            out.append(ipaddress.ip_network(value, strict=False))
        except ValueError:
            raise ValueError(f"addresses: {value!r} is not an IP address or CIDR") from None
    return tuple(out)


def _sha256s(values: list[str]) -> frozenset[str]:
    out = set()
    for value in values:
        if not re.fullmatch(r"[0-9a-fA-F]{64}", value):
            raise ValueError(f"sha256: {value!r} is not a sha256 (64 hex digits)")
        out.add(value.lower())
    return frozenset(out)


def _wildcards(values: list[str]) -> tuple[re.Pattern[str], ...]:
    """Shell-style patterns where ``*`` matches anything (command lines, host names)."""
    return tuple(re.compile(fnmatch.translate(v)) for v in values)


def make_rule(
    data: Mapping[str, Any], origin: str = "", kinds: Iterable[str] = (), domain: str = "file"
) -> Rule:
    """A Rule from its mapping; anything wrong is a ValueError saying what."""
    known = _FIELDS[domain]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (known: {', '.join(known)})")
    actions = NET_ACTIONS if domain == "net" else ACTIONS
    action = data.get("action")
    if not isinstance(action, str) or action not in actions:
        raise ValueError(f"action must be one of {', '.join(actions)}, not {action!r}")
    direction = data.get("direction")
    if direction not in (None, "in", "out"):
        raise ValueError(f"direction must be in or out, not {direction!r}")
    known_kinds = frozenset(kinds)
    rule_kinds = frozenset(_strings(data, "kinds"))
    if known_kinds and rule_kinds - known_kinds:
        bad = sorted(rule_kinds - known_kinds)
        raise ValueError(f"unknown kinds {bad} (known: {', '.join(sorted(known_kinds))})")
    name = data.get("name", "")
    if not isinstance(name, str):
        raise ValueError(f"name must be a string, not {name!r}")
    users = data.get("users", [])
    groups = data.get("groups", [])
    if not isinstance(users, list) or not isinstance(groups, list):
        raise ValueError("users and groups must be lists")
    return Rule(
        action=action,
        name=name,
        kinds=rule_kinds,
        path=tuple(glob_regex(p) for p in _strings(data, "path")),
        exe=tuple(glob_regex(p) for p in _strings(data, "exe")),
        uids=_ids(users, "users", lambda n: pwd.getpwnam(n).pw_uid),
        gids=_ids(groups, "groups", lambda n: grp.getgrnam(n).gr_gid),
        ancestors=tuple(glob_regex(p) for p in _strings(data, "ancestors")),
        cmdline=_wildcards(_strings(data, "cmdline")),
        hosts=_wildcards([h.lower() for h in _strings(data, "hosts")]),
        addresses=_networks(_strings(data, "addresses")),
        ports=_ports(data.get("ports", [])),
        protocols=frozenset(p.lower() for p in _strings(data, "protocols")),
        interfaces=frozenset(_strings(data, "interfaces")),
        direction=direction,
        sha256=_sha256s(_strings(data, "sha256")),
        origin=origin,
        source=dict(data),
    )


def _rule_lines(text: str) -> list[int]:
    """The line number of each ``[[rule]]`` header, in order."""
    return [
        number
        for number, line in enumerate(text.splitlines(), 1)
        if line.strip().replace(" ", "").startswith("[[rule]]")
    ]


def parse(
    text: str, origin: str, kinds: Iterable[str] = (), domain: str = "file"
) -> tuple[list[Rule], str | None]:
    """Rules and the default action (None if the file sets none) from a file's text."""
    actions = NET_ACTIONS if domain == "net" else ACTIONS
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise RulesError(f"{origin}: {err}") from err
    unknown = sorted(set(data) - {"default", "rule"})
    if unknown:
        raise RulesError(f"{origin}: unknown top-level key {unknown[0]!r} (known: default, rule)")
    default = data.get("default")
    if default is not None and default not in actions:
        line = next(
            (n for n, t in enumerate(text.splitlines(), 1) if t.strip().startswith("default")),
            0,
        )
        raise RulesError(
            f"{origin}:{line}: default must be one of {', '.join(actions)}, not {default!r}"
        )
    entries = data.get("rule", [])
    if not isinstance(entries, list):
        raise RulesError(f"{origin}: 'rule' must be an array of tables: [[rule]]")
    lines = _rule_lines(text)
    rules: list[Rule] = []
    for index, entry in enumerate(entries):
        line = lines[index] if index < len(lines) else 0
        where = f"{origin}:{line}"
        try:
            if not isinstance(entry, dict):
                raise ValueError("a rule must be a table")
            rules.append(make_rule(entry, where, kinds, domain))
        except ValueError as err:
            raise RulesError(f"{where}: rule {index + 1}: {err}") from None
    return rules, default


class RuleSet:
    """Ordered rules from files, first match wins, with a decision cache.

    ``paths`` are read in order (a "remembered" file first, typically); the last
    ``default`` given wins, else ``default``. :meth:`reload_if_changed` swaps in new rules
    only when every file loads, so a bad edit keeps the rules in force.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]] = (),
        *,
        default: str = "allow",
        kinds: Iterable[str] = (),
        domain: str = "file",
    ) -> None:
        actions = NET_ACTIONS if domain == "net" else ACTIONS
        if default not in actions:
            raise ValueError(f"default must be one of {', '.join(actions)}, not {default!r}")
        self.domain = domain
        self.paths = [Path(p) for p in paths]
        self.kinds = frozenset(kinds)
        self.base_default = default
        self.default = default
        self.rules: list[Rule] = []
        #: rules held in memory only, before the files' rules ("until restart", "for N
        #: minutes"); the soonest end of one, as time.monotonic()
        self.temporary: list[Rule] = []
        self._next_expiry: float | None = None
        self._checked = 0.0
        #: bumped on every change; cached decisions from another generation are stale
        self.generation = 0
        self.error: str | None = None
        self._stamps: dict[Path, tuple[int, int] | None] = {}
        self._cache: OrderedDict[Any, Decision] = OrderedDict()
        self.hits = 0
        self.misses = 0
        if self.paths:
            self.load()

    def _stamp(self, path: Path) -> tuple[int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def load(self) -> None:
        """Load every file (a missing one is empty); raise RulesError and keep the old
        rules if any file is bad."""
        rules: list[Rule] = []
        default = self.base_default
        stamps: dict[Path, tuple[int, int] | None] = {}
        for path in self.paths:
            stamps[path] = self._stamp(path)
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            except OSError as err:
                raise RulesError(f"{path}: cannot read: {err.strerror}") from err
            file_rules, file_default = parse(text, str(path), self.kinds, self.domain)
            rules += file_rules
            default = file_default or default
        self.rules, self.default = rules, default
        self._stamps = stamps
        self.error = None
        self.generation += 1
        self._cache.clear()

    def reload_if_due(self, now: float | None = None) -> bool:
        """:meth:`reload_if_changed`, at most once per CHECK_INTERVAL_S (``now`` is
        time.monotonic(), if the caller has it)."""
        now = time.monotonic() if now is None else now
        if now - self._checked < CHECK_INTERVAL_S:
            return False
        self._checked = now
        return self.reload_if_changed()

    def status(self) -> dict[str, Any]:
        """How many rules are in force, the last load error, and the cache's counts."""
        return {
            "rules": len(self.rules) + len(self.temporary),
            "rules_error": self.error,
            "cache": {"hits": self.hits, "misses": self.misses},
        }

    def reload_if_changed(self) -> bool:
        """Reload when a file changed; True if new rules are in force. A bad file is
        logged (file, line, problem) and the rules in force stay."""
        if all(self._stamp(p) == self._stamps.get(p) for p in self.paths):
            return False
        try:
            self.load()
        except RulesError as err:
            if str(err) != self.error:
                log.error("rules not reloaded, the ones in force stay: %s", err)
            self.error = str(err)
            self._stamps = {p: self._stamp(p) for p in self.paths}
            return False
        log.info("rules reloaded: %d rules, default %s", len(self.rules), self.default)
        return True

    def cached(self, cache_key: Any) -> Decision | None:
        """The decision cached for ``cache_key``, if any (the subject need not be built)."""
        if self._next_expiry is not None and time.monotonic() >= self._next_expiry:
            self._expire()
        cached = self._cache.get(cache_key)
        if cached is not None:
            self.hits += 1
            self._cache.move_to_end(cache_key)
        return cached

    def decide(self, subject: Subject, cache_key: Any = None) -> Decision:
        """The first matching rule's action, or the default. With ``cache_key`` (the
        process identity, path and kind), a repeated question is answered from cache."""
        if cache_key is not None:
            cached = self.cached(cache_key)
            if cached is not None:
                return cached
        return self.decide_afresh(subject, cache_key)

    def decide_afresh(self, subject: Subject, cache_key: Any = None) -> Decision:
        """:meth:`decide` for a caller that found ``cache_key`` missing from the cache
        already (:meth:`cached`): the rules answer, and the answer is cached."""
        self.misses += 1
        decision = _DEFAULT_DECISIONS.get(self.default) or _default(self.default)
        for rule in self.temporary:
            if rule.matches(subject):
                decision = rule.decision(None)
                break
        else:
            for index, rule in enumerate(self.rules):
                if rule.matches(subject):
                    decision = rule.decision(index)
                    break
        if cache_key is not None:
            self._cache[cache_key] = decision
            if len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return decision

    def add_temporary(self, rule: Mapping[str, Any], minutes: float | None = None) -> Rule:
        """Put ``rule`` before every other, in memory only: until the daemon stops, or
        for ``minutes``. The cache is dropped: decisions made before it may differ."""
        origin = "until restart" if minutes is None else f"for {minutes:g} minutes"
        made = make_rule(rule, origin, self.kinds, self.domain)
        if minutes is not None:
            made.expires = time.monotonic() + minutes * 60
            if self._next_expiry is None or made.expires < self._next_expiry:
                self._next_expiry = made.expires
        self.temporary.insert(0, made)
        self.generation += 1
        self._cache.clear()
        return made

    def _expire(self) -> None:
        now = time.monotonic()
        self.temporary = [r for r in self.temporary if r.expires is None or r.expires > now]
        ends = [r.expires for r in self.temporary if r.expires is not None]
        self._next_expiry = min(ends) if ends else None
        self.generation += 1
        self._cache.clear()
        log.info("rules: a temporary rule ended; %d remain", len(self.temporary))

    def listing(self, editable: str | os.PathLike[str]) -> dict[str, Any]:
        """Every rule in force, for an editor: those of ``editable`` (kport's own file,
        the one "remember" writes) with the version :meth:`save` checks, the others read
        only with their origin, the temporary ones with the minutes they have left."""
        target = Path(editable)
        try:
            text = target.read_text()
        except FileNotFoundError:
            text = ""
        except OSError as err:
            raise RulesError(f"{target}: cannot read: {err.strerror}") from err
        own, _ = parse(text, str(target), self.kinds, self.domain)
        now = time.monotonic()
        prefix = f"{target}:"
        return {
            "domain": self.domain,
            "default": self.default,
            "actions": list(NET_ACTIONS if self.domain == "net" else ACTIONS),
            "fields": list(_FIELDS[self.domain]),
            "kinds": sorted(self.kinds),
            "error": self.error,
            "editable": {
                "path": str(target),
                "version": _version(text),
                "rules": [rule.source for rule in own],
            },
            "others": [
                {"origin": rule.origin, "rule": rule.source}
                for rule in self.rules
                if not rule.origin.startswith(prefix)
            ],
            "temporary": [
                {
                    "origin": rule.origin,
                    "rule": rule.source,
                    "minutes_left": None
                    if rule.expires is None
                    else round(max(0.0, rule.expires - now) / 60, 2),
                }
                for rule in self.temporary
            ],
        }

    def save(self, editable: str | os.PathLike[str], rules: Sequence[Any], version: str) -> None:
        """Replace the rules of ``editable`` with ``rules`` (mappings, in order), if the
        file is still at ``version``; every rule is checked before anything is written,
        the file is replaced atomically (its ``default`` kept, its comments not) and the
        rules reloaded. A bad rule or a changed file raises RulesError saying which."""
        target = Path(editable)
        blocks = []
        for index, rule in enumerate(rules):
            if not isinstance(rule, Mapping):
                raise RulesError(f"rule {index + 1}: a rule must be a mapping, not {rule!r:.40}")
            try:
                make_rule(rule, f"rule {index + 1}", self.kinds, self.domain)
                blocks.append(_rule_block(rule))
            except ValueError as err:
                raise RulesError(f"rule {index + 1}: {err}") from None
        try:
            old = target.read_text()
        except FileNotFoundError:
            old = ""
        if _version(old) != version:
            raise RulesError(
                f"{target} changed since it was read (version {_version(old)}, not "
                f"{version!r:.20}): read the rules again and redo the edit"
            )
        _, default = parse(old, str(target), self.kinds, self.domain)
        head = f"default = {_toml_value(default)}\n\n" if default else ""
        _write_atomically(target, head + "\n".join(blocks))
        self.load()

    def remember(self, path: str | os.PathLike[str], rule: Mapping[str, Any]) -> None:
        """Add ``rule`` at the top of the file ``path`` (atomically) and reload."""
        make_rule(rule, str(path), self.kinds, self.domain)  # refuse a bad one before writing
        target = Path(path)
        try:
            old = target.read_text()
        except FileNotFoundError:
            old = ""
        block = _rule_block(rule)
        head, sep, rest = old.partition("[[rule]]")
        text = f"{head}{block}\n{sep}{rest}" if sep else f"{old}{block}"
        _write_atomically(target, text)
        self.load()


def _rule_block(rule: Mapping[str, Any]) -> str:
    """One rule as a TOML ``[[rule]]`` table."""
    return "[[rule]]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in rule.items())


def _version(text: str) -> str:
    """A rules file's version, as an editor saw it: a hash of its text."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _write_atomically(target: Path, text: str) -> None:
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, target)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"a rule value must be a string, number, boolean or list, not {value!r}")
