// SPDX-License-Identifier: GPL-2.0
/*
 * kport's proc source in the kernel: fork, exec and exit read at the moment itself, from
 * the sched_process_* tracepoints, into one BPF ring buffer that proc_bpf.py reads.
 *
 * At exec the new program's own account is read here, while it exists: ids, start time,
 * the filename given to execve, the resolved executable, argv from the new stack, cwd,
 * cgroup, tty. A process that lives a millisecond arrives whole.
 *
 * Two flavours of the same three programs: tp_btf (typed arguments) and raw_tp (the same
 * tracepoints, untyped), which the loader takes where tp_btf will not load. Every kernel
 * read goes through BPF_CORE_READ, so both share one body, and the object runs on any
 * kernel with BTF (CO-RE).
 *
 * Loss is counted here: each record carries its CPU's count of attempts and of records
 * the full ring refused, so the reader sees every drop at the place it happened.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

#define KIND_FORK 1
#define KIND_EXEC 2
#define KIND_EXIT 3

#define FLAG_THREAD 1          /* a thread's fork or exit, not a process's */
#define FLAG_ARGV_TRUNCATED 2  /* argv longer than argv_max: cut there */
#define FLAG_PATH_TRUNCATED 4  /* a path deeper or longer than we walk */
#define FLAG_ARGV_UNREAD 8     /* the new stack could not be read */

/* Scratch layout: strings are appended one after another; every offset is masked, which
 * is what lets the verifier prove each write in bounds. */
#define DATA_SIZE 65536
#define HEAD_MASK 32767        /* filename, exe, cwd and cgroup: 16 KiB at most, all told */
#define SECTION_MAX 4096       /* one path's bytes, at most */
#define NAME_MAX_READ 256      /* one component: NAME_MAX and its NUL */
#define PATH_DEPTH 48          /* components walked, at most */
#define ARGV_CAP 32768         /* the largest argv_max the loader accepts */

struct settings {
	__u32 argv_max;  /* bytes of argv read, at most ARGV_CAP */
	__u32 threads;   /* report threads' fork and exit too */
	__u32 quiet;     /* the reader is batching: submit without waking it */
	__u32 _pad;
};

struct counters {
	__u64 attempts;  /* records this CPU tried to submit */
	__u64 dropped;   /* ... that the full ring refused */
};

struct event {
	__u8 kind;
	__u8 flags;
	__u16 _pad0;
	__u32 cpu;
	__u64 cpu_seq;         /* this record's attempt number on its CPU, from 1 */
	__u64 dropped;         /* its CPU's drops before it */
	__u64 ktime;           /* CLOCK_MONOTONIC, as the proc connector's timestamps */
	__u64 boot_ns;         /* CLOCK_BOOTTIME, the clock start times count in */
	__u32 pid;             /* the thread */
	__u32 tgid;            /* the process */
	__u32 ppid;            /* its parent process */
	__u32 ns_pid;          /* the process's pid in its own pid namespace */
	__u64 start_boottime;  /* the process's start (its leader's), ns after boot */
	__u32 uid, euid, gid, egid;
	__u64 cgroup_id;
	__u32 a;               /* fork: parent thread | exec: old pid | exit: wait status */
	__u32 b;               /* fork: parent process | exec: tty device (tty_nr) */
	__u32 argv_size;       /* exec: the whole argv's bytes, read or not */
	__u16 filename_len, exe_len, cwd_len, cgroup_len, argv_len;
	__u16 _pad1;
	__u32 cursor;          /* scratch: where the path being walked goes on */
	__u32 _pad2;
	char comm[16];
	char data[DATA_SIZE];
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);  /* the loader sets the size */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct counters);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct settings);
} settings SEC(".maps");

/* One scratch record per CPU; too large for a per-CPU map, so the loader sizes this one
 * to the CPUs and each program uses its own CPU's slot (they run with migration off). */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);  /* the loader sets the number of possible CPUs */
	__type(key, __u32);
	__type(value, struct event);
} scratch SEC(".maps");

/* Kernels before 6.15 name a kernfs node's parent "parent". */
struct kernfs_node___old {
	struct kernfs_node *parent;
} __attribute__((preserve_access_index));

static __always_inline struct kernfs_node *kn_parent(struct kernfs_node *kn)
{
	if (bpf_core_field_exists(kn->__parent))
		return BPF_CORE_READ(kn, __parent);
	return BPF_CORE_READ((struct kernfs_node___old *)kn, parent);
}

static __always_inline struct settings *get_settings(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&settings, &zero);
}

static __always_inline struct event *start(__u8 kind, struct task_struct *task)
{
	__u32 cpu = bpf_get_smp_processor_id();
	struct event *e = bpf_map_lookup_elem(&scratch, &cpu);
	if (!e)
		return 0;
	e->kind = kind;
	e->flags = 0;
	e->cpu = cpu;
	e->ktime = bpf_ktime_get_ns();
	e->boot_ns = bpf_ktime_get_boot_ns();
	e->pid = BPF_CORE_READ(task, pid);
	e->tgid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(task, real_parent, tgid);
	struct pid *tp = BPF_CORE_READ(task, group_leader, thread_pid);
	unsigned int level = BPF_CORE_READ(tp, level);
	e->ns_pid = BPF_CORE_READ(tp, numbers[level & 31].nr);
	e->start_boottime = BPF_CORE_READ(task, group_leader, start_boottime);
	const struct cred *cred = BPF_CORE_READ(task, cred);
	e->uid = BPF_CORE_READ(cred, uid.val);
	e->euid = BPF_CORE_READ(cred, euid.val);
	e->gid = BPF_CORE_READ(cred, gid.val);
	e->egid = BPF_CORE_READ(cred, egid.val);
	e->cgroup_id = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
	e->a = e->b = e->argv_size = 0;
	e->filename_len = e->exe_len = e->cwd_len = e->cgroup_len = e->argv_len = 0;
	/* all 16 bytes: the kernel pads comm with NULs, where a string read would leave the
	 * scratch record's older bytes after the NUL */
	BPF_CORE_READ_INTO(&e->comm, task, comm);
	return e;
}

/* Submit the first ``size`` bytes of the record, counting the attempt and any drop. */
static __always_inline void submit(struct event *e, __u64 size)
{
	__u32 zero = 0;
	struct counters *c = bpf_map_lookup_elem(&counters, &zero);
	if (!c)
		return;
	c->attempts += 1;
	e->cpu_seq = c->attempts;
	e->dropped = c->dropped;
	struct settings *cfg = get_settings();
	__u64 flags = cfg && cfg->quiet ? BPF_RB_NO_WAKEUP : 0;
	if (size > sizeof(*e))
		size = sizeof(*e);
	if (bpf_ringbuf_output(&events, e, size, flags))
		c->dropped += 1;
}

/* A walk up a path or a cgroup, one bpf_loop step per component: the verifier checks a
 * step once, where a plain loop would have it check every path through every step. */
struct walk {
	struct event *e;  /* its cursor is where the next component goes: kept in the map
			   * value, whose loads the verifier takes as any number, so that one
			   * check of a step stands for all of them */
	__u32 begin;      /* where this path began */
	struct dentry *dentry;
	struct mount *mnt;
	struct kernfs_node *kn;
};

/* Append one NUL-terminated component; 1 (stop) when it does not fit or cannot be read. */
static __always_inline long append(struct walk *w, const void *name)
{
	struct event *e = w->e;
	__u32 off = e->cursor & HEAD_MASK;
	if (off - w->begin + NAME_MAX_READ > SECTION_MAX) {
		e->flags |= FLAG_PATH_TRUNCATED;
		return 1;
	}
	long n = bpf_probe_read_kernel_str(&e->data[off], NAME_MAX_READ, name);
	if (n <= 0)
		return 1;
	e->cursor = off + n;
	return 0;
}

static long path_step(__u32 i, void *ctx)
{
	struct walk *w = ctx;
	struct dentry *dentry = w->dentry;
	struct mount *mnt = w->mnt;
	struct dentry *parent = BPF_CORE_READ(dentry, d_parent);
	if (dentry == BPF_CORE_READ(mnt, mnt.mnt_root) || dentry == parent) {
		struct mount *up = BPF_CORE_READ(mnt, mnt_parent);
		if (up == mnt || !up) {
			w->mnt = 0;  /* the root of it all: done */
			return 1;
		}
		w->dentry = BPF_CORE_READ(mnt, mnt_mountpoint);
		w->mnt = up;
		return 0;
	}
	if (append(w, BPF_CORE_READ(dentry, d_name.name)))
		return 1;
	w->dentry = parent;
	return 0;
}

static long cgroup_step(__u32 i, void *ctx)
{
	struct walk *w = ctx;
	struct kernfs_node *kn = w->kn;
	struct kernfs_node *parent = kn_parent(kn);
	if (!parent) {
		w->kn = 0;  /* the root, unnamed: done */
		return 1;
	}
	if (append(w, BPF_CORE_READ(kn, name)))
		return 1;
	w->kn = parent;
	return 0;
}

/* A path, written leaf first as NUL-terminated components (the reader reverses them), up
 * to the root of the mount tree; returns the bytes written. */
static __always_inline __u32 walk_path(struct event *e, __u32 off, struct dentry *dentry,
				       struct vfsmount *vfsmnt)
{
	e->cursor = off;
	struct walk w = {
		.e = e,
		.begin = off,
		.dentry = dentry,
		.mnt = container_of(vfsmnt, struct mount, mnt),
	};
	bpf_loop(PATH_DEPTH, path_step, &w, 0);
	if (w.mnt)
		e->flags |= FLAG_PATH_TRUNCATED;
	return (e->cursor & HEAD_MASK) - off;
}

/* The cgroup v2 path, leaf first like walk_path. */
static __always_inline __u32 walk_cgroup(struct event *e, __u32 off, struct kernfs_node *kn)
{
	e->cursor = off;
	struct walk w = {.e = e, .begin = off, .kn = kn};
	bpf_loop(PATH_DEPTH, cgroup_step, &w, 0);
	if (w.kn)
		e->flags |= FLAG_PATH_TRUNCATED;
	return (e->cursor & HEAD_MASK) - off;
}

static __always_inline int on_exec(struct task_struct *task, pid_t old_pid,
				   struct linux_binprm *bprm)
{
	struct settings *cfg = get_settings();
	if (!cfg)
		return 0;
	struct event *e = start(KIND_EXEC, task);
	if (!e)
		return 0;
	e->a = old_pid;
	struct tty_struct *tty = BPF_CORE_READ(task, signal, tty);
	if (tty) {
		int major = BPF_CORE_READ(tty, driver, major);
		int minor = BPF_CORE_READ(tty, driver, minor_start) + BPF_CORE_READ(tty, index);
		/* the encoding of /proc/<pid>/stat's tty_nr */
		e->b = (minor & 0xff) | ((major & 0xfff) << 8) | ((minor & ~0xff) << 12);
	}
	__u32 off = 0;
	const char *filename = BPF_CORE_READ(bprm, filename);
	long n = bpf_probe_read_kernel_str(&e->data[0], SECTION_MAX, filename);
	if (n > 0) {
		e->filename_len = n;
		off = n;
	}
	struct mm_struct *mm = BPF_CORE_READ(task, mm);
	struct file *exe = BPF_CORE_READ(mm, exe_file);
	if (exe) {
		__u32 len = walk_path(e, off, BPF_CORE_READ(exe, f_path.dentry),
				      BPF_CORE_READ(exe, f_path.mnt));
		e->exe_len = len;
		off += len;
	}
	struct fs_struct *fs = BPF_CORE_READ(task, fs);
	if (fs) {
		__u32 len = walk_path(e, off, BPF_CORE_READ(fs, pwd.dentry),
				      BPF_CORE_READ(fs, pwd.mnt));
		e->cwd_len = len;
		off += len;
	}
	struct kernfs_node *kn = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn);
	if (kn) {
		__u32 len = walk_cgroup(e, off, kn);
		e->cgroup_len = len;
		off += len;
	}
	/* argv: on the new stack, just written by the kernel, so present to read */
	unsigned long arg_start = BPF_CORE_READ(mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(mm, arg_end);
	__u64 size = arg_end > arg_start ? arg_end - arg_start : 0;
	__u32 max = cfg->argv_max;
	if (max > ARGV_CAP)
		max = ARGV_CAP;
	e->argv_size = size > 0xffffffff ? 0xffffffff : size;
	__u32 len = size;
	if (size > max) {
		len = max;
		e->flags |= FLAG_ARGV_TRUNCATED;
	}
	off &= HEAD_MASK;
	if (len > ARGV_CAP)
		len = ARGV_CAP;
	if (len > 0) {
		if (bpf_probe_read_user(&e->data[off], len, (void *)arg_start)) {
			e->flags |= FLAG_ARGV_UNREAD;
			len = 0;
		}
	}
	e->argv_len = len;
	submit(e, offsetof(struct event, data) + off + len);
	return 0;
}

static __always_inline int on_fork(struct task_struct *parent, struct task_struct *child)
{
	struct settings *cfg = get_settings();
	if (!cfg)
		return 0;
	int thread = BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid);
	if (thread && !cfg->threads)
		return 0;
	struct event *e = start(KIND_FORK, child);
	if (!e)
		return 0;
	if (thread) {
		e->flags |= FLAG_THREAD;
		e->start_boottime = BPF_CORE_READ(child, start_boottime);
	}
	e->a = BPF_CORE_READ(parent, pid);
	e->b = BPF_CORE_READ(parent, tgid);
	submit(e, offsetof(struct event, data));
	return 0;
}

static __always_inline int on_exit(struct task_struct *task)
{
	struct settings *cfg = get_settings();
	if (!cfg)
		return 0;
	/* The process has ended once its last thread is here; a thread that ends first is
	 * reported only when threads are. Two threads ending at once may both see the count
	 * at zero: the reader keeps the first of such a pair. */
	int live = BPF_CORE_READ(task, signal, live.counter);
	int thread = live != 0;
	if (thread && !cfg->threads)
		return 0;
	struct event *e = start(KIND_EXIT, task);
	if (!e)
		return 0;
	if (thread)
		e->flags |= FLAG_THREAD;
	e->a = BPF_CORE_READ(task, exit_code);  /* the wait status */
	submit(e, offsetof(struct event, data));
	return 0;
}

/* Each program twice, on the same tracepoints: typed (tp_btf), and untyped (raw_tp) for
 * kernels where tp_btf will not load. The loader keeps one set. */
#define PROGRAMS(flavour, section)                                                      \
	SEC(section "/sched_process_exec")                                              \
	int BPF_PROG(exec_##flavour, struct task_struct *p, pid_t old_pid,               \
		     struct linux_binprm *bprm)                                         \
	{                                                                               \
		return on_exec(p, old_pid, bprm);                                       \
	}                                                                               \
	SEC(section "/sched_process_fork")                                              \
	int BPF_PROG(fork_##flavour, struct task_struct *parent, struct task_struct *child) \
	{                                                                               \
		return on_fork(parent, child);                                          \
	}                                                                               \
	SEC(section "/sched_process_exit")                                              \
	int BPF_PROG(exit_##flavour, struct task_struct *p)                             \
	{                                                                               \
		return on_exit(p);                                                      \
	}

PROGRAMS(btf, "tp_btf")
PROGRAMS(raw, "raw_tp")
