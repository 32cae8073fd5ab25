"""SIGTERM during the start, 1,000 tries: make stress's long run of tests/server/test_tcpserver_start.py.

For each try a server starts and gets TERM at a uniform random delay 0-300 ms after exec, right
after its `-1` port line, or right after its first `status:` line (a third of the tries each).
It must be gone within 1 s every time, with exit 0 whenever the TERM came after its first output.
Runs ours and, where installed, the original; prints the counts; exits 1 on any TERM lost.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.fspath(TOP / "tests" / "server"))

from serverproc import ORIGINAL_SERVER, OUR_SERVER, original_available  # noqa: E402
from test_tcpserver_start import GONE_WITHIN, _lost, _term_many  # noqa: E402

MOMENTS = ("delay", "port", "status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=1000, help="TERMs per server, split over the three moments")
    parser.add_argument("--seed", type=int, default=1)
    arguments = parser.parse_args()
    implementations = [OUR_SERVER] + ([ORIGINAL_SERVER] if original_available() else [])
    failed = False
    for implementation in implementations:
        for number, when in enumerate(MOMENTS):
            tries = arguments.tries // len(MOMENTS) + (number < arguments.tries % len(MOMENTS))
            began = time.monotonic()
            outcomes = _term_many(implementation, when, tries, seed=arguments.seed + number)
            lost = _lost(outcomes)
            slowest = max(outcome.gone_in for outcome in outcomes)
            codes = sorted({str(outcome.code) for outcome in outcomes})
            print(
                f"{implementation.name:8} {when:7} {tries:5} tries: {len(lost)} lost"
                f" (gone > {GONE_WITHIN:g} s or not exit 0 after output); slowest exit {slowest * 1000:.0f} ms;"
                f" exit codes {','.join(codes)}; {time.monotonic() - began:.0f} s",
                flush=True,
            )
            failed |= implementation is OUR_SERVER and bool(lost)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
