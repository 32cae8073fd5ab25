"""What the kernel shows of a running tcpserver: its descriptors, CPU time, memory, children, and
what its log says about its slots. Shared by tests/server/test_faults.py, test_security.py and
the stress run (bench/stress.py); every wait here has a bound.
"""

from __future__ import annotations

import ast
import contextlib
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from serverproc import ServerProcess, talk


def descriptors(pid: int) -> set[int]:
    return {int(name) for name in os.listdir(f"/proc/{pid}/fd")}


def settled_descriptors(server: ServerProcess, limit: int = 40) -> set[int]:
    """The server's descriptors once its loop runs: the status line comes before the loop opens
    its own (epoll, signal pipe), one served client after it."""
    server.wait_for_log(rf"^tcpserver: status: 0/{limit}$")
    talk(server.port)
    wait_idle(server, limit)
    return descriptors(server.pid)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[tuple[int, str]]:
    """(pid, state) of each child process of pid, from /proc (as ps --ppid sees them)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            found.append((int(entry), fields[0]))
    return found


def status_lines(server: ServerProcess, limit: int) -> list[bytes]:
    return [line for line in server.log() if line.startswith(b"tcpserver: status: ") and line.endswith(b"/%d" % limit)]


def wait_idle(server: ServerProcess, limit: int, timeout: float = 20) -> None:
    """Until the last status line says 0/limit (every slot back), on two looks in a row: the
    log's reader may not have caught up yet with a `1/limit` the server wrote before its client
    was even answered."""
    deadline = time.monotonic() + timeout
    idle_at = None  # the count of status lines when the last one was first seen idle
    while time.monotonic() < deadline:
        lines = status_lines(server, limit)
        if lines and lines[-1] == b"tcpserver: status: 0/%d" % limit:
            if idle_at == len(lines):
                return
            idle_at = len(lines)
        else:
            idle_at = None
        time.sleep(0.05)
    raise AssertionError(f"never idle again: {server.log()[-5:]!r}")


def warnings(server: ServerProcess) -> list[bytes]:
    return [line for line in server.log() if b": warning: " in line or b": fatal: " in line]


def short_of_descriptors(pid: int, limit: int) -> None:
    """Process pid may open descriptors up to number limit: its soft RLIMIT_NOFILE only (the
    original's children inherit it with their fork)."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (limit, hard))


@contextlib.contextmanager
def more_descriptors(wanted: int) -> Iterator[None]:
    """This process may hold `wanted` descriptors (a test that opens a thousand clients)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def in_threads(count: int, work: Callable[[int], object], timeout: float = 30) -> list[object]:
    """work(index) in `count` threads at once; each result, or the exception it raised."""
    results: list[object] = [None] * count

    def run(index: int) -> None:
        try:
            results[index] = work(index)
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "clients still running"
    return results


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


# A wrapper (serverproc.launch's `wrapper`) that runs our command named by its first argument
# under an interpreter keeping what the cyclic collector finds (gc.DEBUG_SAVEALL); at SIGUSR2 the
# process writes `garbage: {TYPE: COUNT, ...}` on stderr (garbage_kinds reads it).
KEEPING_GARBAGE = r"""
import collections, gc, os, signal, sys
gc.set_debug(gc.DEBUG_SAVEALL)

def report(*_):
    gc.collect()
    kinds = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.garbage)
    os.write(2, b"garbage: %s\n" % repr(dict(kinds)).encode())

signal.signal(signal.SIGUSR2, report)
sys.argv = sys.argv[1:]
from ucspi.cli import run
run(os.path.basename(sys.argv[0]))
"""


def garbage_kinds(server: ServerProcess, pid: int | None = None) -> dict[str, int]:
    """What a server under KEEPING_GARBAGE (process pid, default its own) has found so far, by type."""
    reports = len([line for line in server.log() if line.startswith(b"garbage: ")])
    os.kill(server.pid if pid is None else pid, signal.SIGUSR2)
    line = server.wait_for_log(r"^garbage: ", count=reports + 1)[reports]
    return ast.literal_eval(line.split(b": ", 1)[1].decode())


def garbage_added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The kinds garbage_kinds found more of in `after`, and how many more."""
    return {kind: count - before.get(kind, 0) for kind, count in after.items() if count > before.get(kind, 0)}
