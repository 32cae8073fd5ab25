/* The native launcher: bin/tcpserver from a checkout, and the installed tcpserver (`make`
 * builds it; bin/tcpclient and bin/sslserver are links to it, and start their command).
 *
 * Before Python starts, tcpserver's (and sslserver's) soft memory, stack, descriptor and process limits go up to
 * the hard ones, so that Python and its threads have room under `softlimit -m N` for any N the
 * C tcpserver starts with; the limits as they were, and the signals ignored before Python ignores SIGPIPE and SIGXFSZ, follow
 * in an argv marker right after the interpreter's arguments (ucspi/server/spawn.py reads it, and
 * every program gets those limits back). Nothing is added to the environment, not even PWD: it
 * goes to Python, and on to every program, byte for byte as it came.
 *
 * Where no C compiler is found, bin/tcpserver is bin/tcpserver.py instead, as before.
 */

#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

extern char **environ;

#define MARKER "--ucspi-launcher="

static void
fatal(const char *command, const char *message, const char *detail)
{
    static char line[PATH_MAX + 256];
    int length = snprintf(line, sizeof line, "%s: fatal: %s%s\n", command, message, detail);
    if (length > 0)
        (void)!write(2, line, (size_t)length < sizeof line ? (size_t)length : sizeof line - 1);
    _exit(111);
}

static int
exists(const char *path)
{
    struct stat status;
    return lstat(path, &status) == 0;
}

/* The virtualenv's Python: beside this file once installed, .venv/bin/ in a checkout. */
static void
find_python(const char *command, const char *argv0, char *python, size_t size)
{
    static char self[PATH_MAX];
    static char checkout[PATH_MAX + 32];
    ssize_t length = readlink("/proc/self/exe", self, sizeof self - 1);
    char *slash;

    if (length > 0) {
        self[length] = '\0';
    }
    else if (realpath(argv0, self) == NULL) {
        fatal(command, "unable to find myself: ", strerror(errno));
    }
    slash = strrchr(self, '/');
    if (slash == NULL)
        fatal(command, "unable to find myself", "");
    *slash = '\0'; /* self is the launcher's directory now */
    snprintf(python, size, "%s/python", self);
    if (access(python, X_OK) == 0)
        return;
    slash = strrchr(self, '/');
    snprintf(checkout, sizeof checkout, "%.*s/.venv/bin/python", slash ? (int)(slash - self) : 0, self);
    if (access(checkout, X_OK) == 0) {
        snprintf(python, size, "%s", checkout);
        return;
    }
    /* Made with a Python this user cannot reach (a pyenv under /root, say). */
    if (exists(python))
        fatal(command, "unable to run Python: access denied: ", python);
    if (exists(checkout))
        fatal(command, "unable to run Python: access denied: ", checkout);
    fatal(command, "run make first", "");
}

/* What Python needs room in: memory, stack (RLIMIT_STACK also sizes threads by default),
 * descriptors, and processes (threads count). The others (CORE, FSIZE, CPU, ...) stay on the
 * server as on the C one: a server's core dump, say, is the admin's call. */
static const int lifted_resources[] = {RLIMIT_AS, RLIMIT_DATA, RLIMIT_STACK, RLIMIT_NOFILE, RLIMIT_NPROC};

/* MARKER ignored=HEX,limit=RESOURCE:SOFT:HARD,...: each limit raised to its hard one is listed. */
static void
lift_limits(char *marker, size_t size)
{
    unsigned long long ignored = 0;
    struct sigaction action;
    size_t used, i;
    int sig, resource;

    for (sig = 1; sig <= 64; sig++) {
        /* glibc refuses its own 32 and 33; SIGKILL and SIGSTOP cannot be ignored. */
        if (sigaction(sig, NULL, &action) == 0 && action.sa_handler == SIG_IGN)
            ignored |= 1ULL << (sig - 1);
    }
    used = (size_t)snprintf(marker, size, "%signored=%llx", MARKER, ignored);
    for (i = 0; i < sizeof lifted_resources / sizeof lifted_resources[0]; i++) {
        struct rlimit limit, lifted;
        resource = lifted_resources[i];
        if (getrlimit(resource, &limit) != 0 || limit.rlim_cur == limit.rlim_max)
            continue;
        lifted.rlim_cur = lifted.rlim_max = limit.rlim_max;
        if (setrlimit(resource, &lifted) != 0)
            continue; /* left as it is: nothing to give back */
        if (used < size)
            used += (size_t)snprintf(marker + used, size - used, ",limit=%d:%llu:%llu", resource,
                                     (unsigned long long)limit.rlim_cur, (unsigned long long)limit.rlim_max);
    }
}

int
main(int argc, char **argv)
{
    const char *argv0 = argc > 0 && argv[0] ? argv[0] : "tcpserver";
    const char *command = strrchr(argv0, '/') ? strrchr(argv0, '/') + 1 : argv0;
    const char *module = "tcpserver";
    /* Static, not on the stack: under `softlimit -s 20000` the C tcpserver starts, and the stack
     * is lifted only once lift_limits has run. */
    static char python[PATH_MAX + 32];
    static char code[128];
    static char marker[1024];
    char **arguments;
    int count = 0, i;

    if (*command == '\0')
        command = "tcpserver";
    if (strcmp(command, "tcpclient") == 0 || strcmp(command, "sslserver") == 0)
        module = command;
    /* First of all: under softlimit -d even this launcher's malloc may not fit. sslserver runs
     * tcpserver's main, under the same run files' softlimit (s/qmail's smtps: -m 30000000). */
    if (strcmp(module, "tcpclient") != 0)
        lift_limits(marker, sizeof marker);
    find_python(command, argv0, python, sizeof python);
    snprintf(code, sizeof code, "import sys;del sys.argv[0];from ucspi.cli import run;run('%s')", module);

    arguments = calloc((size_t)argc + 8, sizeof *arguments);
    if (arguments == NULL)
        fatal(command, "out of memory", "");
    arguments[count++] = python;
    /* -I: PYTHON* variables and the user's site are the program's business, not ours. */
    arguments[count++] = "-I";
    arguments[count++] = "-c";
    arguments[count++] = code;
    arguments[count++] = (char *)argv0;
    if (strcmp(module, "tcpclient") != 0)
        arguments[count++] = marker;
    for (i = 1; i < argc; i++)
        arguments[count++] = argv[i];
    arguments[count] = NULL;
    execve(python, arguments, environ);
    fatal(command, "unable to run Python: ", strerror(errno));
    return 111;
}
