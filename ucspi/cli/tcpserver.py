"""tcpserver [opts] host port program [args...]: accept TCP clients, decide, run the program (docs/behaviour.md §6)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ucspi.cli.getopt import GetoptError, getopt
from ucspi.cli.standard_fds import open_closed_standard_descriptors
from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, Fatal
from ucspi.server.log import Exiting, Log, SignalTaken
from ucspi.server.options import (
    LONG_OPTIONS,
    OPTION_TABLE,
    USAGE,
    BadValue,
    Option,
    ServerOptions,
    UnknownOption,
    apply_options,
)
from ucspi.server.spawn import (
    THREAD_STACK_SIZE,
    first_values,
    read_initial_environment,
    spawn_path,
    take_launcher_marker,
)

if TYPE_CHECKING:
    from ucspi.server.loop import Server


class Command:
    """What tcpserver and sslserver (ucspi/cli/sslserver.py) do differently; the rest is one code."""

    def __init__(
        self,
        name: str,
        usage: str,
        table: Sequence[Option],
        configure: Callable[[list[tuple[str, str | None]], ServerOptions], object] | None = None,
        start: Callable[[ServerOptions, object, dict[bytes, bytes], Log], type | None] | None = None,
    ) -> None:
        self.name = name
        self.usage = usage
        self.table = tuple(table)
        self.flag_letters = "".join(option.name for option in table if option.argument is None)
        self.argument_letters = "".join(option.name for option in table if option.argument is not None)
        self.configure = configure  # its own letters, after apply_options: an object serve hands to start
        self.start = start  # before the listeners: what it loads once; its connection class, or None


TCPSERVER = Command("tcpserver", USAGE, OPTION_TABLE)


def _write_fd(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)
    except OSError:
        pass


def _write_stderr(text: str | bytes) -> None:
    _write_fd(2, (os.fsencode(text) if isinstance(text, str) else text) + b"\n")


def option_rows(table: Sequence[Option]) -> list[tuple[str, str]]:
    """--help's rows of an option table: `-c limit` for a letter, `--name=value` for a word."""
    rows = []
    for option in table:
        spelling = option.spelling
        if option.argument:
            spelling += ("=" if option.is_long else " ") + option.argument
        rows.append((spelling, option.help))
    return rows


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
        formatter.write_dl(option_rows(OPTION_TABLE))
    if long_options:
        with formatter.section("Long options (before the host)"):
            formatter.write_dl(option_rows(long_options))
    with formatter.section("Exit codes"):
        formatter.write_dl(
            [
                ("0", "at SIGTERM (at once), or at the end of a drain (SIGALRM; SIGTERM with --drain)"),
                ("100", "usage error"),
                ("111", "temporary or system failure"),
            ]
        )
    return formatter.getvalue()


def version_text() -> str:
    """--version (README, differences item 4): the installed package's version, read from its metadata."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("ucspi")
    except PackageNotFoundError:
        number = "unknown"
    return f"tcpserver (ucspi) {number}, spawn: {spawn_path()}\n"


def _usage_and_exit(log_usage: bool, usage: str = USAGE) -> None:
    if log_usage:
        _write_stderr(usage)
    os._exit(EXIT_PERMANENT)


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


# The signals the server acts on (README, Signals); HUP, INT, QUIT and the rest keep their default actions.
_TAKEN_SIGNALS = frozenset({signal.SIGTERM, signal.SIGALRM, signal.SIGUSR1})
# ALRM and USR1 inherited as ignored stay ignored, as 0.88 leaves them (it never catches them).
_taken_signals = _TAKEN_SIGNALS
# Set by serve(): the log, whether TERM drains (--drain), what to do before an exit from the signal
# thread (STOPPING=1, the status socket's removal), and, once the loop runs, the hand-over to it.
_signal_log: Log | None = None
_term_drains = False
_before_exit: list[Callable[[], None]] = []
_forward_signal: Callable[[int], None] | None = None
_running_server: Server | None = None  # a TERM during an ALRM's drain hardens it
_forwarding = threading.Lock()  # a USR1 that came before the loop ran is written once it runs
_usr1_waiting = False


def _exit_at_once(number: int) -> None:
    """0.88's TERM (and a drain asked for before the loop runs, with nothing to drain): exit 0 now."""
    with contextlib.suppress(Exception):
        if _signal_log is not None:
            _signal_log.emit(SignalTaken(signal.Signals(number).name[3:].encode(), b"exit"))
            _signal_log.emit(Exiting(0))
    for action in _before_exit:
        with contextlib.suppress(Exception):
            action()
    os._exit(0)


def _take_signals() -> None:
    global _usr1_waiting
    # Every other signal goes to the main thread, as before this thread existed.
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    while True:
        number = signal.sigwait(_taken_signals)
        server = _running_server
        if number == signal.SIGTERM and not _term_drains and not (server is not None and server.draining):
            _exit_at_once(number)
        with _forwarding:
            forward = _forward_signal
            if forward is None and number == signal.SIGUSR1:
                _usr1_waiting = True
                continue
        if forward is not None:
            forward(number)  # the loop's Server.on_signal: drain, harden, status view
        else:
            _exit_at_once(number)  # a drain before the loop runs: nothing to drain


def _take_signals_in_one_thread() -> None:
    """TERM, ALRM and USR1 go to one thread from here on (docs/behaviour.md §6.4 step 2), whatever the main thread does.

    Blocked here, they stay blocked in every thread started later, so each waits for the one
    thread that takes it with sigwait: no window in which a handler is not yet registered or the
    main thread is in a system call. TERM exits 0 from that thread itself; the others, and TERM
    under --drain, are handed to the loop once it runs. The programs start with an empty mask
    (spawn.py).
    """
    global _taken_signals
    _taken_signals = frozenset(
        number
        for number in _TAKEN_SIGNALS
        if number == signal.SIGTERM or signal.getsignal(number) is not signal.SIG_IGN
    )
    signal.pthread_sigmask(signal.SIG_BLOCK, _taken_signals)
    threading.Thread(target=_take_signals, name="signals", daemon=True).start()


def _forward_signals_to(server: Server) -> None:
    """Called on the loop once it runs: from now on the signal thread hands signals to it."""
    global _forward_signal, _running_server
    loop = server.loop

    def forward(number: int) -> None:
        with contextlib.suppress(RuntimeError):  # the loop closed: the process is on its way out
            loop.call_soon_threadsafe(server.on_signal, number)

    _running_server = server
    with _forwarding:
        _forward_signal = forward
        if _usr1_waiting:
            forward(signal.SIGUSR1)


def main(long_options: Sequence[Option] = LONG_OPTIONS, command: Command = TCPSERVER) -> None:
    """The command; tests pass rows of options to come as long_options."""
    # First: the native launcher's marker leaves argv, and the mask we were started with is
    # recorded before any thread blocks a signal (spawn.py).
    take_launcher_marker(sys.argv)
    # Sized here, not by RLIMIT_STACK: under `softlimit -m` each thread would reserve that much.
    threading.stack_size(THREAD_STACK_SIZE)
    open_closed_standard_descriptors()
    program_name = os.path.basename(sys.argv[0]) or command.name
    arguments = sys.argv[1:]
    if arguments == ["--help"]:
        _write_fd(1, help_text(long_options).encode())
        return
    if arguments == ["--version"]:
        _write_fd(1, version_text().encode())
        return
    try:
        parsed, operands = getopt(arguments, command.flag_letters, command.argument_letters, long_options=True)
    except GetoptError as error:
        _write_stderr(error.message(program_name))
        _usage_and_exit(True, command.usage)
        return
    initial_environment = read_initial_environment()
    try:
        options = apply_options(parsed, first_values(initial_environment), (*command.table, *long_options))
    except UnknownOption as error:
        _write_stderr(error.message(program_name))
        _usage_and_exit(True, command.usage)
        return
    except BadValue as error:
        # Like getopt's complaints, written whatever -q says: a command line error is never silent.
        _write_stderr(error.message_for(command.name))
        os._exit(error.exit_code)
    extra = command.configure(parsed, options) if command.configure is not None else None
    unpaired = _proxy_option_without_proxy_from(options)
    if unpaired:
        _write_stderr(f"{command.name}: fatal: {unpaired} needs --proxy-from")
        os._exit(EXIT_PERMANENT)
    from ucspi.server.log import make_log

    log = make_log(options.verbosity, options.log_format, command.name.encode())
    try:
        try:
            serve(options, operands, log, initial_environment, command, extra)
        except MemoryError:
            raise _no_room(command.name, b"out of memory") from None
        except ImportError as error:
            if "failed to map segment" not in str(error):  # the dynamic loader's words for ENOMEM
                raise
            raise _no_room(command.name, b"out of memory") from None
        except RuntimeError as error:
            if str(error) != "can't start new thread":  # threading's words: it keeps no errno
                raise
            raise _no_room(command.name, b"unable to start thread: resource limit reached") from None
    except Fatal as fatal:
        if options.verbosity:
            log.fatal_message(fatal.message)  # classic: the line as it is; logfmt, json: an event
        os._exit(fatal.exit_code)


def _no_room(name: str, text: bytes) -> Fatal:
    """A start that ran out of room, in the original's style (its nomem(): `fatal: out of memory`), 111.

    Where the limits were put back on the server (the ctypes path, or no native launcher:
    spawn.py), a small `softlimit -m` leaves Python no room for a thread's stack.
    """
    return Fatal(name.encode() + b": fatal: " + text, EXIT_TEMPORARY)


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


def _listeners(
    options: ServerOptions, host: str, port: int, environ: dict[bytes, bytes], log: Log | None = None
) -> list[socket.socket]:
    """s6's fd 0 (--inherit=stdin), systemd's sockets when LISTEN_PID is ours, else one bound here.

    Inherited sockets are the supervisor's: -b, -4's binding and -I do not apply to them. Each
    is told to log (the structured modes' `listen` events).
    """
    from ucspi.server.listen import (
        bind_listener,
        matching_listeners,
        resolve_host,
        stdin_listener,
        systemd_listeners,
    )

    inherited = True
    if options.inherit == "stdin":
        listeners = matching_listeners([stdin_listener()], host, port)
    elif (from_systemd := systemd_listeners(environ, os.getpid())) is not None:
        listeners = matching_listeners(from_systemd, host, port)
    else:
        local_ip = resolve_host(host, options.ipv4_only)
        listeners = [bind_listener(local_ip, port, options.backlog, options.ipv4_only, options.interface)]
        inherited = False
    if log is not None:
        log.listening(listeners, inherited)
    return listeners


def serve(
    options: ServerOptions,
    operands: list[str],
    log: Log,
    initial_environment: list[bytes],
    command: Command = TCPSERVER,
    extra: object = None,
) -> None:
    global _signal_log, _term_drains
    _signal_log, _term_drains = log, options.drain is not None or options.term_drain is not None
    _take_signals_in_one_thread()
    from ucspi.server.listen import drop_privileges, resolve_port

    if not operands:
        _usage_and_exit(bool(options.verbosity), command.usage)
    host = operands[0]
    if len(operands) < 2:
        _usage_and_exit(bool(options.verbosity), command.usage)
    port = resolve_port(operands[1])
    if len(operands) < 3:
        _usage_and_exit(bool(options.verbosity), command.usage)
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
    connection_class = command.start(options, extra, environ, log) if command.start is not None else None
    listeners = _listeners(options, host, port, environ, log)
    # Connected before -u/-g: the socket's path may be writable by root alone.
    notifier, notify_error = notifier_from(environ.get(b"NOTIFY_SOCKET"))
    if notify_error is not None:
        log.emit(Warned(b"unable to connect to NOTIFY_SOCKET: " + notify_error.encode()))
    if notifier is not None:
        _before_exit.append(notifier.stopping)
    status_socket = None
    if options.status_socket is not None:
        from ucspi.server.status import StatusSocket

        # Made before -u/-g (its directory may be root's), and owned by the ids they give.
        status_socket = StatusSocket.bind(options.status_socket, options.uid, options.gid)
        _before_exit.append(status_socket.remove)
    # Made before the ids change (docs/behaviour.md §6.4 step 5), so that every module the lookups need is
    # imported while the installed package is surely readable.
    facts = PeerFacts(options, environ)
    try:
        drop_privileges(options.uid, options.gid)
    except Fatal:
        if status_socket is not None:
            status_socket.remove()
        raise
    if options.print_port:
        try:
            os.write(1, b"%d\n" % listeners[0].getsockname()[1])
        except OSError:
            pass
    _close_stdin_stdout()
    spawner = Spawner(program, environ.get(b"PATH"))
    from ucspi.server.connection import Connection

    server = Server(
        options,
        listeners,
        spawner,
        Environment(initial_environment),
        facts,
        log,
        notifier,
        connection_class=connection_class or Connection,
        status_socket=status_socket,
    )
    server.loop.call_soon(_forward_signals_to, server)
    try:
        server.run()
    except Fatal:
        raise
    except Exception as error:
        log.fatal(b"unexpected error: " + os.fsencode(repr(error)))
        os._exit(EXIT_TEMPORARY)
