"""tcprules CDB TMP < rules: compile rules text into a cdb (spec 3)."""

from __future__ import annotations

import os
import sys

from ucspi.errors import EXIT_PERMANENT, Fatal, die
from ucspi.rules.compile import compile_rules

USAGE = b"tcprules: usage: tcprules rules.cdb rules.tmp"


def tcprules(arguments: list[str]) -> None:
    """Compile rules from stdin into CDB, through TMP. Extra arguments are ignored, as in 0.88."""
    if len(arguments) < 2:
        die(USAGE, EXIT_PERMANENT)
    cdb_path, tmp_path = os.fsencode(arguments[0]), os.fsencode(arguments[1])
    try:
        # The launcher moves a stdin Python cannot start with (a directory) to another fd.
        compile_rules(int(os.environ.get("UCSPI_STDIN_FD", "0")), cdb_path, tmp_path)
    except Fatal as error:
        die(error.message, error.exit_code)


def main() -> None:
    # Two positional arguments and no options: the original reads argv[1] and argv[2] as they
    # are, so there is nothing for click to do, and not importing it saves a tenth of a 1M-line run.
    tcprules(sys.argv[1:])
