/* A program the tests drive line by line on stdin; it answers each command
 * with one line on stdout.
 *   alloc MIB SIZE   allocate MIB MiB in blocks of SIZE bytes, touched, kept
 *   free             free every kept block
 *   free_but_last    free every kept block but the last (which keeps glibc
 *                    from trimming the freed space at the top of its heap)
 *   free_every_other free every other kept block (a fragmented heap)
 *   exec PATH ARG    execv(PATH, {PATH, ARG})
 *   setuid UID       setgid+setuid (the record must follow its new owner)
 *   dumpable         prctl(PR_SET_DUMPABLE, 1)
 *   closefds         close every descriptor from 3 up (as daemons do)
 *   exit             exit(0) at once
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/prctl.h>
#include <sys/syscall.h>

static void **blocks;
static size_t nblocks, cap;

static void keep(void *p) {
    if (nblocks == cap) {
        cap = cap ? cap * 2 : 1024;
        blocks = realloc(blocks, cap * sizeof *blocks);
        if (!blocks) { perror("realloc"); exit(2); }
    }
    blocks[nblocks++] = p;
}

int main(void) {
    char line[512];
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("ready %d\n", getpid());
    while (fgets(line, sizeof line, stdin)) {
        unsigned long a = 0, b = 0;
        char path[256] = {0}, arg[128] = {0};
        if (sscanf(line, "alloc %lu %lu", &a, &b) == 2) {
            size_t n = (a << 20) / b;
            for (size_t i = 0; i < n; i++) {
                char *p = malloc(b);
                if (!p) { perror("malloc"); return 2; }
                memset(p, (int)i, b);
                keep(p);
            }
            printf("ok alloc\n");
        } else if (strncmp(line, "free_every_other", 16) == 0) {
            size_t kept = 0;
            for (size_t i = 0; i < nblocks; i++) {
                if (i % 2) free(blocks[i]);
                else blocks[kept++] = blocks[i];
            }
            nblocks = kept;
            printf("ok free_every_other\n");
        } else if (strncmp(line, "free_but_last", 13) == 0) {
            for (size_t i = 0; i + 1 < nblocks; i++) free(blocks[i]);
            if (nblocks) { blocks[0] = blocks[nblocks - 1]; nblocks = 1; }
            printf("ok free_but_last\n");
        } else if (strncmp(line, "free", 4) == 0) {
            for (size_t i = 0; i < nblocks; i++) free(blocks[i]);
            nblocks = 0;
            printf("ok free\n");
        } else if (sscanf(line, "exec %255s %127s", path, arg) == 2) {
            char *argv[] = {path, arg, NULL};
            execv(path, argv);
            perror("execv");
            return 2;
        } else if (sscanf(line, "setuid %lu", &a) == 1) {
            if (setgid((gid_t)a) || setuid((uid_t)a)) { perror("setuid"); return 2; }
            printf("ok setuid\n");
        } else if (strncmp(line, "dumpable", 8) == 0) {
            prctl(PR_SET_DUMPABLE, 1, 0, 0, 0);
            printf("ok dumpable\n");
        } else if (strncmp(line, "closefds", 8) == 0) {
            syscall(SYS_close_range, 3U, ~0U, 0);
            printf("ok closefds\n");
        } else if (strncmp(line, "exit", 4) == 0) {
            exit(0);
        } else {
            printf("unknown %s", line);
        }
    }
    return 0;
}
