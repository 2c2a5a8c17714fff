/* Small programs whose memory truth is known, for the labelled suite of
 * real programs (tests/tests/program_suite.rs). Nothing here knows amm: they
 * call malloc/free and mmap like any C program, and run on whichever
 * allocator the preload library gives them.
 *
 *   labelled leak         keeps 64-byte objects, 4 MiB every 200 ms for 8 s
 *                         (task temporaries come and go beside it)
 *   labelled hoard        fills 160 MiB of 32 KiB objects, frees all but the
 *                         last (the allocator keeps the freed memory), holds
 *                         3 s, then maps 112 MiB of other memory (pressure),
 *                         holds 4 s, unmaps it, runs 1.5 s more
 *   labelled fragment     fills 96 MiB of 48-byte objects, frees 63 of every
 *                         64 (a survivor on every page), holds 5 s
 *   labelled cache        fills a cache of 1 KiB objects, 4 MiB every 200 ms
 *                         up to 100 MiB, then keeps it at that size for 10 s
 *                         while the same work (2 MiB of temporaries every
 *                         200 ms) goes on
 *   labelled temporaries  allocates 64 MiB of 64 KiB objects, touches them,
 *                         holds them 250 ms (past one 200 ms tick: on glibc
 *                         they are returned at their free), frees them all,
 *                         waits 300 ms; 20 times
 * Each mode exits 0 when done.
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/mman.h>

#define MIB (1UL << 20)

static void **blocks;
static size_t nblocks, cap;

static void keep(void *p) {
    if (nblocks == cap) {
        cap = cap ? cap * 2 : 4096;
        blocks = realloc(blocks, cap * sizeof *blocks);
        if (!blocks) { perror("realloc"); exit(2); }
    }
    blocks[nblocks++] = p;
}

static void *touched(size_t size, int fill) {
    char *p = malloc(size);
    if (!p) { perror("malloc"); exit(2); }
    memset(p, fill, size);
    return p;
}

static void fill(size_t bytes, size_t size) {
    for (size_t i = 0; i < bytes / size; i++) keep(touched(size, (int)i));
}

static void sleep_ms(long ms) {
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) != 0) {}
}

/* Task temporaries: `bytes` in objects of `size`, used, held `hold_ms`,
 * then freed. */
static void temporaries(size_t bytes, size_t size, long hold_ms) {
    size_t n = bytes / size;
    void **t = malloc(n * sizeof *t);
    if (!t) { perror("malloc"); exit(2); }
    for (size_t i = 0; i < n; i++) t[i] = touched(size, (int)i);
    if (hold_ms > 0) sleep_ms(hold_ms);
    for (size_t i = 0; i < n; i++) free(t[i]);
    free(t);
}

/* Memory from outside the allocator that pushes the process past spill. */
static void pressure(long hold_ms) {
    size_t len = 112 * MIB;
    char *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) { perror("mmap"); exit(2); }
    memset(m, 1, len);
    sleep_ms(hold_ms);
    munmap(m, len);
    /* goes on a while without it, as a worker would: a release right before
     * the exit could not be told from the process tearing down */
    sleep_ms(1500);
}

int main(int argc, char **argv) {
    const char *mode = argc > 1 ? argv[1] : "";
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (strcmp(mode, "leak") == 0) {
        for (int i = 0; i < 40; i++) {
            fill(4 * MIB, 64);
            temporaries(8 * MIB, 4096, 0);
            sleep_ms(200);
        }
    } else if (strcmp(mode, "hoard") == 0) {
        fill(160 * MIB, 32768);
        for (size_t i = 0; i + 1 < nblocks; i++) free(blocks[i]);
        sleep_ms(3000);
        pressure(4000);
    } else if (strcmp(mode, "fragment") == 0) {
        fill(96 * MIB, 48);
        size_t kept = 0;
        for (size_t i = 0; i < nblocks; i++) {
            if (i % 64 == 0) blocks[kept++] = blocks[i];
            else free(blocks[i]);
        }
        nblocks = kept;
        sleep_ms(5000);
    } else if (strcmp(mode, "cache") == 0) {
        for (int i = 0; i < 25 + 50; i++) {
            if (i < 25) fill(4 * MIB, 1024);
            temporaries(2 * MIB, 4096, 0);
            sleep_ms(200);
        }
    } else if (strcmp(mode, "temporaries") == 0) {
        for (int i = 0; i < 20; i++) {
            temporaries(64 * MIB, 65536, 250);
            sleep_ms(300);
        }
    } else {
        fprintf(stderr, "usage: labelled leak|hoard|fragment|cache|temporaries\n");
        return 2;
    }
    printf("done %s %zu blocks\n", mode, nblocks);
    return 0;
}
