"""fds 0, 1 and 2 that came closed, opened on /dev/null: tcpserver's and sslserver's first step.

A module of its own, importing nothing more: sslserver does it before its start-up split, where
the supervised parent stays small.
"""

from __future__ import annotations

import os


def _placeholder_descriptor() -> int:
    try:
        return os.open(os.devnull, os.O_RDWR)
    except OSError:  # no /dev/null (a bare chroot): a pipe's read end, at EOF, writes fail quietly
        read_end, write_end = os.pipe()
        os.close(write_end)
        return read_end


def open_closed_standard_descriptors() -> None:
    """fds 0, 1 and 2 that came closed become /dev/null (README, differences item 13).

    Done before any socket or pipe exists: a listener or client that landed on 0, 1 or 2 would
    be written to as stdout or as the log, and closed as stdin.
    """
    while True:
        fd = _placeholder_descriptor()
        if fd > 2:
            os.close(fd)
            return
        # The program inherits fd 2 (the log) as its stderr.
        os.set_inheritable(fd, True)
