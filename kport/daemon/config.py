"""The daemon's configuration: TOML in, one validated `Config` out, defaults built in."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import tomli_w

from kport.daemon.redact import RedactError, compile_patterns
from kport.rules import ACTIONS, NET_ACTIONS
from kport.sources.file import NOTIFY_KINDS, PERMISSION_KINDS
from kport.sources.hashes import CACHE_ENTRIES, INLINE_BUDGET_S, INLINE_MAX_BYTES, QUEUE_LIMIT
from kport.sources.net import MAX_QUEUES, VERDICTS, queue_count
from kport.sources.proc import BACKENDS, BATCH_ABOVE, BATCH_WINDOW_S
from kport.sources.proc_bpf import RING_DEFAULT, size_error


class ConfigError(ValueError):
    """The configuration file is not valid; the message names the file and the key."""


@dataclass
class PortConfig:
    users: list[str | int] = field(default_factory=lambda: ["root"])
    groups: list[str | int] = field(default_factory=list)
    queue_limit: int = 8192
    max_connections: int = 64


@dataclass
class ProcConfig:
    enabled: bool = True
    #: auto (eBPF where it loads, else the proc connector), bpf, connector
    backend: str = "auto"
    threads: bool = False
    #: eBPF: bytes of each exec's argv read in the kernel, at most (longer: truncated)
    argv_max: int = 4096
    #: eBPF: the ring buffer's size in KiB, a power of two (full: the kernel counts what
    #: it drops, and a lost event says how many)
    ring_kb: int = RING_DEFAULT // 1024
    #: above batch_above events/s, read the kernel's events at most once per this
    #: window: a storm costs one wake-up per batch, at up to this much more latency (0: off)
    batch_window_ms: float = BATCH_WINDOW_S * 1000
    batch_above: int = BATCH_ABOVE
    #: daemon-side filters: an event is sent when it passes every non-empty one
    kinds: list[str] = field(default_factory=list)
    uids: list[int] = field(default_factory=list)
    exe: list[str] = field(default_factory=list)


@dataclass
class FileConfig:
    enabled: bool = False
    #: paths to watch: a file; a directory for its entries; a mount point whole
    paths: list[str] = field(default_factory=list)
    #: mounts to watch whole, wherever these paths are
    mounts: list[str] = field(default_factory=list)
    #: filesystems to watch whole (every mount of them), named by a path on each
    filesystems: list[str] = field(default_factory=list)
    #: permission events decided by the rules: open_perm, open_exec_perm, access_perm
    permissions: list[str] = field(default_factory=lambda: ["open_perm", "open_exec_perm"])
    #: notifications reported: open, open_exec, access, modify, close_write,
    #: close_nowrite, create, delete, move, attrib
    events: list[str] = field(
        default_factory=lambda: ["close_write", "create", "delete", "move", "attrib"]
    )
    #: rules files, read in order after the remembered rules; reloaded on change
    rules: list[str] = field(default_factory=list)
    #: where "remember" writes rules; "" is <state dir>/file-remembered.toml
    remembered: str = ""
    #: the action when no rule matches: allow | deny | ask | log
    default_action: str = "allow"
    #: how long a decision client has to answer
    decision_deadline_s: float = 10.0
    #: the verdict when it does not answer in time, goes away, or none is connected.
    #: "allow" (fail-open) keeps the machine usable when the decider is gone.
    default_verdict: str = "allow"


@dataclass
class NetConfig:
    enabled: bool = False
    #: the NFQUEUE number kport reads (another firewall may hold one: choose another)
    queue: int = 4747
    #: how many queues, numbered from ``queue``: each CPU's packets go to one, read by a
    #: thread on that CPU. 0: one per CPU, at most 16
    queues: int = 0
    #: how packets reach the queue: auto (nft if its queue expression exists, else
    #: iptables-nft), nft, iptables
    backend: str = "auto"
    #: decide new inbound connections too (outbound ones always)
    inbound: bool = False
    #: decide connections over the loopback interface too
    loopback: bool = False
    #: read DNS answers, so that events and rules know host names
    dns: bool = True
    #: with kport not reading (stopped, crashed) or its queue full, packets pass
    #: (true) or are dropped (false: fail-closed, nothing leaves without kport)
    fail_open: bool = True
    #: packets the kernel holds for kport at once, per queue
    queue_length: int = 4096
    #: rules files, read in order after the remembered rules; reloaded on change
    rules: list[str] = field(default_factory=list)
    #: where "always" answers write rules; "" is <state dir>/net-remembered.toml
    remembered: str = ""
    #: the action when no rule matches: allow | deny | reject | ask | log
    default_action: str = "allow"
    #: how long a decision client has to answer
    decision_deadline_s: float = 10.0
    #: the verdict when it does not answer in time, goes away, or none is connected:
    #: allow | deny | reject
    default_verdict: str = "allow"


@dataclass
class JournalConfig:
    enabled: bool = True
    #: the database file; "" is <state dir>/journal.db
    path: str = ""
    #: retention: events older than this many days are removed
    max_age_days: float = 30.0
    #: retention: the oldest events are removed while the events take more than this
    max_size_mb: int = 1024
    #: events waiting to be written, at most; beyond it the journal records a gap
    queue_limit: int = 200_000
    #: how often queued events are committed: after a crash, at most this much is missing
    #: from the journal (and said to be). Shorter costs delivery throughput.
    commit_interval_ms: int = 200


@dataclass
class ExportConfig:
    """[export]: this host's events to a NATS JetStream stream (`kport export`)."""

    #: the NATS server(s), comma-separated; "" exports nothing
    url: str = ""
    #: this host's name in the fleet; "" is the machine's host name
    host: str = ""
    #: the stream; created when missing (file storage), used as it is when an operator
    #: made it (its subjects must take kport.<host>.>)
    stream: str = "KPORT"
    #: for a stream kport creates: its replicas (3 on a 3-node cluster), and its limits
    replicas: int = 1
    max_age_days: float = 30.0
    max_size_mb: int = 10240
    #: messages published and not yet acknowledged, at most
    window: int = 512
    #: how long an acknowledgement may take before the window is sent again
    ack_timeout_s: float = 5.0
    #: credentials, never on the command line: user and password, or a token, or a
    #: .creds file (JWT and nkey), or an nkey seed file
    user: str = ""
    password: str = ""
    token: str = ""
    creds: str = ""
    nkey: str = ""
    #: TLS: a CA to trust, and a client certificate and key if the server asks for one
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    #: the exporter's niceness (0 to 19): a shipper in the background, it yields the
    #: CPU to the daemon and its local clients whenever they want it
    nice: int = 10


@dataclass
class RedactConfig:
    """[redact]: secrets in command lines replaced by *** before events leave the daemon."""

    enabled: bool = True
    #: the built-in rules: --password=..., --token ..., mysql's -p..., a URL's password,
    #: an Authorization header, PGPASSWORD=... (see kport/daemon/redact.py)
    defaults: bool = True
    #: regular expressions searched in each argument: the match's one group (else the
    #: whole match) is replaced
    patterns: list[str] = field(default_factory=list)


@dataclass
class MetricsConfig:
    """[metrics]: the daemon's counts for Prometheus on /metrics (`kport serve --metrics`)."""

    #: HOST:PORT to serve /metrics on; "" serves none
    listen: str = ""
    #: allow an address that is not loopback (the metrics name this host's clients)
    public: bool = False


@dataclass
class HashConfig:
    """[hash]: the sha256 of executables on exec, file and net events (sources/hashes.py)."""

    enabled: bool = True
    #: files up to this size are hashed on the event path (within inline_budget_ms);
    #: larger ones by a worker, their hash in a later ``hash`` event
    inline_max_mb: float = INLINE_MAX_BYTES / (1 << 20)
    inline_budget_ms: float = INLINE_BUDGET_S * 1000
    #: files whose hash is kept, the least recently used dropped first (counted)
    cache_entries: int = CACHE_ENTRIES
    #: files waiting for the worker, at most; full: the event says so (counted)
    queue_limit: int = QUEUE_LIMIT


@dataclass
class DaemonConfig:
    runtime_dir: str = ""
    state_dir: str = ""
    log_format: str = "text"
    log_level: str = "info"


@dataclass
class Config:
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    proc: ProcConfig = field(default_factory=ProcConfig)
    journal: JournalConfig = field(default_factory=JournalConfig)
    file: FileConfig = field(default_factory=FileConfig)
    net: NetConfig = field(default_factory=NetConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    redact: RedactConfig = field(default_factory=RedactConfig)
    hash: HashConfig = field(default_factory=HashConfig)
    ports: dict[str, PortConfig] = field(
        default_factory=lambda: {
            "proc": PortConfig(groups=["kport"]),
            "journal": PortConfig(groups=["kport"]),
            "objects": PortConfig(groups=["kport"]),
            "file": PortConfig(groups=["kport"]),
            "file-decide": PortConfig(groups=["kport-admin"]),
            "net": PortConfig(groups=["kport"]),
            "net-decide": PortConfig(groups=["kport-admin"]),
            "control": PortConfig(),
        }
    )

    def to_toml(self) -> str:
        return tomli_w.dumps(asdict(self))


PROC_KINDS = frozenset(
    {
        "snapshot",
        "fork",
        "clone",
        "exec",
        "exit",
        "uid",
        "gid",
        "sid",
        "comm",
        "ptrace",
        "coredump",
        "lost",
    }
)


def _fill(target: Any, data: dict[str, Any], where: str) -> None:
    known = {f.name: f for f in fields(target)}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(known)})")
        current = getattr(target, key)
        if isinstance(current, bool):
            ok = isinstance(value, bool)
        elif isinstance(current, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(current, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
        elif isinstance(current, str):
            ok = isinstance(value, str)
        elif isinstance(current, list):
            ok = isinstance(value, list)
        else:
            ok = True
        if not ok:
            raise ConfigError(f"{where}.{key}: expected {type(current).__name__}, got {value!r}")
        setattr(target, key, float(value) if isinstance(current, float) else value)


#: the sections that are one table each
_SECTIONS = ("daemon", "proc", "journal", "file", "net", "export", "metrics", "redact", "hash")


def load(path: str | Path | None) -> Config:
    """The effective configuration: built-in defaults, overridden by the file if given."""
    config = Config()
    if path is None:
        return config
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: {err}") from err
    for section, value in data.items():
        if section == "ports":
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [ports] must be a table")
            for name, port in value.items():
                if not isinstance(port, dict):
                    raise ConfigError(f"{path}: [ports.{name}] must be a table")
                target = config.ports.setdefault(name, PortConfig())
                _fill(target, port, f"{path}: ports.{name}")
        elif section in _SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: [{section}] must be a table")
            _fill(getattr(config, section), value, f"{path}: {section}")
        else:
            raise ConfigError(
                f"{path}: unknown section [{section}] "
                "(known: daemon, proc, journal, file, net, export, metrics, redact, hash, ports)"
            )
    bad = set(config.proc.kinds) - PROC_KINDS
    if bad:
        raise ConfigError(f"{path}: proc.kinds: unknown kinds {sorted(bad)}")
    if not 0 <= config.proc.batch_window_ms <= 100:
        raise ConfigError(f"{path}: proc.batch_window_ms must be 0 to 100")
    if config.proc.backend not in BACKENDS:
        raise ConfigError(f"{path}: proc.backend must be {', '.join(BACKENDS)}")
    wrong = size_error(config.proc.argv_max, config.proc.ring_kb * 1024)
    if wrong is not None:
        raise ConfigError(f"{path}: proc (argv_max, ring_kb): {wrong}")
    if config.hash.cache_entries < 1 or config.hash.queue_limit < 1:
        raise ConfigError(f"{path}: hash.cache_entries and hash.queue_limit must be >= 1")
    if config.hash.inline_max_mb < 0 or config.hash.inline_budget_ms <= 0:
        raise ConfigError(f"{path}: hash.inline_max_mb must be >= 0, inline_budget_ms > 0")
    if config.proc.batch_above < 0:
        raise ConfigError(f"{path}: proc.batch_above must be >= 0 (events per second)")
    if config.journal.max_age_days <= 0 or config.journal.max_size_mb <= 0:
        raise ConfigError(f"{path}: journal.max_age_days and journal.max_size_mb must be > 0")
    if config.journal.queue_limit < 1:
        raise ConfigError(f"{path}: journal.queue_limit must be >= 1")
    if not 1 <= config.journal.commit_interval_ms <= 60_000:
        raise ConfigError(f"{path}: journal.commit_interval_ms must be 1 to 60000")
    check_file(config.file, str(path))
    check_net(config.net, str(path))
    check_export(config.export, str(path))
    check_redact(config.redact, str(path))
    if config.daemon.log_format not in ("text", "json"):
        raise ConfigError(f"{path}: daemon.log_format must be 'text' or 'json'")
    return config


def _one_of(values: tuple[str, ...]) -> str:
    return ", ".join(values[:-1]) + " or " + values[-1]


def _check_decisions(
    cfg: FileConfig | NetConfig,
    section: str,
    where: str,
    actions: tuple[str, ...],
    verdicts: tuple[str, ...],
) -> None:
    """What every deciding section has: a default action, a default verdict, a deadline."""
    if cfg.default_action not in actions:
        raise ConfigError(f"{where}: {section}.default_action must be {_one_of(actions)}")
    if cfg.default_verdict not in verdicts:
        raise ConfigError(f"{where}: {section}.default_verdict must be {_one_of(verdicts)}")
    if not 0.01 <= cfg.decision_deadline_s <= 3600:
        raise ConfigError(f"{where}: {section}.decision_deadline_s must be 0.01 to 3600 seconds")


def check_file(cfg: FileConfig, where: str) -> None:
    """Raise ConfigError for a [file] section that cannot work."""
    _check_decisions(cfg, "file", where, ACTIONS, ("allow", "deny"))
    for key, known in (("permissions", PERMISSION_KINDS), ("events", NOTIFY_KINDS)):
        bad = [k for k in getattr(cfg, key) if k not in known]
        if bad:
            raise ConfigError(
                f"{where}: file.{key}: unknown kinds {bad} (known: {', '.join(known)})"
            )


def check_net(cfg: NetConfig, where: str) -> None:
    """Raise ConfigError for a [net] section that cannot work."""
    _check_decisions(cfg, "net", where, NET_ACTIONS, VERDICTS)
    if cfg.backend not in ("auto", "nft", "iptables"):
        raise ConfigError(f"{where}: net.backend must be auto, nft or iptables")
    if not 0 <= cfg.queue <= 65535:
        raise ConfigError(f"{where}: net.queue must be 0 to 65535")
    if not 0 <= cfg.queues <= MAX_QUEUES:
        raise ConfigError(f"{where}: net.queues must be 0 (one per CPU) to {MAX_QUEUES}")
    count = queue_count(cfg.queues)
    if cfg.queue + count - 1 > 65535:
        raise ConfigError(
            f"{where}: net.queue {cfg.queue} and {count} queues go past "
            "NFQUEUE 65535: choose a lower net.queue"
        )
    if not 1 <= cfg.queue_length <= 1_000_000:
        raise ConfigError(f"{where}: net.queue_length must be 1 to 1000000")


def check_export(cfg: ExportConfig, where: str) -> None:
    if cfg.url and "@" in cfg.url.split("//", 1)[-1].split("/", 1)[0]:
        raise ConfigError(
            f"{where}: export.url holds credentials: put them in export.user and "
            "export.password (or token, creds, nkey), where no command line shows them"
        )
    if not 1 <= cfg.replicas <= 5:
        raise ConfigError(f"{where}: export.replicas must be 1 to 5")
    if not 0 <= cfg.nice <= 19:
        raise ConfigError(f"{where}: export.nice must be 0 to 19")
    if not 1 <= cfg.window <= 100_000:
        raise ConfigError(f"{where}: export.window must be 1 to 100000")
    if cfg.max_age_days <= 0 or cfg.max_size_mb <= 0 or cfg.ack_timeout_s <= 0:
        raise ConfigError(
            f"{where}: export.max_age_days, export.max_size_mb and export.ack_timeout_s must be > 0"
        )


def check_redact(cfg: RedactConfig, where: str) -> None:
    """Raise ConfigError naming a [redact] pattern that is not a usable regular expression."""
    if not all(isinstance(p, str) for p in cfg.patterns):
        raise ConfigError(f"{where}: redact.patterns must be strings")
    try:
        compile_patterns(cfg.patterns)
    except RedactError as err:
        raise ConfigError(f"{where}: redact.patterns: {err}") from err
