"""The eBPF proc backend: its record layout (bytes made here), and its programs in the real
kernel — an exec read whole at the moment itself, argv cut at the limit, drops counted."""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from typing import Any

import pytest

from kport.sources import proc_bpf, procinfo
from kport.sources.proc_bpf import HEAD, ProcBpf

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="loading BPF programs needs root")
SH = os.path.realpath("/bin/sh")


def record(kind: int, *, flags: int = 0, sections: tuple[bytes, ...] = (), **fields: int) -> bytes:
    """A ring record as the programs write it (see proc_bpf.bpf.c's struct event)."""
    names = "cpu cpu_seq dropped ktime boot_ns pid tgid ppid ns_pid start uid euid gid egid"
    values: dict[str, Any] = dict.fromkeys([*names.split(), "cgroup_id", "a", "b", "argv_size"], 0)
    values.update(fields)
    lens = [len(s) for s in sections] + [0] * (5 - len(sections))
    head = HEAD.pack(
        kind, flags, 0, values["cpu"], values["cpu_seq"], values["dropped"], values["ktime"],
        values["boot_ns"], values["pid"], values["tgid"], values["ppid"], values["ns_pid"],
        values["start"], values["uid"], values["euid"], values["gid"], values["egid"],
        values["cgroup_id"], values["a"], values["b"], values["argv_size"], *lens, 0, 0, 0,
        b"comm\0\0",
    )  # fmt: skip
    return head + b"".join(sections)


# --- the layout --------------------------------------------------------------------------


def test_the_head_is_the_c_struct_up_to_its_data() -> None:
    # kind..cpu 8, four u64 32, four u32 16, start 8, ids 16, cgroup 8, a b argv_size 12,
    # five lengths and a pad 12, cursor and a pad 8, comm 16
    assert HEAD.size == 136


def test_an_exec_record_paths_reversed_and_argv_with_empty_and_odd_arguments() -> None:
    argv = b"/bin/prog\0\0x\xff y\0\0"
    raw = record(
        proc_bpf.KIND_EXEC,
        sections=(b"/bin/prog\0", b"prog\0bin\0usr\0", b"tmp\0", b"user.slice\0", argv),
        pid=7,
        tgid=7,
        argv_size=len(argv),
    )
    rec = proc_bpf.parse(raw)
    texts = proc_bpf.Texts()
    assert texts.name(rec.filename) == "/bin/prog"
    assert texts.path(rec.exe) == "/usr/bin/prog" == texts.path(rec.exe)  # and remembered
    assert texts.path(rec.cwd) == "/tmp"
    assert texts.path(rec.cgroup) == "/user.slice"
    assert rec.comm.rstrip(b"\0") == b"comm"
    assert proc_bpf.split_argv(rec.argv or b"") == [
        b"/bin/prog",
        b"",
        b"x\xff y",
        b"",
    ]


def test_the_root_is_a_path_of_no_components_and_a_cut_argv_keeps_its_last_part() -> None:
    rec = proc_bpf.parse(record(proc_bpf.KIND_EXEC, sections=(b"x\0", b"", b"", b"", b"ab\0cd")))
    assert rec.exe is None and rec.cwd is None and proc_bpf.path_of(rec.cgroup or b"x") == b"/"
    assert proc_bpf.split_argv(b"ab\0cd") == [b"ab", b"cd"]
    assert proc_bpf.split_argv(b"") == []


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"\x02" * 20, "shorter than its head"),
        (record(9), "unknown kind 9"),
        (record(proc_bpf.KIND_EXEC, sections=(b"abc",))[:-1], "says it holds"),
    ],
)
def test_a_malformed_record_is_a_value_error_naming_what_is_wrong(raw: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        proc_bpf.parse(raw)


def test_bad_sizes_are_refused_before_anything_loads() -> None:
    with pytest.raises(ValueError, match="argv_max"):
        ProcBpf(argv_max=proc_bpf.ARGV_CAP + 1)
    with pytest.raises(ValueError, match="power of two"):
        ProcBpf(ring_bytes=5000)


def test_a_missing_object_is_one_line_saying_how_to_build_it(tmp_path: Any) -> None:
    with pytest.raises(proc_bpf.BpfUnavailable, match=r"not built: run `make`"):
        ProcBpf(obj_path=tmp_path / "nothing.bpf.o")


# --- in the kernel -----------------------------------------------------------------------


def ours(bpf: ProcBpf, pid: int, kinds: set[int], timeout: float = 10) -> list[proc_bpf.Record]:
    """The records of ``pid`` until one of each kind in ``kinds`` has come."""
    found: list[proc_bpf.Record] = []
    deadline = time.monotonic() + timeout
    while {r.kind for r in found} < kinds:
        assert time.monotonic() < deadline, f"records of {pid} missing: {found}"
        bpf.wait(0.1)
        found += [r for r in map(proc_bpf.parse, bpf.drain()) if r.tgid == pid]
    return found


@needs_root
@pytest.mark.parametrize("flavour", ["btf", "raw"])
def test_an_exec_is_read_whole_in_the_kernel_and_matches_proc(flavour: str) -> None:
    # raw: the programs as they load where tp_btf will not
    bpf = ProcBpf(flavours=(flavour,))
    assert bpf.flavour == proc_bpf.FLAVOURS[flavour]
    try:
        marker = f"kport-bpf-{os.getpid()}"
        # it lives on (read below through /proc) with its argv as given
        child = subprocess.Popen(
            [SH, "-c", "read x; exit 3", marker, "", "two words"], stdin=subprocess.PIPE
        )
        try:
            recs = ours(bpf, child.pid, {proc_bpf.KIND_FORK, proc_bpf.KIND_EXEC})
            stat = procinfo.read_stat(child.pid)
            cgroup = procinfo.cgroup(child.pid)
        finally:
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
        fork, exe = (
            next(r for r in recs if r.kind == k) for k in (proc_bpf.KIND_FORK, proc_bpf.KIND_EXEC)
        )
        recs = ours(bpf, child.pid, {proc_bpf.KIND_EXIT})
    finally:
        bpf.close()
    assert stat is not None
    assert fork.b == os.getpid() and fork.ppid == os.getpid()
    assert procinfo.ticks_from_boottime_ns(fork.start_boottime) == stat.start_time
    assert procinfo.ticks_from_boottime_ns(exe.start_boottime) == stat.start_time
    assert (exe.filename or b"").rstrip(b"\0") == SH.encode()
    texts = proc_bpf.Texts()
    assert texts.path(exe.exe) == SH
    assert texts.path(exe.cwd) == os.getcwd()
    assert texts.path(exe.cgroup) == cgroup
    assert proc_bpf.split_argv(exe.argv or b"") == [
        SH.encode(), b"-c", b"read x; exit 3", marker.encode(), b"", b"two words",
    ]  # fmt: skip
    assert (exe.uid, exe.euid, exe.gid, exe.egid) == (0, 0, 0, 0)
    assert exe.ppid == os.getpid() and exe.ns_pid == child.pid
    # all 16 bytes, NUL-padded as the kernel keeps it (no older bytes left after the NUL)
    assert exe.comm == os.path.basename(SH).encode().ljust(16, b"\0")
    assert not exe.flags & proc_bpf.FLAG_ARGV_TRUNCATED
    (exit_,) = [r for r in recs if r.kind == proc_bpf.KIND_EXIT]
    assert exit_.a == 3 << 8 and exit_.boot_ns > exit_.start_boottime


def _big_stack() -> None:
    # the kernel takes argv and the environment up to a quarter of the stack's limit
    resource.setrlimit(resource.RLIMIT_STACK, (64 << 20, 64 << 20))


@needs_root
def test_a_2mb_argv_is_read_up_to_the_limit_and_said_to_be_cut() -> None:
    bpf = ProcBpf(argv_max=proc_bpf.ARGV_CAP)
    try:
        # 2 MiB in 32 arguments (one argument may hold 128 KiB at most)
        big = [f"{i:02d}" + "y" * ((64 << 10) - 2) for i in range(32)]
        subprocess.run(["/bin/true", "first", *big], check=True, preexec_fn=_big_stack)
        (exe,) = [
            r
            for r in map(proc_bpf.parse, bpf.drain())
            if r.kind == proc_bpf.KIND_EXEC and (r.argv or b"").startswith(b"/bin/true\0first\0")
        ]
    finally:
        bpf.close()
    assert exe.flags & proc_bpf.FLAG_ARGV_TRUNCATED
    assert exe.argv_size == len(b"/bin/true\0first\0") + sum(len(a) + 1 for a in big) > 2 << 20
    assert len(exe.argv or b"") == proc_bpf.ARGV_CAP
    args = proc_bpf.split_argv(exe.argv or b"")
    assert args[:2] == [b"/bin/true", b"first"]
    assert args[2:-1] == [a.encode() for a in big[: len(args) - 3]]
    assert big[len(args) - 3].encode().startswith(args[-1])
    assert sum(len(a) + 1 for a in args) - 1 == proc_bpf.ARGV_CAP


@needs_root
def test_a_full_ring_drops_are_counted_per_cpu_and_add_up() -> None:
    bpf = ProcBpf(ring_bytes=proc_bpf.RING_MIN)  # a page: a few dozen records
    try:
        for _ in range(200):  # nobody drains meanwhile
            subprocess.run(["/bin/true"], check=True)
        got = [proc_bpf.parse(r) for r in bpf.drain()]
        counters = bpf.counters()
    finally:
        bpf.close()
    assert sum(c[1] for c in counters) > 0
    # Each record carries its place among its CPU's attempts and its CPU's drops before
    # it: what its CPU attempted before it is exactly what came before it, plus the drops.
    for cpu in range(len(counters)):
        mine = [r for r in got if r.cpu == cpu]
        for before, r in enumerate(mine):
            assert r.cpu_seq - 1 == before + r.dropped, (cpu, before, r)
        if mine:  # and the counters say no less (more only if records came meanwhile)
            assert counters[cpu][0] >= mine[-1].cpu_seq
            assert counters[cpu][1] >= mine[-1].dropped


@needs_root
def test_quiet_submits_wake_no_waiter_and_a_drain_still_finds_them() -> None:
    bpf = ProcBpf()

    def waited(timeout: float, run: list[str]) -> float:
        """How long a waiter blocked in wait() took, while ``run`` ran."""
        took: list[float] = []

        def wait() -> None:
            # drained right before the wait: a record already there would end it at once
            bpf.drain()
            started = time.monotonic()
            bpf.wait(timeout)
            took.append(time.monotonic() - started)

        waiter = threading.Thread(target=wait)
        waiter.start()
        time.sleep(0.1)  # the waiter is blocked by now (if not, it only waits less)
        subprocess.run(run, check=True)
        waiter.join()
        return took[0]

    try:
        bpf.set_quiet(True)
        quiet_took = waited(1.0, ["/bin/true", "quiet"])
        quiet = [r for r in map(proc_bpf.parse, bpf.drain()) if r.argv == b"/bin/true\0quiet\0"]
        bpf.set_quiet(False)
        loud_took = waited(30.0, ["/bin/true", "loud"])
    finally:
        bpf.close()
    assert quiet_took >= 0.9  # not woken by the record ...
    assert len(quiet) == 1  # ... which was there all along
    assert loud_took < 15.0  # woken, long before its timeout
