"""tcpserver scenarios run end to end on one implementation, giving an Outcome to check or compare.

tests/server/test_tcpserver_*.py run them on ours and check the Outcome against what the spec
says; tests/compat/test_tcpserver_compat.py runs them on ours and on the original and requires
the same Outcome.comparable(), which already leaves out what README, differences items 1, 2 and 8
allow to differ (the lines of a child ours never makes, the order of lines, glibc's signals).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fakes import FakeDNS, FakeIdentd
from serverproc import (
    Implementation,
    ServerProcess,
    connect,
    environment_entries,
    launch,
    mask_log_line,
    mask_ports,
    plain_environment,
    read_line,
    read_to_eof,
    rules_cdb,
    start_server,
    talk,
)

CAT_ENVIRON = ["/bin/cat", "/proc/self/environ"]
# Wait statuses of children the original makes and ours does not (README, differences item 1).
_NO_CHILD_STATUSES = {b"25600", b"28416"}
_PORT_ENTRY = re.compile(rb"(^|\x00)(TCPLOCALPORT|TCPREMOTEPORT)=\d+")
_END_LINE = re.compile(rb"^tcpserver: end PID status (\d+)$")


@dataclass
class Outcome:
    """What a scenario saw: client replies, the server's log (pids and ports masked), exit codes."""

    replies: list[bytes] = field(default_factory=list)
    log: list[bytes] = field(default_factory=list)
    exit_code: int | None = None
    facts: dict[str, object] = field(default_factory=dict)

    @property
    def environments(self) -> list[list[bytes]]:
        """Each reply read as an environment block (the program was cat /proc/self/environ)."""
        return [mask_ports(environment_entries(reply)) for reply in self.replies]

    def comparable(self) -> Outcome:
        """The Outcome less what the original may do differently: its no-program children's
        pid/end lines (README, differences item 1) and the order of lines (item 2)."""
        # Pids are masked already: take out each no-program end line and one pid line with it
        # (every client of a scenario comes from the same address, so any pid line will do).
        no_program = [
            line for line in self.log if (match := _END_LINE.match(line)) and match.group(1) in _NO_CHILD_STATUSES
        ]
        kept = [line for line in self.log if line not in no_program]
        for _ in no_program:
            pid_line = next((line for line in kept if line.startswith(b"tcpserver: pid PID from ")), None)
            if pid_line is not None:
                kept.remove(pid_line)
        replies = [_PORT_ENTRY.sub(rb"\1\2=PORT", reply) for reply in self.replies]
        return Outcome(replies, sorted(kept), self.exit_code, dict(self.facts))


def talk_in_turn(server: ServerProcess, send: bytes = b"", *, source: str | None = None, limit: int = 40) -> bytes:
    """One client, then wait until its slot is free again, so that clients never overlap."""
    done = len([line for line in server.log() if line == b"tcpserver: status: 0/%d" % limit])
    reply = talk(server.port, send, source=source)
    server.wait_for_log(rf"^tcpserver: status: 0/{limit}$", count=done + 1)
    return reply


def finish(server: ServerProcess, connections: int, limit: int = 40) -> list[bytes]:
    """Wait for every connection's slot to come back, stop the server, return its masked log."""
    server.wait_for_log(rf"^tcpserver: status: 0/{limit}$", count=connections + 1)
    code = server.stop()
    assert code == 0, server.log()
    return [mask_log_line(line) for line in server.log()]


# ---------------------------------------------------------------- environment


def served_environment(
    implementation: Implementation,
    options: Sequence[str],
    *,
    rules: str | bytes | None = None,
    directory: Path,
    environment: Sequence[bytes] | None = None,
    source: str | None = None,
    bare: bool = False,
    connections: int = 1,
    program: Sequence[str] = CAT_ENVIRON,
    clients_took: list[float] | None = None,
) -> Outcome:
    """One or more clients of `tcpserver -v OPTIONS [-x rules.cdb] 127.0.0.1 0 cat /proc/self/environ`;
    clients_took, if given, gets the seconds the clients took (the server's start-up left out)."""
    arguments = ["-v", *options]
    if rules is not None:
        arguments += ["-x", os.fspath(rules_cdb(directory, rules))]
    command = implementation.bare_command if bare else implementation.command
    with start_server(command, arguments, program, environment=environment) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        began = time.monotonic()
        replies = [talk_in_turn(server, source=source) for _ in range(connections)]
        if clients_took is not None:
            clients_took.append(time.monotonic() - began)
        log = finish(server, connections)
    return Outcome(replies, log)


def deny_with_banner(implementation: Implementation, directory: Path) -> Outcome:
    """A deny rule: the client gets the banner then EOF; the program (it makes a marker) never runs."""
    marker = directory / "marker"
    cdb = rules_cdb(directory, '127.0.0.1:deny,X="ignored"\n')
    program = ["/bin/sh", "-c", f"touch {marker}; echo ran"]
    with start_server(implementation.command, ["-v", "-HRl0", "-Bbanner\n", "-x", os.fspath(cdb)], program) as server:
        reply = talk(server.port)
        log = finish(server, 1)
    return Outcome([reply], log, facts={"program ran": marker.exists()})


def banner_then_program(implementation: Implementation) -> Outcome:
    """-B: the banner comes first, verbatim (no escape processing), then the program's output."""
    with start_server(implementation.command, ["-v", "-HRl0", "-B", "hello\\n\n"], ["/bin/echo", "program"]) as server:
        reply = talk(server.port)
        log = finish(server, 1)
    return Outcome([reply], log)


# ---------------------------------------------------------------- rules files


def rules_file_problem(implementation: Implementation, directory: Path, problem: str, allow_missing: bool) -> Outcome:
    """The rules file is missing, or holds 8 bytes of garbage: the client is dropped, or with -X served."""
    cdb = directory / "rules.cdb"
    if problem == "corrupt":
        cdb.write_bytes(b"garbage!")
    options = ["-v", "-HRl0", "-x", os.fspath(cdb), *(["-X"] if allow_missing else [])]
    with start_server(implementation.command, options, CAT_ENVIRON, cwd=directory) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        replies = [talk_in_turn(server), talk_in_turn(server)]
        log = finish(server, 2)
    return Outcome(replies, [line.replace(os.fsencode(directory), b"DIR") for line in log])


def rules_replaced_while_running(implementation: Implementation, directory: Path, tcprules: Path) -> Outcome:
    """tcprules rewrites the cdb between two clients (and again to a deny): each sees the rules of its time."""
    cdb = rules_cdb(directory, '127.0.0.1:allow,GENERATION="1"\n', tcprules=tcprules)
    with start_server(implementation.command, ["-v", "-HRl0", "-x", os.fspath(cdb)], CAT_ENVIRON) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        replies = [talk_in_turn(server)]
        rules_cdb(directory, '127.0.0.1:allow,GENERATION="2"\n', tcprules=tcprules)
        replies.append(talk_in_turn(server))
        rules_cdb(directory, "127.0.0.1:deny\n", tcprules=tcprules)
        replies.append(talk_in_turn(server))
        log = finish(server, 3)
    return Outcome(replies, log)


def program_missing(implementation: Implementation, program: str) -> Outcome:
    """The program cannot be run: each client is dropped with the warning; the server carries on."""
    with start_server(implementation.command, ["-v", "-HRl0"], [program]) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        replies = [talk_in_turn(server), talk_in_turn(server)]
        alive = server.alive()
        log = finish(server, 2)
    return Outcome(replies, log, facts={"alive after": alive})


# ---------------------------------------------------------------- the log


# Reads what to do from the client: exit with a code, or kill itself with a signal.
_EXIT_AS_TOLD = 'ulimit -c 0; read how; case "$how" in [0-9]*) exit "$how";; *) kill -s "$how" $$;; esac'


def wait_statuses(implementation: Implementation, hows: Sequence[str]) -> Outcome:
    """One client per entry of `hows`, one at a time; the log ends each with its wait status."""
    with start_server(implementation.command, ["-v", "-HRl0"], ["/bin/sh", "-c", _EXIT_AS_TOLD]) as server:
        server.wait_for_log(r"^tcpserver: status: 0/40$")
        replies = [talk_in_turn(server, how.encode() + b"\n") for how in hows]
        log = finish(server, len(hows))
    return Outcome(replies, log)


# ---------------------------------------------------------------- processes


# Each program counts itself in and out of a shared counter under flock and records what it saw.
_COUNT_CONCURRENCY = """
exec 9>>"$DIR/lock"
flock 9; now=$(( $(cat "$DIR/now" 2>/dev/null || echo 0) + 1 )); echo $now >"$DIR/now"; echo $now >>"$DIR/seen"
flock -u 9
sleep 0.25
flock 9; now=$(( $(cat "$DIR/now") - 1 )); echo $now >"$DIR/now"; flock -u 9
echo served
"""


def concurrency_limit(implementation: Implementation, directory: Path, limit: int, clients: int) -> Outcome:
    """`clients` clients at once against -c limit; facts: the most programs ever running together."""
    environment = plain_environment({b"DIR": os.fsencode(directory)})
    options = ["-v", "-HRl0", f"-c{limit}"]
    with start_server(
        implementation.command, options, ["/bin/sh", "-c", _COUNT_CONCURRENCY], environment=environment
    ) as server:
        replies: list[bytes] = [b""] * clients

        def client(index: int) -> None:
            replies[index] = talk(server.port, timeout=20)

        threads = [threading.Thread(target=client, args=(index,)) for index in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        server.wait_for_log(rf"^tcpserver: status: 0/{limit}$", count=2)
        statuses = [line for line in server.log() if line.startswith(b"tcpserver: status: ")]
        server.stop()
    seen = [int(line) for line in (directory / "seen").read_text().split()]
    most_in_log = max(int(line.split(b" ")[2].split(b"/")[0]) for line in statuses)
    return Outcome(replies, [], facts={"most running": max(seen), "programs": len(seen), "most in log": most_in_log})


def user_and_groups(
    implementation: Implementation, options: Sequence[str], environment: Sequence[bytes] | None = None
) -> Outcome:
    """-u/-g (or -U): the program's user id, group id and group list."""
    program = ["/bin/sh", "-c", "id -u; id -g; id -G"]
    with start_server(implementation.command, ["-v", "-HRl0", *options], program, environment=environment) as server:
        reply = talk(server.port)
        log = finish(server, 1)
    return Outcome([reply], log)


def stdout_after_port(implementation: Implementation) -> Outcome:
    """-1: the port line, then EOF on stdout while the server runs (fds 0 and 1 are closed)."""
    with start_server(implementation.command, ["-HRl0"], ["/bin/echo", "hi"]) as server:
        rest = server.rest_of_stdout(timeout=3)
        reply = talk(server.port)
        alive = server.alive()
    return Outcome([reply], facts={"stdout after the port": rest, "alive": alive})


def terminate_while_serving(implementation: Implementation) -> Outcome:
    """SIGTERM: the server exits 0 at once, silently; the running program carries on to the end."""
    program = ["/bin/sh", "-c", "echo started; read line; echo finished $line"]
    with start_server(implementation.command, ["-v", "-HRl0"], program) as server:
        with connect(server.port) as client:
            started = read_line(client)
            server.wait_for_log(r"^tcpserver: ok ")
            began = time.monotonic()
            server.signal(signal.SIGTERM)
            code = server.process.wait(5)  # not server.wait(): the program still holds its stderr
            took = time.monotonic() - began
            client.sendall(b"after\n")
            rest = read_to_eof(client)
        try:
            talk(server.port, timeout=2)
            refused = False
        except ConnectionRefusedError:
            refused = True
        server.wait(5)
        log = [mask_log_line(line) for line in server.log()]
    return Outcome([started, rest], log, code, facts={"quick": took < 2, "refused after": refused})


def other_signal(implementation: Implementation, number: int) -> Outcome:
    """SIGINT or SIGHUP after a client: the server ends by the signal's default action, saying nothing."""
    with start_server(implementation.command, ["-HRl0"], ["/bin/echo", "hi"]) as server:
        reply = talk(server.port)
        time.sleep(0.1)
        server.signal(number)
        code = server.wait(5)
        log = server.log()
    return Outcome([reply], log, code)


_SIGNAL_FIELDS = re.compile(rb"^(SigBlk|SigIgn):\s*([0-9a-f]+)$", re.MULTILINE)


def child_signals(implementation: Implementation, ignored: Sequence[int] = ()) -> Outcome:
    """SigBlk and SigIgn of the program (cat's own /proc/self/status), every bit: glibc's 32 and
    33 included, which both spawn paths set to their default (README, differences item 8)."""
    with start_server(
        implementation.command, ["-HRl0"], ["/bin/cat", "/proc/self/status"], ignore_signals=ignored
    ) as server:
        status = talk(server.port)
    fields = {name.decode(): int(value, 16) for name, value in _SIGNAL_FIELDS.findall(status)}
    return Outcome(facts=fields)


def _describe_fd(pid: int, fd: int, connection: str) -> str:
    target = os.readlink(f"/proc/{pid}/fd/{fd}")
    if target == connection:
        return "connection"
    return re.sub(r"\[\d+\]", "", target)


def child_descriptors(implementation: Implementation) -> Outcome:
    """The program's open descriptors (cat, waiting for input); the server was started with one
    more descriptor open (/dev/null, at the first free number from 100: facts["extra"])."""
    null = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    extra = fcntl.fcntl(null, fcntl.F_DUPFD_CLOEXEC, 100)
    try:
        with start_server(implementation.command, ["-v", "-HRl0"], ["/bin/cat"], pass_fds=[extra]) as server:
            with connect(server.port) as client:
                client.sendall(b"ping\n")
                echoed = read_line(client)
                line = server.wait_for_log(r"^tcpserver: ok ")[0]
                pid = int(line.split()[2])
                connection = os.readlink(f"/proc/{pid}/fd/0")
                descriptors = {int(fd): _describe_fd(pid, int(fd), connection) for fd in os.listdir(f"/proc/{pid}/fd")}
                client.shutdown(socket.SHUT_WR)
                read_to_eof(client)
    finally:
        os.close(extra)
        os.close(null)
    return Outcome([echoed], facts={"descriptors": descriptors, "extra": extra})


# ---------------------------------------------------------------- DNS and ident

LOCAL_NAME = "Local.Example.COM."
CLIENT_NAME = "Client.Example.COM."


@contextlib.contextmanager
def fake_dns(ip: str, *, forward: Sequence[str] | None = None, mode: str = "answer") -> Iterator[FakeDNS]:
    """A fake DNS on ip:53 naming 127.0.0.1 and the client's ip; `forward` are the A records of the client's name."""
    ptr = {"127.0.0.1": LOCAL_NAME, ip: CLIENT_NAME}
    with FakeDNS(ip, mode=mode, ptr=ptr, a={CLIENT_NAME: forward if forward is not None else [ip]}) as dns:  # type: ignore[arg-type]
        yield dns
    assert not dns.errors


def lookup_environment(
    implementation: Implementation,
    directory: Path,
    ip: str,
    options: Sequence[str],
    *,
    rules: str | None = None,
    dns: bool = True,
    forward: Sequence[str] | None = None,
    dns_mode: str = "answer",
    ident_mode: str | None = None,
    ident_reply: bytes = b"",
    extra_environment: dict[bytes, bytes] | None = None,
) -> Outcome:
    """The program's environment for a client from ip, with a fake DNS ($DNSCACHEIP=ip) and/or
    a fake identd on ip:113 (when ident_mode is given); the client's ip reads CLIENTIP."""
    environment = plain_environment({b"DNSCACHEIP": ip.encode(), **(extra_environment or {})})
    with contextlib.ExitStack() as fakes:
        server_dns = fakes.enter_context(fake_dns(ip, forward=forward, mode=dns_mode)) if dns else None
        identd = None
        if ident_mode is not None:
            identd = fakes.enter_context(FakeIdentd(ip, mode=ident_mode, reply=ident_reply))  # type: ignore[arg-type]
        # The clients' time only: a Python server's start-up under load could pass a second alone.
        clients_took: list[float] = []
        outcome = served_environment(
            implementation,
            options,
            rules=rules,
            directory=directory,
            environment=environment,
            source=ip,
            clients_took=clients_took,
        )
        took = clients_took[0]
    if server_dns is not None:
        outcome.facts["questions"] = sorted({(request.qname, request.rdtype) for request in server_dns.requests})
    if identd is not None:
        assert not identd.errors
        outcome.facts["ident requests"] = [request.line.split(b",")[0].strip().isdigit() for request in identd.requests]
    outcome.facts["took a second"] = took >= 1
    return _mask_ip(outcome, ip)


def _mask_ip(outcome: Outcome, ip: str) -> Outcome:
    """The test's own 127.0.0.N written as CLIENTIP, so two runs on two addresses compare."""

    def mask(text: bytes) -> bytes:
        return re.sub(rb"(?<![0-9.])" + re.escape(ip.encode()) + rb"(?![0-9])", b"CLIENTIP", text)

    outcome.replies = [mask(reply) for reply in outcome.replies]
    outcome.log = [mask(line) for line in outcome.log]
    return outcome


# ---------------------------------------------------------------- command line


def command_line(
    implementation: Implementation, arguments: Sequence[str], environment: Sequence[bytes] | None = None
) -> Outcome:
    """A tcpserver that is expected to end by itself: its stdout, stderr and exit code."""
    process = launch(implementation.command, arguments, environment=environment)
    try:
        stdout, stderr = process.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate(timeout=5)
        raise
    return Outcome([stdout], stderr.splitlines(), process.returncode)


def port_in_use(implementation: Implementation) -> Outcome:
    """Binding a port some socket already listens on: `unable to bind: address already used`."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        return command_line(implementation, ["-HRl0", "127.0.0.1", str(port), "/bin/true"])


def bundled_options(implementation: Implementation, directory: Path) -> Outcome:
    """Bundled flags, attached and separate arguments, `-Xx file` with the file missing, `--`,
    and an option after the program's name left to the program (docs/behaviour.md §6.1)."""
    options = ["-vHRc5", "-Bhi ", "-l", "local", "-Xx", os.fspath(directory / "missing.cdb"), "-t1", "--"]
    with start_server(implementation.command, options, ["/bin/echo", "-n", "-v"]) as server:
        reply = talk_in_turn(server, limit=5)
        log = finish(server, 1, limit=5)
    return Outcome([reply], log)
