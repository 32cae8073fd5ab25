"""Faults injected into a real tcpserver, for tests only: the server's code has no hook for them.

    python tests/support/faults.py SPEC NAME [tcpserver arguments...]

SPEC is JSON: a list of {"target": "module:Qualified.name", "calls": [N, ...]}. The named
function or method (coroutine functions too) raises InjectedFault on its N-th calls, counted
across all threads from 1; every other call goes through. Then tcpserver runs as the installed
command would, with NAME as its argv[0]. Being a script on the server's own sys.path is what
arms it: no environment variable does (the server would pass it to every program).
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import sys
import threading
from collections.abc import Callable
from typing import Any


class InjectedFault(RuntimeError):
    """The exception every injected fault raises; its name is what the log line shows."""


def _resolve(target: str) -> tuple[Any, str, Callable[..., Any]]:
    module_name, _, qualified = target.partition(":")
    owner: Any = importlib.import_module(module_name)
    *path, attribute = qualified.split(".")
    for name in path:
        owner = getattr(owner, name)
    return owner, attribute, getattr(owner, attribute)


def arm(target: str, calls: set[int]) -> None:
    owner, attribute, original = _resolve(target)
    lock = threading.Lock()
    count = 0

    def faulty() -> bool:
        nonlocal count
        with lock:
            count += 1
            return count in calls

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def wrapped_coroutine(*args: Any, **kwargs: Any) -> Any:
            if faulty():
                raise InjectedFault(target)
            return await original(*args, **kwargs)

        setattr(owner, attribute, wrapped_coroutine)
        return

    @functools.wraps(original)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if faulty():
            raise InjectedFault(target)
        return original(*args, **kwargs)

    setattr(owner, attribute, wrapped)


def main() -> None:
    for fault in json.loads(sys.argv[1]):
        arm(fault["target"], set(fault["calls"]))
    sys.argv = sys.argv[2:]
    from ucspi.cli.tcpserver import main as tcpserver

    tcpserver()


if __name__ == "__main__":
    main()
