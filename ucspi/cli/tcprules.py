"""tcprules CDB TMP < rules: compile rules text into a cdb (spec 3)."""

from __future__ import annotations

import os
import sys

import click

from ucspi.errors import EXIT_PERMANENT, Fatal, die
from ucspi.rules.compile import compile_rules

USAGE = b"tcprules: usage: tcprules rules.cdb rules.tmp"


@click.command(context_settings={"help_option_names": [], "ignore_unknown_options": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def tcprules(arguments: tuple[str, ...]) -> None:
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
    # The original takes its arguments as they are: a leading "--" makes click do the same.
    tcprules.main(["--", *sys.argv[1:]], prog_name="tcprules")
