/* Allocates 32 MiB, forks; the child allocates 64 MiB more. Each says who
 * it is ("parent PID" / "child PID") and waits for its stdin to close.
 * With "exec" as argument the child execs ARGV[2] at once instead. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void hold(size_t mib) {
    for (size_t i = 0; i < mib * 16; i++) {
        char *p = malloc(64 << 10);
        if (!p) { perror("malloc"); exit(2); }
        memset(p, 1, 64 << 10);
    }
}

int main(int argc, char **argv) {
    char c;
    hold(32);
    pid_t pid = fork();
    if (pid < 0) { perror("fork"); return 2; }
    if (pid == 0) {
        if (argc > 2 && strcmp(argv[1], "exec") == 0) {
            execl(argv[2], argv[2], (char *)NULL);
            perror("execl");
            _exit(2);
        }
        hold(64);
        printf("child %d\n", getpid());
        fflush(stdout);
        while (read(0, &c, 1) > 0) {}
        return 0;
    }
    printf("parent %d\n", getpid());
    fflush(stdout);
    while (read(0, &c, 1) > 0) {}
    int status;
    waitpid(pid, &status, 0);
    return WIFEXITED(status) ? WEXITSTATUS(status) : 1;
}
