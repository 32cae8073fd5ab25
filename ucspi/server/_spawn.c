/* ucspi.server._spawn: start the program as the original's child would, GIL released.
 *
 * clone(CLONE_VM|CLONE_VFORK) on a stack inside this call's own frame: no child stack to map
 * and unmap, no copy of the page tables. The child only makes system calls on what the parent
 * prepared: it resets the signals that have handlers (they live in the parent's memory) and
 * those the server ignores but the original's child has at default, restores the soft resource
 * limits tcpserver was started with, puts the connection on fds 0 and 1, sets the mask, and
 * execs along the original's PATH search (pathexec_run). The exec's errno comes back through
 * the shared memory; a child whose exec failed is reaped here, before this call returns.
 */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <pthread.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <stdint.h>
#include <unistd.h>

/* The kernel's sigset_t (what rt_sigprocmask takes): 64 signals. */
typedef unsigned long kernel_sigset;
#define KERNEL_SIGSET_SIZE sizeof(kernel_sigset)
#define SIGNAL_BIT(sig) (1UL << ((sig) - 1))
/* glibc's internal signals (SIGCANCEL, SIGSETXID): its sigaction refuses them, and nothing
 * sends them to the child; their handlers go at execve like every other handler. */
#define FIRST_INTERNAL_SIGNAL 32
#define LAST_INTERNAL_SIGNAL 33
#define CHILD_STACK_SIZE (32 * 1024)

typedef struct {
    int resource;
    struct rlimit limit;
} saved_limit;

/* Set once by configure(); read by every child. */
static kernel_sigset signals_to_default; /* set to SIG_DFL whatever they are now */
static kernel_sigset program_mask;       /* the program's signal mask */
static saved_limit limits[RLIM_NLIMITS];
static int limit_count;

typedef struct {
    char *const *candidates;
    Py_ssize_t candidate_count;
    char *const *argv;
    char *const *envp;
    int stdin_fd;
    int stdout_fd;
    const int *pass_fds;
    Py_ssize_t pass_count;
    volatile int exec_errno; /* written by the child, read by the parent once it is resumed */
} child_job;

static int
raw_sigprocmask(int how, const kernel_sigset *set, kernel_sigset *old)
{
    /* The system call itself: glibc's wrapper would leave its internal signals out. */
    return (int)syscall(SYS_rt_sigprocmask, how, set, old, KERNEL_SIGSET_SIZE);
}

static void
put_on(child_job *job, int from, int to)
{
    /* dup2 onto itself keeps close-on-exec: cleared instead, as posix_spawn's dup2 does. */
    if ((from == to ? fcntl(to, F_SETFD, 0) : dup2(from, to)) == -1) {
        job->exec_errno = errno;
        _exit(127);
    }
}

static int
child_main(void *argument)
{
    child_job *job = argument;
    struct sigaction action;
    int sig;
    Py_ssize_t i;
    int saved = 0;

    memset(&action, 0, sizeof action);
    for (sig = 1; sig < 65; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP || (sig >= FIRST_INTERNAL_SIGNAL && sig <= LAST_INTERNAL_SIGNAL))
            continue;
        if (!(signals_to_default & SIGNAL_BIT(sig))) {
            if (sigaction(sig, NULL, &action) == -1)
                continue;
            /* Ignored ones the server inherited stay ignored, as the original's child keeps them. */
            if (action.sa_handler == SIG_DFL || action.sa_handler == SIG_IGN)
                continue;
        }
        memset(&action, 0, sizeof action);
        action.sa_handler = SIG_DFL;
        sigaction(sig, &action, NULL);
    }
    for (i = 0; i < limit_count; i++) {
        /* The soft limit as it was; the hard one as it is now (lowered since, it caps the soft). */
        struct rlimit now, wanted;
        if (getrlimit(limits[i].resource, &now) != 0)
            continue;
        wanted.rlim_max = now.rlim_max;
        wanted.rlim_cur = limits[i].limit.rlim_cur < now.rlim_max ? limits[i].limit.rlim_cur : now.rlim_max;
        setrlimit(limits[i].resource, &wanted);
    }
    put_on(job, job->stdin_fd, 0);
    put_on(job, job->stdout_fd, 1);
    for (i = 0; i < job->pass_count; i++)
        put_on(job, job->pass_fds[i], job->pass_fds[i]);
    raw_sigprocmask(SIG_SETMASK, &program_mask, NULL);
    /* pathexec_run: ENOENT goes on; EACCES, EPERM and EISDIR go on but are remembered; any
     * other error ends the search. */
    for (i = 0; i < job->candidate_count; i++) {
        execve(job->candidates[i], job->argv, job->envp);
        if (errno != ENOENT) {
            saved = errno;
            if (errno != EACCES && errno != EPERM && errno != EISDIR)
                break;
        }
    }
    job->exec_errno = saved ? saved : ENOENT;
    _exit(127);
}

/* -- the clone --------------------------------------------------------------------------- */

static pid_t
clone_child(child_job *job, int *clone_errno)
{
    kernel_sigset all = ~0UL, old;
    pid_t pid;
    /* The child's stack: inside this frame, so nothing is mapped per spawn. */
    char stack[CHILD_STACK_SIZE] __attribute__((aligned(64)));

    /* Every signal blocked across the clone: no handler of ours may run in the child. */
    raw_sigprocmask(SIG_SETMASK, &all, &old);
    pid = clone(child_main, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, job);
    *clone_errno = pid == -1 ? errno : 0;
    raw_sigprocmask(SIG_SETMASK, &old, NULL);
    return pid;
}

/* -- the engine: spawning threads, reaping, and the events the loop takes ---------------------
 *
 * The loop hands a job over (submit) and goes on; a spawning thread clones, registers the pid
 * and queues the answer, and an eventfd wakes the loop, which takes every queued event at once
 * (take): no GIL, no Python and no wake-up per client in between. The loop reaps (reap, on
 * SIGCHLD and at each take): no thread of its own to wake per program that ends.
 *
 * Only reap reaps. A child whose exec failed is registered too, as failed: it is reaped without
 * an event. A zombie nobody registered may be the child of a clone that has not returned yet:
 * each spawner's window (odd while it is between clone and registration) is noted, the round
 * stops there, and the next round after every window noted has closed decides: the zombie is
 * registered by then, or it was never ours (a child the process had before it was tcpserver).
 * The spawner that closes a window while a round waits for one wakes the loop.
 */

enum { EVENT_SPAWNED, EVENT_EXEC_FAILED, EVENT_FORK_FAILED, EVENT_ENDED };

typedef struct queued_job {
    struct queued_job *next;
    long long token;
    child_job job; /* its arrays and strings follow this struct, in the same allocation */
} queued_job;

typedef struct {
    int kind;
    long long token;
    long value; /* the pid, the errno or the wait status */
} engine_event;

typedef struct pid_entry {
    struct pid_entry *next;
    pid_t pid;
    int failed; /* its exec failed: reaped without an event */
    long long token;
} pid_entry;

#define PID_BUCKETS 1024
#define MAX_SPAWNERS 17 /* up to 16 spawning threads, and the loop's own (spawn_now) */
#define ENGINE_THREAD_STACK (256 * 1024)

static struct {
    int started;
    int broken; /* an event could not be queued: the server must exit */
    pthread_mutex_t lock;
    pthread_cond_t job_ready; /* the spawning threads wait on it */
    queued_job *head, *tail;
    engine_event *events, *spare;
    size_t event_count, event_capacity, spare_capacity;
    int wake_pending;
    int wake_fd;
    int child_signal_fd; /* SIGCHLD as a descriptor; -1 until child_signal_fd() */
    pid_entry *buckets[PID_BUCKETS];
    unsigned long window[MAX_SPAWNERS]; /* odd: that spawner is between clone and registration */
    int reap_due;                   /* take() reaps first: a window the round waited for closed */
    int reap_wanted;                /* a round stopped at a zombie nobody registered: */
    pid_t suspect;                  /* that zombie, */
    unsigned long noted[MAX_SPAWNERS]; /* and the windows as they were then */
    int spawners;                   /* the loop's own is the last */
    char **candidates;
    Py_ssize_t candidate_count;
    char **argv;
} engine = {.lock = PTHREAD_MUTEX_INITIALIZER, .job_ready = PTHREAD_COND_INITIALIZER, .wake_fd = -1, .child_signal_fd = -1};

static pid_entry **
bucket_of(pid_t pid)
{
    return &engine.buckets[(unsigned)pid % PID_BUCKETS];
}

static pid_entry *
find_registered(pid_t pid, pid_entry ***link)
{
    pid_entry **here = bucket_of(pid);
    for (; *here != NULL; here = &(*here)->next)
        if ((*here)->pid == pid) {
            *link = here;
            return *here;
        }
    return NULL;
}

/* Under the lock. Returns whether the eventfd must be written once the lock is released. */
static int
push_event(int kind, long long token, long value)
{
    if (engine.event_count == engine.event_capacity) {
        size_t capacity = engine.event_capacity ? engine.event_capacity * 2 : 64;
        engine_event *grown = realloc(engine.events, capacity * sizeof *grown);
        if (grown == NULL) {
            engine.broken = 1; /* take() says so; nothing else can give this client its end */
            return 1;
        }
        engine.events = grown;
        engine.event_capacity = capacity;
    }
    engine.events[engine.event_count].kind = kind;
    engine.events[engine.event_count].token = token;
    engine.events[engine.event_count].value = value;
    engine.event_count++;
    if (engine.wake_pending)
        return 0;
    engine.wake_pending = 1;
    return 1;
}

static void
wake_loop(void)
{
    uint64_t one = 1;
    while (write(engine.wake_fd, &one, sizeof one) == -1 && errno == EINTR)
        ;
}

/* Clone in spawner slot's window and register the child; an answer queued unless inline.
 * Returns the pid (-1: no child), with *failure the exec's or the clone's errno. */
static pid_t
spawn_registered(int slot, long long token, child_job *job, int queue_answer, int *failure)
{
    pid_t pid;
    int clone_errno, wake = 0;
    pid_entry *entry = malloc(sizeof *entry);

    if (entry == NULL) {
        *failure = ENOMEM;
        pid = -1;
        clone_errno = ENOMEM;
        pthread_mutex_lock(&engine.lock);
        goto answer;
    }
    job->exec_errno = 0;
    __atomic_add_fetch(&engine.window[slot], 1, __ATOMIC_SEQ_CST); /* open: odd */
    pid = clone_child(job, &clone_errno);
    pthread_mutex_lock(&engine.lock);
    if (pid > 0) {
        entry->pid = pid;
        entry->failed = job->exec_errno != 0;
        entry->token = token;
        entry->next = *bucket_of(pid);
        *bucket_of(pid) = entry;
        entry = NULL;
    }
    __atomic_add_fetch(&engine.window[slot], 1, __ATOMIC_SEQ_CST); /* closed: even */
    if (engine.reap_wanted) {
        /* A round stopped at a zombie that may be this clone's: the loop's next take reaps. */
        engine.reap_wanted = 0;
        engine.reap_due = 1;
        wake = !engine.wake_pending;
        engine.wake_pending = 1;
    }
answer:
    *failure = pid == -1 ? clone_errno : job->exec_errno;
    if (queue_answer) {
        if (pid == -1)
            wake |= push_event(EVENT_FORK_FAILED, token, clone_errno);
        else if (job->exec_errno)
            wake |= push_event(EVENT_EXEC_FAILED, token, job->exec_errno);
        else
            wake |= push_event(EVENT_SPAWNED, token, pid);
    }
    pthread_mutex_unlock(&engine.lock);
    free(entry);
    if (wake)
        wake_loop();
    return pid;
}

static void
block_every_signal(void)
{
    sigset_t all;
    /* glibc's own mask call: it leaves its internal signals (setxid's) deliverable. */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, NULL);
}

static void *
spawning_thread(void *argument)
{
    int slot = (int)(intptr_t)argument, failure;
    queued_job *taken;

    block_every_signal();
    for (;;) {
        pthread_mutex_lock(&engine.lock);
        while (engine.head == NULL)
            pthread_cond_wait(&engine.job_ready, &engine.lock);
        taken = engine.head;
        engine.head = taken->next;
        if (engine.head == NULL)
            engine.tail = NULL;
        pthread_mutex_unlock(&engine.lock);
        spawn_registered(slot, taken->token, &taken->job, 1, &failure);
        free(taken);
    }
    return NULL;
}

static int
noted_windows_open(void)
{
    int i;
    for (i = 0; i < engine.spawners; i++)
        if ((engine.noted[i] & 1) && __atomic_load_n(&engine.window[i], __ATOMIC_SEQ_CST) == engine.noted[i])
            return 1;
    return 0;
}

PyDoc_STRVAR(reap_doc,
"reap()\n\n"
"Reap every ended program the engine registered, each end queued for take(); never waits.");

PyDoc_STRVAR(child_signal_fd_doc,
"child_signal_fd() -> fd\n\n"
"A signalfd for SIGCHLD, readable when a child has ended (for threads that block SIGCHLD: the\n"
"caller blocks it); reap() empties it. The same descriptor at every call.");

static PyObject *
child_signal_fd(PyObject *module, PyObject *unused)
{
    sigset_t child;

    if (engine.child_signal_fd == -1) {
        sigemptyset(&child);
        sigaddset(&child, SIGCHLD);
        if ((engine.child_signal_fd = signalfd(-1, &child, SFD_NONBLOCK | SFD_CLOEXEC)) == -1)
            return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(engine.child_signal_fd);
}

static void
reap_round(void)
{
    int i;

    if (engine.child_signal_fd != -1) {
        /* Emptied first: a child that ends from here on makes it readable again. */
        struct signalfd_siginfo taken[8];
        while (read(engine.child_signal_fd, taken, sizeof taken) > 0)
            ;
    }
    pthread_mutex_lock(&engine.lock);
    engine.reap_wanted = 0;
    engine.reap_due = 0;
    for (;;) {
        siginfo_t info;
        pid_entry *entry, **link;
        int status;

        memset(&info, 0, sizeof info);
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == -1) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: no child at all */
        }
        if (info.si_pid <= 0)
            break; /* none has ended */
        entry = find_registered(info.si_pid, &link);
        if (entry == NULL) {
            if (engine.suspect != info.si_pid) {
                /* Perhaps a clone's whose spawner has not registered it yet: decided once every
                 * window open now has closed. */
                engine.suspect = info.si_pid;
                for (i = 0; i < engine.spawners; i++)
                    engine.noted[i] = __atomic_load_n(&engine.window[i], __ATOMIC_SEQ_CST);
            }
            if (noted_windows_open()) {
                engine.reap_wanted = 1; /* the spawner closing one wakes the loop */
                break;
            }
            /* Not ours (its spawner would have registered it): reaped, nobody told. */
        }
        engine.suspect = 0;
        while (waitpid(info.si_pid, &status, 0) == -1 && errno == EINTR)
            ;
        if (entry != NULL) {
            *link = entry->next;
            if (!entry->failed)
                push_event(EVENT_ENDED, entry->token, status); /* the caller takes them next */
            free(entry);
        }
    }
    pthread_mutex_unlock(&engine.lock);
}

static PyObject *
reap(PyObject *module, PyObject *unused)
{
    if (engine.started)
        reap_round();
    Py_RETURN_NONE;
}

/* A NULL-terminated copy of a sequence of bytes (malloc'd: the engine keeps it for good). */
static char **
copied_strings(PyObject *sequence, Py_ssize_t *count_out)
{
    PyObject *items = PySequence_Fast(sequence, "a sequence of bytes expected");
    Py_ssize_t count, i;
    char **array;

    if (items == NULL)
        return NULL;
    count = PySequence_Fast_GET_SIZE(items);
    array = calloc(count + 1, sizeof(char *));
    if (array == NULL) {
        Py_DECREF(items);
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        if (!PyBytes_Check(item)) {
            PyErr_SetString(PyExc_TypeError, "bytes expected");
            break;
        }
        if ((array[i] = strdup(PyBytes_AS_STRING(item))) == NULL) {
            PyErr_NoMemory();
            break;
        }
    }
    Py_DECREF(items);
    if (PyErr_Occurred()) {
        for (i = 0; i < count; i++)
            free(array[i]);
        free(array);
        return NULL;
    }
    *count_out = count;
    return array;
}

PyDoc_STRVAR(start_engine_doc,
"start_engine(candidates, argv, threads) -> fd\n\n"
"Start the spawning threads for the program argv, run from the first of candidates\n"
"(paths, in PATH order) that execve takes. fd becomes readable when take() has events. Once.");

static PyObject *
start_engine(PyObject *module, PyObject *args)
{
    PyObject *candidates, *argv;
    int threads, i, error;
    pthread_attr_t attributes;
    pthread_t thread;
    Py_ssize_t argv_count;

    if (!PyArg_ParseTuple(args, "OOi:start_engine", &candidates, &argv, &threads))
        return NULL;
    if (engine.started) {
        PyErr_SetString(PyExc_RuntimeError, "start_engine: started already");
        return NULL;
    }
    if (threads < 1 || threads > MAX_SPAWNERS - 1) {
        PyErr_SetString(PyExc_ValueError, "start_engine: threads out of range");
        return NULL;
    }
    if ((engine.candidates = copied_strings(candidates, &engine.candidate_count)) == NULL)
        return NULL;
    if ((engine.argv = copied_strings(argv, &argv_count)) == NULL)
        return NULL;
    if (engine.candidate_count == 0 || argv_count == 0) {
        PyErr_SetString(PyExc_ValueError, "start_engine: no program");
        return NULL;
    }
    if ((engine.wake_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    engine.spawners = threads + 1;
    /* Sized here, not by RLIMIT_STACK (which softlimit -m sets too); the child's stack is inside. */
    pthread_attr_init(&attributes);
    pthread_attr_setstacksize(&attributes, ENGINE_THREAD_STACK);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    for (i = 0, error = 0; error == 0 && i < threads; i++)
        error = pthread_create(&thread, &attributes, spawning_thread, (void *)(intptr_t)i);
    pthread_attr_destroy(&attributes);
    if (error != 0) {
        errno = error;
        return PyErr_SetFromErrno(PyExc_OSError); /* the server cannot serve: it exits */
    }
    engine.started = 1;
    return PyLong_FromLong(engine.wake_fd);
}

/* The job for one client: its environment, descriptors and token, copied into one allocation
 * that the spawning thread frees. */
static queued_job *
make_job(long long token, PyObject *environment, int stdin_fd, int stdout_fd, PyObject *pass_fds)
{
    PyObject *entries = NULL, *passed = NULL;
    Py_ssize_t count, pass_count, i;
    size_t strings = 0, size;
    queued_job *made = NULL;
    char **envp, *text;
    int *pass;

    if (!engine.started) {
        PyErr_SetString(PyExc_RuntimeError, "the spawn engine is not started");
        return NULL;
    }
    if ((entries = PySequence_Fast(environment, "environment: a sequence of bytes expected")) == NULL
        || (passed = PySequence_Fast(pass_fds, "pass_fds: a sequence expected")) == NULL)
        goto done;
    count = PySequence_Fast_GET_SIZE(entries);
    pass_count = PySequence_Fast_GET_SIZE(passed);
    for (i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(entries, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "environment: bytes expected, not %.100s", Py_TYPE(item)->tp_name);
            goto done;
        }
        /* An entry holding a NUL ends there, as a C string does (and as from the original). */
        strings += strlen(PyBytes_AS_STRING(item)) + 1;
    }
    size = sizeof *made + (count + 1) * sizeof(char *) + pass_count * sizeof(int) + strings;
    if ((made = malloc(size)) == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    envp = (char **)(made + 1);
    pass = (int *)(envp + count + 1);
    text = (char *)(pass + pass_count);
    for (i = 0; i < pass_count; i++) {
        pass[i] = _PyLong_AsInt(PySequence_Fast_GET_ITEM(passed, i));
        if (pass[i] == -1 && PyErr_Occurred()) {
            free(made);
            made = NULL;
            goto done;
        }
    }
    for (i = 0; i < count; i++) {
        size_t length = strlen(PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(entries, i))) + 1;
        memcpy(text, PyBytes_AS_STRING(PySequence_Fast_GET_ITEM(entries, i)), length);
        envp[i] = text;
        text += length;
    }
    envp[count] = NULL;
    made->next = NULL;
    made->token = token;
    made->job.candidates = engine.candidates;
    made->job.candidate_count = engine.candidate_count;
    made->job.argv = engine.argv;
    made->job.envp = envp;
    made->job.stdin_fd = stdin_fd;
    made->job.stdout_fd = stdout_fd;
    made->job.pass_fds = pass;
    made->job.pass_count = pass_count;
    made->job.exec_errno = 0;
done:
    Py_XDECREF(entries);
    Py_XDECREF(passed);
    return made;
}

PyDoc_STRVAR(submit_doc,
"submit(token, environment, stdin_fd, stdout_fd, pass_fds)\n\n"
"Hand the spawn over to a spawning thread: stdin_fd on 0, stdout_fd on 1, pass_fds kept open,\n"
"environment (bytes entries) exactly as the program gets it. Its answer comes from take().");

static PyObject *
submit(PyObject *module, PyObject *args)
{
    long long token;
    PyObject *environment, *pass_fds;
    int stdin_fd, stdout_fd;
    queued_job *job;

    if (!PyArg_ParseTuple(args, "LOiiO:submit", &token, &environment, &stdin_fd, &stdout_fd, &pass_fds))
        return NULL;
    if ((job = make_job(token, environment, stdin_fd, stdout_fd, pass_fds)) == NULL)
        return NULL;
    pthread_mutex_lock(&engine.lock);
    if (engine.tail != NULL)
        engine.tail->next = job;
    else
        engine.head = job;
    engine.tail = job;
    pthread_cond_signal(&engine.job_ready);
    pthread_mutex_unlock(&engine.lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(spawn_now_doc,
"spawn_now(token, environment, stdin_fd, stdout_fd, pass_fds) -> pid\n\n"
"submit's spawn made on the calling thread (the loop's only), GIL released; the answer is\n"
"returned, or raised: ForkError when there is no child, OSError with the exec's errno. The\n"
"program's end comes from take().");

static PyObject *fork_error; /* ForkError: the clone itself failed (EAGAIN, ENOMEM) */

static PyObject *
spawn_now(PyObject *module, PyObject *args)
{
    long long token;
    PyObject *environment, *pass_fds;
    int stdin_fd, stdout_fd, failure;
    queued_job *job;
    pid_t pid;

    if (!PyArg_ParseTuple(args, "LOiiO:spawn_now", &token, &environment, &stdin_fd, &stdout_fd, &pass_fds))
        return NULL;
    if ((job = make_job(token, environment, stdin_fd, stdout_fd, pass_fds)) == NULL)
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    pid = spawn_registered(engine.spawners - 1, token, &job->job, 0, &failure);
    Py_END_ALLOW_THREADS
    free(job);
    if (pid == -1 || failure != 0) {
        /* No child at all: the original's `unable to fork`, not an exec's failure. */
        errno = failure;
        return PyErr_SetFromErrno(pid == -1 ? fork_error : PyExc_OSError);
    }
    return PyLong_FromLong(pid);
}

PyDoc_STRVAR(take_doc,
"take() -> [(kind, token, value), ...]\n\n"
"Every event queued since the last call (after a reap, when a round waited for a spawn), in order: (0, token, pid) spawned, (1, token, errno)\n"
"the exec failed, (2, token, errno) no child (clone failed), (3, token, wait status) ended.\n"
"A spawn's answer always comes before its program's end.");

static PyObject *
take(PyObject *module, PyObject *unused)
{
    uint64_t counter;
    engine_event *taken;
    size_t count, capacity, i;
    PyObject *list;

    int reap_due;

    if (!engine.started)
        return PyList_New(0);
    pthread_mutex_lock(&engine.lock);
    reap_due = engine.reap_due;
    pthread_mutex_unlock(&engine.lock);
    if (reap_due)
        reap_round();
    /* Read first: an event queued from here on writes the eventfd again. */
    if (read(engine.wake_fd, &counter, sizeof counter) == -1 && errno != EAGAIN && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    pthread_mutex_lock(&engine.lock);
    if (engine.broken) {
        pthread_mutex_unlock(&engine.lock);
        return PyErr_NoMemory();
    }
    taken = engine.events;
    count = engine.event_count;
    capacity = engine.event_capacity;
    engine.events = engine.spare;
    engine.event_capacity = engine.spare_capacity;
    engine.event_count = 0;
    engine.wake_pending = 0;
    pthread_mutex_unlock(&engine.lock);
    /* Only this call touches the spare buffer: the one just taken becomes it. */
    engine.spare = taken;
    engine.spare_capacity = capacity;
    if ((list = PyList_New((Py_ssize_t)count)) == NULL)
        return NULL;
    for (i = 0; i < count; i++) {
        PyObject *event = Py_BuildValue("(iLl)", taken[i].kind, taken[i].token, taken[i].value);
        if (event == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, (Py_ssize_t)i, event);
    }
    return list;
}

PyDoc_STRVAR(signal_all_doc,
"signal_all(number)\n\n"
"number to every registered program. Under the engine's lock: a registered pid is alive or a\n"
"zombie not reaped yet, so it names no one else's process.");

static PyObject *
signal_all(PyObject *module, PyObject *args)
{
    int number, i;
    pid_entry *entry;

    if (!PyArg_ParseTuple(args, "i:signal_all", &number))
        return NULL;
    pthread_mutex_lock(&engine.lock);
    for (i = 0; i < PID_BUCKETS; i++)
        for (entry = engine.buckets[i]; entry != NULL; entry = entry->next)
            if (!entry->failed)
                kill(entry->pid, number);
    pthread_mutex_unlock(&engine.lock);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(configure_doc,
"configure(signals_to_default, program_mask, limits)\n\n"
"For every spawn from now on: signal numbers set to SIG_DFL in the child whatever they are\n"
"(signals with handlers always are), the program's signal mask (signal numbers), and the\n"
"(resource, soft, hard) limits set in the child before its exec.");

static int
signal_set(PyObject *numbers, kernel_sigset *set)
{
    PyObject *iterator = PyObject_GetIter(numbers), *item;

    *set = 0;
    if (iterator == NULL)
        return -1;
    while ((item = PyIter_Next(iterator)) != NULL) {
        long sig = PyLong_AsLong(item);
        Py_DECREF(item);
        if (sig == -1 && PyErr_Occurred())
            break;
        if (sig < 1 || sig > 64) {
            PyErr_Format(PyExc_ValueError, "signal number out of range: %ld", sig);
            break;
        }
        *set |= SIGNAL_BIT(sig);
    }
    Py_DECREF(iterator);
    return PyErr_Occurred() ? -1 : 0;
}

static PyObject *
configure(PyObject *module, PyObject *args)
{
    PyObject *to_default, *mask, *limit_list;
    kernel_sigset new_default, new_mask;
    saved_limit new_limits[RLIM_NLIMITS];
    Py_ssize_t count, i;

    if (!PyArg_ParseTuple(args, "OOO!:configure", &to_default, &mask, &PyTuple_Type, &limit_list))
        return NULL;
    if (signal_set(to_default, &new_default) == -1 || signal_set(mask, &new_mask) == -1)
        return NULL;
    count = PyTuple_GET_SIZE(limit_list);
    if (count > RLIM_NLIMITS) {
        PyErr_SetString(PyExc_ValueError, "configure: too many limits");
        return NULL;
    }
    for (i = 0; i < count; i++) {
        int resource;
        unsigned long long soft, hard;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(limit_list, i), "iKK:limit", &resource, &soft, &hard))
            return NULL;
        new_limits[i].resource = resource;
        new_limits[i].limit.rlim_cur = (rlim_t)soft;
        new_limits[i].limit.rlim_max = (rlim_t)hard;
    }
    /* Internal signals are never blocked in the program, as after a plain exec of the original. */
    new_mask &= ~(SIGNAL_BIT(FIRST_INTERNAL_SIGNAL) | SIGNAL_BIT(LAST_INTERNAL_SIGNAL));
    signals_to_default = new_default;
    program_mask = new_mask;
    memcpy(limits, new_limits, sizeof new_limits);
    limit_count = (int)count;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(accept_batch_doc,
"accept_batch(fd, most) -> (clients, errno)\n\n"
"Up to most connections accepted from the listening socket fd: clients as socket._accept() gives\n"
"them ((fd, address), close-on-exec, blocking); errno 0 when the queue is empty, else the error\n"
"that ended the batch. No exception for the empty queue: one such call per wakeup.");

static PyObject *
client_address(const struct sockaddr_storage *address)
{
    char text[INET6_ADDRSTRLEN];

    /* What CPython's makesockaddr gives: inet_ntop's text, the port, and for IPv6 the flow
     * information and the scope id. */
    if (address->ss_family == AF_INET) {
        const struct sockaddr_in *v4 = (const struct sockaddr_in *)address;
        if (inet_ntop(AF_INET, &v4->sin_addr, text, sizeof text) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(si)", text, ntohs(v4->sin_port));
    }
    if (address->ss_family == AF_INET6) {
        const struct sockaddr_in6 *v6 = (const struct sockaddr_in6 *)address;
        if (inet_ntop(AF_INET6, &v6->sin6_addr, text, sizeof text) == NULL)
            return PyErr_SetFromErrno(PyExc_OSError);
        return Py_BuildValue("(siII)", text, ntohs(v6->sin6_port), ntohl(v6->sin6_flowinfo), v6->sin6_scope_id);
    }
    PyErr_SetString(PyExc_OSError, "accept_batch: not an IP socket");
    return NULL;
}

static PyObject *
accept_batch(PyObject *module, PyObject *args)
{
    int listener, most, fd, error = 0;
    PyObject *clients, *client;

    if (!PyArg_ParseTuple(args, "ii:accept_batch", &listener, &most))
        return NULL;
    if ((clients = PyList_New(0)) == NULL)
        return NULL;
    while (PyList_GET_SIZE(clients) < most) {
        struct sockaddr_storage address;
        socklen_t length = sizeof address;
        fd = accept4(listener, (struct sockaddr *)&address, &length, SOCK_CLOEXEC);
        if (fd == -1) {
            if (errno == EINTR)
                continue;
            error = errno == EAGAIN || errno == EWOULDBLOCK ? 0 : errno;
            break;
        }
        client = client_address(&address);
        if (client == NULL || (client = Py_BuildValue("(iN)", fd, client)) == NULL || PyList_Append(clients, client) < 0) {
            Py_XDECREF(client);
            close(fd); /* never a descriptor nobody holds */
            Py_DECREF(clients);
            return NULL;
        }
        Py_DECREF(client);
    }
    return Py_BuildValue("(Ni)", clients, error);
}

PyDoc_STRVAR(set_name_doc, "set_name(name): the process's name as ps and pgrep see it (prctl PR_SET_NAME).");

static PyObject *
set_name(PyObject *module, PyObject *name)
{
    if (!PyBytes_Check(name)) {
        PyErr_SetString(PyExc_TypeError, "set_name: bytes expected");
        return NULL;
    }
    /* The kernel truncates to 15 bytes. */
    if (syscall(SYS_prctl, 15 /* PR_SET_NAME */, PyBytes_AS_STRING(name), 0, 0, 0) == -1)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"start_engine", start_engine, METH_VARARGS, start_engine_doc},
    {"submit", submit, METH_VARARGS, submit_doc},
    {"spawn_now", spawn_now, METH_VARARGS, spawn_now_doc},
    {"take", take, METH_NOARGS, take_doc},
    {"reap", reap, METH_NOARGS, reap_doc},
    {"child_signal_fd", child_signal_fd, METH_NOARGS, child_signal_fd_doc},
    {"signal_all", signal_all, METH_VARARGS, signal_all_doc},
    {"configure", configure, METH_VARARGS, configure_doc},
    {"set_name", set_name, METH_O, set_name_doc},
    {"accept_batch", accept_batch, METH_VARARGS, accept_batch_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_definition = {
    PyModuleDef_HEAD_INIT,
    .m_name = "ucspi.server._spawn",
    .m_doc = "The program's start in C: clone(CLONE_VM|CLONE_VFORK), then execve.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    /* Until configure(): the signals Python itself ignores and the ones the server catches. */
    signals_to_default = SIGNAL_BIT(SIGPIPE) | SIGNAL_BIT(SIGXFSZ) | SIGNAL_BIT(SIGCHLD) | SIGNAL_BIT(SIGTERM);
    program_mask = 0;
    limit_count = 0;
    PyObject *module = PyModule_Create(&module_definition);
    if (module == NULL)
        return NULL;
    fork_error = PyErr_NewException("ucspi.server._spawn.ForkError", PyExc_OSError, NULL);
    if (fork_error == NULL || PyModule_AddObjectRef(module, "ForkError", fork_error) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
