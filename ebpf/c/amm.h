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

/* Levels, in increasing order of urgency. */
#define AMM_LEVEL_BELOW 0
#define AMM_LEVEL_SPILL 1
#define AMM_LEVEL_PAUSE 2
#define AMM_LEVEL_TERMINATE 3

/* Kinds of event the program emits on the ring buffer. */
#define AMM_EVENT_LEVEL 1 /* the level changed (up, or down below re-arm) */
#define AMM_EVENT_SPIKE 2 /* the growth rate predicts terminate within the horizon */
#define AMM_EVENT_EXIT 3  /* the watched process exited; its entries are gone */

/* Bits of amm_watch_config.flags. */
/* Send amm_watch_config.signal to the process at the page that crosses
 * terminate. Only set for a process that registered itself with the agent. */
#define AMM_WATCH_SIGNAL_ON_TERMINATE (1u << 0)

/* Bits of amm_event.flags. */
/* The RSS update that caused the event was made by another task than the
 * watched process (tracepoint `curr == 0`): reclaim, exit, process_vm_*. */
#define AMM_EVENT_FLAG_FOREIGN (1u << 0)
/* The program sent the terminate signal together with this event. */
#define AMM_EVENT_FLAG_SIGNALLED (1u << 1)

/* kmem:rss_stat members (enum in include/linux/mm_types_task.h). */
#define AMM_MM_FILEPAGES 0
#define AMM_MM_ANONPAGES 1
#define AMM_MM_SWAPENTS 2
#define AMM_MM_SHMEMPAGES 3
#define AMM_NR_MM_COUNTERS 4

/* A threshold that is switched off. */
#define AMM_DISABLED ((__u64)-1)

/* Words in the watched-tgid bitmap: PID_MAX_LIMIT (4 Mi) bits. */
#define AMM_PID_WORDS 65536

/* Size of the ring buffer each client may get for its own events. */
#define AMM_CLIENT_RING_BYTES (64 * 1024)

/* Most possible CPUs the program sums per-CPU counters over. */
#define AMM_MAX_CPUS 512

/* Written by userspace when a tgid is watched; read-only for the program. */
struct amm_watch_config {
	__u64 limit_bytes;
	__u64 rearm_bytes;     /* below this a raised level falls back to below */
	__u64 spill_bytes;     /* AMM_DISABLED switches a level off */
	__u64 pause_bytes;
	__u64 terminate_bytes;
	__u64 spike_horizon_ns; /* 0: no spike alarm */
	__u32 flags;            /* AMM_WATCH_* */
	__u32 signal;           /* with AMM_WATCH_SIGNAL_ON_TERMINATE */
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
	__u32 level;                           /* AMM_LEVEL_* */
	__u32 spike_active;                    /* an alarm is out, not re-armed yet */
	__u64 spike_calm_since_ns;             /* growth calm since (re-arms after a horizon) */
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
	__u32 kind;               /* AMM_EVENT_* */
	__u32 level;              /* level after the event */
	__u32 prev_level;         /* level before it */
	__u64 rss_bytes;
	__u64 peak_rss_bytes;
	__u64 faults;             /* EXIT: minflt + majflt of the process */
	__s64 rate_bytes_per_ms;
	__u64 eta_ns;             /* SPIKE: predicted time to terminate */
	__u32 flags;              /* AMM_EVENT_FLAG_* */
	__u32 cpu;
};

/* Counters of the program itself, one slot per CPU (a per-CPU array). */
struct amm_stats {
	__u64 events;        /* records submitted */
	__u64 dropped;       /* records lost because the ring buffer was full */
	__u64 bound;         /* watches bound to their mm */
	__u64 exits;         /* watches removed by process exit */
};

#endif /* AMM_H */
