"""tcprulescheck CDB: show which rule applies to the client in TCPREMOTEIP/HOST/INFO (docs/behaviour.md §4).

TCPREMOTEIP may be IPv6 in any spelling; a CIDR match is shown as its network (lookup.describe).
"""

from __future__ import annotations

import os
import sys

from ucspi.cli import answer_help_or_version
from ucspi.errors import EXIT_PERMANENT, EXIT_TEMPORARY, die, error_text

USAGE = b"tcprulescheck: usage: tcprulescheck rules.cdb"

HELP = """\
Usage: tcprulescheck rules.cdb

  Print the rule of rules.cdb that applies to the client described by TCPREMOTEIP (default
  0.0.0.0), TCPREMOTEHOST and TCPREMOTEINFO: `rule KEY:`, each `set environment variable
  NAME=VALUE`, then `allow connection` or `deny connection`; `default:` when no rule matches.
  The lookup is tcpserver's own. Further arguments are ignored.

Exit codes:
  0    whatever the verdict
  100  usage
  111  unable to read rules.cdb

See tcprulescheck(1).
"""


def tcprulescheck(arguments: list[str]) -> None:
    """Look up the client described by the environment in CDB and print the rule."""
    if not arguments:
        die(USAGE, EXIT_PERMANENT)
    from ucspi.rules.database import RulesFile
    from ucspi.rules.lookup import describe

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
    # One file name and no options, as the original reads argv[1]: no parser to import (click
    # alone took half of this command's start-up time).
    arguments = sys.argv[1:]
    if answer_help_or_version("tcprulescheck", arguments, HELP):
        return
    tcprulescheck(arguments)
