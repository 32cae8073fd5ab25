"""`make bench`: our tcpserver and tcprules side by side with the C originals (Debian's ucspi-tcp).

Every scenario runs the two servers alternately (C, ours, ours, C, ...), each on a fresh port,
for ROUNDS rounds, and reports medians and the median of the per-round ratios (ours / C): this
machine is noisy, ratios from the same run are what hold. The load comes from bench/loadgen.c,
compiled here. Results go to stdout and to bench/results/latest.md.

Usage: .venv/bin/python bench/run.py [--rounds N] [--quick]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
BENCH = TOP / "bench"
RESULTS = BENCH / "results" / "latest.md"
C_SERVER = "/usr/bin/tcpserver"
C_TCPRULES = "/usr/bin/tcprules"
OURS = str(TOP / ".venv" / "bin" / "tcpserver")
QUIET_FLAGS = ["-H", "-R", "-l", "0"]  # no DNS, no ident: neither server leaves loopback


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    options: tuple[str, ...] = ()
    program: tuple[str, ...] = ("/bin/true",)
    count: int = 4000
    seconds: float = 3.0
    goal: float | None = None  # minimum ours / C rate ratio


@dataclass(frozen=True)
class LoadResult:
    done: int
    failed: int
    rate: float
    p50_us: int
    p99_us: int


def build_loadgen(work: Path) -> Path:
    binary = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, BENCH / "loadgen.c"], check=True)
    return binary


def start_server(server: str, options: Sequence[str], program: Sequence[str]) -> tuple[subprocess.Popen, int]:
    process = subprocess.Popen(
        [server, "-1", *QUIET_FLAGS, *options, "127.0.0.1", "0", *program],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip():
        process.kill()
        raise RuntimeError(f"{server} did not start")
    return process, int(line)


def stop_server(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    time.sleep(0.2)  # let the last children end before the next run


def run_load(loadgen: Path, port: int, clients: int, count: int, seconds: float) -> LoadResult:
    output = subprocess.run(
        [loadgen, "127.0.0.1", str(port), str(clients), str(count), str(seconds)],
        capture_output=True,
        text=True,
        check=True,
        timeout=seconds + 30,
    ).stdout.split()
    fields = dict(zip(output[::2], output[1::2], strict=True))
    return LoadResult(
        int(fields["done"]), int(fields["failed"]), float(fields["rate"]), int(fields["p50_us"]), int(fields["p99_us"])
    )


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(loadgen: Path, server: str, scenario: Scenario) -> LoadResult:
    process, port = start_server(server, scenario.options, scenario.program)
    try:
        run_load(loadgen, port, scenario.clients, 50, 5)  # warm-up: caches, first spawns
        return run_load(loadgen, port, scenario.clients, scenario.count, scenario.seconds)
    finally:
        stop_server(process)


def side_by_side(loadgen: Path, scenario: Scenario, rounds: int) -> dict[str, object]:
    c_results: list[LoadResult] = []
    our_results: list[LoadResult] = []
    for round_number in range(rounds):
        order = [(C_SERVER, c_results), (OURS, our_results)]
        if round_number % 2:
            order.reverse()
        for server, results in order:
            results.append(measure(loadgen, server, scenario))
    ratios = [ours.rate / c.rate for ours, c in zip(our_results, c_results, strict=True) if c.rate]
    return {
        "c_rate": statistics.median(r.rate for r in c_results),
        "our_rate": statistics.median(r.rate for r in our_results),
        "ratio": statistics.median(ratios) if ratios else 0.0,
        "c_p50_p99": (statistics.median(r.p50_us for r in c_results), statistics.median(r.p99_us for r in c_results)),
        "our_p50_p99": (
            statistics.median(r.p50_us for r in our_results),
            statistics.median(r.p99_us for r in our_results),
        ),
        "failed": (sum(r.failed for r in c_results), sum(r.failed for r in our_results)),
    }


def memory_growth(loadgen: Path, server: str, connections: int) -> tuple[int, int]:
    """Resident KiB after a 200-connection warm-up and after `connections` more."""
    process, port = start_server(server, (), ("/bin/true",))
    try:
        run_load(loadgen, port, 8, 200, 10)
        before = resident_kib(process.pid)
        remaining = connections
        while remaining > 0:
            batch = min(remaining, 20000)
            result = run_load(loadgen, port, 8, batch, 120)
            remaining -= max(result.done, 1)
        time.sleep(0.5)
        return before, resident_kib(process.pid)
    finally:
        stop_server(process)


def idle_resident_kib(options: Sequence[str]) -> int:
    """Our server's RSS with the given flags after start-up, no client (default flags import DNS)."""
    process = subprocess.Popen(
        [OURS, "-1", *options, "127.0.0.1", "0", "/bin/true"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    process.stdout.readline()
    time.sleep(0.5)
    try:
        return resident_kib(process.pid)
    finally:
        stop_server(process)


def write_rules(path: Path, lines: Sequence[str], tcprules: str = C_TCPRULES) -> Path:
    source = path.with_suffix(".txt")
    source.write_text("".join(line + "\n" for line in lines))
    with source.open("rb") as stdin:
        subprocess.run([tcprules, path, path.with_suffix(".tmp")], stdin=stdin, check=True)
    return path


def cidr_rules(count: int) -> list[str]:
    """`count` CIDR rules of mixed lengths, both families, none matching 127.0.0.1 or ::1, then
    `:allow`: every client pays for every recorded length (the worst case of a lookup)."""
    rules = []
    for index in range(count):
        if index % 2:
            length = 8 + index % 25  # /8 .. /32
            network = (10 << 24 | (index * 2654435761) % (1 << 24)) >> (32 - length) << (32 - length)
            address = ".".join(str(network >> shift & 255) for shift in (24, 16, 8, 0))
        else:
            length = 16 + index % 113  # /16 .. /128
            network = (0x2001_0DB8 << 96 | (index * 11400714819323198485) % (1 << 96)) >> (128 - length)
            address = format(ipaddress.IPv6Address(network << (128 - length)))
        rules.append(f"{address}/{length}:deny")
    return [*rules, ":allow"]


def cidr_lookup_cost(cdb: Path, plain_cdb: Path) -> tuple[float, float, float]:
    """µs per decision for an IPv4 and an IPv6 client on the CIDR file, and on the plain one."""
    sys.path.insert(0, str(TOP))
    from ucspi.rules.database import RulesFile

    def per_decision(path: Path, ip: bytes) -> float:
        rules = RulesFile(os.fsencode(path))
        rules.decide(ip, None, None)
        rounds = 20000
        started = time.perf_counter()
        for _ in range(rounds):
            rules.decide(ip, None, None)
        return (time.perf_counter() - started) / rounds * 1e6

    return per_decision(cdb, b"127.0.0.1"), per_decision(cdb, b"::1"), per_decision(plain_cdb, b"127.0.0.1")


def scenarios(work: Path, quick: bool) -> list[Scenario]:
    thousand = [f"10.{i // 250}.{i % 250}.{i % 7}:allow,RELAYCLIENT=\"\"" for i in range(999)] + [":allow"]
    rules_1000 = write_rules(work / "rules1000.cdb", thousand)
    deny_all = write_rules(work / "deny.cdb", [":deny"])
    # The C tcprules cannot read CIDR lines; the C server reads our file as plain keys.
    cidr = write_rules(work / "cidr10000.cdb", cidr_rules(10_000), str(TOP / "bin" / "tcprules"))
    count = 1500 if quick else 4000
    return [
        Scenario("/bin/true, K=1", 1, count=count, goal=1.0),
        Scenario("/bin/true, K=8", 8, count=count, goal=1.1),
        Scenario("/bin/true, K=64, -b 256 -c 200", 64, ("-b", "256", "-c", "200"), count=count, goal=1.1),
        Scenario("100 bytes out, K=8", 8, program=("/bin/echo", "x" * 99), count=count),
        Scenario("-x 1,000 rules, K=8", 8, ("-x", str(rules_1000)), count=count),
        Scenario("deny flood, K=8", 8, ("-x", str(deny_all)), count=count * 4, goal=3.0),
        Scenario("-x 10,000 CIDR rules, K=8", 8, ("-x", str(cidr)), count=count),
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer connections and rounds, for a smoke run")
    parser.add_argument("--memory-connections", type=int, default=100_000)
    arguments = parser.parse_args(argv)
    for needed in (C_SERVER, C_TCPRULES, OURS):
        if not os.access(needed, os.X_OK):
            print(f"bench: {needed} is missing (apt-get install ucspi-tcp; make)", file=sys.stderr)
            return 111
    rounds = 2 if arguments.quick else arguments.rounds
    lines = [
        f"# ucspi benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Both servers with `{' '.join(QUIET_FLAGS)}`; "
        f"{rounds} rounds, alternating; medians, and the median of per-round ratios.",
        "",
        "| scenario | C conn/s | ours conn/s | ours / C | goal "
        "| C p50 / p99 µs | ours p50 / p99 µs | failed C / ours |",
        "|---|---|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory(prefix="ucspi-bench-") as scratch:
        work = Path(scratch)
        loadgen = build_loadgen(work)
        for scenario in scenarios(work, arguments.quick):
            result = side_by_side(loadgen, scenario, rounds)
            verdict = "" if scenario.goal is None else f"≥ {scenario.goal:.1f}× " + (
                "met" if result["ratio"] >= scenario.goal else "**not met**"
            )
            c50, c99 = result["c_p50_p99"]
            o50, o99 = result["our_p50_p99"]
            lines.append(
                f"| {scenario.name} | {result['c_rate']:.0f} | {result['our_rate']:.0f} | {result['ratio']:.2f} | "
                f"{verdict} | {c50:.0f} / {c99:.0f} | {o50:.0f} / {o99:.0f} | "
                f"{result['failed'][0]} / {result['failed'][1]} |"
            )
            print(lines[-1], flush=True)

        v4_cost, v6_cost, plain_cost = cidr_lookup_cost(work / "cidr10000.cdb", work / "rules1000.cdb")
        lines += [
            "",
            f"CIDR lookup cost (in-process, RulesFile.decide): {v4_cost:.1f} µs for an IPv4 client and "
            f"{v6_cost:.1f} µs for an IPv6 one with 10,000 CIDR rules of mixed lengths; {plain_cost:.1f} µs "
            "for an IPv4 client with the 1,000 plain rules. (The C server reads the CIDR file as plain keys.)",
        ]
        print(lines[-1], flush=True)

        connections = 20_000 if arguments.quick else arguments.memory_connections
        lines += ["", f"Memory (resident, after a warm-up and after {connections:,} more connections, K=8):", ""]
        lines += ["| server | before | after | growth |", "|---|---|---|---|"]
        for name, server in (("C", C_SERVER), ("ours", OURS)):
            before, after = memory_growth(loadgen, server, connections)
            growth = (after - before) / 1024
            lines.append(f"| {name} | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB | {growth:+.2f} MiB |")
            print(lines[-1], flush=True)
        default_kib = idle_resident_kib([])
        quiet_kib = idle_resident_kib(QUIET_FLAGS)
        lines += [
            "",
            f"Ours at rest: {quiet_kib / 1024:.1f} MiB with `-H -R -l 0`, {default_kib / 1024:.1f} MiB with the "
            "default flags (which load the DNS library). Goal: at most 30 MB, growing less than 1 MB.",
        ]

    sys.path.insert(0, str(BENCH))
    import tcprules_bench

    print("\ntcprules, 1M lines:", flush=True)
    rules_result = tcprules_bench.benchmark(lines=200_000 if arguments.quick else 1_000_000, rounds=rounds)
    lines += ["", "tcprules on a generated 1M-line file (time and peak memory), see bench/tcprules_bench.py:", ""]
    lines += rules_result.table().splitlines()

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
