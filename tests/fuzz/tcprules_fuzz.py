"""make fuzz: tcprules attacked with generated rules files, with figures at the end.

1. Differential (needs /usr/bin/tcprules): each input, less the lines README, differences item 5 lets us
   read differently (conftest.without_extended_syntax, as tests/compat/test_tcprules_live.py),
   goes to the original as a subprocess and to our compile_rules() in-process, one after the
   other in the same directory under the same absolute names; exit code, stdout, stderr, the
   cdb bytes and the files left must be equal. Half the runs find an old cdb in place, which a
   failed run must leave as it was. One input in --cli-every also goes through bin/tcprules,
   the command as users run it (Python start-up included), which must agree too.
2. In-process: compile_rules() on each input: only Fatal may escape, a parse error must leave
   the previous cdb (bytes and inode), and every cdb must read back (cdbx, records and lookups)
   to exactly the records add_records() gives on the same text cut into random blocks.

Inputs: rule_inputs.py (a table of every range edge, then random kinds). Work is split into
chunks over one worker process per core; each chunk has its own seed, so a finding is replayed
with --seed and --only-chunk. A difference is shrunk (lines, then bytes) before it is shown.
Exit status 1 on any finding.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOP = HERE.parents[1]
sys.path[:0] = [str(HERE), str(HERE.parent)]  # rule_inputs, and tests/conftest.py it reuses

import cdbx  # noqa: E402
import rule_inputs  # noqa: E402
from conftest import without_extended_syntax  # noqa: E402

from ucspi.errors import EXIT_PERMANENT, Fatal  # noqa: E402
from ucspi.rules.cidr import CIDR_LENGTHS_KEY  # noqa: E402
from ucspi.rules.compile import compile_rules  # noqa: E402
from ucspi.rules.syntax import RuleSyntaxError, add_records  # noqa: E402

ORIGINAL = b"/usr/bin/tcprules"
OUR_COMMAND = os.fsencode(TOP / "bin" / "tcprules")
ENVIRONMENT = {b"PATH": os.environb.get(b"PATH", b"/usr/local/bin:/usr/bin:/bin")}
# A previous cdb a failed run must leave alone (docs/behaviour.md §3.2): the golden file of spec example 7.
OLD_CDB = (TOP / "tests" / "data" / "golden" / "ex7_duplicate_key.cdb").read_bytes()
PARSE_ERROR = b"tcprules: fatal: unable to parse this line: "
SHOWN_FINDINGS = 5  # per chunk: one bug tends to show up many times


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    cdb: bytes | None
    files: tuple[str, ...]


@dataclass
class ChunkResult:
    phase: str
    inputs: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    exempt_lines: int = 0  # README, differences item 5 lines dropped before the comparison
    cli_runs: int = 0
    exit_codes: Counter[int] = field(default_factory=Counter)  # the original's, or ours in-process
    findings: list[str] = field(default_factory=list)
    finding_count: int = 0
    stopped_by_time: bool = False

    def found(self, text: str) -> None:
        self.finding_count += 1
        if len(self.findings) < SHOWN_FINDINGS:
            self.findings.append(text)


class Workspace:
    """A directory on tmpfs where possible (fsync costs nothing there) and memfds for the streams."""

    def __init__(self) -> None:
        parent = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.directory = tempfile.mkdtemp(prefix="ucspi-fuzz-", dir=parent)
        self.cdb = os.fsencode(os.path.join(self.directory, "rules.cdb"))
        self.tmp = os.fsencode(os.path.join(self.directory, "rules.tmp"))
        self.stdin = os.memfd_create("rules-input")
        self.stdout = os.memfd_create("stdout")
        self.stderr = os.memfd_create("stderr")
        self.last_exit = 0  # of the original's run in the differential, of ours in-process

    def close(self) -> None:
        for fd in (self.stdin, self.stdout, self.stderr):
            os.close(fd)
        shutil.rmtree(self.directory, ignore_errors=True)

    def prepare(self, text: bytes, old_cdb: bool) -> None:
        for path in (self.cdb, self.tmp):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        if old_cdb:
            with open(self.cdb, "wb") as file:
                file.write(OLD_CDB)
        os.ftruncate(self.stdin, 0)
        os.pwrite(self.stdin, text, 0)
        os.lseek(self.stdin, 0, os.SEEK_SET)

    def outcome(self, exit_code: int, stdout: bytes, stderr: bytes) -> Outcome:
        try:
            with open(self.cdb, "rb") as file:
                cdb: bytes | None = file.read()
        except FileNotFoundError:
            cdb = None
        return Outcome(exit_code, stdout, stderr, cdb, tuple(sorted(os.listdir(self.directory))))

    def run_command(self, program: bytes, argv0: bytes, text: bytes, old_cdb: bool) -> Outcome:
        """program CDB TMP < text, as a subprocess: posix_spawn costs a third of subprocess.run."""
        self.prepare(text, old_cdb)
        for fd in (self.stdout, self.stderr):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # the child writes at the shared offset
        actions = [
            (os.POSIX_SPAWN_DUP2, self.stdin, 0),
            (os.POSIX_SPAWN_DUP2, self.stdout, 1),
            (os.POSIX_SPAWN_DUP2, self.stderr, 2),
        ]
        pid = os.posix_spawn(program, [argv0, self.cdb, self.tmp], ENVIRONMENT, file_actions=actions)
        _, status = os.waitpid(pid, 0)
        return self.outcome(os.waitstatus_to_exitcode(status), _whole(self.stdout), _whole(self.stderr))

    def run_ours(self, text: bytes, old_cdb: bool) -> Outcome:
        """Our tcprules without its process: what ucspi.cli.tcprules does after the arguments."""
        self.prepare(text, old_cdb)
        try:
            compile_rules(self.stdin, self.cdb, self.tmp)
        except Fatal as fatal:
            return self.outcome(fatal.exit_code, b"", fatal.message + b"\n")
        return self.outcome(0, b"", b"")


def _whole(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


# ---- the two checks -----------------------------------------------------------------------


def differential_problem(space: Workspace, text: bytes, old_cdb: bool, cli: bool) -> str | None:
    theirs = space.run_command(ORIGINAL, b"tcprules", text, old_cdb)
    space.last_exit = theirs.exit_code
    ours = space.run_ours(text, old_cdb)
    if ours != theirs:
        return f"in-process ours {_summary(ours)} != original {_summary(theirs)}"
    if cli:
        command = space.run_command(OUR_COMMAND, OUR_COMMAND, text, old_cdb)
        if command != theirs:
            return f"bin/tcprules {_summary(command)} != original {_summary(theirs)}"
    return None


def _summary(outcome: Outcome) -> str:
    cdb = "no cdb" if outcome.cdb is None else f"cdb {len(outcome.cdb)} bytes {hash(outcome.cdb) & 0xFFFF:04x}"
    streams = f"stdout {outcome.stdout[:80]!r} stderr {outcome.stderr[:160]!r}"
    return f"exit {outcome.exit_code} {streams} {cdb} files {outcome.files}"


def _random_blocks(r: random.Random, text: bytes) -> list[bytes]:
    """The text as os.read might return it: whole, byte by byte, or cut at random points."""
    roll = r.random()
    if roll < 0.4 or len(text) < 2:
        return [text]
    if roll < 0.5 and len(text) < 400:
        return [text[index : index + 1] for index in range(len(text))]
    cuts = sorted({r.randrange(1, len(text)) for _ in range(r.randint(1, 8))})
    edges = [0, *cuts, len(text)]
    return [text[start:end] for start, end in itertools.pairwise(edges)]


def in_process_problem(space: Workspace, r: random.Random, text: bytes) -> str | None:
    """Compile text over the previous run's cdb; None when all is as designed."""
    expected: list[tuple[bytes, bytes]] = []
    bad_line: bytes | None = None
    try:
        lengths = add_records(_random_blocks(r, text), lambda key, data: expected.append((key, data))).record_data()
    except RuleSyntaxError as error:
        bad_line, lengths = error.line, None
    if lengths is not None:
        expected.append((CIDR_LENGTHS_KEY, lengths))
    try:
        before = os.stat(space.cdb)
        with open(space.cdb, "rb") as file:
            old = file.read()
    except FileNotFoundError:
        before, old = None, b""
    os.ftruncate(space.stdin, 0)
    os.pwrite(space.stdin, text, 0)
    os.lseek(space.stdin, 0, os.SEEK_SET)
    space.last_exit = 0
    try:
        compile_rules(space.stdin, space.cdb, space.tmp)
    except Fatal as fatal:
        space.last_exit = fatal.exit_code
        if bad_line is None:
            return f"Fatal {fatal.message[:200]!r} where the parser took every line"
        message = PARSE_ERROR + bad_line.split(b"\x00", 1)[0]
        if (fatal.exit_code, fatal.message) != (EXIT_PERMANENT, message):
            return f"Fatal {fatal.exit_code} {fatal.message[:200]!r}, expected {message[:200]!r}"
        if before is not None:
            after = os.stat(space.cdb)
            with open(space.cdb, "rb") as file:
                if file.read() != old or after.st_ino != before.st_ino:
                    return "a parse error changed the previous cdb"
        return None
    if bad_line is not None:
        return f"compiled, but the parser stopped at {bad_line[:200]!r}"
    reader = cdbx.CDB(space.cdb)
    try:
        stored = list(reader.items(all=True))
        if stored != expected:
            return f"cdb holds {stored[:5]!r}..., parsed {expected[:5]!r}..."
        for key in {key for key, _ in expected}:
            if reader.get(key, all=True) != [data for other, data in expected if other == key]:
                return f"lookup of {key[:100]!r} disagrees with the records"
    finally:
        reader.close()
    return None


# ---- chunks, run in the workers ---------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    phase: str  # "differential" or "in-process"
    number: int
    seed: int
    count: int
    deadline: float  # time.time() after which the chunk stops early
    cli_every: int = 0
    fixed: tuple[bytes, ...] = ()  # the range-edge table instead of random inputs


def _inputs(chunk: Chunk, r: random.Random) -> list[tuple[str, bytes]]:
    if chunk.fixed:
        return [("range-edges", text) for text in chunk.fixed]
    return list(rule_inputs.generated(r, chunk.count))


def run_chunk(chunk: Chunk) -> ChunkResult:
    result = ChunkResult(chunk.phase)
    r = random.Random(f"{chunk.seed}/{chunk.phase}/{chunk.number}")
    space = Workspace()
    try:
        for index, (kind, text) in enumerate(_inputs(chunk, r)):
            if index % 64 == 0 and time.time() > chunk.deadline:
                result.stopped_by_time = True
                break
            result.inputs += 1
            result.kinds[kind] += 1
            try:
                if chunk.phase == "differential":
                    compared = without_extended_syntax(text)
                    result.exempt_lines += text.count(b"\n") - compared.count(b"\n")
                    cli = chunk.cli_every > 0 and r.randrange(chunk.cli_every) == 0
                    result.cli_runs += cli
                    old_cdb = r.random() < 0.5
                    problem = differential_problem(space, compared, old_cdb, cli)
                    if problem is not None:
                        problem += _shrunk(space, compared, old_cdb, cli)
                else:
                    problem = in_process_problem(space, r, text)
            except Exception:  # the finding: an exception that escaped
                problem = traceback.format_exc(limit=-4)
            result.exit_codes[space.last_exit] += 1
            if problem is not None:
                where = f"{chunk.phase} chunk {chunk.number} input {index} {kind}"
                result.found(f"[{where}] {problem}\n    input {text[:300]!r}")
    finally:
        space.close()
    return result


def _shrunk(space: Workspace, text: bytes, old_cdb: bool, cli: bool) -> str:
    smallest = shrink(lambda candidate: differential_problem(space, candidate, old_cdb, cli) is not None, text)
    return f"\n    shrunk to {smallest!r}: {differential_problem(space, smallest, old_cdb, cli)}"


def shrink(differs: Callable[[bytes], bool], text: bytes, budget: int = 3000) -> bytes:
    """A smaller input that still differs: drop lines, then runs of bytes, while it still does."""
    calls = 0

    def still(candidate: bytes) -> bool:
        nonlocal calls
        calls += 1
        return calls <= budget and differs(candidate)

    lines = text.split(b"\n")
    index = 0
    while index < len(lines) and len(lines) > 1:
        candidate = lines[:index] + lines[index + 1 :]
        if still(b"\n".join(candidate)):
            lines = candidate
        else:
            index += 1
    text = b"\n".join(lines)
    size = max(len(text) // 2, 1)
    while size >= 1 and calls < budget:
        position = 0
        while position < len(text):
            candidate = text[:position] + text[position + size :]
            if still(candidate):
                text = candidate
            else:
                position += size
        size //= 2
    return text


# ---- the driver -------------------------------------------------------------------------------


def chunks(phase: str, total: int, size: int, seed: int, deadline: float, cli_every: int) -> list[Chunk]:
    plan = []
    if phase == "differential":
        table = tuple(rule_inputs.range_edges())
        table = table[: min(len(table), total)]
        for start in range(0, len(table), size):
            plan.append(Chunk(phase, len(plan), seed, 0, deadline, cli_every, table[start : start + size]))
        total -= len(table)
    while total > 0:
        count = min(size, total)
        plan.append(Chunk(phase, len(plan), seed, count, deadline, cli_every))
        total -= count
    return plan


def run_phase(pool: multiprocessing.pool.Pool, plan: list[Chunk], label: str) -> tuple[ChunkResult, float]:
    total = ChunkResult(label)
    started = last = time.monotonic()
    target = sum(len(chunk.fixed) or chunk.count for chunk in plan)
    for result in pool.imap_unordered(run_chunk, plan):
        total.inputs += result.inputs
        total.kinds.update(result.kinds)
        total.exempt_lines += result.exempt_lines
        total.cli_runs += result.cli_runs
        total.exit_codes.update(result.exit_codes)
        total.finding_count += result.finding_count
        total.stopped_by_time |= result.stopped_by_time
        for finding in result.findings:
            print(finding, flush=True)
        now = time.monotonic()
        if now - last >= 10:
            last = now
            rate = total.inputs / (now - started)
            print(
                f"  {label}: {total.inputs:,}/{target:,} inputs, {total.finding_count} findings,"
                f" {rate:,.0f}/s, {now - started:.0f} s",
                flush=True,
            )
    return total, time.monotonic() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--differential", type=int, default=100_000, help="inputs compared with the original")
    parser.add_argument("--in-process", type=int, default=1_000_000, help="inputs through our compiler alone")
    parser.add_argument("--time-limit", type=float, default=1200, help="seconds for both phases together")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--seed", type=int, default=None, help="reproduce a run (default: a new seed)")
    parser.add_argument("--cli-every", type=int, default=250, help="one input in N also through bin/tcprules")
    options = parser.parse_args(argv)
    seed = options.seed if options.seed is not None else random.randrange(1 << 32)
    deadline = time.time() + options.time_limit
    have_original = os.access(ORIGINAL, os.X_OK)
    print(f"tcprules fuzz: seed {seed}, {options.jobs} workers, time limit {options.time_limit:.0f} s", flush=True)
    results: list[tuple[ChunkResult, float]] = []
    started = time.monotonic()
    # fork: the workers inherit the imported modules; each makes its own workspace.
    with multiprocessing.get_context("fork").Pool(options.jobs) as pool:
        if not have_original:
            print("  differential: skipped, the original is not installed (/usr/bin/tcprules)", flush=True)
        elif options.differential > 0:
            plan = chunks("differential", options.differential, 500, seed, deadline, options.cli_every)
            results.append(run_phase(pool, plan, "differential"))
        if options.in_process > 0:
            plan = chunks("in-process", options.in_process, 5000, seed, deadline, 0)
            results.append(run_phase(pool, plan, "in-process"))
    elapsed = time.monotonic() - started
    findings = 0
    print(f"\ntcprules fuzz, seed {seed}, {options.jobs} workers:")
    for result, seconds in results:
        findings += result.finding_count
        kinds = ", ".join(f"{kind} {count:,}" for kind, count in sorted(result.kinds.items()))
        exits = ", ".join(f"exit {code}: {count:,}" for code, count in sorted(result.exit_codes.items()))
        extra = ""
        if result.phase == "differential":
            extra = f"; {result.cli_runs:,} also through bin/tcprules; {result.exempt_lines:,} exempt lines dropped"
        print(
            f"  {result.phase}: {result.inputs:,} inputs, {result.finding_count} differences,"
            f" {seconds:.0f} s{extra}\n    ({kinds})\n    ({exits})"
        )
        if result.stopped_by_time:
            print(f"  {result.phase}: stopped by the time limit before its count")
    print(f"  total: {sum(result.inputs for result, _ in results):,} inputs, {findings} differences, {elapsed:.0f} s")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
