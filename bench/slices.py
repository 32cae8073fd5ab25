"""Interleaved slices: a quick A/B of tcpserver versions at one K, finer than `make bench`'s rows.

Each server (C, ours, and with --baseline that commit's) is started once and kept running; the
load then alternates between them in short slices (--connections each, the order rotating each
round), so that a machine whose speed drifts over minutes drifts for all of them alike. A slice
measures connections per second and the server's own CPU per connection, read from
/proc/PID/task/*/schedstat (nanoseconds, every thread of the server; its children excluded)
rather than the clock ticks of /proc/PID/stat: at K=1 a slice's CPU is a few hundred ms. It
prints the medians of the per-slice ratios to C and, with a baseline, to the baseline.

Usage: .venv/bin/python bench/slices.py [--clients K] [--connections N] [--rounds R] [--baseline COMMIT]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench  # bench/run.py: the servers, the load client, the baseline


def server_cpu_seconds(pid: int) -> float:
    """CPU time of every thread of pid so far, from the scheduler's own accounting."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError):
            pass  # a thread that ended meanwhile
    return total / 1e9


def one_slice(loadgen: Path, port: int, pid: int, clients: int, connections: int) -> tuple[float, float]:
    """(connections per second, server CPU µs per connection) over one slice of load."""
    before = server_cpu_seconds(pid)
    line = subprocess.run(
        [str(loadgen), "127.0.0.1", str(port), str(clients), str(connections), "30"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    after = server_cpu_seconds(pid)
    done = int(line[1])
    if not done:
        raise RuntimeError(f"no connection served on port {port}")
    return float(line[7]), (after - before) / done * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1, help="K, connections in flight (default 1)")
    parser.add_argument("--connections", type=int, default=2000, help="per slice (default 2,000)")
    parser.add_argument("--rounds", type=int, default=16, help="slices per server (default 16)")
    parser.add_argument("--baseline", help="a commit whose server runs beside ours")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ucspi-slices-") as scratch:
        work = Path(scratch)
        loadgen = bench.build_loadgen(work)
        servers = {"C": bench.C_SERVER, "ours": bench.OURS}
        if arguments.baseline:
            revision = ["git", "-C", str(bench.TOP), "rev-parse", arguments.baseline]
            sha = subprocess.run(revision, capture_output=True, text=True, check=True).stdout.strip()
            servers["baseline"] = str(bench.extract_baseline(sha, work)[0])
        running: dict[str, tuple[subprocess.Popen, int, int]] = {}
        try:
            for name, server in servers.items():
                process, port = bench.start_server(server, [], ("/bin/true",))
                running[name] = (process, port, bench.serving_pid(process, port))
            names = list(running)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
            for round_number in range(arguments.rounds):
                shift = round_number % len(names)
                for name in names[shift:] + names[:shift]:
                    _process, port, pid = running[name]
                    results[name].append(one_slice(loadgen, port, pid, arguments.clients, arguments.connections))
        finally:
            for process, _port, _pid in running.values():
                bench.stop_server(process)

    def ratios(name: str, to: str, index: int) -> list[float]:
        return [mine[index] / theirs[index] for mine, theirs in zip(results[name], results[to], strict=True)]

    def summary(values: list[float]) -> str:
        return f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})"

    print(f"K={arguments.clients}, {arguments.rounds} slices of {arguments.connections} connections per server")
    for name in names:
        rate = statistics.median(result[0] for result in results[name])
        cpu = statistics.median(result[1] for result in results[name])
        line = f"{name:9} {rate:7.0f} conn/s  {cpu:6.1f} µs CPU"
        if name != "C":
            line += f"   x C: rate {summary(ratios(name, 'C', 0))}, CPU {summary(ratios(name, 'C', 1))}"
        print(line)
    if "baseline" in results:
        rate, cpu = summary(ratios("ours", "baseline", 0)), summary(ratios("ours", "baseline", 1))
        print(f"ours / baseline: rate {rate}, CPU {cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
