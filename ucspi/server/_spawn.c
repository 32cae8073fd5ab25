/* ucspi.server._spawn: start the program as the original's child would, on the loop's thread.
 *
 * clone(CLONE_VM) without CLONE_VFORK: no page tables to copy, and the loop does not wait for
 * the child to exec, so no thread and no hand-off per client. The child runs on a stack of its
 * own from a pool, and makes only raw system calls on what the parent prepared (it shares the
 * loop thread's memory, its errno included): it resets the signals that have handlers (they
 * live in the parent's memory) and those the server ignores but the original's child has at
 * default, restores the soft resource limits tcpserver was started with, puts the connection
 * on fds 0 and 1, sets the mask, and execs along the original's PATH search (pathexec_run).
 * The kernel clears the slot's word when the child's hold on the memory ends (at its exec, or
 * its exit: CLONE_CHILD_CLEARTID), and the slot is free again. An exec that failed leaves its
 * errno in the child's entry and exits 111, as the original's child does; the reap tells it.
 */

#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <pthread.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <stdint.h>
#include <unistd.h>

#if !defined(__x86_64__) && !defined(__aarch64__)
/* setup.py builds this extension as optional: without it, the ctypes path starts programs. */
#error "the child's raw system calls are written for x86_64 and aarch64 only"
#endif

/* The kernel's sigset_t (what rt_sigprocmask takes): 64 signals. */
typedef unsigned long kernel_sigset;
#define KERNEL_SIGSET_SIZE sizeof(kernel_sigset)
#define SIGNAL_BIT(sig) (1UL << ((sig) - 1))
/* glibc's internal signals (SIGCANCEL, SIGSETXID): its sigaction refuses them, and nothing
 * sends them to the child; their handlers go at execve like every other handler. */
#define FIRST_INTERNAL_SIGNAL 32
#define LAST_INTERNAL_SIGNAL 33
/* The original's child exits so when its exec fails (strerr_die2sys(111, ...)). */
#define EXEC_FAILED_STATUS 111

typedef struct {
    int resource;
    struct rlimit limit;
} saved_limit;

/* Set once by configure(); read by every child. */
static kernel_sigset signals_to_default; /* set to SIG_DFL whatever they are now */
static kernel_sigset program_mask;       /* the program's signal mask */
static saved_limit limits[RLIM_NLIMITS];
static int limit_count;

/* -- the child: raw system calls only ----------------------------------------------------- */

/* The system call itself, its error as -errno: glibc's wrappers would write errno, which the
 * child shares with the loop's thread running beside it. */
static inline long
raw_call(long number, long a, long b, long c, long d)
{
#if defined(__x86_64__)
    long result;
    register long r10 __asm__("r10") = d;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(number), "D"(a), "S"(b), "d"(c), "r"(r10)
                     : "rcx", "r11", "memory");
    return result;
#else
    register long x8 __asm__("x8") = number;
    register long x0 __asm__("x0") = a;
    register long x1 __asm__("x1") = b;
    register long x2 __asm__("x2") = c;
    register long x3 __asm__("x3") = d;
    __asm__ volatile("svc 0" : "+r"(x0) : "r"(x8), "r"(x1), "r"(x2), "r"(x3) : "memory");
    return x0;
#endif
}

/* The kernel's struct sigaction on both architectures (each has SA_RESTORER). */
typedef struct {
    void *handler;
    unsigned long flags;
    void *restorer;
    kernel_sigset mask;
} kernel_sigaction;

/* The kernel's struct rlimit64, as prlimit64 takes it. */
typedef struct {
    unsigned long long soft;
    unsigned long long hard;
} kernel_rlimit;

/* The kernel's struct sched_attr (SCHED_ATTR_SIZE_VER1), as sched_getattr fills it. */
typedef struct {
    unsigned int size, policy;
    unsigned long long flags;
    int nice;
    unsigned int priority;
    unsigned long long runtime, deadline, period;
    unsigned int util_min, util_max;
} kernel_sched_attr;

typedef struct {
    char *const *candidates;
    Py_ssize_t candidate_count;
    char *const *argv;
    char *const *envp;
    int stdin_fd;
    int stdout_fd;
    const int *pass_fds;
    Py_ssize_t pass_count;
    volatile int *exec_errno; /* in the child's registry entry: the reap reads it */
} child_job;

static void
child_failed(child_job *job, long error)
{
    *job->exec_errno = (int)-error;
    raw_call(SYS_exit, EXEC_FAILED_STATUS, 0, 0, 0);
    for (;;)
        ; /* exit does not return */
}

static void
put_on(child_job *job, int from, int to)
{
    /* dup onto itself keeps close-on-exec: cleared instead, as posix_spawn's dup2 does. */
    long result = from == to ? raw_call(SYS_fcntl, to, F_SETFD, 0, 0) : raw_call(SYS_dup3, from, to, 0, 0);
    if (result < 0)
        child_failed(job, result);
}

/* The scheduler's attributes put again, unchanged: the kernel's change path re-queues the new
 * child, which measured a 5-10% earlier first byte at K=8 (and nothing at K=1). A fair-class
 * task's slice is set back to the default (runtime 0), and, were the server's own slice a custom
 * one (it then differs from the default), that slice is put back: the program inherits what the
 * original's child would. Any refusal leaves things as they were. */
static void
requeue_with_the_same_attributes(void)
{
    kernel_sched_attr inherited, reset, now;

    memset(&inherited, 0, sizeof inherited);
    if (raw_call(SYS_sched_getattr, 0, (long)&inherited, sizeof inherited, 0) != 0 || inherited.runtime == 0)
        return; /* no fair-class slice (a real-time policy), or no sched_getattr */
    reset = inherited;
    reset.size = sizeof reset;
    reset.flags = 0;
    reset.runtime = 0;
    if (raw_call(SYS_sched_setattr, 0, (long)&reset, 0, 0) != 0)
        return;
    memset(&now, 0, sizeof now);
    if (raw_call(SYS_sched_getattr, 0, (long)&now, sizeof now, 0) == 0 && now.runtime != inherited.runtime) {
        inherited.size = sizeof inherited;
        inherited.flags = 0;
        raw_call(SYS_sched_setattr, 0, (long)&inherited, 0, 0);
    }
}

static int
child_main(void *argument)
{
    child_job *job = argument;
    kernel_sigaction action;
    int sig;
    Py_ssize_t i;
    long result, saved = 0;

    for (sig = 1; sig < 65; sig++) {
        if (sig == SIGKILL || sig == SIGSTOP || (sig >= FIRST_INTERNAL_SIGNAL && sig <= LAST_INTERNAL_SIGNAL))
            continue;
        if (!(signals_to_default & SIGNAL_BIT(sig))) {
            if (raw_call(SYS_rt_sigaction, sig, 0, (long)&action, KERNEL_SIGSET_SIZE) < 0)
                continue;
            /* Ignored ones the server inherited stay ignored, as the original's child keeps them. */
            if (action.handler == SIG_DFL || action.handler == SIG_IGN)
                continue;
        }
        action.handler = SIG_DFL;
        action.flags = 0;
        action.restorer = NULL;
        action.mask = 0;
        raw_call(SYS_rt_sigaction, sig, (long)&action, 0, KERNEL_SIGSET_SIZE);
    }
    for (i = 0; i < limit_count; i++) {
        /* The soft limit as it was; the hard one as it is now (lowered since, it caps the soft). */
        kernel_rlimit now, wanted;
        if (raw_call(SYS_prlimit64, 0, limits[i].resource, 0, (long)&now) < 0)
            continue;
        wanted.hard = now.hard;
        wanted.soft = limits[i].limit.rlim_cur < now.hard ? limits[i].limit.rlim_cur : now.hard;
        raw_call(SYS_prlimit64, 0, limits[i].resource, (long)&wanted, 0);
    }
    requeue_with_the_same_attributes();
    put_on(job, job->stdin_fd, 0);
    put_on(job, job->stdout_fd, 1);
    for (i = 0; i < job->pass_count; i++)
        put_on(job, job->pass_fds[i], job->pass_fds[i]);
    raw_call(SYS_rt_sigprocmask, SIG_SETMASK, (long)&program_mask, 0, KERNEL_SIGSET_SIZE);
    /* pathexec_run: ENOENT goes on; EACCES, EPERM and EISDIR go on but are remembered; any
     * other error ends the search. */
    for (i = 0; i < job->candidate_count; i++) {
        result = raw_call(SYS_execve, (long)job->candidates[i], (long)job->argv, (long)job->envp, 0);
        if (result != -ENOENT) {
            saved = result;
            if (result != -EACCES && result != -EPERM && result != -EISDIR)
                break;
        }
    }
    child_failed(job, saved ? saved : -ENOENT);
    return 0;
}

/* -- the clone ---------------------------------------------------------------------------
 *
 * A child's stack and its job (environment and all) must outlast the parent's clone call: the
 * child reads them until its exec. Each lives in a slot of the pool, whose word the kernel
 * clears once the child no longer holds the memory. With every slot taken (children that are
 * slow to exec, or stopped before it), the clone waits for its child (CLONE_VFORK) on a
 * stack inside the call's own frame.
 */

#define CHILD_STACK_SIZE (16 * 1024) /* child_main needs under a kilobyte */
#define DEFAULT_SLOTS 128                /* far more than ever wait for their exec at once */
#define MAX_SLOTS 4096

typedef struct {
    volatile pid_t busy; /* non-zero from the clone until the kernel clears it */
    void *job_memory;    /* freed once the slot is free: at the next reap or clone */
} child_slot;

static child_slot *slots;
static int slot_count;
static char *slot_stacks; /* slot_count stacks, each above a guard page */
static size_t slot_span;  /* one stack and its guard page */

static int
allocate_slots(int count)
{
    long page = sysconf(_SC_PAGESIZE);
    int i;

    if (count == 0)
        return 0; /* every clone waits for its child's exec */
    if ((slots = calloc((size_t)count, sizeof *slots)) == NULL)
        return -1;
    slot_span = CHILD_STACK_SIZE + (size_t)page;
    slot_stacks = mmap(NULL, slot_span * count, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
    if (slot_stacks == MAP_FAILED)
        return -1;
    /* A child that overran its stack faults instead of writing into the next one's. */
    for (i = 0; i < count; i++)
        if (mprotect(slot_stacks + slot_span * i, (size_t)page, PROT_NONE) == -1)
            return -1;
    slot_count = count;
    return 0;
}

/* Whether slot i is free: its child has exec'd or ended (the kernel cleared the word), or it
 * never had one. Its last job is freed then. */
static int
slot_done(int i)
{
    if (__atomic_load_n(&slots[i].busy, __ATOMIC_ACQUIRE) != 0)
        return 0;
    free(slots[i].job_memory);
    slots[i].job_memory = NULL;
    return 1;
}

/* At each reap round: a burst's environments are not kept until their slots come round again. */
static void
free_done_jobs(void)
{
    int i;

    for (i = 0; i < slot_count; i++)
        slot_done(i);
}

/* The first free slot; -1 when every one is taken. The first, not the next in turn: only as
 * many stacks are ever touched (resident) as children wait for their exec at once, a few,
 * where a rotation would touch all of them. */
static int
free_slot(void)
{
    int i;

    for (i = 0; i < slot_count; i++)
        if (slot_done(i))
            return i;
    return -1;
}

static int
raw_sigprocmask(int how, const kernel_sigset *set, kernel_sigset *old)
{
    /* The system call itself: glibc's wrapper would leave its internal signals out. */
    return (int)syscall(SYS_rt_sigprocmask, how, set, old, KERNEL_SIGSET_SIZE);
}

/* The child for job, whose memory is job_memory (the pool's from here on, or freed). */
static pid_t
clone_child(child_job *job, void *job_memory, int *clone_errno)
{
    kernel_sigset all = ~0UL, old;
    pid_t pid;
    int slot = free_slot();

    /* Every signal blocked across the clone: no handler of ours may run in the child. */
    raw_sigprocmask(SIG_SETMASK, &all, &old);
    if (slot >= 0) {
        slots[slot].busy = 1;
        slots[slot].job_memory = job_memory;
        pid = clone(child_main, slot_stacks + slot_span * (slot + 1), CLONE_VM | CLONE_CHILD_CLEARTID | SIGCHLD, job,
                    NULL, NULL, &slots[slot].busy);
        *clone_errno = pid == -1 ? errno : 0;
        if (pid == -1)
            slots[slot].busy = 0; /* its job is freed with the slot's next use */
    } else {
        char stack[CHILD_STACK_SIZE] __attribute__((aligned(64)));
        /* Only this clone waits (for the child's exec): the GIL goes meanwhile. The one above
         * keeps it, lest getting it back wait up to a switch interval for a thread that took it. */
        Py_BEGIN_ALLOW_THREADS
        pid = clone(child_main, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, job);
        *clone_errno = pid == -1 ? errno : 0;
        Py_END_ALLOW_THREADS
        free(job_memory);
    }
    raw_sigprocmask(SIG_SETMASK, &old, NULL);
    return pid;
}

/* -- the engine: the registry of children, and reaping ------------------------------------
 *
 * spawn and reap both run on the loop's thread: a child is registered before any reap can
 * see it end. So every zombie the registry does not know is one the process had before it was
 * tcpserver: reaped, and nobody is told. A registered child is reaped once, and its end (with
 * its failed exec first, if it failed) handed back.
 */

enum { EVENT_EXEC_FAILED = 1, EVENT_ENDED = 3 };

typedef struct pid_entry {
    struct pid_entry *next;
    pid_t pid;
    volatile int exec_errno; /* written by the child before it exits 111 */
    long long token;
} pid_entry;

#define PID_BUCKETS 1024

static struct {
    int started;
    pthread_mutex_t lock; /* the registry: signal_all may come from another thread */
    int child_signal_fd;  /* SIGCHLD as a descriptor; -1 until child_signal_fd() */
    pid_entry *buckets[PID_BUCKETS];
    char **candidates;
    Py_ssize_t candidate_count;
    char **argv;
} engine = {.lock = PTHREAD_MUTEX_INITIALIZER, .child_signal_fd = -1};

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

PyDoc_STRVAR(reap_doc,
"reap() -> ([(kind, token, value), ...], complete)\n\n"
"Every ended program the engine registered, reaped, in order; never waits. (3, token, wait\n"
"status) is a program's end; (1, token, errno) comes just before it when its exec failed.\n"
"complete is False when the round stopped short (out of memory): call again soon.");

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

static int
append_event(PyObject *events, int kind, long long token, long value)
{
    PyObject *event = Py_BuildValue("(iLl)", kind, token, value);
    int result;

    if (event == NULL)
        return -1;
    result = PyList_Append(events, event);
    Py_DECREF(event);
    return result;
}

static PyObject *
reap(PyObject *module, PyObject *unused)
{
    PyObject *events = PyList_New(0);
    int complete = 1;

    if (events == NULL)
        return NULL;
    if (!engine.started)
        return Py_BuildValue("(NO)", events, Py_True);
    free_done_jobs();
    if (engine.child_signal_fd != -1) {
        /* Emptied first: a child that ends from here on makes it readable again. A read that
         * does not fill the buffer took all there was (no second read, to find EAGAIN). */
        struct signalfd_siginfo taken[8];
        while (read(engine.child_signal_fd, taken, sizeof taken) == (ssize_t) sizeof taken)
            ;
    }
    for (;;) {
        siginfo_t info;
        pid_entry *entry, **link;
        int status, exec_errno;

        /* Looked at first (WNOWAIT): an event that cannot be made leaves the child to the next
         * round, unreaped and still registered. */
        memset(&info, 0, sizeof info);
        if (waitid(P_ALL, 0, &info, WEXITED | WNOHANG | WNOWAIT) == -1) {
            if (errno == EINTR)
                continue;
            break; /* ECHILD: no child at all */
        }
        if (info.si_pid <= 0)
            break; /* none has ended */
        pthread_mutex_lock(&engine.lock);
        entry = find_registered(info.si_pid, &link);
        pthread_mutex_unlock(&engine.lock);
        if (entry != NULL) {
            /* Made without the lock: a finalizer run by the allocation may call in again. */
            Py_ssize_t before = PyList_GET_SIZE(events);
            status = info.si_code == CLD_EXITED ? (info.si_status & 0xff) << 8
                   : (info.si_status & 0x7f) | (info.si_code == CLD_DUMPED ? 0x80 : 0);
            exec_errno = entry->exec_errno;
            if ((exec_errno && append_event(events, EVENT_EXEC_FAILED, entry->token, exec_errno) < 0)
                || append_event(events, EVENT_ENDED, entry->token, status) < 0) {
                /* Out of memory: this child waits, unreaped, for the caller's next round, and
                 * none of its events is told twice. */
                PyErr_Clear();
                PyList_SetSlice(events, before, PyList_GET_SIZE(events), NULL);
                complete = 0;
                break;
            }
        }
        /* Registered or not (a child the process had before it was tcpserver), reaped now;
         * looked up again for its link, which the lock did not hold meanwhile. */
        pthread_mutex_lock(&engine.lock);
        while (waitpid(info.si_pid, &status, 0) == -1 && errno == EINTR)
            ;
        if (entry != NULL && find_registered(info.si_pid, &link) == entry) {
            *link = entry->next;
            free(entry);
        }
        pthread_mutex_unlock(&engine.lock);
    }
    return Py_BuildValue("(NO)", events, complete ? Py_True : Py_False);
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
"start_engine(candidates, argv, slots=128)\n\n"
"Make ready to spawn the program argv, run from the first of candidates (paths, in PATH\n"
"order) that execve takes: the stacks of slots children in flight are mapped here (with 0, or\n"
"all of them taken, a clone waits for its child's exec). Once.");

static PyObject *
start_engine(PyObject *module, PyObject *args)
{
    PyObject *candidates, *argv;
    Py_ssize_t argv_count;
    int slots_wanted = DEFAULT_SLOTS;

    if (!PyArg_ParseTuple(args, "OO|i:start_engine", &candidates, &argv, &slots_wanted))
        return NULL;
    if (slots_wanted < 0 || slots_wanted > MAX_SLOTS) {
        PyErr_SetString(PyExc_ValueError, "start_engine: slots out of range");
        return NULL;
    }
    if (engine.started) {
        PyErr_SetString(PyExc_RuntimeError, "start_engine: started already");
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
    if (allocate_slots(slots_wanted) == -1)
        return PyErr_SetFromErrno(PyExc_OSError); /* the server cannot serve: it exits */
    engine.started = 1;
    Py_RETURN_NONE;
}

/* One client's job: its environment and descriptors, copied into one allocation (returned
 * in *memory) that outlives the call until the child has exec'd. */
static child_job *
make_job(PyObject *environment, PyObject *pass_fds, void **memory)
{
    PyObject *entries = NULL, *passed = NULL;
    Py_ssize_t count, pass_count, i;
    size_t strings = 0, size;
    child_job *made = NULL;
    char **envp, *text;
    int *pass;

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
    made->candidates = engine.candidates;
    made->candidate_count = engine.candidate_count;
    made->argv = engine.argv;
    made->envp = envp;
    made->pass_fds = pass;
    made->pass_count = pass_count;
    *memory = made;
done:
    Py_XDECREF(entries);
    Py_XDECREF(passed);
    return made;
}

PyDoc_STRVAR(spawn_doc,
"spawn(token, environment, stdin_fd, stdout_fd, pass_fds) -> pid\n\n"
"Start the program for a client, without waiting for its exec: stdin_fd on 0, stdout_fd on 1,\n"
"pass_fds kept open, environment (bytes entries) exactly as the program gets it. ForkError:\n"
"no child at all. An exec that fails is told by reap(), with the program's end, under token.");

static PyObject *fork_error; /* ForkError: the clone itself failed (EAGAIN, ENOMEM) */

static PyObject *
spawn(PyObject *module, PyObject *args)
{
    long long token;
    PyObject *environment, *pass_fds;
    int stdin_fd, stdout_fd, clone_errno;
    child_job *job;
    void *memory;
    pid_entry *entry;
    pid_t pid;

    if (!PyArg_ParseTuple(args, "LOiiO:spawn", &token, &environment, &stdin_fd, &stdout_fd, &pass_fds))
        return NULL;
    if (!engine.started) {
        PyErr_SetString(PyExc_RuntimeError, "the spawn engine is not started");
        return NULL;
    }
    if ((job = make_job(environment, pass_fds, &memory)) == NULL)
        return NULL;
    if ((entry = malloc(sizeof *entry)) == NULL) {
        free(memory);
        return PyErr_NoMemory();
    }
    job->stdin_fd = stdin_fd;
    job->stdout_fd = stdout_fd;
    job->exec_errno = &entry->exec_errno;
    entry->exec_errno = 0;
    entry->token = token;
    pid = clone_child(job, memory, &clone_errno);
    if (pid == -1) {
        free(entry);
        errno = clone_errno;
        return PyErr_SetFromErrno(fork_error); /* the original's `unable to fork` */
    }
    entry->pid = pid;
    pthread_mutex_lock(&engine.lock);
    entry->next = *bucket_of(pid);
    *bucket_of(pid) = entry;
    pthread_mutex_unlock(&engine.lock);
    return PyLong_FromLong(pid);
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
    {"spawn", spawn, METH_VARARGS, spawn_doc},
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
    .m_doc = "The program's start in C: clone(CLONE_VM), then execve, never waited for.",
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
