/* A malloc-heavy benchmark: THREADS threads each keep SLOTS live blocks and
 * replace a random one OPS times with a block of a random size (16 bytes to
 * MAXSIZE, most of them small), touching what they get. Then every block is
 * freed, and the process idles IDLE seconds.
 *
 * usage: mallocbench THREADS OPS SLOTS MAXSIZE IDLE
 * prints one line: wall_ms hwm_kib rss_live_kib rss_freed_kib rss_idle_kib */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static long ops, slots, maxsize;
static void **all[64];

static long status_kib(const char *key) {
    char line[256];
    long v = -1;
    FILE *f = fopen("/proc/self/status", "r");
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (strncmp(line, key, strlen(key)) == 0) v = atol(line + strlen(key));
    fclose(f);
    return v;
}

static size_t pick(unsigned *seed) {
    unsigned r = rand_r(seed);
    /* 7 in 8 blocks small (16..512 bytes), the rest up to maxsize */
    return (r & 7) ? 16 + (size_t)(r >> 3) % 497 : 16 + (size_t)(r >> 3) % (size_t)maxsize;
}

static void *work(void *arg) {
    uintptr_t id = (uintptr_t)arg;
    unsigned seed = (unsigned)id * 7919u + 1;
    void **slot = calloc((size_t)slots, sizeof *slot);
    all[id] = slot;
    for (long i = 0; i < ops; i++) {
        long j = rand_r(&seed) % slots;
        free(slot[j]);
        size_t n = pick(&seed);
        char *p = malloc(n);
        if (!p) { perror("malloc"); exit(2); }
        p[0] = (char)i;
        p[n - 1] = (char)i;
        slot[j] = p;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 6) { fprintf(stderr, "usage: mallocbench THREADS OPS SLOTS MAXSIZE IDLE\n"); return 2; }
    long threads = atol(argv[1]);
    ops = atol(argv[2]); slots = atol(argv[3]); maxsize = atol(argv[4]);
    int idle = atoi(argv[5]);
    if (threads < 1 || threads > 64) return 2;
    pthread_t t[64];
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC, &a);
    for (long i = 0; i < threads; i++) pthread_create(&t[i], NULL, work, (void *)(uintptr_t)i);
    for (long i = 0; i < threads; i++) pthread_join(t[i], NULL);
    clock_gettime(CLOCK_MONOTONIC, &b);
    long live = status_kib("VmRSS:");
    for (long i = 0; i < threads; i++) {
        for (long j = 0; j < slots; j++) free(all[i][j]);
        free(all[i]);
    }
    long freed = status_kib("VmRSS:");
    sleep((unsigned)idle);
    long idle_rss = status_kib("VmRSS:");
    double ms = (double)(b.tv_sec - a.tv_sec) * 1e3 + (double)(b.tv_nsec - a.tv_nsec) / 1e6;
    printf("%.1f %ld %ld %ld %ld\n", ms, status_kib("VmHWM:"), live, freed, idle_rss);
    return 0;
}
