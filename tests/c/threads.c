/* Many threads allocating through every entry point, checking what they
 * get. With "exit" as argument, one thread calls exit() while the others
 * are still allocating (and the publisher is publishing).
 * Exit status 0 only if every check held. */
#define _GNU_SOURCE
#include <malloc.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define THREADS 16
#define ROUNDS 20000

static int exit_early;

static int check(void *p, size_t size, size_t align) {
    if (!p) return 0;
    if (align && ((uintptr_t)p % align)) return 0;
    if (malloc_usable_size(p) < size) return 0;
    memset(p, 0xa5, size);
    return 1;
}

static void *work(void *arg) {
    unsigned seed = (unsigned)(uintptr_t)arg;
    void *keep[64] = {0};
    for (int i = 0; i < ROUNDS; i++) {
        size_t size = 1 + rand_r(&seed) % 20000;
        int slot = rand_r(&seed) % 64;
        void *p = NULL;
        size_t align = 0;
        switch (i % 9) {
        case 0: p = malloc(size); break;
        case 1: p = calloc(1, size);
            for (size_t k = 0; k < size; k++) if (((char *)p)[k]) { fprintf(stderr, "calloc not zeroed\n"); exit(3); }
            break;
        case 2: p = realloc(keep[slot], size); keep[slot] = NULL; break;
        case 3: if (posix_memalign(&p, 64, size)) p = NULL; align = 64; break;
        case 4: p = aligned_alloc(256, (size + 255) & ~(size_t)255); align = 256; break;
        case 5: p = memalign(4096, size); align = 4096; break;
        case 6: p = valloc(size); align = 4096; break;
        case 7: p = pvalloc(size); align = 4096; break;
        case 8: p = reallocarray(keep[slot], 4, size / 4 + 1); keep[slot] = NULL; size = 4 * (size / 4 + 1); break;
        }
        if (!check(p, size, align)) { fprintf(stderr, "bad block (case %d, size %zu)\n", i % 9, size); exit(4); }
        free(keep[slot]);
        keep[slot] = p;
        if (exit_early && arg == (void *)1 && i == ROUNDS / 2) exit(0);
    }
    for (int k = 0; k < 64; k++) free(keep[k]);
    return NULL;
}

int main(int argc, char **argv) {
    pthread_t t[THREADS];
    exit_early = argc > 1 && strcmp(argv[1], "exit") == 0;
    for (uintptr_t i = 0; i < THREADS; i++)
        if (pthread_create(&t[i], NULL, work, (void *)(i + 1))) { perror("pthread_create"); return 2; }
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    return 0;
}
