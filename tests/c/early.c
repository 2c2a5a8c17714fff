/* Allocation before main (a constructor), a program that may never call
 * malloc itself, and a fork with no exec from a constructor: each must just
 * run and exit 0. Built with -DNO_MALLOC for the program that never calls
 * malloc. */
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef NO_MALLOC
__attribute__((constructor)) static void before_main(void) {
    for (int i = 0; i < 1000; i++) {
        char *p = malloc(1000 + i);
        memset(p, 1, 1000 + i);
        free(p);
    }
    pid_t pid = fork();
    if (pid == 0) _exit(0);
    int st;
    waitpid(pid, &st, 0);
}
#endif

int main(void) {
    return 0;
}
