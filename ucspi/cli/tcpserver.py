"""tcpserver [opts] host port program [args...]: accept TCP clients, decide, run the program (spec 6)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

from ucspi.cli.getopt import GetoptError, HelpRequested, getopt
from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, Fatal
from ucspi.server.log import Log
from ucspi.server.options import ARGUMENT_LETTERS, FLAG_LETTERS, OPTION_TABLE, USAGE, ServerOptions, apply_options
from ucspi.server.spawn import first_values, read_initial_environment


def _write_stderr(text: str) -> None:
    try:
        os.write(2, os.fsencode(text) + b"\n")
    except OSError:
        pass


def help_text() -> str:
    """--help (differences item 4), formatted by click from the option table."""
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
            [(f"-{letter}" + (f" {argument}" if argument else ""), text) for letter, argument, text in OPTION_TABLE]
        )
    with formatter.section("Exit codes"):
        formatter.write_dl([("100", "usage error"), ("111", "temporary or system failure"), ("0", "SIGTERM")])
    return formatter.getvalue()


def _usage_and_exit(log_usage: bool) -> None:
    if log_usage:
        _write_stderr(USAGE)
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


def main() -> None:
    program_name = os.path.basename(sys.argv[0]) or "tcpserver"
    arguments = sys.argv[1:]
    try:
        parsed, operands = getopt(arguments, FLAG_LETTERS, ARGUMENT_LETTERS, help_flag="--help")
    except HelpRequested:
        sys.stdout.write(help_text())
        sys.stdout.flush()
        return
    except GetoptError as error:
        _write_stderr(error.message(program_name))
        _usage_and_exit(True)
        return
    initial_environment = read_initial_environment()
    options = apply_options(parsed, first_values(initial_environment))
    log = Log(options.verbosity)
    try:
        serve(options, operands, log, initial_environment)
    except Fatal as fatal:
        if options.verbosity:
            try:
                os.write(2, fatal.message + b"\n")
            except OSError:
                pass
        os._exit(fatal.exit_code)


def serve(options: ServerOptions, operands: list[str], log: Log, initial_environment: list[bytes]) -> None:
    from ucspi.server.listen import bind_listener, drop_privileges, resolve_host, resolve_port

    if not operands:
        _usage_and_exit(bool(options.verbosity))
    host = operands[0]
    if len(operands) < 2:
        _usage_and_exit(bool(options.verbosity))
    port = resolve_port(operands[1])
    if len(operands) < 3:
        _usage_and_exit(bool(options.verbosity))
    program = [os.fsencode(argument) for argument in operands[2:]]

    # SIGTERM exits 0 from here on, as the original's handler, installed as early, does.
    signal.signal(signal.SIGTERM, lambda _signal, _frame: os._exit(0))
    # SIGINT and SIGHUP end the server as their default action does: quietly, no traceback.
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    from ucspi.server.loop import Server
    from ucspi.server.peer import PeerFacts
    from ucspi.server.spawn import Environment, Spawner

    local_ip = resolve_host(host, options.ipv4_only)
    listener = bind_listener(local_ip, port, options.backlog, options.ipv4_only, options.interface)
    # Looked up as getenv does: the first entry of a name wins.
    environ = first_values(initial_environment)
    # Made before the ids change (spec 6.4 step 5), so that every module the lookups need is
    # imported while the installed package is surely readable.
    facts = PeerFacts(options, environ)
    drop_privileges(options.uid, options.gid)
    if options.print_port:
        try:
            os.write(1, b"%d\n" % listener.getsockname()[1])
        except OSError:
            pass
    _close_stdin_stdout()
    spawner = Spawner(program, environ.get(b"PATH"))
    server = Server(options, listener, spawner, Environment(initial_environment), facts, log)
    try:
        server.run()
    except Fatal:
        raise
    except Exception as error:
        log.fatal(b"unexpected error: " + os.fsencode(repr(error)))
        os._exit(EXIT_TEMPORARY)
