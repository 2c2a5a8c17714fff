/* SPDX-License-Identifier: GPL-2.0 OR MIT */
/*
 * The kernel program's amm_level_of (ebpf/c/amm.h), compiled for the host by
 * tests/tests/layout.rs: reads "spill pause terminate rss" lines (decimal
 * bytes) on stdin and prints the level of each, one per line.
 */
#include <stdio.h>

#include "amm.h"

int main(void)
{
	unsigned long long spill, pause, terminate, rss;

	while (scanf("%llu %llu %llu %llu", &spill, &pause, &terminate, &rss) == 4) {
		struct amm_watch_config cfg = {
			.spill_bytes = spill,
			.pause_bytes = pause,
			.terminate_bytes = terminate,
		};
		printf("%u\n", amm_level_of(&cfg, rss));
	}
	return 0;
}
