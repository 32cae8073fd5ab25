"""Exit codes and djb's error strings (docs/behaviour.md §1.1, 1.3): the original's words, kept in one place."""

from __future__ import annotations

import errno
import os
import sys

EXIT_PERMANENT = 100
EXIT_TEMPORARY = 111

# djb's error_str() in its own order; for errnos sharing a value the first listed wins.
_DJB_ERROR_TEXT: list[tuple[str, str]] = [
    ("EINTR", "interrupted system call"),
    ("ENOMEM", "out of memory"),
    ("ENOENT", "file does not exist"),
    ("ETXTBSY", "text busy"),
    ("EIO", "input/output error"),
    ("EEXIST", "file already exists"),
    ("ETIMEDOUT", "timed out"),
    ("EINPROGRESS", "operation in progress"),
    ("EAGAIN", "temporary failure"),
    ("EWOULDBLOCK", "input/output would block"),
    ("EPIPE", "broken pipe"),
    ("EPERM", "permission denied"),
    ("EACCES", "access denied"),
    ("ENXIO", "device not configured"),
    ("EPROTO", "protocol error"),
    ("EISDIR", "is a directory"),
    ("ESRCH", "no such process"),
    ("E2BIG", "argument list too long"),
    ("ENOEXEC", "exec format error"),
    ("EBADF", "file descriptor not open"),
    ("ECHILD", "no child processes"),
    ("EDEADLK", "operation would cause deadlock"),
    ("EFAULT", "bad address"),
    ("ENOTBLK", "not a block device"),
    ("EBUSY", "device busy"),
    ("EXDEV", "cross-device link"),
    ("ENODEV", "device does not support operation"),
    ("ENOTDIR", "not a directory"),
    ("EINVAL", "invalid argument"),
    ("ENFILE", "system cannot open more files"),
    ("EMFILE", "process cannot open more files"),
    ("ENOTTY", "not a tty"),
    ("EFBIG", "file too big"),
    ("ENOSPC", "out of disk space"),
    ("ESPIPE", "unseekable descriptor"),
    ("EROFS", "read-only file system"),
    ("EMLINK", "too many links"),
    ("EDOM", "input out of range"),
    ("ERANGE", "output out of range"),
    ("EALREADY", "operation already in progress"),
    ("ENOTSOCK", "not a socket"),
    ("EDESTADDRREQ", "destination address required"),
    ("EMSGSIZE", "message too long"),
    ("EPROTOTYPE", "incorrect protocol type"),
    ("ENOPROTOOPT", "protocol not available"),
    ("EPROTONOSUPPORT", "protocol not supported"),
    ("ESOCKTNOSUPPORT", "socket type not supported"),
    ("EOPNOTSUPP", "operation not supported"),
    ("EPFNOSUPPORT", "protocol family not supported"),
    ("EAFNOSUPPORT", "address family not supported"),
    ("EADDRINUSE", "address already used"),
    ("EADDRNOTAVAIL", "address not available"),
    ("ENETDOWN", "network down"),
    ("ENETUNREACH", "network unreachable"),
    ("ENETRESET", "network reset"),
    ("ECONNABORTED", "connection aborted"),
    ("ECONNRESET", "connection reset"),
    ("ENOBUFS", "out of buffer space"),
    ("EISCONN", "already connected"),
    ("ENOTCONN", "not connected"),
    ("ESHUTDOWN", "socket shut down"),
    ("ETOOMANYREFS", "too many references"),
    ("ECONNREFUSED", "connection refused"),
    ("ELOOP", "symbolic link loop"),
    ("ENAMETOOLONG", "file name too long"),
    ("EHOSTDOWN", "host down"),
    ("EHOSTUNREACH", "host unreachable"),
    ("ENOTEMPTY", "directory not empty"),
    ("EPROCLIM", "too many processes"),
    ("EUSERS", "too many users"),
    ("EDQUOT", "disk quota exceeded"),
    ("ESTALE", "stale NFS file handle"),
    ("EREMOTE", "too many levels of remote in path"),
    ("ENOLCK", "no locks available"),
    ("ENOSYS", "system call not available"),
    ("ENOSTR", "not a stream device"),
    ("ETIME", "timer expired"),
    ("ENOSR", "out of stream resources"),
    ("ENOMSG", "no message of desired type"),
    ("EBADMSG", "bad message type"),
    ("EIDRM", "identifier removed"),
    ("ENONET", "machine not on network"),
    ("ENOLINK", "link severed"),
    ("EADV", "advertise error"),
    ("ESRMNT", "srmount error"),
    ("ECOMM", "communication error"),
    ("EMULTIHOP", "multihop attempted"),
    ("EREMCHG", "remote address changed"),
]

ERROR_TEXT: dict[int, str] = {0: "no error"}
for _name, _text in _DJB_ERROR_TEXT:
    _number = getattr(errno, _name, None)
    if _number is not None:
        ERROR_TEXT.setdefault(_number, _text)


def error_text(error: BaseException | int | None) -> str:
    """The djb text for an errno or an OSError; anything else is a cdb format error."""
    number = error if isinstance(error, int) else getattr(error, "errno", None)
    if number is None:
        # cdbx raises a bare OSError("Format Error"): djb's cdb reports EPROTO (docs/behaviour.md §2.6).
        number = errno.EPROTO
    return ERROR_TEXT.get(number, "unknown error")


class Fatal(Exception):
    """A message for stderr and the exit code the original gives with it."""

    def __init__(self, message: bytes | str, exit_code: int, errno: int | None = None) -> None:
        super().__init__(message)
        self.message = message.encode("latin-1") if isinstance(message, str) else message
        self.exit_code = exit_code
        self.errno = errno  # the system error behind it, if any


def die(message: bytes, exit_code: int) -> None:
    """Write one diagnostic line in a single write() and exit, like strerr_die."""
    try:
        os.write(2, message + b"\n")
    except OSError:
        pass
    sys.stdout.flush()
    os._exit(exit_code)
