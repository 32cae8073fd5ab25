"""`make stress`: 10,000 connections from 200 concurrent clients against `tcpserver -c 100 -b 256`.

Figures, each checked (exit 1 when one fails):
* no connection lost: every client got its program's "ok\\n", whole (bench/loadgen.c EXPECT);
* concurrency never above 100, counted by the programs themselves (bench/concurrency.c keeps a
  flock'd counter of programs running, with its maximum) and, from outside, by /proc;
* no zombies: the server's children as /proc (ps --ppid) shows them, during and after the run;
* the server's descriptors (/proc/PID/fd) and memory (VmRSS) flat: sampled every 0.1 s, and
  compared after the run with a baseline taken after a warm-up;
* meanwhile bin/tcprules replaces the server's rules (-x) over and over (up to 1,000 times):
  no client is dropped or denied for it.

Bounded: the load generator stops after 300 s whatever happens, every wait has a limit.
Usage: .venv/bin/python bench/stress.py [--connections N] [--clients K] [--hold-ms MS]
"""

from __future__ import annotations

import argparse
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BENCH = TOP / "bench"
OURS = TOP / ".venv" / "bin" / "tcpserver"
TCPRULES = TOP / "bin" / "tcprules"
REPLACEMENTS = 1000
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from serverstate import children, descriptors, rss_kib  # noqa: E402

LIMIT = 100
BACKLOG = 256
WARM_UP = 1000
LOAD_SECONDS = 300
# Allowed after 10,000 connections: no descriptor more, and under 2 MiB of resident memory more.
RSS_GROWTH_KIB = 2048


@dataclass
class Samples:
    descriptors: list[int] = field(default_factory=list)
    rss_kib: list[int] = field(default_factory=list)
    zombies: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)


def build(work: Path) -> tuple[Path, Path]:
    loadgen, program = work / "loadgen", work / "concurrency"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", loadgen, BENCH / "loadgen.c"], check=True)
    subprocess.run(["gcc", "-O2", "-o", program, BENCH / "concurrency.c"], check=True)
    return loadgen, program


def run_load(loadgen: Path, port: int, clients: int, count: int) -> dict[str, float]:
    output = subprocess.run(
        [loadgen, "127.0.0.1", str(port), str(clients), str(count), str(LOAD_SECONDS), "ok\n"],
        capture_output=True,
        text=True,
        check=True,
        timeout=LOAD_SECONDS + 30,
    ).stdout.split()
    return {name: float(value) for name, value in zip(output[::2], output[1::2], strict=True)}


def read_counter(counter: Path) -> tuple[int, int, int]:
    """(running now, most running at once, programs started)."""
    return struct.unpack("3l", counter.read_bytes())


def sample(pid: int, samples: Samples, stop: threading.Event) -> None:
    while not stop.wait(0.1):
        try:
            samples.descriptors.append(len(descriptors(pid)))
            samples.rss_kib.append(rss_kib(pid))
            states = [state for _, state in children(pid)]
        except OSError:
            return
        samples.zombies.append(states.count("Z"))
        samples.running.append(len(states))


def compile_rules(cdb: Path, generation: int) -> None:
    text = b'127.0.0.:allow,GENERATION="%d"\n:deny\n' % generation
    subprocess.run([TCPRULES, cdb, cdb.with_suffix(".tmp")], input=text, check=True, timeout=30)


def replace_rules(cdb: Path, done: threading.Event, count: list[int]) -> None:
    """bin/tcprules (tmp, rename) again and again until the load is over or 1,000 replacements."""
    while not done.is_set() and count[0] < REPLACEMENTS:
        count[0] += 1
        compile_rules(cdb, count[0])


def wait_for_no_children(pid: int, seconds: float) -> list[tuple[int, str]]:
    deadline = time.monotonic() + seconds
    while (left := children(pid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--hold-ms", type=int, default=100, help="how long each program keeps its slot")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ucspi-stress-") as directory:
        work = Path(directory)
        loadgen, program = build(work)
        counter = work / "counter"
        counter.write_bytes(bytes(24))
        log_path = work / "tcpserver.log"
        cdb = work / "rules.cdb"
        compile_rules(cdb, 0)
        command = [OURS, "-1", "-v", "-HRl0", "-c", str(LIMIT), "-b", str(BACKLOG), "-x", cdb, "127.0.0.1", "0"]
        with open(log_path, "wb") as log:
            server = subprocess.Popen(
                [*command, program, counter, str(arguments.hold_ms)],
                stdout=subprocess.PIPE,
                stderr=log,
                env={"PATH": "/usr/bin:/bin"},
            )
        try:
            assert server.stdout is not None
            port = int(server.stdout.readline())
            return stress(server.pid, port, loadgen, counter, cdb, log_path, arguments)
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(10)


def stress(
    pid: int, port: int, loadgen: Path, counter: Path, cdb: Path, log_path: Path, arguments: argparse.Namespace
) -> int:
    warm = run_load(loadgen, port, arguments.clients, WARM_UP)
    wait_for_no_children(pid, 30)
    time.sleep(0.5)
    base_descriptors, base_rss = len(descriptors(pid)), rss_kib(pid)
    counter.write_bytes(bytes(24))  # the server is idle: no program holds the counter

    samples = Samples()
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(pid, samples, stop), daemon=True)
    sampler.start()
    load_done = threading.Event()
    replaced = [0]
    writer = threading.Thread(target=replace_rules, args=(cdb, load_done, replaced), daemon=True)
    writer.start()
    load = run_load(loadgen, port, arguments.clients, arguments.connections)
    load_done.set()
    writer.join(60)
    left = wait_for_no_children(pid, 30)
    time.sleep(0.5)
    stop.set()
    sampler.join(5)
    after_descriptors, after_rss = len(descriptors(pid)), rss_kib(pid)
    running_now, most_running, started = read_counter(counter)

    log = log_path.read_bytes().splitlines()
    statuses = [int(line.split(b" ")[2].split(b"/")[0]) for line in log if line.startswith(b"tcpserver: status: ")]
    ends = [line for line in log if line.startswith(b"tcpserver: end ")]
    bad_ends = [line for line in ends if not line.endswith(b" status 0")]
    warnings = [line for line in log if b"warning" in line or b"fatal" in line]
    denied = [line for line in log if line.startswith(b"tcpserver: deny ")]
    expected_ends = int(warm["done"]) + arguments.connections

    checks = [
        ("connections done", load["done"] == arguments.connections, f"{load['done']:.0f} of {arguments.connections}"),
        ("connections failed", load["failed"] == 0, f"{load['failed']:.0f}"),
        ("replies whole", load["matched"] == arguments.connections, f"{load['matched']:.0f} exactly 'ok\\n'"),
        ("programs started", started == arguments.connections, f"{started}"),
        ("most programs at once (their count)", most_running <= LIMIT, f"{most_running} (limit {LIMIT})"),
        (
            "most children at once (/proc)",
            max(samples.running, default=0) <= LIMIT,
            f"{max(samples.running, default=0)}",
        ),
        ("most slots in the log", max(statuses) <= LIMIT, f"{max(statuses)}"),
        ("programs running after", running_now == 0 and not left, f"{running_now} counted, {len(left)} children"),
        ("zombies after", not left, f"{len([1 for _, state in left if state == 'Z'])}"),
        ("end lines, all status 0", len(ends) == expected_ends and not bad_ends, f"{len(ends)} of {expected_ends}"),
        ("warnings (drops)", not warnings, f"{len(warnings)}"),
        ("rules replaced by bin/tcprules meanwhile, denials", not denied, f"{replaced[0]}, {len(denied)}"),
        (
            "descriptors: baseline / most / after",
            after_descriptors == base_descriptors and max(samples.descriptors) <= base_descriptors + 20,
            f"{base_descriptors} / {max(samples.descriptors)} / {after_descriptors}",
        ),
        (
            "VmRSS KiB: baseline / most / after",
            after_rss - base_rss < RSS_GROWTH_KIB,
            f"{base_rss} / {max(samples.rss_kib)} / {after_rss} ({after_rss - base_rss:+d})",
        ),
    ]
    print(
        f"tcpserver -c {LIMIT} -b {BACKLOG}: {arguments.connections} connections from {arguments.clients} clients,"
        f" programs hold {arguments.hold_ms} ms; {load['seconds']:.1f} s, {load['rate']:.0f} conn/s,"
        f" p50 {load['p50_us'] / 1000:.0f} ms, p99 {load['p99_us'] / 1000:.0f} ms"
    )
    print(
        f"samples every 0.1 s: {len(samples.descriptors)}; most zombies seen at once (not yet reaped): "
        f"{max(samples.zombies, default=0)}"
    )
    for name, ok, figure in checks:
        print(f"  {'ok  ' if ok else 'FAIL'} {name}: {figure}")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
