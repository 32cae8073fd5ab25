"""Stopping never cuts a TLS session (README, sslserver, "Stopping"): two processes from the start.

Under ucspi-ssl each session has a TLS process of its own, so TERM to sslserver (and the restart
that follows under supervise) leaves every session running. Ours holds every session in one
process, so that process must not be the one the supervisor stops. At start, before any thread
or loop exists, sslserver forks once:

- The parent, the process the supervisor started, serves nothing. It relays the child's sd_notify
  datagrams to NOTIFY_SOCKET from its own pid (systemd takes them from the main pid only), sends
  ALRM and USR1 on to the child, and at TERM, HUP or INT tells the child to stop (a byte on the
  lifeline pipe), waits until the child has closed its listeners (its STOPPING=1, which the drain
  sends right after closing them; 5 s at most), and exits 0: a new server can bind at once. A
  child that drains on its own (a TERM or ALRM sent to it) ends the parent the same way; a child
  that ends first (a usage error, a certificate not loaded) gives the parent its exit code.
- The child serves, in a process group of its own (a terminal's ^C reaches the parent only). At
  the parent's word, or at EOF on the lifeline (the parent was killed), it sends itself TERM,
  which drains (--drain's deadline if given, else none): the listeners close, every session goes
  on to its end, and the process exits after the last one.

A crash or a KILL of the child ends its sessions; a KILL of the parent ends none.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import struct
import threading

STOP_WAIT_SECONDS = 5.0
_FORWARDED = (signal.SIGALRM, signal.SIGUSR1)
_STOPPING = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class Child:
    """What the serving child knows of its parent."""

    def __init__(self, parent_pid: int, lifeline_fd: int, notify_address: bytes) -> None:
        self.parent_pid = parent_pid
        self.lifeline_fd = lifeline_fd
        self.notify_address = notify_address  # the parent's relay socket, `@name`

    def adopt(self, environ: dict[bytes, bytes]) -> None:
        """The environment as the child must read it: systemd's sockets named for it, notify via the parent."""
        if environ.get(b"LISTEN_PID") == b"%d" % self.parent_pid:
            environ[b"LISTEN_PID"] = b"%d" % os.getpid()
        environ[b"NOTIFY_SOCKET"] = self.notify_address

    def watch_lifeline(self) -> None:
        """A thread: the parent's stop byte, or its death, becomes a TERM to ourselves (a drain)."""
        threading.Thread(target=self._watch, name="lifeline", daemon=True).start()

    def _watch(self) -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())  # the signal thread takes them
        try:
            while True:
                try:
                    data = os.read(self.lifeline_fd, 64)
                except InterruptedError:
                    continue
                except OSError:
                    data = b""
                if b"X" in data:
                    return  # the parent leaves because we drain already: a second TERM would harden it
                if not data or b"S" in data:
                    break
        except Exception:
            pass
        os.kill(os.getpid(), signal.SIGTERM)


def split() -> Child | None:
    """In the child: what it needs to know. The parent never returns. None: no split (serve as one process)."""
    parent_pid = os.getpid()
    relay = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        # An abstract socket has no permissions: each datagram's sender is checked (_from_child).
        relay.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        # A name the kernel picks (autobind): one of ours, by pid, could be taken first by anyone
        # (or by another container's sslserver sharing the network namespace), and no split then.
        relay.bind(b"")
        name = relay.getsockname()[1:]
        lifeline_read, lifeline_write = os.pipe()
    except OSError:
        relay.close()
        return None
    pid = os.fork()
    if pid == 0:
        relay.close()
        os.close(lifeline_write)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)
        return Child(parent_pid, lifeline_read, b"@" + name)
    os.close(lifeline_read)
    _supervise(pid, relay, lifeline_write)
    raise AssertionError("unreachable")


def _notifier_socket() -> tuple[socket.socket | None, bytes | None]:
    address = os.environb.get(b"NOTIFY_SOCKET")
    if not address:
        return None, None
    if address.startswith(b"@"):
        address = b"\0" + address[1:]
    try:
        return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC), address
    except OSError:
        return None, None


_CREDENTIALS = struct.Struct("iII")  # struct ucred: pid, uid, gid


def _from_child(relay: socket.socket, child: int) -> bytes:
    """The next datagram if the serving child sent it, else b"" (anyone may send to an abstract name)."""
    try:
        message, ancillary, _flags, _address = relay.recvmsg(4096, socket.CMSG_SPACE(_CREDENTIALS.size))
    except OSError:
        return b""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= _CREDENTIALS.size:
            pid, _uid, _gid = _CREDENTIALS.unpack_from(data)
            return message if pid == child else b""
    return b""


def _close_all_but(keep: set[int]) -> None:
    """fds 0 and 1 become /dev/null (the child has the real ones: `-1` and `$(...)`); the rest but keep close."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1):
            os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass
    try:
        numbers = [int(entry) for entry in os.listdir("/proc/self/fd")]
    except OSError:
        numbers = list(range(3, 256))
    for fd in numbers:
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _supervise(child: int, relay: socket.socket, lifeline: int) -> None:
    wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    notify, notify_address = _notifier_socket()
    keep = {relay.fileno(), lifeline, wake_read, wake_write}
    if notify is not None:
        keep.add(notify.fileno())
    _close_all_but(keep)
    signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
    for number in (*_STOPPING, *_FORWARDED, signal.SIGCHLD):
        signal.signal(number, lambda *_: None)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    stop_deadline: float | None = None
    import time

    while True:
        # A SIGCHLD that came before its handler was set is lost: the child is looked at once a second too.
        timeout = 1.0 if stop_deadline is None else max(0.0, min(1.0, stop_deadline - time.monotonic()))
        try:
            readable, _, _ = select.select([wake_read, relay], [], [], timeout)
        except InterruptedError:
            readable = []
        if stop_deadline is not None and time.monotonic() >= stop_deadline:
            os._exit(0)  # the child did not say: it may still be starting; its sessions are its own
        if relay in readable:
            message = _from_child(relay, child)
            if notify is not None and message:
                with contextlib.suppress(OSError):
                    notify.sendto(message, notify_address)
            if b"STOPPING=1" in message.split(b"\n"):
                # Its listeners are closed (at our TERM, or its own drain): a new server can bind.
                with contextlib.suppress(OSError):
                    os.write(lifeline, b"X")
                os._exit(0)
        numbers = b""
        if wake_read in readable:
            try:
                numbers = os.read(wake_read, 256)
            except OSError:
                numbers = b""
        for number in numbers:
            if number in _FORWARDED:
                with contextlib.suppress(OSError):
                    os.kill(child, number)
            elif number in _STOPPING and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_WAIT_SECONDS
                with contextlib.suppress(OSError):
                    os.write(lifeline, b"S")
        try:
            pid, status = os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pid, status = child, 0
        if pid == child:
            if stop_deadline is not None:
                os._exit(0)
            os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 111)
