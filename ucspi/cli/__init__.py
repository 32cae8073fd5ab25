"""One small module per command: parse arguments, call the library, exit."""

from __future__ import annotations

import importlib

COMMANDS = ("tcprules", "tcprulescheck", "tcpserver")


def run(command: str) -> None:
    """Run a command by name, for the launchers in bin/."""
    if command not in COMMANDS:
        raise SystemExit(f"ucspi: unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    importlib.import_module(f"ucspi.cli.{command}").main()
