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
#include <sys/wait.h>
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

/* The bytes items of a PySequence_Fast as a NULL-terminated array (borrowed: the sequence holds them).
 * An item holding a NUL ends there, as a C string does: a DNS name with a NUL in TCPREMOTEHOST
 * reaches the program cut, as from the original (and as through posix_spawn's c_char_p). */
static char **
string_array(PyObject *sequence, const char *what)
{
    Py_ssize_t count = PySequence_Fast_GET_SIZE(sequence);
    PyObject **items = PySequence_Fast_ITEMS(sequence);
    char **array = PyMem_Malloc((count + 1) * sizeof(char *));
    Py_ssize_t i;

    if (array == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (i = 0; i < count; i++) {
        if (!PyBytes_Check(items[i])) {
            PyMem_Free(array);
            PyErr_Format(PyExc_TypeError, "%s: bytes expected, not %.100s", what, Py_TYPE(items[i])->tp_name);
            return NULL;
        }
        array[i] = PyBytes_AS_STRING(items[i]);
    }
    array[count] = NULL;
    return array;
}

PyDoc_STRVAR(spawn_doc,
"spawn(candidates, argv, environment, stdin_fd, stdout_fd, pass_fds) -> pid\n\n"
"Run argv with environment (sequences of bytes, passed as they are) from the first of candidates\n"
"(paths, in PATH order) that execve takes, stdin_fd on 0, stdout_fd on 1, pass_fds open.\n"
"OSError with the exec's errno when none does (the failed child is reaped already).");

static PyObject *fork_error; /* ForkError: the clone itself failed (EAGAIN, ENOMEM) */

static PyObject *
spawn(PyObject *module, PyObject *args)
{
    PyObject *candidates, *argv, *environment, *pass_fds;
    PyObject *candidate_list = NULL, *argv_list = NULL, *environment_list = NULL, *pass_list = NULL;
    int stdin_fd, stdout_fd;
    char **candidate_array = NULL, **argv_array = NULL, **envp_array = NULL;
    int pass_array[64];
    int *pass = pass_array;
    Py_ssize_t pass_count = 0, i;
    child_job job;
    kernel_sigset all = ~0UL, old;
    pid_t pid;
    int clone_errno = 0, status;
    PyObject *result = NULL;
    /* The child's stack: inside this frame, so nothing is mapped per spawn. */
    char stack[CHILD_STACK_SIZE] __attribute__((aligned(64)));

    if (!PyArg_ParseTuple(args, "OOOiiO:spawn", &candidates, &argv, &environment, &stdin_fd, &stdout_fd, &pass_fds))
        return NULL;
    if ((candidate_list = PySequence_Fast(candidates, "spawn: candidates must be a sequence")) == NULL
        || (argv_list = PySequence_Fast(argv, "spawn: argv must be a sequence")) == NULL
        || (environment_list = PySequence_Fast(environment, "spawn: environment must be a sequence")) == NULL
        || (pass_list = PySequence_Fast(pass_fds, "spawn: pass_fds must be a sequence")) == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(candidate_list) == 0 || PySequence_Fast_GET_SIZE(argv_list) == 0) {
        PyErr_SetString(PyExc_ValueError, "spawn: no program");
        goto done;
    }
    pass_count = PySequence_Fast_GET_SIZE(pass_list);
    if (pass_count > (Py_ssize_t)(sizeof pass_array / sizeof pass_array[0])) {
        pass = PyMem_Malloc(pass_count * sizeof(int));
        if (pass == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    for (i = 0; i < pass_count; i++) {
        pass[i] = _PyLong_AsInt(PySequence_Fast_GET_ITEM(pass_list, i));
        if (pass[i] == -1 && PyErr_Occurred())
            goto done;
    }
    if ((candidate_array = string_array(candidate_list, "candidates")) == NULL)
        goto done;
    if ((argv_array = string_array(argv_list, "argv")) == NULL)
        goto done;
    if ((envp_array = string_array(environment_list, "environment")) == NULL)
        goto done;

    job.candidates = candidate_array;
    job.candidate_count = PySequence_Fast_GET_SIZE(candidate_list);
    job.argv = argv_array;
    job.envp = envp_array;
    job.stdin_fd = stdin_fd;
    job.stdout_fd = stdout_fd;
    job.pass_fds = pass;
    job.pass_count = pass_count;
    job.exec_errno = 0;

    Py_BEGIN_ALLOW_THREADS
    /* Every signal blocked across the clone: no handler of ours may run in the child. */
    raw_sigprocmask(SIG_SETMASK, &all, &old);
    pid = clone(child_main, stack + sizeof stack, CLONE_VM | CLONE_VFORK | SIGCHLD, &job);
    if (pid == -1)
        clone_errno = errno;
    raw_sigprocmask(SIG_SETMASK, &old, NULL);
    if (pid > 0 && job.exec_errno != 0) {
        /* Ours to reap: children.py's reaper leaves alone a pid no spawn registered. */
        while (waitpid(pid, &status, 0) == -1 && errno == EINTR)
            ;
    }
    Py_END_ALLOW_THREADS

    if (pid == -1) {
        /* No child at all: the original's `unable to fork`, not an exec's failure. */
        errno = clone_errno;
        PyErr_SetFromErrno(fork_error);
    }
    else if (job.exec_errno != 0) {
        errno = job.exec_errno;
        PyErr_SetFromErrno(PyExc_OSError);
    }
    else {
        result = PyLong_FromLong(pid);
    }

done:
    PyMem_Free(candidate_array);
    PyMem_Free(argv_array);
    PyMem_Free(envp_array);
    if (pass != pass_array)
        PyMem_Free(pass);
    Py_XDECREF(candidate_list);
    Py_XDECREF(argv_list);
    Py_XDECREF(environment_list);
    Py_XDECREF(pass_list);
    return result;
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
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {"configure", configure, METH_VARARGS, configure_doc},
    {"set_name", set_name, METH_O, set_name_doc},
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
