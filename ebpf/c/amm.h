/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The structs that cross between the BPF program and userspace.
 *
 * Every struct here has a Rust mirror in ebpf/src/lib.rs with the same size
 * and field offsets; tests/tests/layout.rs reads the BTF that clang puts in
 * the compiled object and checks both sides agree. Change both together.
 *
 * Only fixed-width types, explicit padding, 8-byte alignment.
 */
#ifndef AMM_H
#define AMM_H

#include <linux/types.h>

/*
 * Constants are enums, not macros, so they reach the object's BTF and the
 * layout test checks each value against its Rust twin (ebpf/src/lib.rs,
 * `c_enums`). An enum never used as a type is kept in BTF by the anchor in
 * amm.bpf.c.
 */

/* Levels, in increasing order of urgency. */
enum amm_level {
	AMM_LEVEL_BELOW = 0,
	AMM_LEVEL_SPILL = 1,
	AMM_LEVEL_PAUSE = 2,
	AMM_LEVEL_TERMINATE = 3,
};

/* Kinds of event the program emits on the ring buffer. */
enum amm_event_kind {
	AMM_EVENT_LEVEL = 1,       /* the level changed (up, or down below re-arm) */
	AMM_EVENT_SPIKE = 2,       /* the growth rate predicts terminate within the horizon */
	AMM_EVENT_EXIT = 3,        /* the watched process exited; its entries are gone */
	AMM_EVENT_CREDENTIALS = 4, /* its credentials changed: the watch ended there */
};

/* Bits of amm_watch_config.flags. */
enum amm_watch_flag {
	/* Send amm_watch_config.signal to the process at the page that crosses
	 * terminate. Only set for a process that registered itself with the
	 * agent or was registered by its parent. */
	AMM_WATCH_SIGNAL_ON_TERMINATE = 1 << 0,
	/* The process must keep the uids, gids and (at most) the permitted
	 * capabilities in amm_watch_config: a change (setuid/setgid or
	 * file-capability exec, setresuid) ends the watch with
	 * AMM_EVENT_CREDENTIALS, and nothing more is counted, emitted or
	 * signalled for it. */
	AMM_WATCH_BIND_CREDENTIALS = 1 << 1,
};

/* Bits of amm_event.flags. */
enum amm_event_flag {
	/* The RSS update that caused the event was made by another task than
	 * the watched process (tracepoint `curr == 0`): reclaim, exit,
	 * process_vm_*. */
	AMM_EVENT_FLAG_FOREIGN = 1 << 0,
	/* The program sent the terminate signal together with this event. */
	AMM_EVENT_FLAG_SIGNALLED = 1 << 1,
};

/* Why a watch ended in the kernel (amm_watch_state.ended). */
enum amm_end {
	AMM_END_NONE = 0,
	AMM_END_CREDENTIALS = 1,
};

/* kmem:rss_stat members (enum in include/linux/mm_types_task.h). */
enum amm_mm_counter {
	AMM_MM_FILEPAGES = 0,
	AMM_MM_ANONPAGES = 1,
	AMM_MM_SWAPENTS = 2,
	AMM_MM_SHMEMPAGES = 3,
	AMM_NR_MM_COUNTERS = 4,
};

/* Sizes shared with userspace. */
enum amm_limit {
	/* Words in the watched-tgid bitmap: PID_MAX_LIMIT (4 Mi) bits. */
	AMM_PID_WORDS = 65536,
	/* Size of the ring buffer each client may get for its own events. */
	AMM_CLIENT_RING_BYTES = 64 * 1024,
	/* Most possible CPUs the program sums per-CPU counters over. */
	AMM_MAX_CPUS = 512,
};

/* Fields of struct amm_stats, for stat_add(). */
enum amm_stat {
	AMM_STAT_EVENTS = 0,
	AMM_STAT_DROPPED = 1,
	AMM_STAT_BOUND = 2,
	AMM_STAT_EXITS = 3,
	AMM_STAT_STRANGERS = 4,
	AMM_STAT_CREDENTIALS = 5,
};

/* A threshold that is switched off: all ones, `amm_ebpf::DISABLED` in Rust.
 * The one constant left a macro: a 64-bit value is no portable enum. */
#define AMM_DISABLED ((__u64)-1)

/* Written by userspace when a tgid is watched; read-only for the program. */
struct amm_watch_config {
	__u64 limit_bytes;
	__u64 rearm_bytes;     /* below this a raised level falls back to below */
	__u64 spill_bytes;     /* AMM_DISABLED switches a level off */
	__u64 pause_bytes;
	__u64 terminate_bytes;
	__u64 spike_horizon_ns; /* 0: no spike alarm */
	__u32 flags;            /* enum amm_watch_flag */
	__u32 signal;           /* with AMM_WATCH_SIGNAL_ON_TERMINATE */
	/* CLOCK_BOOTTIME ns at which the agent last saw the process running:
	 * it held its pid then, so a task whose thread group leader started
	 * later holds a recycled pid and never matches the watch. */
	__u64 born_before_ns;
	/* With AMM_WATCH_BIND_CREDENTIALS: the capabilities the process may
	 * hold (CapPrm at registration) and the ids it must keep. */
	__u64 cap_permitted;
	__u32 uid;
	__u32 euid;
	__u32 suid;
	__u32 gid;
	__u32 egid;
	__u32 sgid;
};

/* Kept by the program; userspace writes it zeroed and may read it. */
struct amm_watch_state {
	__u64 mm;                              /* address of the mm_struct watched */
	__s64 rss_pages[AMM_NR_MM_COUNTERS];   /* exact per-member counters */
	__u64 rss_bytes;                       /* FILE + ANON + SHMEM */
	__u64 peak_rss_bytes;
	__u64 faults;                          /* minflt + majflt, set at exit */
	__s64 rate_bytes_per_ms;               /* smoothed growth rate */
	__u64 window_start_ns;                 /* start of the current rate window */
	__u64 window_start_rss;
	__u64 updates;                         /* rss_stat updates seen */
	__u64 foreign_updates;                 /* of which curr == 0 */
	__u32 level;                           /* enum amm_level */
	__u32 spike_active;                    /* an alarm is out, not re-armed yet */
	__u64 spike_calm_since_ns;             /* growth calm since (re-arms after a horizon) */
	__u32 ended;                           /* enum amm_end: nothing counts after it */
	__u32 reserved;                        /* explicit padding, zero */
};

/* The value of the `watches` map, keyed by tgid. */
struct amm_watch {
	struct amm_watch_config config;
	struct amm_watch_state state;
};

/* One record on the `events` ring buffer. */
struct amm_event {
	__u64 t_ns;               /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u32 tgid;
	__u32 kind;               /* enum amm_event_kind */
	__u32 level;              /* level after the event */
	__u32 prev_level;         /* level before it */
	__u64 rss_bytes;
	__u64 peak_rss_bytes;
	__u64 faults;             /* EXIT: minflt + majflt of the process */
	__s64 rate_bytes_per_ms;
	__u64 eta_ns;             /* SPIKE: predicted time to terminate */
	__u32 flags;              /* enum amm_event_flag */
	__u32 cpu;
};

/* Counters of the program itself, one slot per CPU (a per-CPU array). */
struct amm_stats {
	__u64 events;        /* records submitted */
	__u64 dropped;       /* records lost because the ring buffer was full */
	__u64 bound;         /* watches bound to their mm */
	__u64 exits;         /* watches removed by process exit */
	__u64 strangers;     /* updates of a watched pid by another process (a recycled pid) */
	__u64 credentials;   /* watches ended by a credentials change */
};

/*
 * The level `rss` reaches under a watch's thresholds: the highest level whose
 * threshold it reaches. The one C definition: its Rust twin is
 * amm_protocol::ThresholdBytes::level_of, and tests/tests/layout.rs compiles
 * this very function for the host and checks both give the same level on
 * every edge (each threshold, one byte either side, AMM_DISABLED, 0, 2^64-1).
 */
static inline __attribute__((always_inline)) __u32
amm_level_of(const struct amm_watch_config *cfg, __u64 rss)
{
	if (rss >= cfg->terminate_bytes)
		return AMM_LEVEL_TERMINATE;
	if (rss >= cfg->pause_bytes)
		return AMM_LEVEL_PAUSE;
	if (rss >= cfg->spill_bytes)
		return AMM_LEVEL_SPILL;
	return AMM_LEVEL_BELOW;
}

#endif /* AMM_H */
