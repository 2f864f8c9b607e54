"""The eBPF proc backend: loads ``proc_bpf.bpf.o`` through libbpf, attaches it to the
sched_process_* tracepoints, and reads its ring buffer; and the layout of its records.

Nothing else in kport calls libbpf. Its C API is reached through ctypes over Debian's
``libbpf.so.1``: opening, sizing and loading the object, attaching its programs (tp_btf,
else raw_tp on the same tracepoints), the maps, and the ring buffer. The ring is drained
with the GIL held (``PyDLL``) so its per-record callback does not trade the GIL back and
forth; the wait for data is a plain ``poll`` on the ring's fd, with the GIL released.

The object is built from ``proc_bpf.bpf.c`` by ``make`` (see the Makefile); it is never
committed. Where it is missing or the kernel refuses it, :class:`BpfUnavailable` says why
in one line.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import select
import struct
from pathlib import Path
from typing import Any, Final, NamedTuple

from kport.errors import KportError

OBJECT: Final = Path(__file__).with_name("proc_bpf.bpf.o")
SOURCE: Final = Path(__file__).with_name("proc_bpf.bpf.c")

KIND_FORK: Final = 1
KIND_EXEC: Final = 2
KIND_EXIT: Final = 3
FLAG_THREAD: Final = 1
FLAG_ARGV_TRUNCATED: Final = 2
FLAG_PATH_TRUNCATED: Final = 4
FLAG_ARGV_UNREAD: Final = 8
#: the largest argv a record can carry (ARGV_CAP in the C source)
ARGV_CAP: Final = 32768
#: the smallest ring the kernel takes (a page) and the default (room for ~10,000 execs)
RING_MIN: Final = 4096
RING_DEFAULT: Final = 16 << 20

#: struct event's fixed head; ``data`` follows it (see proc_bpf.bpf.c)
HEAD: Final = struct.Struct("=BBHIQQQQIIIIQIIIIQIIIHHHHHHII16s")
_SETTINGS: Final = struct.Struct("=IIII")  # argv_max, threads, quiet, pad
_COUNTERS: Final = struct.Struct("=QQ")  # attempts, dropped
_ZERO_KEY: Final = (ctypes.c_uint32 * 1)(0)

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
_PRINT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_PROGRAMS: Final = ("exec", "fork", "exit")
#: the programs' flavours, in the order they are tried: typed tracepoints, then the same
#: tracepoints untyped where those will not load
FLAVOURS: Final = {"btf": "tp_btf", "raw": "raw_tp"}


def size_error(argv_max: int, ring_bytes: int) -> str | None:
    """What is wrong with these sizes (see ProcBpf), or None."""
    if not 0 <= argv_max <= ARGV_CAP:
        return f"argv_max must be 0 to {ARGV_CAP} bytes, not {argv_max}"
    if ring_bytes < RING_MIN or ring_bytes & (ring_bytes - 1):
        return f"the ring's size must be a power of two of at least {RING_MIN} bytes"
    return None


class BpfUnavailable(KportError):
    """The eBPF backend cannot run here; the message says why (and what would fix it)."""


class Record(NamedTuple):
    """One record of the ring, parsed: the head's fields in its order (see
    proc_bpf.bpf.c), then an exec's strings, bytes as the kernel had them. A tuple: a
    storm makes tens of thousands a second, and a tuple is built in one step."""

    kind: int
    flags: int
    pad0: int
    cpu: int
    cpu_seq: int
    dropped: int  # its CPU's drops before it
    ktime: int  # CLOCK_MONOTONIC ns
    boot_ns: int  # CLOCK_BOOTTIME ns
    pid: int
    tgid: int
    ppid: int
    ns_pid: int
    start_boottime: int  # ns after boot
    uid: int
    euid: int
    gid: int
    egid: int
    cgroup_id: int
    a: int  # fork: parent thread | exec: old pid | exit: wait status
    b: int  # fork: parent process | exec: tty_nr
    argv_size: int
    filename_len: int
    exe_len: int
    cwd_len: int
    cgroup_len: int
    argv_len: int
    pad1: int
    cursor: int
    pad2: int
    comm: bytes  # NUL-padded
    filename: bytes | None = None  # NUL-terminated
    exe: bytes | None = None  # components leaf first: see path_of
    cwd: bytes | None = None  # the same
    cgroup: bytes | None = None  # the same
    argv: bytes | None = None


_NO_STRINGS: Final = (None, None, None, None, None)
_new = tuple.__new__  # Record._make without its Python frame
_KINDS: Final = frozenset((KIND_FORK, KIND_EXEC, KIND_EXIT))


def path_of(raw: bytes) -> bytes:
    """A path as the programs write it (components leaf first, each NUL-terminated) as one
    absolute path."""
    parts = raw.split(b"\0")[:-1]
    parts.reverse()
    return b"/" + b"/".join(parts)


class Texts:
    """Paths and names as text, remembered by their bytes (at most ``limit``, then begun
    anew): a storm runs the same few programs in the same few directories, and rebuilding
    and decoding a path costs more than the rest of its record."""

    def __init__(self, limit: int = 4096) -> None:
        self.limit = limit
        self._paths: dict[bytes, str] = {}
        self._names: dict[bytes, str] = {}

    def path(self, raw: bytes | None) -> str | None:
        """:func:`path_of` ``raw``, decoded (U+FFFD for what is not UTF-8)."""
        if raw is None:
            return None
        text = self._paths.get(raw)  # the usual case, kept to one lookup
        return text if text is not None else self._learn(self._paths, raw, path_of(raw))

    def name(self, raw: bytes | None) -> str | None:
        """``raw`` up to its first NUL, decoded (U+FFFD for what is not UTF-8)."""
        if raw is None:
            return None
        text = self._names.get(raw)
        return text if text is not None else self._learn(self._names, raw, raw.split(b"\0", 1)[0])

    def _learn(self, known: dict[bytes, str], raw: bytes, shaped: bytes) -> str:
        if len(known) >= self.limit:
            known.clear()
        text = known[raw] = shaped.decode(errors="replace")
        return text


def parse(raw: bytes) -> Record:
    """A record's bytes as a :class:`Record`; ValueError if they are not one."""
    if len(raw) < HEAD.size:
        raise ValueError(f"a ring record of {len(raw)} bytes, shorter than its head")
    head = HEAD.unpack_from(raw)
    kind = head[0]
    if kind != KIND_EXEC:
        if kind not in _KINDS:
            raise ValueError(f"a ring record of unknown kind {kind}")
        return _new(Record, head + _NO_STRINGS)
    filename_len, exe_len, cwd_len, cgroup_len, argv_len = head[21:26]
    at = HEAD.size
    end = at + filename_len + exe_len + cwd_len + cgroup_len + argv_len
    if end > len(raw):
        raise ValueError(f"an exec record of {len(raw)} bytes that says it holds {end}")
    # paths stay as written (see Texts): most are the same as the last exec's
    filename = raw[at : at + filename_len]
    at += filename_len
    exe = raw[at : at + exe_len] if exe_len else None
    at += exe_len
    cwd = raw[at : at + cwd_len] if cwd_len else None
    at += cwd_len
    cgroup = raw[at : at + cgroup_len]
    at += cgroup_len
    return _new(Record, (*head, filename, exe, cwd, cgroup, raw[at : at + argv_len]))


def split_argv(raw: bytes) -> list[bytes]:
    """argv's NUL-separated bytes as its arguments, empty ones kept. A whole argv ends with
    one NUL; a truncated one ends inside its last argument, which is kept as far as read."""
    if not raw:
        return []
    return (raw[:-1] if raw.endswith(b"\0") else raw).split(b"\0")


def split_argv_text(text: str) -> list[str]:
    """:func:`split_argv` of argv decoded whole (one decode instead of one per argument)."""
    if not text:
        return []
    return (text[:-1] if text.endswith("\0") else text).split("\0")


def _lib(loader: type[ctypes.CDLL]) -> ctypes.CDLL:
    try:
        lib = loader("libbpf.so.1", use_errno=True)
    except OSError as err:
        raise BpfUnavailable(
            f"libbpf.so.1 cannot be loaded ({err}): install Debian's libbpf1"
        ) from err
    p, i, u, s = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
    signatures: dict[str, tuple[Any, list[Any]]] = {
        "libbpf_set_print": (p, [p]),
        "libbpf_num_possible_cpus": (i, []),
        "bpf_object__open_file": (p, [ctypes.c_char_p, p]),
        "bpf_object__load": (i, [p]),
        "bpf_object__close": (None, [p]),
        "bpf_object__find_map_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_object__find_program_by_name": (p, [p, ctypes.c_char_p]),
        "bpf_program__set_autoload": (i, [p, ctypes.c_bool]),
        "bpf_program__attach": (p, [p]),
        "bpf_link__destroy": (i, [p]),
        "bpf_map__set_max_entries": (i, [p, u]),
        "bpf_map__fd": (i, [p]),
        "bpf_map__update_elem": (i, [p, p, s, p, s, ctypes.c_uint64]),
        "bpf_map__lookup_elem": (i, [p, p, s, p, s, ctypes.c_uint64]),
        "ring_buffer__new": (p, [i, _SAMPLE_FN, p, p]),
        "ring_buffer__consume": (i, [p]),
        "ring_buffer__free": (None, [p]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


class _LibbpfLog:
    """libbpf's messages, kept (the last few) rather than printed: the verifier's verdict
    goes into the one line that says why loading failed. One for the process, never freed:
    libbpf keeps the callback for good."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lines: list[str] = []
        libc = ctypes.CDLL(None)
        self._vsnprintf = libc.vsnprintf
        self._vsnprintf.argtypes = [
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_char_p,
            ctypes.c_void_p,
        ]
        # a va_list is passed as a pointer on x86_64 alone; elsewhere keep the format
        self._formats = platform.machine() == "x86_64"
        self.callback = _PRINT_FN(self._print)
        lib.libbpf_set_print(ctypes.cast(self.callback, ctypes.c_void_p))

    def _print(self, level: int, fmt: bytes | None, args: int | None) -> int:
        if fmt is None:
            return 0
        text = fmt
        if self._formats:
            buf = ctypes.create_string_buffer(512)
            self._vsnprintf(buf, len(buf), fmt, args)
            text = buf.value
        line = text.decode(errors="replace").strip()
        if line:
            self.lines = [*self.lines[-40:], line]
        return 0

    def reason(self) -> str:
        """The verifier's or libbpf's last words worth showing, in one line."""
        for line in reversed(self.lines):
            if line[:1].isdigit() or line.startswith((";", "--", "R", "frame")):
                continue  # the verifier's trace
            if "failed to load object" in line or "failed to load:" in line:
                continue  # says only that it failed
            return line
        return ""


_log: _LibbpfLog | None = None


def _os_reason(err: int) -> str:
    if err in (errno.EPERM, errno.EACCES):
        return (
            f"{os.strerror(err)}: loading BPF programs needs CAP_BPF and CAP_PERFMON "
            "(or CAP_SYS_ADMIN) in the initial user namespace, and a kernel not locked down"
        )
    return os.strerror(err)


class ProcBpf:
    """The loaded object, its attached programs and its ring (see the module docstring)."""

    def __init__(
        self,
        *,
        argv_max: int = 4096,
        threads: bool = False,
        ring_bytes: int = RING_DEFAULT,
        obj_path: Path = OBJECT,
        flavours: tuple[str, ...] = tuple(FLAVOURS),
    ) -> None:
        wrong = size_error(argv_max, ring_bytes)
        if wrong is not None:
            raise ValueError(wrong)
        if not os.path.exists("/sys/kernel/btf/vmlinux"):
            raise BpfUnavailable("this kernel has no BTF (/sys/kernel/btf/vmlinux)")
        if not obj_path.exists():
            raise BpfUnavailable(
                f"{obj_path} is not built: run `make` in kport's source tree "
                "(it needs Debian's clang, llvm, bpftool and libbpf-dev)"
            )
        self._lib = _lib(ctypes.CDLL)
        self._pylib = _lib(ctypes.PyDLL)  # the drain holds the GIL: see the docstring
        global _log
        if _log is None:
            _log = _LibbpfLog(self._lib)
        self._log = _log
        self.flavour = ""
        self._obj: int | None = None
        self._links: list[int] = []
        self._rb: int | None = None
        self.records: list[bytes] = []
        self._sample = _SAMPLE_FN(self._on_sample)
        self._settings = bytearray(_SETTINGS.pack(argv_max, int(threads), 0, 0))
        self._ncpu = self._lib.libbpf_num_possible_cpus()
        self._counters_size = self._ncpu * _COUNTERS.size
        failures: dict[str, list[str]] = {}  # why → the flavours that failed so
        try:
            for flavour in flavours:
                try:
                    self._load(flavour, obj_path, ring_bytes)
                except BpfUnavailable as err:
                    failures.setdefault(str(err), []).append(FLAVOURS[flavour])
                    self._unload()
                    continue
                self.flavour = FLAVOURS[flavour]
                break
            else:
                raise BpfUnavailable(
                    "; ".join(f"{' and '.join(names)}: {why}" for why, names in failures.items())
                )
            ring = self._map("events")
            fd = self._lib.bpf_map__fd(ring)
            rb = self._lib.ring_buffer__new(fd, self._sample, None, None)
            if not rb:
                raise BpfUnavailable(f"ring_buffer__new: {_os_reason(ctypes.get_errno())}")
            self._rb = rb
            self._poll = select.poll()
            self._poll.register(fd, select.POLLIN)
        except BaseException:
            self.close()
            raise

    # --- loading -----------------------------------------------------------------------

    def _map(self, name: str) -> int:
        assert self._obj is not None
        found = self._lib.bpf_object__find_map_by_name(self._obj, name.encode())
        if not found:
            raise BpfUnavailable(f"{OBJECT.name} has no map {name}: rebuild it with `make`")
        return int(found)

    def _load(self, flavour: str, obj_path: Path, ring_bytes: int) -> None:
        lib = self._lib
        obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not obj:
            raise BpfUnavailable(f"cannot open {obj_path}: {_os_reason(ctypes.get_errno())}")
        self._obj = obj
        for name in _PROGRAMS:
            for each in FLAVOURS:
                prog = lib.bpf_object__find_program_by_name(obj, f"{name}_{each}".encode())
                if not prog:
                    raise BpfUnavailable(f"{obj_path.name} has no program {name}_{each}")
                lib.bpf_program__set_autoload(prog, each == flavour)
        lib.bpf_map__set_max_entries(self._map("events"), ring_bytes)
        lib.bpf_map__set_max_entries(self._map("scratch"), self._ncpu)
        rc = lib.bpf_object__load(obj)
        if rc < 0:
            # refused outright, the reason says all; else the verifier's word says why
            detail = "" if -rc in (errno.EPERM, errno.EACCES) else self._log.reason()
            raise BpfUnavailable(
                f"the kernel refused the programs: {_os_reason(-rc)}"
                + (f" ({detail})" if detail else "")
            )
        try:
            self._update("settings", self._settings)
        except OSError as err:
            raise BpfUnavailable(str(err)) from err
        for name in _PROGRAMS:
            prog = lib.bpf_object__find_program_by_name(obj, f"{name}_{flavour}".encode())
            link = lib.bpf_program__attach(prog)
            if not link:
                raise BpfUnavailable(
                    f"cannot attach {name}_{flavour}: {_os_reason(ctypes.get_errno())}"
                )
            self._links.append(link)

    def _unload(self) -> None:
        for link in self._links:
            self._lib.bpf_link__destroy(link)
        self._links.clear()
        if self._obj is not None:
            self._lib.bpf_object__close(self._obj)
            self._obj = None

    def _update(self, name: str, value: bytearray) -> None:
        buf = (ctypes.c_char * len(value)).from_buffer(value)
        rc = self._lib.bpf_map__update_elem(self._map(name), _ZERO_KEY, 4, buf, len(value), 0)
        if rc < 0:
            raise OSError(-rc, f"cannot set the BPF map {name}: {os.strerror(-rc)}")

    def close(self) -> None:
        if getattr(self, "_rb", None):
            self._lib.ring_buffer__free(self._rb)
            self._rb = None
        if hasattr(self, "_lib"):
            self._unload()

    # --- reading -----------------------------------------------------------------------

    def _on_sample(self, _ctx: int | None, data: int, size: int) -> int:
        self.records.append(ctypes.string_at(data, size))
        return 0

    def wait(self, timeout_s: float) -> bool:
        """Wait (GIL released) until the ring has data or ``timeout_s`` passes."""
        return bool(self._poll.poll(int(timeout_s * 1000)))

    def also_wake_on(self, fd: int) -> None:
        """Have :meth:`wait` return when ``fd`` is readable too."""
        self._poll.register(fd, select.POLLIN)

    def drain(self) -> list[bytes]:
        """Every record in the ring now, oldest first (copies: the ring moves on)."""
        assert self._rb is not None
        rc = self._pylib.ring_buffer__consume(self._rb)
        records, self.records = self.records, []
        if rc < 0:
            raise OSError(-rc, f"reading the BPF ring: {os.strerror(-rc)}")
        return records

    def set_quiet(self, quiet: bool) -> None:
        """Have the programs submit without waking the reader (it drains on a timer while
        batching) or wake it as each record comes to an empty ring."""
        struct.pack_into("=I", self._settings, 8, int(quiet))
        self._update("settings", self._settings)

    def counters(self) -> list[tuple[int, int]]:
        """(attempts, dropped) per possible CPU, as the programs counted them."""
        if self._obj is None:
            raise OSError(errno.EBADF, "the BPF programs are unloaded")
        buf = ctypes.create_string_buffer(self._counters_size)
        rc = self._lib.bpf_map__lookup_elem(
            self._map("counters"), _ZERO_KEY, 4, buf, self._counters_size, 0
        )
        if rc < 0:
            raise OSError(-rc, f"reading the BPF counters: {os.strerror(-rc)}")
        raw = buf.raw
        return [_COUNTERS.unpack_from(raw, i * _COUNTERS.size) for i in range(self._ncpu)]
