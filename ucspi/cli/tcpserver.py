"""tcpserver [opts] host port program [args...]: accept TCP clients, decide, run the program (docs/behaviour.md §6)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence

from ucspi.cli.getopt import GetoptError, getopt
from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, Fatal
from ucspi.server.log import Log
from ucspi.server.options import (
    ARGUMENT_LETTERS,
    FLAG_LETTERS,
    LONG_OPTIONS,
    OPTION_TABLE,
    USAGE,
    BadValue,
    Option,
    ServerOptions,
    UnknownOption,
    apply_options,
)
from ucspi.server.spawn import first_values, read_initial_environment


def _write_fd(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass


def _write_stderr(text: str | bytes) -> None:
    _write_fd(2, (os.fsencode(text) if isinstance(text, str) else text) + b"\n")


def help_text(long_options: Sequence[Option] = LONG_OPTIONS) -> str:
    """--help (README, differences item 4), formatted by click from the option tables."""
    import click

    formatter = click.HelpFormatter()
    formatter.write_usage("tcpserver", "[options] host port program [args...]")
    formatter.write_paragraph()
    formatter.write_text(
        "Listen on HOST (0 for all addresses) and PORT (0 for any); for each client, set the"
        " TCP* environment variables, apply the rules, and run PROGRAM with the connection on"
        " descriptors 0 and 1."
    )
    with formatter.section("Options"):
        formatter.write_dl(
            [
                (option.spelling + (f" {option.argument}" if option.argument else ""), option.help)
                for option in OPTION_TABLE
            ]
        )
    if long_options:
        with formatter.section("Long options (before the host)"):
            formatter.write_dl(
                [
                    (option.spelling + (f"={option.argument}" if option.argument else ""), option.help)
                    for option in long_options
                ]
            )
    with formatter.section("Exit codes"):
        formatter.write_dl([("100", "usage error"), ("111", "temporary or system failure"), ("0", "SIGTERM")])
    return formatter.getvalue()


def version_text() -> str:
    """--version (README, differences item 4): the installed package's version, read from its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("ucspi")
    except PackageNotFoundError:
        number = "unknown"
    return f"tcpserver (ucspi) {number}\n"


def _usage_and_exit(log_usage: bool) -> None:
    if log_usage:
        _write_stderr(USAGE)
    os._exit(EXIT_PERMANENT)


def _placeholder_descriptor() -> int:
    try:
        return os.open(os.devnull, os.O_RDWR)
    except OSError:  # no /dev/null (a bare chroot): a pipe's read end, at EOF, writes fail quietly
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end


def _open_closed_standard_descriptors() -> None:
    """fds 0, 1 and 2 that came closed become /dev/null (README, differences item 13).

    Done before any socket exists: a listener or client that landed on 0, 1 or 2 would be
    written to as stdout or as the log, and closed as stdin.
    """
    while True:
        fd = _placeholder_descriptor()
        if fd > 2:
            os.close(fd)
            return
        # The program inherits fd 2 (the log) as its stderr.
        os.set_inheritable(fd, True)


def _close_stdin_stdout() -> None:
    """The original closes fds 0 and 1 (so `port=$(tcpserver -1 ...)` returns at once).

    /dev/null takes their places, so that an accepted socket never lands on 0 or 1.
    """
    try:
        null_fd = os.open(os.devnull, os.O_RDWR)
    except OSError:  # no /dev/null (a bare chroot): closed, as the original leaves them
        for fd in (0, 1):
            with contextlib.suppress(OSError):
                os.close(fd)
        return
    for fd in (0, 1):
        os.dup2(null_fd, fd, inheritable=False)
    os.close(null_fd)


# Set by serve() once $NOTIFY_SOCKET is connected: STOPPING=1 before the TERM exit.
_before_sigterm_exit: Callable[[], None] | None = None


def _wait_for_sigterm() -> None:
    # Every other signal goes to the main thread, as before this thread existed.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    signal.sigwait({signal.SIGTERM})
    if _before_sigterm_exit is not None:
        with contextlib.suppress(Exception):
            _before_sigterm_exit()
    os._exit(0)


def _exit_0_on_sigterm() -> None:
    """SIGTERM exits 0 from here on (docs/behaviour.md §6.4 step 2), whatever the main thread is doing.

    Blocked here, TERM stays blocked in every thread started later, so it waits for the one
    thread that takes it with sigwait: no window in which a handler is not yet registered or the
    main thread is in a system call. The programs start with an empty mask (spawn.py).
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_wait_for_sigterm, name="sigterm", daemon=True).start()


def main(long_options: Sequence[Option] = LONG_OPTIONS) -> None:
    """The command; tests pass rows of options to come as long_options."""
    _open_closed_standard_descriptors()
    program_name = os.path.basename(sys.argv[0]) or "tcpserver"
    arguments = sys.argv[1:]
    if arguments == ["--help"]:
        _write_fd(1, help_text(long_options).encode())
        return
    if arguments == ["--version"]:
        _write_fd(1, version_text().encode())
        return
    try:
        parsed, operands = getopt(arguments, FLAG_LETTERS, ARGUMENT_LETTERS, long_options=True)
    except GetoptError as error:
        _write_stderr(error.message(program_name))
        _usage_and_exit(True)
        return
    initial_environment = read_initial_environment()
    try:
        options = apply_options(parsed, first_values(initial_environment), (*OPTION_TABLE, *long_options))
    except UnknownOption as error:
        _write_stderr(error.message(program_name))
        _usage_and_exit(True)
        return
    except BadValue as error:
        # Like getopt's complaints, written whatever -q says: a command line error is never silent.
        _write_stderr(error.message)
        os._exit(error.exit_code)
    unpaired = _proxy_option_without_proxy_from(options)
    if unpaired:
        _write_stderr(f"tcpserver: fatal: {unpaired} needs --proxy-from")
        os._exit(EXIT_PERMANENT)
    log = Log(options.verbosity)
    try:
        serve(options, operands, log, initial_environment)
    except Fatal as fatal:
        if options.verbosity:
            _write_stderr(fatal.message)
        os._exit(fatal.exit_code)


def _proxy_option_without_proxy_from(options: ServerOptions) -> str | None:
    """The first PROXY refinement given without --proxy-from: it would silently do nothing."""
    if options.proxy_from is not None:
        return None
    given = {
        "--proxy": options.proxy_version is not None,
        "--proxy-timeout": options.proxy_timeout is not None,
        "--proxy-local": options.proxy_local is not None,
        "--proxy-ident": options.proxy_ident,
    }
    return next((spelling for spelling, present in given.items() if present), None)


def _listeners(options: ServerOptions, host: str, port: int, environ: dict[bytes, bytes]) -> list[socket.socket]:
    """s6's fd 0 (--inherit=stdin), systemd's sockets when LISTEN_PID is ours, else one bound here.

    Inherited sockets are the supervisor's: -b, -4's binding and -I do not apply to them.
    """
    from ucspi.server.listen import (
        bind_listener,
        matching_listeners,
        resolve_host,
        stdin_listener,
        systemd_listeners,
    )

    if options.inherit == "stdin":
        return matching_listeners([stdin_listener()], host, port)
    inherited = systemd_listeners(environ, os.getpid())
    if inherited is not None:
        return matching_listeners(inherited, host, port)
    local_ip = resolve_host(host, options.ipv4_only)
    return [bind_listener(local_ip, port, options.backlog, options.ipv4_only, options.interface)]


def serve(options: ServerOptions, operands: list[str], log: Log, initial_environment: list[bytes]) -> None:
    global _before_sigterm_exit
    _exit_0_on_sigterm()
    from ucspi.server.listen import drop_privileges, resolve_port

    if not operands:
        _usage_and_exit(bool(options.verbosity))
    host = operands[0]
    if len(operands) < 2:
        _usage_and_exit(bool(options.verbosity))
    port = resolve_port(operands[1])
    if len(operands) < 3:
        _usage_and_exit(bool(options.verbosity))
    program = [os.fsencode(argument) for argument in operands[2:]]

    # SIGINT and SIGHUP end the server as their default action does: quietly, no traceback.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    from ucspi.server.log import Warned
    from ucspi.server.loop import Server
    from ucspi.server.notify import notifier_from
    from ucspi.server.peer import PeerFacts
    from ucspi.server.spawn import Environment, Spawner

    # Looked up as getenv does: the first entry of a name wins.
    environ = first_values(initial_environment)
    listeners = _listeners(options, host, port, environ)
    # Connected before -u/-g: the socket's path may be writable by root alone.
    notifier, notify_error = notifier_from(environ.get(b"NOTIFY_SOCKET"))
    if notify_error is not None:
        log.emit(Warned(b"unable to connect to NOTIFY_SOCKET: " + notify_error.encode()))
    if notifier is not None:
        _before_sigterm_exit = notifier.stopping
    # Made before the ids change (docs/behaviour.md §6.4 step 5), so that every module the lookups need is
    # imported while the installed package is surely readable.
    facts = PeerFacts(options, environ)
    drop_privileges(options.uid, options.gid)
    if options.print_port:
        try:
            os.write(1, b"%d\n" % listeners[0].getsockname()[1])
        except OSError:
            pass
    _close_stdin_stdout()
    spawner = Spawner(program, environ.get(b"PATH"))
    server = Server(options, listeners, spawner, Environment(initial_environment), facts, log, notifier)
    try:
        server.run()
    except Fatal:
        raise
    except Exception as error:
        log.fatal(b"unexpected error: " + os.fsencode(repr(error)))
        os._exit(EXIT_TEMPORARY)
