"""One small module per command: parse arguments, call the library, exit.

Each command module imports only what it needs: tcprules and tcprulescheck are called in loops
by admin scripts, so their start-up time is theirs to keep small (bench/startup.py).
"""

from __future__ import annotations

import importlib
import os

COMMANDS = ("sslserver", "tcpclient", "tcprules", "tcprulescheck", "tcpserver")


def run(command: str) -> None:
    """Run a command by name, for the launchers in bin/."""
    if command not in COMMANDS:
        raise SystemExit(f"ucspi: unknown command {command!r}; use one of {', '.join(COMMANDS)}")
    importlib.import_module(f"ucspi.cli.{command}").main()


def package_version() -> str:
    """The installed package's version (setup.cfg's), read from its metadata only when asked."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ucspi")
    except PackageNotFoundError:
        return "unknown"


def version_line(command: str) -> bytes:
    """`--version`'s answer: `tcprules (ucspi) 0.1.0` (docs/behaviour.md §8)."""
    return f"{command} (ucspi) {package_version()}\n".encode()


def answer_help_or_version(command: str, arguments: list[str], help_text: str) -> bool:
    """`--help` or `--version` as the only argument: print on stdout and return True.

    Anywhere else these words are what 0.88 takes them for (a file name, an illegal option).
    """
    if arguments == ["--help"]:
        _write_stdout(help_text.encode())
        return True
    if arguments == ["--version"]:
        _write_stdout(version_line(command))
        return True
    return False


def _write_stdout(data: bytes) -> None:
    try:
        os.write(1, data)
    except OSError:
        pass
