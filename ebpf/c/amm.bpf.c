// SPDX-License-Identifier: GPL-2.0
/*
 * amm's kernel side: exact RSS, peak, growth rate, level and (at exit) page
 * faults of every *watched* process, at the resolution of one RSS update
 * (one page here).
 *
 * Attach points are BTF tracepoints (tp_btf) on kmem:rss_stat and
 * sched:sched_process_exit: they receive the tracepoint's raw arguments and
 * do not run the classic event's TP_fast_assign, which for rss_stat sums a
 * per-CPU counter under a spin lock on every RSS change of every process on
 * the node. An unwatched process pays one bitmap test per RSS change
 * (benches/RESULTS.md has the numbers).
 *
 * The program emits on the `events` ring buffer only when something happens:
 * a level crossing upward, the fall below the re-arm level, a spike alarm,
 * the exit of a watched process, or the change of its credentials. It never
 * acts on a process on its own: the terminate signal is sent only when
 * userspace set AMM_WATCH_SIGNAL_ON_TERMINATE for it, which the agent does
 * only for a process that registered itself (or its parent did).
 *
 * A watch is bound to the process, not to its pid number: a task counts for
 * it only if its thread group's leader started no later than the agent last
 * saw the process running (born_before_ns), so a recycled pid never matches;
 * and, with AMM_WATCH_BIND_CREDENTIALS, only while it keeps the credentials
 * it had, so a setuid exec ends the watch before anything is counted,
 * emitted or signalled for the new program.
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

#include "amm.h"
#include "watched.h"

char LICENSE[] SEC("license") = "GPL";

/*
 * The few kernel types the program reads, relocated by CO-RE against the
 * running kernel's BTF (/sys/kernel/btf/vmlinux), so no vmlinux.h is needed
 * and the object loads on kernels whose layouts differ.
 */
#pragma clang attribute push(__attribute__((preserve_access_index)), apply_to = record)
struct percpu_counter {
	__s64 count;
	__s32 *counters;
};
struct task_struct;
typedef struct {
	__u32 val;
} kuid_t;
typedef struct {
	__u32 val;
} kgid_t;
typedef struct {
	__u64 val;
} kernel_cap_t;
struct cred {
	kuid_t uid;
	kgid_t gid;
	kuid_t suid;
	kgid_t sgid;
	kuid_t euid;
	kgid_t egid;
	kernel_cap_t cap_permitted;
};
struct mm_struct {
	struct percpu_counter rss_stat[AMM_NR_MM_COUNTERS];
	struct task_struct *owner;
};
struct signal_struct {
	struct {
		int counter;
	} live;
	unsigned long min_flt;
	unsigned long maj_flt;
};
struct task_struct {
	int tgid;
	struct mm_struct *mm;
	struct signal_struct *signal;
	struct task_struct *group_leader;
	unsigned long min_flt;
	unsigned long maj_flt;
	__u64 start_boottime;
	const struct cred *real_cred;
};
#pragma clang attribute pop

/* Set by the loader before the object is loaded (frozen .rodata). */
const volatile __u32 nr_cpus = 1;     /* possible CPUs */
const volatile __u32 page_shift = 12; /* log2(page size) */
/* Length of one growth-rate window. */
const volatile __u64 rate_window_ns = 1000000;

/* tgid -> watch (config from userspace, state kept here). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct amm_watch);
} watches SEC(".maps");

/* mm_struct address -> tgid, for updates made by another task (curr == 0).
 * The classic tracepoint calls this key mm_id (a hash of the same address);
 * a BTF tracepoint has the address itself. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, __u32);
} mm_owner SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} events SEC(".maps");

/* tgid -> a ring buffer of the client's own (created by the agent, its fd
 * handed to the client that registered the tgid): the client reads its
 * events without waiting for the agent to relay them. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__array(values, struct {
		__uint(type, BPF_MAP_TYPE_RINGBUF);
		__uint(max_entries, AMM_CLIENT_RING_BYTES);
	});
} client_rings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct amm_stats);
} stats SEC(".maps");

/*
 * Per-CPU offsets. An mm's RSS counters are percpu_counters: an exact value
 * is `count` plus every CPU's unflushed delta, which lives at
 * `counters + __per_cpu_offset[cpu]`. The kernel BTF does not tag `counters`
 * as per-CPU, so bpf_per_cpu_ptr() refuses it, and aya resolves no __ksym.
 * The offsets are learnt from a per-CPU array map instead: its value on CPU c
 * is at pptr + offset[c], where pptr is the raw per-CPU pointer the map keeps
 * at the same place as a plain array keeps its first value.
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} offset_probe_plain SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} offset_probe_percpu SEC(".maps");

/* Turns a pointer into a number: stored to a map value and read back. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} ptr_scratch SEC(".maps");

/* Keeps struct amm_event (otherwise only used through a ring-buffer
 * pointer) and the shared enums (otherwise only constants) in the object's
 * BTF, so the layout test can read them. */
struct amm_btf_anchor {
	struct amm_event event;
	enum amm_level level;
	enum amm_event_kind kind;
	enum amm_watch_flag watch_flag;
	enum amm_event_flag event_flag;
	enum amm_end end;
	enum amm_limit limit;
	enum amm_stat stat;
};
struct amm_btf_anchor *amm_btf_anchor __attribute__((unused));

__u64 cpu_offset[AMM_MAX_CPUS];
__u32 cpu_offset_ready;

static __always_inline __u64 addr_of(const void *p)
{
	__u32 zero = 0;
	volatile __u64 *slot = bpf_map_lookup_elem(&ptr_scratch, &zero);

	if (!slot)
		return 0;
	*slot = (__u64)p;
	return *slot;
}

static __noinline int learn_cpu_offsets(void)
{
	__u32 zero = 0;
	__u64 plain_map, plain_value, percpu_map, pptr = 0;
	void *v;

	plain_map = addr_of(&offset_probe_plain);
	v = bpf_map_lookup_elem(&offset_probe_plain, &zero);
	if (!v)
		return -1;
	plain_value = addr_of(v);
	percpu_map = addr_of(&offset_probe_percpu);
	if (!plain_map || !plain_value || !percpu_map || plain_value <= plain_map)
		return -1;
	if (bpf_probe_read_kernel(&pptr, sizeof(pptr),
				  (const void *)(percpu_map + (plain_value - plain_map))))
		return -1;
	for (__u32 cpu = 0; cpu < AMM_MAX_CPUS; cpu++) {
		if (cpu >= nr_cpus)
			break;
		v = bpf_map_lookup_percpu_elem(&offset_probe_percpu, &zero, cpu);
		if (!v)
			return -1;
		cpu_offset[cpu] = addr_of(v) - pptr;
	}
	cpu_offset_ready = 1;
	return 0;
}

static __always_inline void stat_add(enum amm_stat field)
{
	__u32 zero = 0;
	struct amm_stats *s = bpf_map_lookup_elem(&stats, &zero);

	if (!s)
		return;
	switch (field) {
	case AMM_STAT_EVENTS: s->events++; break;
	case AMM_STAT_DROPPED: s->dropped++; break;
	case AMM_STAT_BOUND: s->bound++; break;
	case AMM_STAT_EXITS: s->exits++; break;
	case AMM_STAT_STRANGERS: s->strangers++; break;
	case AMM_STAT_CREDENTIALS: s->credentials++; break;
	}
}

/* Exact value of one RSS counter, in pages. */
static __always_inline __s64 read_counter(struct mm_struct *mm, int member)
{
	struct percpu_counter *c;
	__s64 sum;
	__u64 base;

	switch (member) {
	case AMM_MM_FILEPAGES: c = &mm->rss_stat[AMM_MM_FILEPAGES]; break;
	case AMM_MM_ANONPAGES: c = &mm->rss_stat[AMM_MM_ANONPAGES]; break;
	case AMM_MM_SHMEMPAGES: c = &mm->rss_stat[AMM_MM_SHMEMPAGES]; break;
	default: return 0;
	}
	sum = c->count;
	if (!cpu_offset_ready && learn_cpu_offsets())
		return sum < 0 ? 0 : sum; /* approximate, as get_mm_rss() is */
	base = (__u64)c->counters;
	for (__u32 cpu = 0; cpu < AMM_MAX_CPUS; cpu++) {
		__s32 delta = 0;

		if (cpu >= nr_cpus)
			break;
		bpf_probe_read_kernel(&delta, sizeof(delta),
				      (const void *)(base + cpu_offset[cpu]));
		sum += delta;
	}
	return sum < 0 ? 0 : sum;
}

/* One event to the client's own ring (if it asked for one) first, then to
 * the agent's. When the client has it already, the agent is not woken for a
 * level or spike event (it would compete with the client for a CPU at the
 * worst moment); it drains its ring on its own timer. Exits always wake it. */
static __always_inline void emit(__u32 tgid, struct amm_watch *w, __u32 kind, __u32 level,
				 __u32 prev, __u64 rss, __u64 eta_ns, __u32 flags, __u64 now)
{
	struct amm_event e = {
		.t_ns = now,
		.tgid = tgid,
		.kind = kind,
		.level = level,
		.prev_level = prev,
		.rss_bytes = rss,
		.peak_rss_bytes = w->state.peak_rss_bytes,
		.faults = w->state.faults,
		.rate_bytes_per_ms = w->state.rate_bytes_per_ms,
		.eta_ns = eta_ns,
		.flags = flags,
		.cpu = bpf_get_smp_processor_id(),
	};
	void *ring = bpf_map_lookup_elem(&client_rings, &tgid);
	__u64 wake = BPF_RB_FORCE_WAKEUP;

	if (ring) {
		if (bpf_ringbuf_output(ring, &e, sizeof(e), BPF_RB_FORCE_WAKEUP))
			stat_add(AMM_STAT_DROPPED);
		else if (kind != AMM_EVENT_EXIT)
			wake = BPF_RB_NO_WAKEUP;
	}
	if (bpf_ringbuf_output(&events, &e, sizeof(e), wake))
		stat_add(AMM_STAT_DROPPED);
	else
		stat_add(AMM_STAT_EVENTS);
}

/* Signed a * b / c for the rate arithmetic (BPF has no signed division
 * before ISA v4). */
static __always_inline __s64 scale(__s64 a, __u64 b, __u64 c)
{
	__u64 m;

	if (!c)
		return 0;
	if (a < 0) {
		m = (__u64)(-a) * b / c;
		return -(__s64)m;
	}
	return (__s64)((__u64)a * b / c);
}

/* Growth rate and spike alarm; called on every update of a watched mm. */
static __always_inline void update_rate(__u32 tgid, struct amm_watch *w, __u64 rss, __u64 now,
					__u32 flags)
{
	struct amm_watch_config *cfg = &w->config;
	__u64 start = w->state.window_start_ns;
	__s64 inst, rate;
	__u64 horizon = cfg->spike_horizon_ns, eta_ns = AMM_DISABLED;

	if (start == 0) {
		w->state.window_start_ns = now;
		w->state.window_start_rss = rss;
		return;
	}
	if (now - start < rate_window_ns)
		return;
	inst = scale((__s64)rss - (__s64)w->state.window_start_rss, 1000000, now - start);
	rate = (w->state.rate_bytes_per_ms + inst) >> 1; /* EWMA, weight 1/2 */
	w->state.rate_bytes_per_ms = rate;
	w->state.window_start_ns = now;
	w->state.window_start_rss = rss;

	if (!horizon || cfg->terminate_bytes == AMM_DISABLED || rss >= cfg->terminate_bytes)
		return;
	if (rate > 0)
		eta_ns = (cfg->terminate_bytes - rss) * 1000 / (__u64)rate * 1000; /* us resolution */
	if (eta_ns <= horizon) {
		w->state.spike_calm_since_ns = 0;
		if (__sync_val_compare_and_swap(&w->state.spike_active, 0, 1) == 0)
			emit(tgid, w, AMM_EVENT_SPIKE, w->state.level, w->state.level, rss, eta_ns,
			     flags, now);
	} else if (eta_ns > 2 * horizon && w->state.spike_active) {
		/* re-armed once the growth has stayed calm for a whole horizon, so
		 * a spike that stutters (allocate, spill, allocate) is one alarm */
		if (!w->state.spike_calm_since_ns)
			w->state.spike_calm_since_ns = now;
		else if (now - w->state.spike_calm_since_ns >= horizon)
			w->state.spike_active = 0;
	} else {
		w->state.spike_calm_since_ns = 0;
	}
}

static __always_inline void update_level(__u32 tgid, struct amm_watch *w, __u64 rss, __u64 now,
					 __u32 flags)
{
	struct amm_watch_config *cfg = &w->config;
	__u32 cur = w->state.level;
	__u32 lvl = amm_level_of(cfg, rss);

	if (lvl > cur) {
		if (__sync_val_compare_and_swap(&w->state.level, cur, lvl) != cur)
			return; /* another CPU moved it first and emitted */
		if (lvl == AMM_LEVEL_TERMINATE && (cfg->flags & AMM_WATCH_SIGNAL_ON_TERMINATE) &&
		    !(flags & AMM_EVENT_FLAG_FOREIGN) && cfg->signal) {
			/* current is a thread of the watched process here */
			if (bpf_send_signal(cfg->signal) == 0)
				flags |= AMM_EVENT_FLAG_SIGNALLED;
		}
		emit(tgid, w, AMM_EVENT_LEVEL, lvl, cur, rss, 0, flags, now);
	} else if (cur != AMM_LEVEL_BELOW && rss < cfg->rearm_bytes) {
		if (__sync_val_compare_and_swap(&w->state.level, cur, AMM_LEVEL_BELOW) != cur)
			return;
		w->state.spike_active = 0;
		emit(tgid, w, AMM_EVENT_LEVEL, AMM_LEVEL_BELOW, cur, rss, 0, flags, now);
	}
}

static __always_inline void update_peak(struct amm_watch *w, __u64 rss)
{
	for (int i = 0; i < 4; i++) {
		__u64 old = w->state.peak_rss_bytes;

		if (rss <= old)
			return;
		if (__sync_val_compare_and_swap(&w->state.peak_rss_bytes, old, rss) == old)
			return;
	}
}

/* True when `t` (a task of the watched tgid, or the owner of its mm) is of
 * the process the watch was made for: its thread group's leader started no
 * later than the agent last saw that process running. A recycled pid's
 * process started after. */
static __always_inline int born_in_time(const struct amm_watch *w, struct task_struct *t)
{
	struct task_struct *leader = t->group_leader;

	if (!leader || leader->start_boottime > w->config.born_before_ns) {
		stat_add(AMM_STAT_STRANGERS);
		return 0;
	}
	return 1;
}

/* True when `t` no longer has the ids it was watched with, or holds a
 * capability it was not permitted then. */
static __always_inline int creds_changed(const struct amm_watch_config *cfg, struct task_struct *t)
{
	const struct cred *c = t->real_cred;

	if (!c)
		return 1;
	return c->uid.val != cfg->uid || c->euid.val != cfg->euid || c->suid.val != cfg->suid ||
	       c->gid.val != cfg->gid || c->egid.val != cfg->egid || c->sgid.val != cfg->sgid ||
	       (c->cap_permitted.val & ~cfg->cap_permitted) != 0;
}

/* May this update count for the watch? `t` is the task to judge it by (the
 * faulting thread, or for another task's update the mm's owner; NULL when
 * the mm has none left, its last teardown, which counts only for the mm the
 * watch is bound to). A credentials change ends the watch here, once, with
 * an event; nothing counts for it afterwards. */
static __always_inline int counts_for(__u32 tgid, struct amm_watch *w, struct task_struct *t,
				      __u64 mm_addr)
{
	if (w->state.ended)
		return 0;
	if (!t)
		return w->state.mm == mm_addr;
	if (!born_in_time(w, t))
		return 0;
	if (!(w->config.flags & AMM_WATCH_BIND_CREDENTIALS) || !creds_changed(&w->config, t))
		return 1;
	if (__sync_val_compare_and_swap(&w->state.ended, AMM_END_NONE, AMM_END_CREDENTIALS) ==
	    AMM_END_NONE) {
		stat_add(AMM_STAT_CREDENTIALS);
		emit(tgid, w, AMM_EVENT_CREDENTIALS, w->state.level, w->state.level,
		     w->state.rss_bytes, 0, 0, bpf_ktime_get_ns());
	}
	return 0;
}

/* Binds a watch to the mm it follows: on its first update, or after exec. */
static __always_inline void bind_mm(__u32 tgid, struct amm_watch *w, struct mm_struct *mm,
				    __u64 mm_addr)
{
	__u64 old = w->state.mm;

	if (old == mm_addr)
		return;
	if (__sync_val_compare_and_swap(&w->state.mm, old, mm_addr) != old)
		return;
	if (old)
		bpf_map_delete_elem(&mm_owner, &old);
	bpf_map_update_elem(&mm_owner, &mm_addr, &tgid, BPF_ANY);
	w->state.rss_pages[AMM_MM_FILEPAGES] = read_counter(mm, AMM_MM_FILEPAGES);
	w->state.rss_pages[AMM_MM_ANONPAGES] = read_counter(mm, AMM_MM_ANONPAGES);
	w->state.rss_pages[AMM_MM_SHMEMPAGES] = read_counter(mm, AMM_MM_SHMEMPAGES);
	stat_add(AMM_STAT_BOUND);
}

SEC("tp_btf/rss_stat")
int BPF_PROG(amm_rss_stat, struct mm_struct *mm, int member)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_struct *judge = task;
	struct amm_watch *w;
	__u32 tgid, flags = 0;
	__u64 mm_addr, rss, now;
	__s64 pages;

	if (member == AMM_MM_SWAPENTS)
		return 0;
	if (task->mm == mm) {
		/* curr == 1: the process itself faulted or unmapped */
		tgid = task->tgid;
		if (!watched_bit(tgid))
			return 0;
	} else {
		/* curr == 0: reclaim, exit, or another task working on this mm */
		__u32 *owner;

		mm_addr = addr_of(mm);
		owner = bpf_map_lookup_elem(&mm_owner, &mm_addr);
		judge = mm->owner;
		if (owner) {
			tgid = *owner;
		} else {
			/* not bound yet: the watched process made no update of its own */
			if (!judge)
				return 0;
			tgid = judge->tgid;
			if (!watched_bit(tgid))
				return 0;
		}
		flags = AMM_EVENT_FLAG_FOREIGN;
	}
	w = bpf_map_lookup_elem(&watches, &tgid);
	if (!w)
		return 0;
	mm_addr = addr_of(mm);
	if (!counts_for(tgid, w, judge, mm_addr))
		return 0;
	if (w->state.mm != mm_addr) {
		/* an update for an mm this watch does not follow (yet) */
		if (flags & AMM_EVENT_FLAG_FOREIGN && w->state.mm)
			return 0; /* the mm the process left at exec */
		bind_mm(tgid, w, mm, mm_addr);
	}
	pages = read_counter(mm, member);
	switch (member) {
	case AMM_MM_FILEPAGES: w->state.rss_pages[AMM_MM_FILEPAGES] = pages; break;
	case AMM_MM_ANONPAGES: w->state.rss_pages[AMM_MM_ANONPAGES] = pages; break;
	case AMM_MM_SHMEMPAGES: w->state.rss_pages[AMM_MM_SHMEMPAGES] = pages; break;
	}
	rss = (__u64)(w->state.rss_pages[AMM_MM_FILEPAGES] + w->state.rss_pages[AMM_MM_ANONPAGES] +
		      w->state.rss_pages[AMM_MM_SHMEMPAGES])
	      << page_shift;
	w->state.rss_bytes = rss;
	__sync_fetch_and_add(&w->state.updates, 1);
	if (flags & AMM_EVENT_FLAG_FOREIGN)
		__sync_fetch_and_add(&w->state.foreign_updates, 1);
	update_peak(w, rss);
	now = bpf_ktime_get_ns();
	update_level(tgid, w, rss, now, flags);
	update_rate(tgid, w, rss, now, flags);
	return 0;
}

/*
 * Page faults of the whole process as the kernel counts them (minflt +
 * majflt, what getrusage and /proc/PID/stat report), read when its last
 * thread exits: threads already gone are summed in signal_struct, the last
 * thread and a zombie group leader still hold their own. A thread exiting
 * in the same instant may not be summed yet. Counting faults on
 * exceptions:page_fault_user instead would cost every process on the node
 * a hook per fault (benches/RESULTS.md).
 */
static __always_inline __u64 exit_faults(struct task_struct *p)
{
	struct signal_struct *sig = p->signal;
	struct task_struct *leader = p->group_leader;
	__u64 n = sig->min_flt + sig->maj_flt + p->min_flt + p->maj_flt;

	if (leader && leader != p)
		n += leader->min_flt + leader->maj_flt;
	return n;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(amm_process_exit, struct task_struct *p)
{
	struct amm_watch *w;
	struct amm_watch copy;
	__u32 tgid = p->tgid;

	if (!watched_bit(tgid))
		return 0;
	/* group_dead: the last thread has left (signal->live already dropped) */
	if (p->signal->live.counter != 0)
		return 0;
	w = bpf_map_lookup_elem(&watches, &tgid);
	if (!w)
		return 0;
	/* a recycled pid's process exiting is not the watched one's exit */
	if (!born_in_time(w, p))
		return 0;
	__builtin_memcpy(&copy, w, sizeof(copy));
	copy.state.faults = exit_faults(p);
	/* whoever deletes the entry emits: a racing thread exit emits nothing */
	if (bpf_map_delete_elem(&watches, &tgid))
		return 0;
	if (copy.state.mm)
		bpf_map_delete_elem(&mm_owner, &copy.state.mm);
	stat_add(AMM_STAT_EXITS);
	/* a watch ended by a credentials change said its last word already */
	if (copy.state.ended)
		return 0;
	emit(tgid, &copy, AMM_EVENT_EXIT, copy.state.level, copy.state.level, copy.state.rss_bytes,
	     0, 0, bpf_ktime_get_ns());
	return 0;
}
