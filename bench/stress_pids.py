"""Issue 9, row 1 at full size: exec failures mixed with normal clients until the pids wrap.

A rule gives clients from 127.0.0.2 a 200 KB variable (E2BIG: their program cannot start),
others are served, under -c 20, in a pid namespace of the usual 32,768 pids, until the pids
have gone round at least once. Checked (exit 1 when one fails): never more than 20 programs at
once (counted by the programs), every program's end logged with its real status (0), and every
child whose exec failed ended with 111 (status 28416, as the original's do; none on the
fallback, which has no child for them), one per `unable to run` warning, no other end.

Usage: .venv/bin/python bench/stress_pids.py [--pid-max N] [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from serverproc import FALLBACK_FORCED, OUR_SERVER, rules_cdb, start_server, talk  # noqa: E402
from serverstate import in_threads, wait_idle  # noqa: E402

LIMIT = 20


def counts(counter: Path) -> tuple[int, int, int]:
    data = counter.read_bytes()
    return tuple(int.from_bytes(data[i : i + 8], "little") for i in range(0, 24, 8))  # type: ignore[return-value]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pid-max", type=int, default=32768)
    parser.add_argument("--seconds", type=float, default=300, help="give up after this long")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ucspi-stress-pids-") as directory:
        work = Path(directory)
        program = work / "concurrency"
        subprocess.run(["gcc", "-O2", "-o", program, TOP / "bench" / "concurrency.c"], check=True)
        counter = work / "counter"
        counter.write_bytes(bytes(24))
        cdb = rules_cdb(work, f'127.0.0.2:allow,HUGE="{"x" * 200_000}"\n:allow\n')
        began = time.monotonic()
        with start_server(
            OUR_SERVER.command,
            ["-v", "-HRl0", "-c", str(LIMIT), "-b", "100", "-x", str(cdb)],
            [str(program), str(counter), "5"],
            wrapper=[TOP / "tests" / "support" / "small_pid_space", str(arguments.pid_max)],
        ) as server:
            clients = dropped_wrong = 0
            while time.monotonic() - began < arguments.seconds:
                # Each program takes a pid (so does each failed spawn): past pid_max they have wrapped.
                if counts(counter)[2] > arguments.pid_max:
                    break
                results = in_threads(
                    60, lambda index: talk(server.port, source="127.0.0.2" if index % 3 == 0 else None, timeout=30)
                )
                clients += len(results)
                for index, result in enumerate(results):
                    dropped_wrong += result != (b"" if index % 3 == 0 else b"ok\n")
            wait_idle(server, LIMIT, timeout=60)
            running, most, programs = counts(counter)
            log = server.log()
        ends = [line for line in log if line.startswith(b"tcpserver: end ")]
        served_ends = [line for line in ends if line.endswith(b" status 0")]
        failed_ends = [line for line in ends if line.endswith(b" status 28416")]
        bad_ends = len(ends) - len(served_ends) - len(failed_ends)
        cannot_run = [line for line in log if b"unable to run" in line]
        seconds = time.monotonic() - began
        print(f"stress_pids: {clients} clients, {programs} programs in {seconds:.0f} s, pid space {arguments.pid_max}")
        print(
            f"  most programs at once {most} (limit {LIMIT}); end lines {len(ends)}: status 0 {len(served_ends)},"
            f" 28416 {len(failed_ends)} (`unable to run` warnings {len(cannot_run)}), other {bad_ends}"
        )
        print(f"  clients with a wrong answer: {dropped_wrong}; running at the end: {running}")
        failures = []
        if programs <= arguments.pid_max:
            failures.append("the pids did not wrap within the time")
        if most > LIMIT:
            failures.append(f"{most} programs at once under -c {LIMIT}")
        if len(served_ends) != programs or bad_ends:
            failures.append("end lines do not match the programs that ran")
        if len(failed_ends) != (0 if FALLBACK_FORCED else len(cannot_run)) or not cannot_run:
            failures.append("the failed execs' ends do not match their warnings")
        if dropped_wrong or running:
            failures.append("clients answered wrongly")
        for failure in failures:
            print("  FAILED:", failure)
        return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
