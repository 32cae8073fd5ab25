"""tcpclient's start-up: ours against the floor (`python3 -I -c pass`) and Debian's C one.

Median of 50 interleaved runs of each contestant (one of each per round, so machine load hits
all alike). The connection goes to a local listener that accepts and closes; the program is
`true`. Modes: -H -R -l NAME with a literal host (the issue's goal: floor + 10 ms), the same
through bin/tcpclient (the checkout's launcher), a host name (system resolver), a refused port.
Prints the table; exits 0.

    .venv/bin/python bench/tcpclient_startup.py [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
OURS = TOP / ".venv" / "bin" / "tcpclient"
LAUNCHER = TOP / "bin" / "tcpclient"
ORIGINAL = Path("/usr/bin/tcpclient")
# The real interpreter, not a pyenv shim or the virtualenv's site: the floor every Python command pays.
FLOOR = [getattr(sys, "_base_executable", sys.executable), "-I", "-c", "pass"]


def _serve(listener: socket.socket) -> None:
    while True:
        try:
            connection, _ = listener.accept()
        except OSError:
            return
        connection.close()


def _time_once(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    rounds = parser.parse_args().rounds
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = str(listener.getsockname()[1])
    threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        refused = str(probe.getsockname()[1])

    served = ["-H", "-R", "-l", "bench", "127.0.0.1", port, "true"]
    contestants: dict[str, list[str]] = {"floor: python3 -I -c pass": FLOOR}
    modes = {
        "-HRl NAME, literal host": served,
        "-HRl NAME, host localhost (system resolver)": ["-H", "-R", "-l", "bench", "localhost", port, "true"],
        "refused port": ["-q", "-H", "-R", "-l", "bench", "127.0.0.1", refused, "true"],
    }
    for mode, arguments in modes.items():
        contestants[f"ours, {mode}"] = [str(OURS), *arguments]
        if os.access(ORIGINAL, os.X_OK):
            contestants[f"C, {mode}"] = [str(ORIGINAL), *arguments]
    contestants["ours via bin/tcpclient, -HRl NAME, literal host"] = [str(LAUNCHER), *served]

    times: dict[str, list[float]] = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, argv in contestants.items():
            times[name].append(_time_once(argv))
    listener.close()

    floor = statistics.median(times["floor: python3 -I -c pass"])
    print(f"tcpclient start-up, median of {rounds} interleaved runs (ms); load {os.getloadavg()[0]:.1f}")
    for name, samples in times.items():
        median = statistics.median(samples)
        print(f"  {name:58s} {median * 1000:7.1f}   floor {(median - floor) * 1000:+7.1f}")
    goal = statistics.median(times["ours, -HRl NAME, literal host"]) - floor
    verdict = "met" if goal <= 0.010 else "NOT met"
    print(f"goal (ours, -HRl NAME, literal host <= floor + 10 ms): {verdict} ({goal * 1000:+.1f} ms)")


if __name__ == "__main__":
    main()
