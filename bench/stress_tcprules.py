"""tcprules at full size: records past cdb's 4 GiB, and many runs racing on one TMP path.

Figures, each checked (exit 1 when one fails):
* past 4 GiB (issue 9, row 11): 4,200 rules of 1 MiB each go through a pipe, so the records'
  total passes the 4 GiB a cdb can address. tcprules must exit 111 with the original's
  `tcprules: fatal: unable to write to rules.tmp: out of memory`, and the old cdb must keep its
  bytes and its inode. The original, where installed, runs the same case first as the reference.
  About 4.3 GB of disk for TMP, once per command; TMP is removed after each run.
* races (README, differences item 14): ROUNDS rounds of 2, then 3, runs of bin/tcprules on one TMP
  path, every run holding TMP open before any reads input. Each round must leave exactly one
  of the inputs' cdbs (compared with each input compiled alone), every run exiting 0, and no
  file but the cdb.

Bounded: every run and every wait has a time limit.
Usage: .venv/bin/python bench/stress_tcprules.py [--rounds N] [--skip-4gib] [--work DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
OURS = TOP / "bin" / "tcprules"
ORIGINAL = Path("/usr/bin/tcprules")
ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}

# 4,200 lines of 1 MiB: 4.1 GiB of values, past 2^32 about a hundred records before the end.
BIG_LINE = b':allow,X="' + b"v" * ((1 << 20) - 13) + b'"\n'
BIG_LINES = 4200
BIG_DISK_NEEDED = 4600 << 20
BIG_RUN_SECONDS = 600.0
BIG_EXPECTED = (111, b"tcprules: fatal: unable to write to rules.tmp: out of memory\n")

RACE_LINES = 1500
WAIT_SECONDS = 10.0
RUN_SECONDS = 60.0


@dataclass(frozen=True)
class BigRun:
    exit_code: int
    stderr: bytes
    seconds: float
    tmp_bytes: int
    peak_rss_mib: float
    cdb_intact: bool


def past_4gib(command: Path, work: Path) -> BigRun:
    """One run of command on 4,200 MiB of rules, over an existing one-rule cdb."""
    work.mkdir()
    subprocess.run([command, "rules.cdb", "rules.tmp"], input=b"1.2.3.4:allow\n", cwd=work, env=ENV, check=True)
    old_bytes, old_inode = (work / "rules.cdb").read_bytes(), (work / "rules.cdb").stat().st_ino
    started = time.monotonic()
    process = subprocess.Popen(
        [command, "rules.cdb", "rules.tmp"], stdin=subprocess.PIPE, stderr=subprocess.PIPE, cwd=work, env=ENV
    )
    assert process.stdin is not None and process.stderr is not None

    def feed() -> None:
        try:
            for _ in range(BIG_LINES):
                process.stdin.write(BIG_LINE)
            process.stdin.close()
        except BrokenPipeError:
            pass  # it gave up before the end: what it says is the result

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    timer = threading.Timer(BIG_RUN_SECONDS, process.kill)
    timer.start()
    try:
        stderr = process.stderr.read()
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    finally:
        timer.cancel()
        feeder.join(timeout=WAIT_SECONDS)
    seconds = time.monotonic() - started
    tmp = work / "rules.tmp"
    tmp_bytes = tmp.stat().st_size if tmp.exists() else -1
    cdb = work / "rules.cdb"
    intact = cdb.read_bytes() == old_bytes and cdb.stat().st_ino == old_inode
    shutil.rmtree(work)
    return BigRun(process.returncode, stderr, seconds, tmp_bytes, usage.ru_maxrss / 1024, intact)


def report_big(name: str, run: BigRun) -> bool:
    good = (run.exit_code, run.stderr) == BIG_EXPECTED and run.cdb_intact
    print(
        f"past 4 GiB, {name}: exit {run.exit_code}, {run.stderr!r}, {run.seconds:.1f} s, "
        f"TMP left {run.tmp_bytes / (1 << 30):.2f} GiB, peak RSS {run.peak_rss_mib:.1f} MiB, "
        f"old cdb {'intact' if run.cdb_intact else 'CHANGED'}: {'ok' if good else 'FAILED'}"
    )
    return good


def race_rules(tag: int) -> bytes:
    lines = (b'10.%d.%d.%d:allow,RUN="%d"\n' % (i >> 16, (i >> 8) & 255, i & 255, tag) for i in range(RACE_LINES))
    return b"".join(lines)


def has_open(pid: int, path: Path) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


def compiled_alone(rules: bytes, directory: Path) -> bytes:
    directory.mkdir()
    subprocess.run([OURS, "rules.cdb", "rules.tmp"], input=rules, cwd=directory, env=ENV, check=True)
    return (directory / "rules.cdb").read_bytes()


def race(directory: Path, inputs: list[bytes], expected: set[bytes]) -> str | None:
    """One round; None when it left one input's cdb and nothing else, else what went wrong."""
    directory.mkdir()
    runs = [
        subprocess.Popen(
            [OURS, "rules.cdb", "rules.tmp"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=directory,
            env=ENV,
        )
        for _ in inputs
    ]
    try:
        deadline = time.monotonic() + WAIT_SECONDS
        while not all(has_open(run.pid, directory / "rules.tmp") for run in runs):
            if time.monotonic() > deadline:
                return "a run never opened TMP"
            time.sleep(0.005)
        # One thread per run: the runs waiting for the lock do not read, and a pipe holds 64 KiB.
        feeders = [
            threading.Thread(target=run.communicate, args=(rules,), daemon=True)
            for run, rules in zip(runs, inputs, strict=True)
        ]
        for feeder in feeders:
            feeder.start()
        for feeder in feeders:
            feeder.join(timeout=RUN_SECONDS)
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
            run.wait()
    codes = [run.returncode for run in runs]
    files = sorted(path.name for path in directory.iterdir())
    cdb = directory / "rules.cdb"
    problem = None
    if codes != [0] * len(runs):
        problem = f"exit codes {codes}"
    elif files != ["rules.cdb"]:
        problem = f"files {files}"
    elif cdb.read_bytes() not in expected:
        problem = "a corrupt cdb"
    shutil.rmtree(directory)
    return problem


def races(work: Path, rounds: int) -> bool:
    work.mkdir()
    inputs = [race_rules(tag) for tag in range(3)]
    expected = {compiled_alone(rules, work / f"alone-{tag}") for tag, rules in enumerate(inputs)}
    good = True
    for runners in (2, 3):
        started = time.monotonic()
        problems: list[str] = []
        for number in range(rounds):
            ordered = inputs[number % runners :] + inputs[: number % runners]
            problem = race(work / f"race-{runners}-{number}", ordered[:runners], expected)
            if problem is not None:
                problems.append(problem)
        seconds = time.monotonic() - started
        print(
            f"races of {runners} runs on one TMP: {rounds - len(problems)} of {rounds} rounds left one run's cdb, "
            f"{seconds:.1f} s" + (f"; first problem: {problems[0]}" if problems else "")
        )
        good = good and not problems
    return good


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="rounds of each race (default 200)")
    parser.add_argument("--skip-4gib", action="store_true", help="leave out the 4 GiB case")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()), help="where TMP goes")
    arguments = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ucspi-stress-tcprules-", dir=arguments.work))
    good = True
    try:
        if not arguments.skip_4gib:
            free = shutil.disk_usage(work).free
            if free < BIG_DISK_NEEDED:
                print(f"past 4 GiB: needs {BIG_DISK_NEEDED >> 20} MiB free in {work}, has {free >> 20}: FAILED")
                good = False
            else:
                if ORIGINAL.exists():
                    good = report_big("original", past_4gib(ORIGINAL, work / "original")) and good
                good = report_big("ours", past_4gib(OURS, work / "ours")) and good
        good = races(work / "races", arguments.rounds) and good
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("stress_tcprules:", "ok" if good else "FAILED")
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
