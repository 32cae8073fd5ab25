#!/usr/bin/env python3
"""Start-up of tcprules and tcprulescheck: ours, the floor (`python3 -I -c pass`) and the C ones.

    .venv/bin/python bench/startup.py [--runs 50] [--installed PREFIX]

Each round runs every contestant once, in an order that rotates from round to round, so that a
change in the machine's load falls on all of them alike; the figures are the medians. The floor
is the interpreter our launchers run, so `ours - floor` is what our code adds. --installed adds
the commands of `make install PREFIX=...` (no editable-install finder at start-up). Says so when
ours takes more than the floor + 12 ms, the goal; --strict then exits 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
RULES = TOP / "examples" / "tcp.smtp"
BUDGET_MS = 12.0


@dataclass
class Contestant:
    name: str
    argv: list[str]
    stdin: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    times: list[float] = field(default_factory=list)
    floor: Contestant | None = None  # the interpreter it runs under, started bare

    def run(self, cwd: Path) -> None:
        environment = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.environment}
        with open(self.stdin or os.devnull, "rb") as stdin:
            started = time.perf_counter()
            finished = subprocess.run(self.argv, stdin=stdin, stdout=subprocess.DEVNULL, cwd=cwd, env=environment)
            elapsed = time.perf_counter() - started
        if finished.returncode != 0:
            raise SystemExit(f"{self.name}: exit {finished.returncode}")
        self.times.append(elapsed)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000


def contestants(bin_directory: Path, label: str, cdb: Path, floor: Contestant | None = None) -> list[Contestant]:
    client = {"TCPREMOTEIP": "192.168.10.5"}
    tcprules = [str(bin_directory / "tcprules"), str(cdb), f"{cdb}.tmp"]
    tcprulescheck = [str(bin_directory / "tcprulescheck"), str(cdb)]
    return [
        Contestant(f"tcprules ({label})", tcprules, RULES, floor=floor),
        Contestant(f"tcprulescheck ({label})", tcprulescheck, None, client, floor=floor),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--installed", type=Path, help="PREFIX of a `make install`")
    parser.add_argument("--strict", action="store_true", help="exit 1 when over the floor + 12 ms")
    arguments = parser.parse_args()

    python = TOP / ".venv" / "bin" / "python"
    with tempfile.TemporaryDirectory(prefix="ucspi-startup-") as scratch:
        work = Path(scratch)
        floor = Contestant("python3 -I -c pass (floor: the checkout's .venv)", [str(python), "-I", "-c", "pass"])
        floors = [floor]
        ours = contestants(TOP / "bin", "ours, checkout", work / "ours.cdb", floor)
        if arguments.installed:
            installed_python = arguments.installed / "lib" / "ucspi" / "bin" / "python"
            installed_floor = Contestant(
                f"python3 -I -c pass (floor: {installed_python.resolve()})", [str(installed_python), "-I", "-c", "pass"]
            )
            floors.append(installed_floor)
            ours += contestants(arguments.installed / "bin", "ours, installed", work / "installed.cdb", installed_floor)
        originals = []
        if shutil.which("tcprules", path="/usr/bin") and shutil.which("tcprulescheck", path="/usr/bin"):
            originals = contestants(Path("/usr/bin"), "C", work / "c.cdb")
        everyone = [*floors, *ours, *originals]
        for contestant in everyone:  # warm the page cache, and make the cdbs tcprulescheck reads
            if "tcprulescheck" in contestant.name:
                continue
            contestant.run(work)
            contestant.times.clear()
        for round_number in range(arguments.runs):
            shift = round_number % len(everyone)
            for contestant in everyone[shift:] + everyone[:shift]:
                contestant.run(work)

    load = os.getloadavg()[0]
    print(f"start-up, medians of {arguments.runs} interleaved runs (load {load:.1f}, {os.cpu_count()} cores)")
    print("| command | median ms | over the floor ms |")
    print("|---|---|---|")
    for contestant in everyone:
        over = "" if contestant in floors else f"{contestant.median_ms - (contestant.floor or floor).median_ms:+.1f}"
        print(f"| {contestant.name} | {contestant.median_ms:.1f} | {over} |")
    slow = [
        contestant.name
        for contestant in ours
        if contestant.floor is not None and contestant.median_ms - contestant.floor.median_ms > BUDGET_MS
    ]
    if slow:
        print(f"over the floor + {BUDGET_MS:.0f} ms: {', '.join(slow)}")
        return 1 if arguments.strict else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
