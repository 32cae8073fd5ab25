"""`make bench`: our tcpserver side by side with the C original, its peers and the floor; tcprules too.

Every scenario runs the servers in turn, each on a fresh port, for ROUNDS rounds, the order
rotating so that each goes first in turn, and reports the median of the per-round ratios to the C
tcpserver (Debian's ucspi-tcp) with the rounds' range: this machine is noisy, ratios from the
same round are what hold. The servers (issue 10):

* C: /usr/bin/tcpserver, the reference; ours: .venv/bin/tcpserver; both with `-H -R -l 0`;
* tcpsvd: Debian ipsvd's, with `-l 0` (it looks up neither the client's name nor ident unless
  told) and tcpserver's default `-c 40 -b 20` (or the row's);
* xinetd: `xinetd -dontfork -f CONFIG`, a config of its own: one UNLISTED service on a loopback
  port, `flags = NOLIBWRAP` (no tcp-wrappers lookups), no logging, `instances` = the row's `-c`,
  `cps` high enough never to trip (its own backlog is 64);
* floor 1t, floor 2t: bench/floor.c, accept + vfork + dup2 + execve and nothing else, in 1 and 2
  threads sharing the listener (the least any server can spend per connection).

Rows run with `-c 200 -b 256` use those limits in every server. The deny-flood row and the
rules rows run C and ours only (the peers' rules differ). For each server and row the report
also gives its own CPU per allowed connection (utime + stime of the server process, its
children excluded, from /proc/PID/stat around the measured load), and a `/bin/echo` row (one
byte out) gives the first-byte latency, from connect to the first byte, p50 and p99. The memory
part measures our RSS with `-H -R` at start and after --memory-connections connections (bounded
in time); `--rss` runs only that part, and writes bench/results/rss.md. The load comes from
bench/loadgen.c and the floor from bench/floor.c, both compiled here with gcc. Results go to
stdout and to bench/results/latest.md (or --output).

--baseline=COMMIT adds that commit's server as one more contestant in the same rounds. Its tree
is extracted with `git archive` into the scratch directory (removed at the end), its C extension
built there, and run by our interpreter with its own `ucspi` package first on sys.path; the
report then also gives ours / baseline, flagged when ours falls below 0.95x the baseline.

Usage: .venv/bin/python bench/run.py [--rounds N] [--quick] [--rss] [--baseline COMMIT] [--output FILE]
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import ipaddress
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

TOP = Path(__file__).resolve().parent.parent
BENCH = TOP / "bench"
RESULTS = BENCH / "results" / "latest.md"
RSS_RESULTS = BENCH / "results" / "rss.md"
C_SERVER = "/usr/bin/tcpserver"
C_TCPRULES = "/usr/bin/tcprules"
OURS = str(TOP / ".venv" / "bin" / "tcpserver")
TCPSVD = "/usr/bin/tcpsvd"
XINETD = "/usr/sbin/xinetd"
QUIET_FLAGS = ["-H", "-R", "-l", "0"]  # no DNS, no ident: no server leaves loopback
DEFAULT_CONCURRENCY, DEFAULT_BACKLOG = 40, 20  # tcpserver's -c and -b, given to the peers too
BASELINE_FLOOR = 0.95  # ours / baseline conn/s below this is a regression (issue 9, item 8)
WHICH_UCSPI = "--which-ucspi"  # the baseline launcher's probe: print the ucspi it imports, exit
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Issue 10's goals, ratios to the C server in the same run.
GOAL_CPU_RATIO = 1.2
GOAL_RSS_MIB, GOAL_GROWTH_MIB = 30 * 1e6 / 2**20, 1e6 / 2**20  # "30 MB", "1 MB"
# Debian's busybox leaves tcpsvd out: issue 10's figures (K=1, 8, 64), quoted, not measured.
BUSYBOX_QUOTED = "1.16, 1.01 and 0.92"


@dataclass(frozen=True)
class Scenario:
    name: str
    clients: int
    concurrency: int | None = None  # -c; None: tcpserver's default (the peers get the same)
    backlog: int | None = None  # -b; likewise
    rules: Path | None = None  # -x; such rows run the tcpserver contestants only
    program: tuple[str, ...] = ("/bin/true",)
    count: int = 4000
    seconds: float = 3.0
    goal: float | None = None  # minimum ours / C rate ratio
    first_byte: bool = False  # the row whose program writes a byte: first-byte latency
    denies: bool = False  # the rules deny every client: no program runs

    def tcpserver_options(self) -> list[str]:
        options = [] if self.concurrency is None else ["-c", str(self.concurrency)]
        options += [] if self.backlog is None else ["-b", str(self.backlog)]
        return options + ([] if self.rules is None else ["-x", str(self.rules)])


@dataclass(frozen=True)
class Contestant:
    name: str  # the report's word: "C", "ours", "baseline", "tcpsvd", "xinetd", "floor 1t", ...
    server: str  # an executable
    kind: str = "tcpserver"  # "tcpserver" (takes tcpserver's arguments), "tcpsvd", "xinetd", "floor"
    threads: int = 1  # the floor's

    @property
    def takes_rules(self) -> bool:
        return self.kind == "tcpserver"


@dataclass(frozen=True)
class LoadResult:
    done: int
    failed: int
    rate: float
    p50_us: int
    p99_us: int
    first_p50_us: int = 0  # connect to the first byte, over the connections that got one
    first_p99_us: int = 0
    cpu_us: float = 0.0  # the server's own CPU per allowed connection (its children excluded)
    first: int = 0  # the connections that got a byte


def build(work: Path, source: str) -> Path:
    binary = work / Path(source).stem
    subprocess.run(["gcc", "-O2", "-pthread", "-o", binary, BENCH / source], check=True)
    return binary


def build_loadgen(work: Path) -> Path:
    return build(work, "loadgen.c")


def _first_line_port(process: subprocess.Popen, name: str, log: IO[bytes]) -> int:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line.strip():
        _give_up(process, name, log)
    return int(line)


def _give_up(process: subprocess.Popen, name: str, log: IO[bytes]) -> None:
    process.kill()
    process.wait()
    log.seek(0)
    last_lines = log.read().decode(errors="replace").strip().splitlines()[-3:]
    raise RuntimeError(f"{name} did not start: " + " | ".join(last_lines))


def start_server(server: str, options: Sequence[str], program: Sequence[str]) -> tuple[subprocess.Popen, int]:
    """A tcpserver (C, ours, a baseline) on 127.0.0.1, port 0, with -1: (process, port)."""
    return _spawn([server, "-1", *QUIET_FLAGS, *options, "127.0.0.1", "0", *program], server, _first_line_port)


def _spawn(
    argv: Sequence[str],
    name: str,
    find_port: Callable[[subprocess.Popen, str, IO[bytes]], int],
) -> tuple[subprocess.Popen, int]:
    # The log goes to an unnamed file, not a pipe that could fill up and stall the server; it is
    # read only to say why a server did not start.
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        return process, find_port(process, name, log)


def _listening_ports(pid: int) -> list[int]:
    """The TCP ports process PID listens on: its sockets' inodes looked up in /proc/net/tcp."""
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except (FileNotFoundError, ProcessLookupError):
        return []
    ports = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
            ports.append(int(fields[1].rpartition(":")[2], 16))
    return ports


def serving_pid(process: subprocess.Popen, port: int) -> int:
    """The process that holds the listening socket: the one started, or, should a launcher have
    started the server as its child rather than exec it, that child (its CPU and RSS are the
    server's, not the launcher's)."""
    pids = [process.pid]
    for _ in range(20):  # a bound: the started process and its descendants, breadth first
        if not pids:
            break
        pid = pids.pop(0)
        if port in _listening_ports(pid):
            return pid
        for task in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
            try:
                pids += [int(child) for child in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
            except OSError:
                pass
    return process.pid


def _wait_listening(process: subprocess.Popen, name: str, log: IO[bytes]) -> int:
    """For servers that do not print their port: it is known once their socket listens."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and process.poll() is None:
        ports = _listening_ports(process.pid)
        if ports:
            return ports[0]
        time.sleep(0.02)
    _give_up(process, name, log)
    return 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def xinetd_config(work: Path, port: int, scenario: Scenario) -> Path:
    config = work / "xinetd.conf"
    user = "\tuser = root\n" if os.geteuid() == 0 else ""  # xinetd needs one as root, ignores it else
    config.write_text(
        "defaults\n{\n}\n"
        "service ucspi-bench\n{\n"
        "\ttype = UNLISTED\n\tsocket_type = stream\n\tprotocol = tcp\n\twait = no\n"
        f"{user}\tbind = 127.0.0.1\n\tport = {port}\n"
        f"\tserver = {scenario.program[0]}\n"
        + (f"\tserver_args = {' '.join(scenario.program[1:])}\n" if scenario.program[1:] else "")
        + f"\tinstances = {scenario.concurrency or DEFAULT_CONCURRENCY}\n"
        "\tper_source = UNLIMITED\n\tcps = 1000000 1\n\tflags = NOLIBWRAP\n"
        "\tlog_on_success =\n\tlog_on_failure =\n}\n"
    )
    return config


def start_contestant(contestant: Contestant, scenario: Scenario, work: Path) -> tuple[subprocess.Popen, int]:
    concurrency = str(scenario.concurrency or DEFAULT_CONCURRENCY)
    backlog = str(scenario.backlog or DEFAULT_BACKLOG)
    if contestant.kind == "tcpserver":
        return start_server(contestant.server, scenario.tcpserver_options(), scenario.program)
    if contestant.kind == "floor":
        argv = [contestant.server, str(contestant.threads), backlog, *scenario.program]
        return _spawn(argv, contestant.name, _first_line_port)
    if contestant.kind == "tcpsvd":
        argv = [contestant.server, "-l", "0", "-c", concurrency, "-b", backlog, "127.0.0.1", "0", *scenario.program]
        return _spawn(argv, contestant.name, _wait_listening)
    assert contestant.kind == "xinetd"
    # xinetd takes no port 0: a free one, tried again should another process take it meanwhile.
    for attempt in range(3):
        config = xinetd_config(work, free_port(), scenario)
        try:
            return _spawn([contestant.server, "-dontfork", "-f", str(config)], contestant.name, _wait_listening)
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


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
        int(fields["done"]),
        int(fields["failed"]),
        float(fields["rate"]),
        int(fields["p50_us"]),
        int(fields["p99_us"]),
        int(fields["first_p50_us"]),
        int(fields["first_p99_us"]),
        first=int(fields["first"]),
    )


def cpu_ticks(pid: int) -> int:
    """utime + stime of process PID (all its threads; its children not)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5), counted from the state


def resident_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(loadgen: Path, contestant: Contestant, scenario: Scenario, work: Path) -> LoadResult:
    process, port = start_contestant(contestant, scenario, work)
    try:
        run_load(loadgen, port, scenario.clients, 50, 5)  # warm-up: caches, first spawns
        time.sleep(0.05)
        pid = serving_pid(process, port)
        before = cpu_ticks(pid)
        result = run_load(loadgen, port, scenario.clients, scenario.count, scenario.seconds)
        time.sleep(0.1)  # the last reaps and closes are the server's work too
        spent = (cpu_ticks(pid) - before) / CLOCK_TICKS * 1e6
        return dataclasses.replace(result, cpu_us=spent / result.done if result.done else 0.0)
    finally:
        stop_server(process)


def side_by_side(
    loadgen: Path, scenario: Scenario, contestants: Sequence[Contestant], rounds: int, work: Path
) -> dict[str, list[LoadResult]]:
    """Each contestant's result per round; the order rotates so that each one goes first in turn
    (C, ours, ...; ours, ..., C; ...), since the first run of a round meets a cooler machine."""
    taking = [contestant for contestant in contestants if scenario.rules is None or contestant.takes_rules]
    results: dict[str, list[LoadResult]] = {contestant.name: [] for contestant in taking}
    for round_number in range(rounds):
        shift = round_number % len(taking)
        for contestant in [*taking[shift:], *taking[:shift]]:
            results[contestant.name].append(measure(loadgen, contestant, scenario, work))
    return results


def per_round(
    numerators: Sequence[LoadResult], denominators: Sequence[LoadResult], value: Callable[[LoadResult], float]
) -> list[float]:
    """The per-round ratios of VALUE: both ran in the same round, on the same machine state."""
    return [value(top) / value(bottom) for top, bottom in zip(numerators, denominators, strict=True) if value(bottom)]


def round_ratios(numerators: Sequence[LoadResult], denominators: Sequence[LoadResult]) -> list[float]:
    return per_round(numerators, denominators, lambda result: result.rate)


def median_ratio(numerators: Sequence[LoadResult], denominators: Sequence[LoadResult]) -> float:
    ratios = round_ratios(numerators, denominators)
    return statistics.median(ratios) if ratios else 0.0


def ratio_cell(ratios: Sequence[float]) -> str:
    """The median of the per-round ratios and, with more than one round, their range."""
    if not ratios:
        return "-"
    if len(ratios) == 1:
        return f"{ratios[0]:.2f}"
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def median_of(results: Sequence[LoadResult], value: Callable[[LoadResult], float]) -> float:
    return statistics.median(value(result) for result in results)


def rate_cell(results: Sequence[LoadResult]) -> str:
    return f"{median_of(results, lambda result: result.rate):.0f}"


def memory_growth(loadgen: Path, server: str, connections: int, seconds: float) -> tuple[int, int, int, int]:
    """Resident KiB at start (ready, no client yet), after a 200-connection warm-up, and after up
    to `connections` more within `seconds`; and how many of those were made."""
    process, port = start_server(server, (), ("/bin/true",))
    try:
        time.sleep(0.5)
        pid = serving_pid(process, port)
        at_start = resident_kib(pid)
        run_load(loadgen, port, 8, 200, 10)
        warm = resident_kib(pid)
        made = 0
        deadline = time.monotonic() + seconds
        while made < connections and time.monotonic() < deadline:
            batch = min(connections - made, 20000)
            result = run_load(loadgen, port, 8, batch, max(1.0, deadline - time.monotonic()))
            made += result.done
            if not result.done:
                break
        time.sleep(0.5)
        return at_start, warm, resident_kib(pid), made
    finally:
        stop_server(process)


def idle_resident_kib(options: Sequence[str]) -> int:
    """Our server's RSS with the given flags after start-up, no client (default flags import DNS)."""
    process = subprocess.Popen(
        [OURS, "-1", *options, "127.0.0.1", "0", "/bin/true"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert process.stdout is not None
    port = int(process.stdout.readline() or 0)
    time.sleep(0.5)
    try:
        return resident_kib(serving_pid(process, port))
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
        # A new client each time (the last byte or group varies): the verdicts kept for clients
        # seen before would otherwise make it a dict lookup.
        rules = RulesFile(os.fsencode(path))
        rounds = 20000
        clients = [ip + (b"%x" % (n & 0xFFFF) if b":" in ip else b"%d" % (n % 250)) for n in range(rounds)]
        rules.decide(clients[0], None, None)
        started = time.perf_counter()
        for number, client in enumerate(clients):
            if number % 250 == 0:
                rules._verdicts.clear()  # an IPv4 client's last byte comes round again
            rules.decide(client, None, None)
        return (time.perf_counter() - started) / rounds * 1e6

    return per_decision(cdb, b"127.0.0."), per_decision(cdb, b"2001:db8::"), per_decision(plain_cdb, b"127.0.0.")


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
    if (tree / "setup.py").exists():
        # Its own C extension, as `make` would build it: else the baseline would spawn through the
        # fallback, and the comparison would be of the spawn paths. Without a compiler it does.
        subprocess.run(
            [sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=tree, capture_output=True, check=False
        )
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
    thousand = [f'10.{i // 250}.{i % 250}.{i % 7}:allow,RELAYCLIENT=""' for i in range(999)] + [":allow"]
    rules_1000 = write_rules(work / "rules1000.cdb", thousand)
    deny_all = write_rules(work / "deny.cdb", [":deny"])
    # The C tcprules cannot read CIDR lines; the C server reads our file as plain keys.
    cidr = write_rules(work / "cidr10000.cdb", cidr_rules(10_000), str(TOP / "bin" / "tcprules"))
    count, seconds = (1000, 1.5) if quick else (4000, 2.5)
    return [
        Scenario("/bin/true, K=1", 1, count=count, seconds=seconds, goal=1.05),
        Scenario("/bin/true, K=8", 8, count=count, seconds=seconds, goal=1.05),
        Scenario("/bin/true, K=64, -c 200 -b 256", 64, 200, 256, count=count, seconds=seconds, goal=1.05),
        Scenario(
            "/bin/echo (1 byte out), K=8", 8, program=("/bin/echo",), count=count, seconds=seconds, first_byte=True
        ),
        Scenario("deny flood, K=8", 8, rules=deny_all, count=count * 4, seconds=seconds, goal=3.0, denies=True),
        Scenario("-x 1,000 rules, K=8", 8, rules=rules_1000, count=count, seconds=seconds),
        Scenario("-x 10,000 CIDR rules, K=8", 8, rules=cidr, count=count, seconds=seconds),
    ]


def contestants_here(work: Path, baseline: str | None) -> tuple[list[Contestant], list[str]]:
    """The servers of the run, in the report's order, and a note for each peer not installed."""
    contestants = [Contestant("C", C_SERVER), Contestant("ours", OURS)]
    if baseline is not None:
        contestants.append(Contestant("baseline", baseline))
    missing = []
    for name, path, kind, package in (("tcpsvd", TCPSVD, "tcpsvd", "ipsvd"), ("xinetd", XINETD, "xinetd", "xinetd")):
        if os.access(path, os.X_OK):
            contestants.append(Contestant(name, path, kind))
        else:
            missing.append(f"{name} is not installed (apt-get install {package}): its column is left out.")
    floor = build(work, "floor.c")
    contestants += [Contestant("floor 1t", str(floor), "floor", 1), Contestant("floor 2t", str(floor), "floor", 2)]
    return contestants, missing


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


class Report:
    """The Markdown report, printed as it grows: a long run shows its rows as they come."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, *lines: str) -> None:
        self.lines += lines
        for line in lines:
            print(line, flush=True)


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def rate_table(runs: Sequence[tuple[Scenario, dict[str, list[LoadResult]]]], names: Sequence[str]) -> list[str]:
    rows = []
    for scenario, results in runs:
        c = results["C"]
        ours = round_ratios(results["ours"], c)
        goal = (
            ""
            if scenario.goal is None
            else f"≥ {scenario.goal:.2f}: " + verdict(statistics.median(ours) >= scenario.goal)
        )
        cells = [ratio_cell(round_ratios(results[name], c)) if name in results else "" for name in names[1:]]
        rows.append([scenario.name, rate_cell(c), *cells, goal])
    return table(["row", "C conn/s", *names[1:], "ours' goal"], rows)


def cpu_cell(results: dict[str, list[LoadResult]], name: str) -> str:
    if name not in results:
        return ""
    ratios = per_round(results[name], results["C"], lambda result: result.cpu_us)
    return f"{median_of(results[name], lambda result: result.cpu_us):.0f} ({ratio_cell(ratios)})"


def cpu_table(runs: Sequence[tuple[Scenario, dict[str, list[LoadResult]]]], names: Sequence[str]) -> list[str]:
    rows = []
    for scenario, results in runs:
        c = results["C"]
        ratios = per_round(results["ours"], c, lambda result: result.cpu_us)
        goal = verdict(bool(ratios) and statistics.median(ratios) <= GOAL_CPU_RATIO)
        if scenario.denies:
            goal = "(per denied connection: no goal)"
        cells = [cpu_cell(results, name) for name in names[1:]]
        rows.append([scenario.name, f"{median_of(c, lambda result: result.cpu_us):.0f}", *cells, goal])
    return table(["row", "C µs", *(f"{name} µs (× C)" for name in names[1:]), f"ours ≤ {GOAL_CPU_RATIO}× C"], rows)


def latency_table(runs: Sequence[tuple[Scenario, dict[str, list[LoadResult]]]], names: Sequence[str]) -> list[str]:
    rows = []
    for scenario, results in runs:
        cells = [
            f"{median_of(results[name], lambda r: r.p50_us):.0f} / {median_of(results[name], lambda r: r.p99_us):.0f}"
            if name in results
            else ""
            for name in names
        ]
        rows.append([scenario.name, *cells])
    return table(["row", *names], rows)


def first_byte_table(results: dict[str, list[LoadResult]], names: Sequence[str]) -> list[str]:
    c = results["C"]
    rows = []
    for name in names:
        if name not in results:
            continue
        p50 = per_round(results[name], c, lambda result: result.first_p50_us)
        p99 = per_round(results[name], c, lambda result: result.first_p99_us)
        goal = ""
        if name == "ours":
            goal = verdict(bool(p50) and bool(p99) and statistics.median(p50) <= 1 and statistics.median(p99) <= 1)
        rows.append(
            [
                name,
                f"{median_of(results[name], lambda result: result.first_p50_us):.0f}",
                f"{median_of(results[name], lambda result: result.first_p99_us):.0f}",
                ratio_cell(p50),
                ratio_cell(p99),
                goal,
            ]
        )
    return table(["server", "p50 µs", "p99 µs", "p50 / C", "p99 / C", "goal: both ≤ C"], rows)


def spawn_path() -> str:
    """What our tcpserver says of itself (issue 10: --version names the spawn path in use)."""
    return server_version(OURS)


def server_version(server: str) -> str:
    try:
        shown = subprocess.run([server, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"(tcpserver --version failed: {error})"
    said = " ".join((shown.stdout + shown.stderr).split())
    return said or f"(tcpserver --version printed nothing, exit {shown.returncode})"


def memory_part(
    report: Report, loadgen: Path, contestants: Sequence[Contestant], connections: int, seconds: float
) -> None:
    report.add(
        "",
        f"Memory (resident; `-H -R -l 0`; K=8, `/bin/true`): at start, after a 200-connection warm-up, and after "
        f"up to {connections:,} more connections within {seconds:.0f} s. Goal for ours: at most 30 MB "
        f"({GOAL_RSS_MIB:.1f} MiB), growing less than 1 MB ({GOAL_GROWTH_MIB:.2f} MiB) from the start.",
        "",
        *table(["server", "at start", "after warm-up", "after", "connections", "growth from start", "goal"], []),
    )
    for contestant in contestants:
        at_start, warm, after, made = memory_growth(loadgen, contestant.server, connections, seconds)
        growth = (after - at_start) / 1024
        goal = ""
        if contestant.name == "ours":
            goal = verdict(max(at_start, warm, after) / 1024 <= GOAL_RSS_MIB and growth < GOAL_GROWTH_MIB)
            if made < connections:
                goal += f" (only {made:,} connections in the time)"
        report.add(
            f"| {contestant.name} | {at_start / 1024:.1f} MiB | {warm / 1024:.1f} MiB | {after / 1024:.1f} MiB "
            f"| {made:,} | {growth:+.2f} MiB | {goal} |"
        )


def tcprules_part(lines: int, rounds: int) -> list[str]:
    """bench/tcprules_bench.py's table, from a process of its own: a program's peak RSS as wait4
    reports it starts from the hiwater mark of the process that spawned it (exec records the old
    memory's), and this one's has grown with the rows above."""
    shown = subprocess.run(
        [sys.executable, str(BENCH / "tcprules_bench.py"), "--lines", str(lines), "--rounds", str(rounds)],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    ).stdout
    print(shown, end="", flush=True)
    table = shown.splitlines()
    starts = [index for index, line in enumerate(table) if line.startswith("tcprules, ")]
    return table[starts[-1] :] if starts else ["(bench/tcprules_bench.py printed no table)"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, help="rounds per row (default 5; --quick: 1)")
    parser.add_argument("--quick", action="store_true", help="fewer connections and rounds: a smoke run (< 2 min)")
    parser.add_argument("--rss", action="store_true", help="only the memory part (C, ours and a baseline)")
    parser.add_argument("--memory-connections", type=int, help="default 100,000 (--quick: 10,000)")
    parser.add_argument(
        "--memory-seconds", type=float, default=120.0, help="the bound on each server's memory run (default 120)"
    )
    parser.add_argument(
        "--baseline", metavar="COMMIT", help="also run this commit's server, in the same rounds (e.g. HEAD, v1.0)"
    )
    parser.add_argument(
        "--output", type=Path, help=f"the Markdown report (default {RESULTS}; with --rss, {RSS_RESULTS})"
    )
    arguments = parser.parse_args(argv)
    # The memory part alone does not replace the whole run's report.
    output = arguments.output or (RSS_RESULTS if arguments.rss else RESULTS)
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
    rounds = arguments.rounds or (1 if arguments.quick else 5)
    connections = arguments.memory_connections or (10_000 if arguments.quick else 100_000)
    started = time.monotonic()
    report = Report()
    report.add(
        f"# ucspi benchmark, {time.strftime('%Y-%m-%d %H:%M %Z')}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Linux {platform.release()}, "
        f"Python {platform.python_version()}. Ours: `{spawn_path()}`. "
        + (f"{rounds} rounds, the order rotating; " if rounds > 1 else "1 round; ")
        + "medians, and the median of per-round ratios to the C tcpserver with the rounds' range in brackets."
        + (" A `--quick` run: a smoke test, not figures." if arguments.quick else ""),
    )
    with tempfile.TemporaryDirectory(prefix="ucspi-bench-") as scratch:
        work = Path(scratch)
        launcher = None
        if baseline_commit is not None:
            sha, described = baseline_commit
            launcher, module_file = extract_baseline(sha, work)
            report.add(
                "",
                f"Baseline: `{described}` (`--baseline={arguments.baseline}`), extracted with git archive and "
                f"run by the same interpreter as ours, importing its own package "
                f"(`{Path(module_file).relative_to(work)}` in the scratch tree; it says "
                f"`{server_version(str(launcher))}`); ours is {working_tree_state()}. "
                f"A row where ours falls below {BASELINE_FLOOR:.2f}× the baseline is flagged **below**.",
            )
        loadgen = build_loadgen(work)
        contestants, missing = contestants_here(work, None if launcher is None else str(launcher))
        tcpservers = [contestant for contestant in contestants if contestant.kind == "tcpserver"]
        if not arguments.rss:
            run_rows(report, loadgen, contestants, missing, rounds, work, arguments.quick)
        memory_part(report, loadgen, tcpservers, connections, arguments.memory_seconds)
        if not arguments.rss:
            default_kib = idle_resident_kib([])
            quiet_kib = idle_resident_kib(QUIET_FLAGS)
            report.add(
                "",
                f"Ours at rest: {quiet_kib / 1024:.1f} MiB with `-H -R -l 0`, {default_kib / 1024:.1f} MiB with the "
                "default flags (which load the DNS library).",
            )

    if not arguments.rss:
        rule_lines = 200_000 if arguments.quick else 1_000_000
        print(f"\ntcprules, {rule_lines:,} lines:", flush=True)
        report.add(
            "",
            f"tcprules on a generated {rule_lines:,}-line file (time and peak memory), see bench/tcprules_bench.py:",
            "",
        )
        report.add(*tcprules_part(rule_lines, rounds))
    report.add("", f"The whole run took {(time.monotonic() - started) / 60:.1f} min.")

    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text("\n".join(report.lines) + "\n")
    return 0


def run_rows(
    report: Report,
    loadgen: Path,
    contestants: Sequence[Contestant],
    missing: Sequence[str],
    rounds: int,
    work: Path,
    quick: bool,
) -> None:
    names = [contestant.name for contestant in contestants]
    runs: list[tuple[Scenario, dict[str, list[LoadResult]]]] = []
    for scenario in scenarios(work, quick):
        row_started = time.monotonic()
        results = side_by_side(loadgen, scenario, contestants, rounds, work)
        runs.append((scenario, results))
        print(
            f"{scenario.name} ({time.monotonic() - row_started:.0f} s): "
            + ", ".join(
                f"{name} {rate_cell(values)}/s {median_of(values, lambda r: r.cpu_us):.0f} µs"
                for name, values in results.items()
            ),
            flush=True,
        )
    report.add(
        "",
        "Connections per second (allowed ones; in the deny flood, denied ones): C's, and each server's as a "
        "ratio to C. Program `/bin/true` unless the row says; K clients in flight. The rules rows run C and "
        "ours only (tcpsvd's and xinetd's rules are other formats). The floor is floor 2t.",
        "",
        *rate_table(runs, names),
        "",
        f"busybox tcpsvd: Debian's busybox leaves it out; issue 10 measured it at {BUSYBOX_QUOTED} × C at K=1, 8 "
        "and 64 (quoted, not measured here).",
        *missing,
        "",
        "The server's own CPU per allowed connection (utime + stime of the server process from /proc/PID/stat "
        "before and after the load; its children, the programs, excluded), µs, and as a ratio to C's:",
        "",
        *cpu_table(runs, names),
        "",
        "Latency, connect to EOF, p50 / p99 µs:",
        "",
        *latency_table(runs, names),
    )
    for scenario, results in runs:
        if scenario.first_byte:
            report.add("", f"First-byte latency, connect to the first byte ({scenario.name}):", "")
            report.add(*first_byte_table(results, names))
    failures = [
        f"{name} {sum(r.failed for r in values)} in {scenario.name}"
        for scenario, results in runs
        for name, values in results.items()
        if any(r.failed for r in values)
    ]
    # A server that closes a connection at once (a limit, a refusal) is "done" to the load
    # generator; in the byte rows, a connection without its byte shows the program never ran.
    failures += [
        f"{name} {sum(r.done - r.first for r in values)} without the program's byte in {scenario.name}"
        for scenario, results in runs
        if scenario.first_byte
        for name, values in results.items()
        if any(r.first < r.done for r in values)
    ]
    report.add("", "Failed connections: " + ("; ".join(failures) if failures else "none") + ".")
    if "baseline" in names:
        rows = []
        below = []
        for scenario, results in runs:
            ratios = round_ratios(results["ours"], results["baseline"])
            flagged = bool(ratios) and statistics.median(ratios) < BASELINE_FLOOR
            below += [scenario.name] if flagged else []
            rows.append([scenario.name, ratio_cell(ratios), "**below**" if flagged else "ok"])
        report.add("", *table(["row", "ours / baseline (rounds' range)", f"≥ {BASELINE_FLOOR:.2f}× baseline"], rows))
        report.add(
            "",
            f"ours / baseline: **below {BASELINE_FLOOR:.2f}× in {len(below)} rows**: {', '.join(below)}."
            if below
            else f"ours / baseline: at least {BASELINE_FLOOR:.2f}× in every row.",
        )
    v4_cost, v6_cost, plain_cost = cidr_lookup_cost(work / "cidr10000.cdb", work / "rules1000.cdb")
    report.add(
        "",
        f"CIDR lookup cost (in-process, RulesFile.decide, a client not seen before): {v4_cost:.1f} µs "
        f"for an IPv4 client and {v6_cost:.1f} µs for an IPv6 one with 10,000 CIDR rules of mixed lengths; "
        f"{plain_cost:.1f} µs for an IPv4 client with the 1,000 plain rules. "
        "(The C server reads the CIDR file as plain keys.)",
    )


if __name__ == "__main__":
    sys.exit(main())
