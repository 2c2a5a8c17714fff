// SPDX-License-Identifier: GPL-2.0
/*
 * Benchmark-only programs, never loaded by the agent: the same first test as
 * amm.bpf.c (is this tgid watched?) on other attach points, so benches/ can
 * show what each choice would cost an unwatched process:
 * - the classic tracepoints kmem:rss_stat and exceptions:page_fault_user;
 * - a BTF tracepoint on page_fault_user (a per-fault hook for fault counts).
 */
#include <linux/bpf.h>
#include <linux/types.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

#include "amm.h"
#include "watched.h"

char LICENSE[] SEC("license") = "GPL";

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hits SEC(".maps");

static __always_inline int watched(void)
{
	__u32 zero = 0;
	__u64 *n;

	if (!watched_bit(bpf_get_current_pid_tgid() >> 32))
		return 0;
	n = bpf_map_lookup_elem(&hits, &zero);
	if (n)
		__sync_fetch_and_add(n, 1);
	return 0;
}

SEC("tracepoint/kmem/rss_stat")
int classic_rss_stat(void *ctx)
{
	return watched();
}

SEC("tracepoint/exceptions/page_fault_user")
int classic_page_fault_user(void *ctx)
{
	return watched();
}

SEC("tp_btf/page_fault_user")
int BPF_PROG(btf_page_fault_user, unsigned long address, void *regs, unsigned long error_code)
{
	return watched();
}

/* The floor: what attaching any program to rss_stat costs. */
SEC("tp_btf/rss_stat")
int BPF_PROG(btf_rss_stat_empty, void *mm, int member)
{
	return 0;
}
