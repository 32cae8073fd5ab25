"""The status socket under load (issue 13 item 5): clients keep flowing while a reader polls the view.

Starts our tcpserver (`-HR -l0 -c 400`, program /bin/cat, --status-socket), holds HELD clients
open from as many 127.0.1.N addresses (so the view has that many lines), then runs a paced load
of RATE connections a second for SECONDS (each: connect, shut down the write side, read to EOF),
twice: without a status reader, and with one reading the socket in a tight loop. Prints for each
phase the connections done and failed, the rate achieved, the connection time p50/p99 and the
worst lateness against the schedule; for the reader, the reads done and the response time
p50/p99/max, and writes the same to bench/results/status.md (--output). Not run by the tests:
`python bench/status_bench.py [--rate 500 --seconds 10]`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from serverproc import OUR_SERVER, start_server  # noqa: E402


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


class Phase:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.next = 0
        self.times: list[float] = []
        self.lateness: list[float] = []
        self.failed = 0


def _one(port: int, source: str) -> None:
    with socket.socket() as client:
        client.settimeout(5)
        client.bind((source, 0))
        client.connect(("127.0.0.1", port))
        client.shutdown(socket.SHUT_WR)
        while client.recv(4096):
            pass


def _paced_worker(port: int, phase: Phase, start: float, rate: float, total: int) -> None:
    while True:
        with phase.lock:
            index = phase.next
            phase.next += 1
        if index >= total:
            return
        due = start + index / rate
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        began = time.monotonic()
        try:
            _one(port, f"127.0.0.{1 + index % 16}")
        except OSError:
            with phase.lock:
                phase.failed += 1
            continue
        with phase.lock:
            phase.times.append(time.monotonic() - began)
            phase.lateness.append(began - due)


# The reader runs in a process of its own: in this one it would take the GIL from the load.
_READER = r"""
import json, os, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
times, lines = [], []
end = time.monotonic() + seconds
while time.monotonic() < end:
    began = time.monotonic()
    data = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        try:
            client.connect(path)
            while chunk := client.recv(65536):
                data += chunk
        except OSError:
            continue
    times.append(time.monotonic() - began)
    lines.append(data.count(b"\n"))
print(json.dumps({"times": times, "lines": lines}))
"""


def run_phase(port: int, rate: float, seconds: float, threads: int, status_path: Path | None) -> str:
    phase = Phase()
    total = int(rate * seconds)
    reader = None
    if status_path is not None:
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, os.fspath(status_path), str(seconds + 0.1)], stdout=subprocess.PIPE
        )
    start = time.monotonic() + 0.1
    workers = [
        threading.Thread(target=_paced_worker, args=(port, phase, start, rate, total), daemon=True)
        for _ in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(seconds + 30)
    elapsed = time.monotonic() - start
    read_times: list[float] = []
    read_lines: list[int] = []
    if reader is not None:
        output, _ = reader.communicate(timeout=30)
        report = json.loads(output)
        read_times, read_lines = report["times"], report["lines"]
    text = (
        f"done {len(phase.times)} failed {phase.failed} rate {len(phase.times) / elapsed:.0f}/s"
        f" connect-to-EOF p50 {_percentile(phase.times, 0.5) * 1000:.2f} ms"
        f" p99 {_percentile(phase.times, 0.99) * 1000:.2f} ms"
        f" worst lateness {max(phase.lateness, default=0) * 1000:.1f} ms"
    )
    if status_path is not None:
        text += (
            f"\n  status reads {len(read_times)} ({len(read_times) / elapsed:.0f}/s,"
            f" {statistics.median(read_lines) if read_lines else 0:.0f} lines each)"
            f" p50 {_percentile(read_times, 0.5) * 1000:.2f} ms p99 {_percentile(read_times, 0.99) * 1000:.2f} ms"
            f" max {max(read_times, default=0) * 1000:.2f} ms"
        )
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=500, help="connections a second")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--held", type=int, default=100, help="clients held open, one address each (<= 250)")
    parser.add_argument("--threads", type=int, default=16, help="client threads of the paced load")
    parser.add_argument("--output", type=Path, default=TOP / "bench" / "results" / "status.md")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="status-bench-") as scratch, ExitStack() as stack:
        status_path = Path(scratch) / "status.sock"
        server = stack.enter_context(
            start_server(
                OUR_SERVER.command,
                ["-HR", "-l0", "-c400", "-b256", f"--status-socket={status_path}"],
                ["/bin/cat"],
            )
        )
        for number in range(1, arguments.held + 1):
            held = stack.enter_context(socket.socket())
            held.bind((f"127.0.1.{number}", 0))
            held.connect(("127.0.0.1", server.port))
        time.sleep(0.5)
        header = (
            f"tcpserver with {arguments.held} clients held open; {arguments.rate:g} connections/s"
            f" for {arguments.seconds:g} s, {arguments.threads} client threads"
        )
        print(header, flush=True)
        run_phase(server.port, arguments.rate, 1.0, arguments.threads, None)  # warm-up
        rows = []
        for name, path in (("without a status reader", None), ("with a reader in a loop", status_path)):
            rows.append(f"{name}: {run_phase(server.port, arguments.rate, arguments.seconds, arguments.threads, path)}")
            print(rows[-1], flush=True)
    load = os.getloadavg()[0]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    arguments.output.write_text(
        f"# The status socket under load (bench/status_bench.py)\n\n{when}; {header};"
        f" {os.cpu_count()} cores, load average {load:.1f} at the end.\n\n```\n" + "\n".join(rows) + "\n```\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
