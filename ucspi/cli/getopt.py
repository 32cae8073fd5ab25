"""djb's sgetopt: bundled letters, attached or separate arguments, stop at the first non-option.

Unlike POSIX getopt, a lone `-` ends the options and stays (it becomes the first operand). In
0.88 any argument starting with `--` ends the options and is consumed; a command with long
options (README, differences item 11) keeps that for `--` alone and takes `--name[=value]` as an option.
"""

from __future__ import annotations


class GetoptError(Exception):
    """`illegal option -- X` or `option requires an argument -- X`, as sgetopt words it.

    A plain class: importing dataclasses would cost every command's start about 7 ms.
    """

    def __init__(self, letter: str, missing_argument: bool) -> None:
        super().__init__(letter, missing_argument)
        self.letter = letter
        self.missing_argument = missing_argument

    def message(self, program_name: str) -> str:
        problem = "option requires an argument" if self.missing_argument else "illegal option"
        return f"{program_name}: {problem} -- {self.letter}"


def getopt(
    arguments: list[str], letters: str, with_argument: str, *, long_options: bool = False
) -> tuple[list[tuple[str, str | None]], list[str]]:
    """(options in order, operands); raises GetoptError at the first bad letter.

    With long_options, `--name=value` comes out as ("--name", "value") and `--name` as
    ("--name", None), in order among the letters; which names exist is the caller's business.
    """
    options: list[tuple[str, str | None]] = []
    index = 0
    while index < len(arguments):
        argument = arguments[index]
        if argument[:1] != "-" or argument == "-":
            break
        if argument[1] == "-":
            index += 1
            if not long_options or argument == "--":
                break
            name, equals, value = argument.partition("=")
            options.append((name, value if equals else None))
            continue
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
