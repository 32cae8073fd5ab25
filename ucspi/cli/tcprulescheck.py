"""tcprulescheck CDB: show which rule applies to the client in TCPREMOTEIP/HOST/INFO (spec 4).

TCPREMOTEIP may be IPv6 in any spelling; a CIDR match is shown as its network (lookup.describe).
"""

from __future__ import annotations

import os
import sys

import click

from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, die, error_text
from ucspi.rules.database import RulesFile
from ucspi.rules.lookup import describe

USAGE = b"tcprulescheck: usage: tcprulescheck rules.cdb"


@click.command(context_settings={"help_option_names": [], "ignore_unknown_options": True})
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def tcprulescheck(arguments: tuple[str, ...]) -> None:
    """Look up the client described by the environment in CDB and print the rule."""
    if not arguments:
        die(USAGE, EXIT_PERMANENT)
    cdb_path = os.fsencode(arguments[0])
    environ = os.environb
    ip = environ.get(b"TCPREMOTEIP", b"0.0.0.0")
    try:
        decision = RulesFile(cdb_path).decide(ip, environ.get(b"TCPREMOTEHOST"), environ.get(b"TCPREMOTEINFO"))
    except OSError as error:
        die(b"tcprulescheck: fatal: unable to read " + cdb_path + b": " + error_text(error).encode(), EXIT_TEMPORARY)
    sys.stdout.buffer.write(describe(decision))
    sys.stdout.buffer.flush()


def main() -> None:
    tcprulescheck.main(["--", *sys.argv[1:]], prog_name="tcprulescheck")
