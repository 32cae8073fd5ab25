#!/usr/bin/python3 -IS
"""The fallback launcher: bin/tcpserver where `make` found no C compiler (bin/tcpserver.c is the
native one). tcpserver (and tcpclient, sslserver, links to it) from a checkout: run the
virtualenv's command of that name, or say that `make` comes first. Python needs tens of
megabytes before any code runs, so under this launcher `softlimit -m` must leave room for it.

It hands its environment on exactly as it was given: same entries, same order, duplicates and
entries without `=` included, since the command passes it to its program byte for byte. So it
is no shell script (a shell adds PWD and sorts) and names its interpreter absolutely: through
`env python3` a pyenv shim (bash) would add variables first. Under -S no site module runs, and
the environment re-read from /proc is the one exec gave, whatever Python set (LC_CTYPE, PEP 538).
"""

import os
import signal
import sys

command = os.path.basename(sys.argv[0])
checkout = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
target = os.path.join(checkout, ".venv", "bin", command)
if not os.access(target, os.X_OK):
    message = "run make first" if not os.path.lexists(target) else f"unable to run {target}: access denied"
    os.write(2, f"{command}: fatal: {message}\n".encode())
    sys.exit(111)

try:
    with open("/proc/self/environ", "rb") as environ_file:
        entries = environ_file.read().split(b"\0")[:-1]
except OSError:  # no /proc: the environment as Python sees it
    entries = [name + b"=" + value for name, value in os.environb.items()]

# Python ignores these at start; tcpserver gets them as a plain exec would give them.
for number in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(number, signal.SIG_DFL)

arguments = [os.fsencode(target), *map(os.fsencode, sys.argv[1:])]
as_mapping = {}
for entry in entries:
    name, equals, value = entry.partition(b"=")
    if not equals or name in as_mapping:
        break
    as_mapping[name] = value
else:
    os.execve(target, arguments, as_mapping)  # a mapping keeps the order: exact

# Duplicates or entries without `=`: only execve(2) itself takes them as they are.
import ctypes  # noqa: E402

libc = ctypes.CDLL(None, use_errno=True)
argv = (ctypes.c_char_p * (len(arguments) + 1))(*arguments, None)
envp = (ctypes.c_char_p * (len(entries) + 1))(*entries, None)
libc.execve(arguments[0], argv, envp)
os.write(2, f"{command}: fatal: unable to run {target}: {os.strerror(ctypes.get_errno())}\n".encode())
sys.exit(111)
