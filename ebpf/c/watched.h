/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The watched-tgid bitmap and its test: the first (and, for an unwatched
 * process, the only) thing every amm program does. Userspace sets and clears
 * the bits; programs only read them. Shared by amm.bpf.c and bench.bpf.c so
 * the benchmark measures the very same test.
 */
#ifndef AMM_WATCHED_H
#define AMM_WATCHED_H

#include "amm.h"

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, AMM_PID_WORDS);
	__type(key, __u32);
	__type(value, __u64);
} watch_bits SEC(".maps");

static __always_inline int watched_bit(__u32 tgid)
{
	__u32 word = tgid >> 6;
	__u64 *bits = bpf_map_lookup_elem(&watch_bits, &word);

	return bits && ((*bits >> (tgid & 63)) & 1);
}

#endif /* AMM_WATCHED_H */
