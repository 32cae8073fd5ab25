"""tcprules CDB TMP < rules: compile rules text into a cdb (docs/behaviour.md §3)."""

from __future__ import annotations

import os
import sys

from ucspi.cli import answer_help_or_version
from ucspi.errors import EXIT_PERMANENT, Fatal, die

USAGE = b"tcprules: usage: tcprules rules.cdb rules.tmp"

HELP = """\
Usage: tcprules rules.cdb rules.tmp < rules

  Compile the rules read on stdin into rules.tmp, then rename it to rules.cdb, so that a
  server reading rules.cdb sees the old rules or the new ones, never half a file. Runs given
  the same rules.tmp wait for each other. Further arguments are ignored.

Exit codes:
  0    done
  100  usage, or a line it cannot parse
  111  a system error; the old rules.cdb is untouched

See tcprules(1).
"""


def tcprules(arguments: list[str]) -> None:
    """Compile rules from stdin into CDB, through TMP. Extra arguments are ignored, as in 0.88."""
    if len(arguments) < 2:
        die(USAGE, EXIT_PERMANENT)
    cdb_path, tmp_path = os.fsencode(arguments[0]), os.fsencode(arguments[1])
    # Imported here, after the usage check: the compiler is most of the start-up time.
    from ucspi.rules.compile import compile_rules

    try:
        # The launcher moves a stdin Python cannot start with (a directory) to another fd.
        compile_rules(int(os.environ.get("UCSPI_STDIN_FD", "0")), cdb_path, tmp_path)
    except Fatal as error:
        die(error.message, error.exit_code)


def main() -> None:
    # Two positional arguments and no options: the original reads argv[1] and argv[2] as they
    # are, so there is no parser to import (start-up time is bench/startup.py's figure).
    arguments = sys.argv[1:]
    if answer_help_or_version("tcprules", arguments, HELP):
        return
    tcprules(arguments)
