"""`make bench`: our tcpserver and tcprules side by side with the C originals (Debian's ucspi-tcp).

Every scenario runs the servers in turn (C, ours; ours, C; ...), each on a fresh port, for ROUNDS
rounds, and reports medians and the median of the per-round ratios (ours / C): this machine is
noisy, ratios from the same run are what hold. The load comes from bench/loadgen.c, compiled
here. Results go to stdout and to bench/results/latest.md (or --output).

--baseline=COMMIT adds that commit's server as a third contestant in the same rounds (the order
rotates: C, ours, baseline; ours, baseline, C; ...). Its tree is extracted with `git archive` into
the scratch directory (removed at the end) and run by our interpreter with its own `ucspi`
package first on sys.path; each row then also gives baseline / C and ours / baseline, flagged
when ours falls below 0.95x the baseline.

Usage: .venv/bin/python bench/run.py [--rounds N] [--quick] [--baseline COMMIT] [--output FILE]
"""

from __future__ import annotations

import argparse
import configparser
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
QUIET_FLAGS = ["-H", "-R", "-l", "0"]  # no DNS, no ident: no server leaves loopback
BASELINE_FLOOR = 0.95  # ours / baseline conn/s below this is a regression (issue 9, item 8)
WHICH_UCSPI = "--which-ucspi"  # the baseline launcher's probe: print the ucspi it imports, exit


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
class Contestant:
    name: str  # "C", "ours", "baseline": the table's words
    server: str  # an executable taking tcpserver's arguments


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
    # The log goes to an unnamed file, not a pipe that could fill up and stall the server; it is
    # read only to say why a server did not start.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [server, "-1", *QUIET_FLAGS, *options, "127.0.0.1", "0", *program],
            stdout=subprocess.PIPE,
            stderr=log,
        )
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.strip():
            process.kill()
            process.wait()
            log.seek(0)
            last_lines = log.read().decode(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"{server} did not start: " + " | ".join(last_lines))
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


def side_by_side(
    loadgen: Path, scenario: Scenario, contestants: Sequence[Contestant], rounds: int
) -> dict[str, list[LoadResult]]:
    """Each contestant's result per round; the order rotates so that each one goes first in turn
    (for two: C, ours; ours, C; ...), since the first run of a round meets a cooler machine."""
    results: dict[str, list[LoadResult]] = {contestant.name: [] for contestant in contestants}
    for round_number in range(rounds):
        shift = round_number % len(contestants)
        for contestant in [*contestants[shift:], *contestants[:shift]]:
            results[contestant.name].append(measure(loadgen, contestant.server, scenario))
    return results


def round_ratios(numerators: Sequence[LoadResult], denominators: Sequence[LoadResult]) -> list[float]:
    """The per-round rate ratios: both ran in the same round, on the same machine state."""
    return [top.rate / bottom.rate for top, bottom in zip(numerators, denominators, strict=True) if bottom.rate]


def median_ratio(numerators: Sequence[LoadResult], denominators: Sequence[LoadResult]) -> float:
    ratios = round_ratios(numerators, denominators)
    return statistics.median(ratios) if ratios else 0.0


def latency_cell(results: Sequence[LoadResult]) -> str:
    return f"{statistics.median(r.p50_us for r in results):.0f} / {statistics.median(r.p99_us for r in results):.0f}"


def rate_cell(results: Sequence[LoadResult]) -> str:
    return f"{statistics.median(r.rate for r in results):.0f}"


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


def git(*arguments: str, **options: object) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(TOP), *arguments], check=True, **options)  # type: ignore[call-overload]


def resolve_commit(commit: str) -> tuple[str, str] | None:
    """(full hash, one-line description) of COMMIT, or None when git does not know it."""
    try:
        full = git("rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}", capture_output=True, text=True)
    except subprocess.CalledProcessError:
        return None
    sha = full.stdout.strip()
    described = git("log", "-1", "--format=%h %s", sha, capture_output=True, text=True).stdout.strip()
    return sha, described


def working_tree_state() -> str:
    """How ours differs from HEAD, in words: the report must say what "ours" was."""
    changed = git("status", "--porcelain", "--", "ucspi", capture_output=True, text=True).stdout.splitlines()
    head = git("log", "-1", "--format=%h", capture_output=True, text=True).stdout.strip()
    if not changed:
        return f"the working tree, whose ucspi/ is HEAD's ({head})"
    return f"the working tree: HEAD ({head}) with {len(changed)} files changed under ucspi/"


def tcpserver_entry_point(tree: Path) -> tuple[str, str]:
    """(module, function) of the tree's own `tcpserver` console script, as pip would install it."""
    setup_cfg = tree / "setup.cfg"
    if setup_cfg.is_file():
        config = configparser.ConfigParser()
        config.read(setup_cfg)
        for line in config.get("options.entry_points", "console_scripts", fallback="").splitlines():
            name, _, target = line.partition("=")
            if name.strip() == "tcpserver" and ":" in target:
                module, _, function = target.strip().partition(":")
                return module, function
    return "ucspi.cli.tcpserver", "main"


def our_interpreter() -> str:
    """The interpreter named in our own entry script's #! line: the baseline runs under the same one."""
    with open(OURS, "rb") as script:
        first_line = script.readline()
    if first_line.startswith(b"#!"):
        return os.fsdecode(first_line[2:].strip())
    return str(TOP / ".venv" / "bin" / "python")


def baseline_launcher_text(tree: Path, module: str, function: str) -> str:
    # The tree goes first on sys.path: the virtualenv's editable install maps `ucspi` to this
    # checkout, but its finder comes after the path entries. The check makes sure of it, for
    # every ucspi module the entry point imports before it runs.
    return f"""#!{our_interpreter()}
import sys

TREE = {str(tree)!r}
sys.path.insert(0, TREE)
from {module} import {function} as main

strays = [m.__file__ for n, m in list(sys.modules.items()) if n.split(".")[0] == "ucspi"
          and not (getattr(m, "__file__", None) or TREE).startswith(TREE + "/")]
if strays:
    sys.stderr.write(f"bench: the baseline imported {{strays[0]}}, not from {{TREE}}\\n")
    sys.exit(111)
if sys.argv[1:] == [{WHICH_UCSPI!r}]:
    print(sys.modules["ucspi"].__file__)
    sys.exit(0)
sys.exit(main())
"""


def extract_baseline(sha: str, work: Path) -> tuple[Path, str]:
    """COMMIT's tree under WORK, and a `tcpserver` executable that runs its server; checks that
    the executable imports that tree's ucspi, and returns the module file it found."""
    tree = work / f"baseline-{sha[:12]}"
    tree.mkdir()
    archive = subprocess.Popen(["git", "-C", str(TOP), "archive", "--format=tar", sha], stdout=subprocess.PIPE)
    try:
        subprocess.run(["tar", "-x", "-C", str(tree)], stdin=archive.stdout, check=True)
    finally:
        assert archive.stdout is not None
        archive.stdout.close()
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {sha} failed")
    launcher = tree / ".bench" / "tcpserver"  # named tcpserver: the server takes its log prefix from argv[0]
    launcher.parent.mkdir()
    launcher.write_text(baseline_launcher_text(tree, *tcpserver_entry_point(tree)))
    launcher.chmod(0o755)
    probe = subprocess.run([launcher, WHICH_UCSPI], capture_output=True, text=True, check=False)
    module_file = probe.stdout.strip()
    if probe.returncode != 0 or not module_file.startswith(str(tree) + "/"):
        raise RuntimeError(f"the baseline does not run its own code: {probe.stderr.strip() or module_file}")
    return launcher, module_file


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


def scenario_row(scenario: Scenario, results: dict[str, list[LoadResult]], with_baseline: bool) -> str:
    ours_to_c = median_ratio(results["ours"], results["C"])
    goal = "" if scenario.goal is None else f"≥ {scenario.goal:.1f}× " + (
        "met" if ours_to_c >= scenario.goal else "**not met**"
    )
    names = ["C", "ours", *(["baseline"] if with_baseline else [])]
    rates = [rate_cell(results[name]) for name in names]
    cells = [scenario.name, *rates, f"{ours_to_c:.2f}", goal]
    if with_baseline:
        ours_to_baseline = median_ratio(results["ours"], results["baseline"])
        # The rounds' spread beside the median: it tells a regression from this machine's noise.
        spread = round_ratios(results["ours"], results["baseline"]) or [0.0]
        floor = "ok" if ours_to_baseline >= BASELINE_FLOOR else "**below**"
        cells += [
            f"{median_ratio(results['baseline'], results['C']):.2f}",
            f"{ours_to_baseline:.2f} ({min(spread):.2f}-{max(spread):.2f})",
            floor,
        ]
    cells += [latency_cell(results[name]) for name in names]
    cells.append(" / ".join(str(sum(r.failed for r in results[name])) for name in names))
    return "| " + " | ".join(cells) + " |"


def table_header(with_baseline: bool) -> list[str]:
    if not with_baseline:
        return [
            "| scenario | C conn/s | ours conn/s | ours / C | goal "
            "| C p50 / p99 µs | ours p50 / p99 µs | failed C / ours |",
            "|---|---|---|---|---|---|---|---|",
        ]
    return [
        "| scenario | C conn/s | ours conn/s | baseline conn/s | ours / C | goal | baseline / C "
        f"| ours / baseline (rounds' range) | ≥ {BASELINE_FLOOR:.2f}× baseline "
        "| C p50 / p99 µs | ours p50 / p99 µs | baseline p50 / p99 µs | failed C / ours / baseline |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds", type=int, help="rounds per scenario (default 5, with --baseline 6; --quick: one per server)"
    )
    parser.add_argument("--quick", action="store_true", help="fewer connections and rounds, for a smoke run")
    parser.add_argument("--memory-connections", type=int, default=100_000)
    parser.add_argument(
        "--baseline", metavar="COMMIT", help="also run this commit's server, in the same rounds (e.g. HEAD, v1.0)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"the Markdown report (default {RESULTS})")
    arguments = parser.parse_args(argv)
    for needed in (C_SERVER, C_TCPRULES, OURS):
        if not os.access(needed, os.X_OK):
            print(f"bench: {needed} is missing (apt-get install ucspi-tcp; make)", file=sys.stderr)
            return 111
    baseline_commit = None
    if arguments.baseline is not None:
        baseline_commit = resolve_commit(arguments.baseline)
        if baseline_commit is None:
            print(f"bench: --baseline: git knows no commit {arguments.baseline!r}", file=sys.stderr)
            return 100
    with_baseline = baseline_commit is not None
    contestant_count = 3 if with_baseline else 2
    # With a baseline, 6 rounds: each of the three servers goes first twice.
    rounds = arguments.rounds or (contestant_count if arguments.quick else 6 if with_baseline else 5)
    started = time.monotonic()
    lines = [
        f"# ucspi benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}. All servers with `{' '.join(QUIET_FLAGS)}`; "
        f"{rounds} rounds, the order rotating; medians, and the median of per-round ratios."
        + (" A `--quick` run: fewer connections per run, a smoke test, not figures." if arguments.quick else ""),
    ]
    with tempfile.TemporaryDirectory(prefix="ucspi-bench-") as scratch:
        work = Path(scratch)
        contestants = [Contestant("C", C_SERVER), Contestant("ours", OURS)]
        if baseline_commit is not None:
            sha, described = baseline_commit
            launcher, module_file = extract_baseline(sha, work)
            contestants.append(Contestant("baseline", str(launcher)))
            lines += [
                "",
                f"Baseline: `{described}` (`--baseline={arguments.baseline}`), extracted with git archive and "
                f"run by the same interpreter as ours, importing its own package "
                f"(`{Path(module_file).relative_to(work)}` in the scratch tree); ours is {working_tree_state()}. "
                f"A row where ours falls below {BASELINE_FLOOR:.2f}× the baseline is flagged **below**.",
            ]
            print(lines[-1], flush=True)
        lines += ["", *table_header(with_baseline)]
        loadgen = build_loadgen(work)
        below: list[str] = []
        for scenario in scenarios(work, arguments.quick):
            results = side_by_side(loadgen, scenario, contestants, rounds)
            lines.append(scenario_row(scenario, results, with_baseline))
            if with_baseline and median_ratio(results["ours"], results["baseline"]) < BASELINE_FLOOR:
                below.append(scenario.name)
            print(lines[-1], flush=True)
        if with_baseline:
            lines += [
                "",
                f"ours / baseline: **below {BASELINE_FLOOR:.2f}× in {len(below)} rows**: {', '.join(below)}."
                if below
                else f"ours / baseline: at least {BASELINE_FLOOR:.2f}× in every row.",
            ]
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
        for contestant in contestants:
            before, after = memory_growth(loadgen, contestant.server, connections)
            growth = (after - before) / 1024
            lines.append(
                f"| {contestant.name} | {before / 1024:.1f} MiB | {after / 1024:.1f} MiB | {growth:+.2f} MiB |"
            )
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
    lines += ["", f"The whole run took {(time.monotonic() - started) / 60:.1f} min."]

    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
