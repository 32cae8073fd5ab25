"""djb's sgetopt: bundled letters, attached or separate arguments, stop at the first non-option.

Unlike POSIX getopt, any argument starting with `--` ends the options and is consumed, and a
lone `-` ends them and stays (it becomes the first operand).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GetoptError(Exception):
    """`illegal option -- X` or `option requires an argument -- X`, as sgetopt words it."""

    letter: str
    missing_argument: bool

    def message(self, program_name: str) -> str:
        problem = "option requires an argument" if self.missing_argument else "illegal option"
        return f"{program_name}: {problem} -- {self.letter}"


class HelpRequested(Exception):
    """The argument that ended the options was `--help` (ours, not the original's)."""


def getopt(
    arguments: list[str], letters: str, with_argument: str, help_flag: str | None = None
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(options in order, operands); raises GetoptError at the first bad option."""
    options: list[tuple[str, str | None]] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument[:1] != "-" or argument == "-":
            break
        if argument[1] == "-":
            if argument == help_flag:
                raise HelpRequested
            index += 1
            break
        position = 1
        index += 1
        while position < len(argument):
            letter = argument[position]
            position += 1
            if letter in with_argument:
                if position < len(argument):
                    options.append((letter, argument[position:]))
                elif index < len(arguments):
                    options.append((letter, arguments[index]))
                    index += 1
                else:
                    raise GetoptError(letter, missing_argument=True)
                break
            if letter not in letters:
                raise GetoptError(letter, missing_argument=False)
            options.append((letter, None))
    return options, arguments[index:]


def scan_ulong(text: str) -> int:
    """djb's scan_ulong: the leading decimal digits (none -> 0), wrapping at 64 bits."""
    end = 0
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return int(text[:end]) % (1 << 64) if end else 0
