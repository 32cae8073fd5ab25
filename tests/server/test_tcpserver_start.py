"""The start of tcpserver: closed fds 0, 1, 2 (README, differences item 13) and SIGTERM at any moment
of the start (docs/behaviour.md §6.4 step 2: the original exits 0 from its handler, installed before the socket)."""

from __future__ import annotations

import os
import random
import re
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from scenarios import child_signals
from serverproc import (
    ORIGINAL_SERVER,
    OUR_SERVER,
    Implementation,
    connect,
    original_available,
    plain_environment,
    read_to_eof,
    talk,
)

needs_original = pytest.mark.skipif(not original_available(), reason="the original tcpserver is not installed")

# ---------------------------------------------------------------- fds 0, 1 and 2 closed


def _start_with_closed(closed: Sequence[int], arguments: Sequence[str]) -> subprocess.Popen[bytes]:
    """Our tcpserver exec'd by sh with the given standard descriptors closed (`<&-` and so on)."""
    redirections = " ".join(f"{fd}<&-" for fd in closed)
    return subprocess.Popen(
        ["/bin/sh", "-c", f'exec "$@" {redirections}', "sh", os.fspath(OUR_SERVER.command), *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(entry.split(b"=", 1) for entry in plain_environment()),
    )


def _listening_port(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    """The port of the process's listening TCP socket, found through /proc (for when -1 cannot say)."""
    pid = process.pid
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            _, stderr = process.communicate(timeout=5)
            raise AssertionError(f"the server exited {process.returncode}: {stderr[-300:]!r}")
        inodes = set()
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except FileNotFoundError:
                continue
            if match := re.fullmatch(r"socket:\[(\d+)\]", target):
                inodes.add(match[1])
        with open(f"/proc/{pid}/net/tcp") as table:
            for row in table.read().splitlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                    return int(fields[1].rsplit(":", 1)[1], 16)
        time.sleep(0.02)
    raise TimeoutError(f"pid {pid} listens on no TCP port")


def _fd_target(pid: int, fd: int) -> str:
    return os.readlink(f"/proc/{pid}/fd/{fd}")


@dataclass
class ClosedOutcome:
    reply: bytes
    stdout: bytes
    log: list[bytes]
    alive: bool
    fds: dict[int, str]


def _serve_with_closed(closed: Sequence[int]) -> ClosedOutcome:
    program = ["/bin/sh", "-c", "echo hi; echo program-stderr >&2"]
    process = _start_with_closed(closed, ["-1", "-v", "-HRl0", "127.0.0.1", "0", *program])
    try:
        port = _listening_port(process)
        reply = talk(port)
        time.sleep(0.2)  # the end line
        alive = process.poll() is None
        fds = {fd: _fd_target(process.pid, fd) for fd in (0, 1, 2)} if alive else {}
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=5)
    return ClosedOutcome(reply, stdout, stderr.splitlines(), alive, fds)


def _normal_log(log: list[bytes]) -> list[bytes]:
    """Numbers masked; the program's own line (its place among the server's varies) taken out."""
    assert log.count(b"program-stderr") == 1, log
    return [re.sub(rb"\d+", b"N", line) for line in log if line != b"program-stderr"]


SERVED_LOG = [
    b"tcpserver: status: N/N",
    b"tcpserver: status: N/N",
    b"tcpserver: pid N from N.N.N.N",
    b"tcpserver: ok N N:N.N.N.N:N :N.N.N.N::N",
    b"tcpserver: end N status N",
    b"tcpserver: status: N/N",
]


def test_stdin_closed_serves() -> None:
    outcome = _serve_with_closed([0])
    assert (outcome.reply, outcome.alive, outcome.fds[0]) == (b"hi\n", True, os.devnull)
    assert outcome.stdout.isdigit() or outcome.stdout[:-1].isdigit()
    assert _normal_log(outcome.log) == SERVED_LOG


def test_stdout_closed_serves_and_the_port_goes_nowhere() -> None:
    outcome = _serve_with_closed([1])
    assert (outcome.reply, outcome.alive, outcome.stdout, outcome.fds[1]) == (b"hi\n", True, b"", os.devnull)
    assert _normal_log(outcome.log) == SERVED_LOG


def test_stderr_closed_serves_and_logs_to_dev_null() -> None:
    outcome = _serve_with_closed([2])
    assert (outcome.reply, outcome.alive, outcome.log, outcome.fds[2]) == (b"hi\n", True, [], os.devnull)
    assert outcome.stdout[:-1].isdigit()


def test_all_three_closed_serves() -> None:
    outcome = _serve_with_closed([0, 1, 2])
    assert (outcome.reply, outcome.alive, outcome.stdout, outcome.log) == (b"hi\n", True, b"", [])
    assert outcome.fds == {0: os.devnull, 1: os.devnull, 2: os.devnull}


def test_stderr_closed_usage_error_exits_100() -> None:
    process = _start_with_closed([2], ["-Z"])
    assert process.wait(10) == 100


# ---------------------------------------------------------------- SIGTERM during the start

GONE_WITHIN = 1.0
CONCURRENT_SERVERS = 4


@dataclass(frozen=True)
class TermOutcome:
    gone_in: float  # seconds from the TERM to the exit (inf: still there after GONE_WITHIN)
    code: int | None
    after_output: bool  # the server had written something before the TERM was sent


def _term_once(implementation: Implementation, when: str, delay: float) -> TermOutcome:
    """Start the server, send TERM at `when` (a delay after exec, the -1 line, the first status line)."""
    process = subprocess.Popen(
        [os.fspath(implementation.command), "-1", "-v", "-HRl0", "127.0.0.1", "0", "/bin/true"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(entry.split(b"=", 1) for entry in plain_environment()),
    )
    assert process.stdout is not None and process.stderr is not None
    try:
        if when == "delay":
            time.sleep(delay)
        else:
            stream = process.stdout if when == "port" else process.stderr
            line = stream.readline()
            assert line, f"{implementation.name} ended before its first {when} line"
            if when == "status":
                assert line.startswith(b"tcpserver: status: "), line
        readable, _, _ = select.select([process.stdout, process.stderr], [], [], 0)
        after_output = when != "delay" or bool(readable)
        sent = time.monotonic()
        process.send_signal(signal.SIGTERM)
        try:
            code: int | None = process.wait(GONE_WITHIN)
            gone_in = time.monotonic() - sent
        except subprocess.TimeoutExpired:
            code, gone_in = None, float("inf")
        return TermOutcome(gone_in, code, after_output)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(5)
        process.stdout.close()
        process.stderr.close()


def _term_many(implementation: Implementation, when: str, tries: int, seed: int) -> list[TermOutcome]:
    delays = random.Random(seed).choices([index / 1000 for index in range(301)], k=tries)
    with ThreadPoolExecutor(CONCURRENT_SERVERS) as pool:
        return list(pool.map(lambda delay: _term_once(implementation, when, delay), delays))


def _lost(outcomes: list[TermOutcome]) -> list[TermOutcome]:
    """TERMs the server outlived by GONE_WITHIN, or that did not give exit 0 after its first output."""
    return [o for o in outcomes if o.gone_in > GONE_WITHIN or (o.after_output and o.code != 0)]


# 100 + 50 + 50 = 200 tries: about 20 s of our server's starts, 4 at a time.
TERM_CASES = [
    pytest.param("delay", 100, id="random-0-300ms-after-exec"),
    pytest.param("port", 50, id="after-port-line"),
    pytest.param("status", 50, id="after-first-status-line"),
]


@pytest.mark.parametrize(("when", "tries"), TERM_CASES)
def test_sigterm_during_start_is_never_lost(when: str, tries: int) -> None:
    outcomes = _term_many(OUR_SERVER, when, tries, seed=tries)
    assert _lost(outcomes) == []
    if when != "delay":
        assert {o.code for o in outcomes} == {0}


@needs_original
@pytest.mark.parametrize(("when", "tries"), TERM_CASES)
def test_sigterm_during_start_original(when: str, tries: int) -> None:
    """The expectation: the original loses none either."""
    assert _lost(_term_many(ORIGINAL_SERVER, when, tries, seed=tries)) == []


@needs_original
def test_program_starts_with_an_empty_signal_mask_as_the_originals() -> None:
    """TERM is blocked in every thread of ours; the program must not inherit that."""
    ours, original = child_signals(OUR_SERVER), child_signals(ORIGINAL_SERVER)
    assert ours.facts["SigBlk"] == original.facts["SigBlk"] == 0


def test_sigterm_while_a_program_runs_exits_0_and_the_program_goes_on(tmp_path: Path) -> None:
    program = ["/bin/sh", "-c", "echo started; sleep 0.3; echo finished"]
    process = subprocess.Popen(
        [os.fspath(OUR_SERVER.command), "-1", "-HRl0", "127.0.0.1", "0", *program],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=dict(entry.split(b"=", 1) for entry in plain_environment()),
    )
    assert process.stdout is not None
    port = int(process.stdout.readline())
    with connect(port) as client:
        assert client.recv(100) == b"started\n"
        process.send_signal(signal.SIGTERM)
        assert process.wait(GONE_WITHIN) == 0
        assert read_to_eof(client) == b"finished\n"
    process.stdout.close()
