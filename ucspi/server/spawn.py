"""The program's environment and its start (docs/behaviour.md §6.6, 6.7).

Two ways to start it, the same program state either way:
- the C extension ucspi.server._spawn: clone(CLONE_VM) and execve from the loop's thread,
  without waiting for the exec (children.py's EngineChildren);
- where it was not built (no compiler) or UCSPI_NO_EXTENSION=1 forces it, posix_spawn through
  ctypes (not os.posix_spawn: ctypes releases the GIL too, and takes the environment as a raw
  array, so duplicate entries, entries without `=` and the empty name pass as the original
  passes them, in its order).

The native launcher (bin/tcpserver.c) starts Python with the soft resource limits lifted to the
hard ones, so that Python has room under `softlimit -m`; it tells us in an argv marker what they
were, and which signals were ignored before Python changed any (take_launcher_marker).
"""

from __future__ import annotations

import errno
import heapq
import itertools
import os
import signal
from collections.abc import Sequence
from typing import Any

from ucspi.environ import first_values, pathexec_changes, read_initial_environment  # noqa: F401 - re-exported
from ucspi.server.peer import Peer, Relay
from ucspi.server.proxy import TLV_VARIABLE_NAMES

try:
    from ucspi.server import _spawn as _extension
except ImportError:  # built without a compiler: the ctypes path
    _extension = None  # type: ignore[assignment]


class _ForkFailed(OSError):
    """No child at all (clone's EAGAIN, ENOMEM): the original's `unable to fork`."""


# The extension raises its own ForkError; the ctypes path cannot tell a failed fork from a
# failed exec (posix_spawn returns either errno), so it reports both as the exec's.
ForkFailed: type[OSError] = _extension.ForkError if _extension is not None else _ForkFailed

# Read once, at start; like the supervisor's variables it never reaches a program.
_FORCE_CTYPES = os.environb.get(b"UCSPI_NO_EXTENSION") == b"1"
USE_EXTENSION = _extension is not None and not _FORCE_CTYPES
if not USE_EXTENSION:
    # Loaded now, at import: after -u/-g the standard library may be out of reach.
    import ctypes
    import ctypes.util

    _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


# Every thread's stack (threading.stack_size, set first in main): RLIMIT_STACK, which
# `softlimit -m` sets too, would otherwise size each one. Our threads never recurse deeply.
THREAD_STACK_SIZE = 1 << 20


def spawn_path() -> str:
    """Which way programs start, for --version."""
    return "clone extension" if USE_EXTENSION else "posix_spawn (ctypes)"


# -- what the launcher saw before Python started ---------------------------------------------

LAUNCHER_MARKER = "--ucspi-launcher="


class StartState:
    """The server's state at exec, which the program must get back: soft limits, ignored signals, mask."""

    def __init__(self) -> None:
        # (resource, soft, hard) for each soft limit the launcher raised; empty: none raised.
        self.lifted_limits: tuple[tuple[int, int, int], ...] = ()
        # Ignored before Python started (None: no launcher; Python's own SIGPIPE and SIGXFSZ
        # are then taken for defaults, as a plain exec usually gives them).
        self.ignored: frozenset[int] | None = None
        self.mask: frozenset[int] = frozenset()


START = StartState()


def _parse_marker(marker: str) -> tuple[tuple[tuple[int, int, int], ...], frozenset[int]]:
    limits: list[tuple[int, int, int]] = []
    ignored = 0
    for field in marker[len(LAUNCHER_MARKER) :].split(","):
        key, _, value = field.partition("=")
        if key == "ignored":
            ignored = int(value, 16)
        elif key == "limit":
            resource, soft, hard = (int(part) for part in value.split(":"))
            limits.append((resource, soft, hard))
    return tuple(limits), frozenset(number for number in range(1, 65) if ignored >> (number - 1) & 1)


def _internal_signals_ignored() -> frozenset[int]:
    """glibc's 32 and 33 as the server inherited them: read at import, before any thread or
    setuid could make glibc install its own handlers (its sigaction cannot even read them)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"SigIgn:"):
                    bits = int(line.split()[1], 16)
                    return frozenset(number for number in (32, 33) if bits >> (number - 1) & 1)
    except (OSError, ValueError):
        pass
    return frozenset()


INTERNAL_SIGNALS_IGNORED = _internal_signals_ignored()


def take_launcher_marker(argv: list[str]) -> None:
    """main()'s first step: argv[1], the launcher's marker, taken out of argv and read; the mask
    the server was started with recorded. Before any thread starts or blocks a signal.

    Under the ctypes path nothing could restore the limits in the program, so they are put back
    here, on the server itself: softlimit then works as it did before the launcher.
    """
    START.mask = frozenset(int(number) for number in signal.pthread_sigmask(signal.SIG_BLOCK, ()))
    if len(argv) < 2 or not argv[1].startswith(LAUNCHER_MARKER):
        return
    START.lifted_limits, START.ignored = _parse_marker(argv.pop(1))
    if USE_EXTENSION:
        # The kernel names the process after the interpreter; ps and pgrep know it as tcpserver.
        _extension.set_name(os.fsencode(os.path.basename(argv[0]))[:15] or b"tcpserver")
        return
    if START.lifted_limits:
        import resource

        def unsigned(limit: int) -> int:  # as the launcher writes them: RLIM_INFINITY is 2**64 - 1
            return limit % (1 << 64)

        def signed(limit: int) -> int:
            return resource.RLIM_INFINITY if limit >= 1 << 63 else limit

        for number, soft, _hard in START.lifted_limits:
            # The soft limit as it was, under the hard one as it is now.
            hard_now = resource.getrlimit(number)[1]
            resource.setrlimit(number, (signed(min(unsigned(soft), unsigned(hard_now))), hard_now))
        START.lifted_limits = ()


def _ipv4_variables(peer: Peer) -> list[tuple[bytes, bytes | None]]:
    """The 0.88 variables in the original's order (docs/behaviour.md §6.7); None removes a variable."""
    return list(zip(_IPV4_NAMES, _ipv4_values(peer), strict=True))


def _ipv6_variables(peer: Peer) -> list[tuple[bytes, bytes | None]]:
    """An IPv6 client's variables, with their TCP6* twins, in the order of Debian's IPv6 build."""
    names = _IPV6_NAMES if peer.interface is None else _SCOPED_IPV6_NAMES
    return list(zip(names, _ipv6_values(peer), strict=True))


_IPV4_NAMES = (
    b"PROTO", b"TCPLOCALIP", b"TCPLOCALPORT", b"TCPLOCALHOST",
    b"TCPREMOTEIP", b"TCPREMOTEPORT", b"TCPREMOTEHOST", b"TCPREMOTEINFO",
)  # fmt: skip
_IPV6_LOCAL_NAMES = (
    b"PROTO", b"TCPLOCALIP", b"TCP6LOCALIP", b"TCPLOCALPORT", b"TCP6LOCALPORT", b"TCPLOCALHOST", b"TCP6LOCALHOST",
)  # fmt: skip
_IPV6_REMOTE_NAMES = (
    b"TCPREMOTEIP", b"TCP6REMOTEIP", b"TCPREMOTEPORT", b"TCP6REMOTEPORT",
    b"TCPREMOTEHOST", b"TCP6REMOTEHOST", b"TCPREMOTEINFO", b"TCP6REMOTEINFO",
)  # fmt: skip
_IPV6_NAMES = (*_IPV6_LOCAL_NAMES, *_IPV6_REMOTE_NAMES)
_SCOPED_IPV6_NAMES = (*_IPV6_LOCAL_NAMES, b"TCP6INTERFACE", *_IPV6_REMOTE_NAMES)


def _ipv4_values(peer: Peer) -> list[bytes | None]:
    return [
        b"TCP", peer.local_ip, b"%d" % peer.local_port, peer.local_host,
        peer.remote_ip, b"%d" % peer.remote_port, peer.remote_host, peer.remote_info,
    ]  # fmt: skip


def _ipv6_values(peer: Peer) -> list[bytes | None]:
    local_port = b"%d" % peer.local_port
    remote_port = b"%d" % peer.remote_port
    local = [b"TCP6", peer.local_ip, peer.local_ip, local_port, local_port, peer.local_host, peer.local_host]
    if peer.interface is not None:
        local.append(peer.interface)
    local += [
        peer.remote_ip, peer.remote_ip, remote_port, remote_port,
        peer.remote_host, peer.remote_host, peer.remote_info, peer.remote_info,
    ]  # fmt: skip
    return local


def tcp_shape_and_values(peer: Peer) -> tuple[tuple[tuple[bytes, bool], ...], list[bytes | None]]:
    """tcp_variables(peer) given apart, for Environment.build_from: the shape is one made already."""
    ipv6 = peer.ipv6
    scoped = peer.interface is not None
    key = (ipv6, scoped, peer.local_host is None, peer.remote_host is None, peer.remote_info is None)
    return _TCP_SHAPES[key], (_ipv6_values(peer) if ipv6 else _ipv4_values(peer))


def shape_and_values(
    changes: Sequence[tuple[bytes, bytes | None]],
) -> tuple[tuple[tuple[bytes, bool], ...], list[bytes | None]]:
    """Changes given apart, for Environment.build_from."""
    return tuple([(name, value is None) for name, value in changes]), [value for _, value in changes]


def proxy_variables(relay: Relay) -> list[tuple[bytes, bytes | None]]:
    """The balancer's address and the header's TLV values; every name is set or removed, as
    0.88 does with TCPREMOTEHOST, so no stale value from the server's own environment survives."""
    values = dict(relay.variables)
    changes: list[tuple[bytes, bytes | None]] = [
        (b"TCPPROXYIP", relay.ip),
        (b"TCPPROXYPORT", None if relay.ip is None else b"%d" % relay.port),
    ]
    changes += [(name, values.get(name)) for name in TLV_VARIABLE_NAMES]
    return changes


def tcp_variables(peer: Peer, relay: Relay | None = None) -> list[tuple[bytes, bytes | None]]:
    """The changes tcpserver makes to the environment for one client, before the rule's.

    relay: under --proxy-from, for every client (DIRECT when it came straight); its variables
    follow the TCP* ones.
    """
    if relay is None:
        return _ipv6_variables(peer) if peer.ipv6 else _ipv4_variables(peer)
    changes = _ipv6_variables(peer) if peer.ipv6 else _ipv4_variables(peer)
    return changes + proxy_variables(relay)


# A client's TCP variables have one of a few shapes, by the facts it has: made once each, from
# tcp_variables itself, so that a client's environment is found by its shape without one being
# built for it. Key: (ipv6, scoped, no local host, no remote host, no remote info).
_TCP_SHAPES = {
    (ipv6, scoped, *missing): shape_and_values(
        tcp_variables(
            Peer(b"", 0, None if missing[0] else b"", b"", 0, None if missing[1] else b"", None if missing[2] else b"",
                 ipv6, b"", b"" if scoped else None)
        )
    )[0]
    for ipv6 in (False, True)
    for scoped in ((False, True) if ipv6 else (False,))
    for missing in itertools.product((False, True), repeat=3)
}  # fmt: skip


# systemd's hand-over to us alone (sd_listen_fds, sd_notify): a program that saw them could take
# the listeners for its own or send READY=1/STOPPING=1 in our name (README, differences item 12).
SUPERVISOR_VARIABLES = frozenset({b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES", b"LISTEN_PIDFDID", b"NOTIFY_SOCKET"})
# Ours alone too: the switch to the ctypes path (read once at start, above).
_NOT_FOR_PROGRAMS = SUPERVISOR_VARIABLES | {b"UCSPI_NO_EXTENSION"}


def without_supervisor_variables(entries: list[bytes]) -> list[bytes]:
    """entries but those naming a SUPERVISOR_VARIABLES variable or UCSPI_NO_EXTENSION (every one, duplicates too)."""
    return [entry for entry in entries if entry.partition(b"=")[0] not in _NOT_FOR_PROGRAMS or b"=" not in entry]


class Environment:
    """Applies tcpserver's changes to the initial environment as pathexec does.

    Each change removes the first entry of that name (the last entry moves into its place) and
    then, unless it is a removal, appends NAME=VALUE. Where the entries end up depends only on
    the names and on which changes are removals, so that plan is computed once per shape, in
    time linear in the entries and changes (give or take a log): a rule may set 10,000 variables.
    """

    _PLAN_LIMIT = 1024

    def __init__(self, initial: list[bytes]) -> None:
        # Filtered once here, not per client: a program never sees the supervisor's hand-over.
        self.initial = without_supervisor_variables(initial)
        # shape -> (the entries with the changes' places empty, (place, change index, NAME=) each)
        self._made: dict[tuple[tuple[bytes, bool], ...], tuple[list[bytes], tuple[tuple[int, int, bytes], ...]]] = {}

    def _plan(self, shape: tuple[tuple[bytes, bool], ...]) -> list[bytes | int] | None:
        """The entries in order: initial ones as bytes, the changes' own by their index in shape.

        None where a name holds `=`: which entry it removes would depend on the values.
        """
        if any(b"=" in name for name, _removal in shape):
            return None
        entries: list[bytes | int] = list(self.initial)
        # Each position's name; None for an entry without `=`, which no change removes.
        names: list[bytes | None] = [entry.partition(b"=")[0] if b"=" in entry else None for entry in entries]
        # Name -> min-heap of the positions holding it. A position that has since been cut off or
        # given another name is dropped when it comes to the top: no change scans the entries.
        positions: dict[bytes, list[int]] = {}
        for position, name in enumerate(names):
            if name is not None:
                positions.setdefault(name, []).append(position)  # ascending: already a heap
        for change_index, (name, removal) in enumerate(shape):
            heap = positions.get(name)
            while heap and (heap[0] >= len(names) or names[heap[0]] != name):
                heapq.heappop(heap)
            if heap:
                first = heapq.heappop(heap)
                last_entry, last_name = entries.pop(), names.pop()
                if first < len(entries):
                    entries[first], names[first] = last_entry, last_name
                    if last_name is not None:
                        heapq.heappush(positions[last_name], first)
            if not removal:
                entries.append(change_index)
                names.append(name)
                heapq.heappush(positions.setdefault(name, []), len(entries) - 1)
        return entries

    def build(self, changes: Sequence[tuple[bytes, bytes | None]]) -> list[bytes]:
        """The program's environment: the initial one with changes applied (None removes a name)."""
        return self.build_from(*shape_and_values(changes))

    def build_from(self, shape: tuple[tuple[bytes, bool], ...], values: Sequence[bytes | None]) -> list[bytes]:
        """build() for changes given apart: shape, each change's (name, is a removal); values, theirs."""
        made = self._made.get(shape)
        if made is None:
            plan = self._plan(shape)
            if plan is None:
                return pathexec_changes(self.initial, list(zip([name for name, _ in shape], values, strict=True)))
            if len(self._made) >= self._PLAN_LIMIT:
                self._made.clear()
            # The entries as a template, and where each change's value goes: per client, a copy
            # and a few concatenations, whatever the size of the initial environment.
            template = [slot if isinstance(slot, bytes) else b"" for slot in plan]
            fills = tuple(
                (position, slot, shape[slot][0] + b"=") for position, slot in enumerate(plan) if isinstance(slot, int)
            )
            made = self._made[shape] = (template, fills)
        template, fills = made
        entries = template.copy()
        for position, index, prefix in fills:
            entries[position] = prefix + values[index]  # type: ignore[operator]
        return entries


def _signals_to_default() -> set[int]:
    """The signals the program gets at SIG_DFL whatever the server has them at (handlers always go).

    The original's child uncatches TERM, CHLD and PIPE; every other signal it inherited as
    ignored stays ignored. Python ignores PIPE and XFSZ before our code runs: XFSZ goes back to
    its default unless the launcher saw it ignored, and so does any other signal ignored now
    that the launcher saw at its default.
    """
    numbers = {int(signal.SIGPIPE), int(signal.SIGCHLD), int(signal.SIGTERM)}
    if START.ignored is None:
        return numbers | {int(signal.SIGXFSZ)}
    for number in signal.valid_signals():
        if number not in START.ignored and signal.getsignal(number) is signal.SIG_IGN:
            numbers.add(int(number))
    return numbers


def _program_mask() -> set[int]:
    # The original's child unblocks only SIGCHLD (which its parent blocks) of the mask it inherited.
    return set(START.mask) - {int(signal.SIGCHLD)}


class Spawner:
    """Starts the program with the connection on fds 0 and 1, as the original's child would."""

    def __init__(self, program: Sequence[bytes], search_path: bytes | None) -> None:
        self.program = list(program)
        self.path = spawn_path()
        path_entries = (search_path if search_path is not None else b"/bin:/usr/bin").split(b":")
        name = self.program[0]
        # pathexec: a name with `/` is tried alone; else each PATH entry, empty meaning ".".
        self.candidates = (name,) if b"/" in name else tuple((entry or b".") + b"/" + name for entry in path_entries)
        self.argv = tuple(self.program)
        self._ctypes: _CtypesSpawn | None = None
        if USE_EXTENSION:
            # The extension's engine spawns (children.EngineChildren); spawn() is the fallback's.
            _extension.configure(sorted(_signals_to_default()), sorted(_program_mask()), START.lifted_limits)
        else:
            self._ctypes = _CtypesSpawn(self.argv)

    def spawn(self, stdin_fd: int, stdout_fd: int, environment: Sequence[bytes], pass_fds: tuple[int, ...] = ()) -> int:
        """The fallback's spawn: the child's pid; raises OSError with the errno the original's
        execvp would report.

        stdin_fd and stdout_fd become the program's 0 and 1 (the same connection for tcpserver,
        two pipes for sslserver); pass_fds stay open in the program at their own numbers.
        environment: the entries exactly as the program gets them.
        """
        assert self._ctypes is not None, "the extension spawns through its engine"
        return self._ctypes.spawn(self.candidates, stdin_fd, stdout_fd, environment, pass_fds)


class _CtypesSpawn:
    """posix_spawn through ctypes: the path where the extension was not built, or is switched off."""

    def __init__(self, argv: tuple[bytes, ...]) -> None:
        self._ctypes = ctypes
        self._libc = libc = _libc
        self._posix_spawn = libc.posix_spawn
        self._posix_spawn.restype = ctypes.c_int
        self._posix_spawn.argtypes = [
            ctypes.POINTER(ctypes.c_int),
            ctypes.c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_char_p),
            ctypes.POINTER(ctypes.c_char_p),
        ]
        # Opaque glibc structures: 80 and 336 bytes on x86-64; room to spare for other ABIs.
        self._file_actions_type = ctypes.c_char * 1024
        self._argv = self._null_terminated(argv)
        self._attributes = self._make_attributes()
        self._file_actions: dict[tuple[int, ...], Any] = {}

    def _null_terminated(self, items: Sequence[bytes]) -> Any:
        return (self._ctypes.c_char_p * (len(items) + 1))(*items, None)

    def _signal_set(self, numbers: set[int]) -> Any:
        # Bits set directly: sigaddset refuses glibc's internal signals 32 and 33.
        words = [0] * 16
        for number in numbers:
            words[(number - 1) // 64] |= 1 << ((number - 1) % 64)
        return (self._ctypes.c_uint64 * 16)(*words)

    def _make_attributes(self) -> Any:
        attributes = (self._ctypes.c_char * 1024)()
        libc = self._libc
        libc.posix_spawnattr_init(attributes)
        # 32 and 33 too: posix_spawn's child otherwise leaves glibc's internal signals ignored,
        # and SIG_IGN would outlive the exec; but not those the server inherited as ignored,
        # which the original's child keeps ignored (the extension's child leaves both alone).
        defaults = self._signal_set(_signals_to_default() | ({32, 33} - INTERNAL_SIGNALS_IGNORED))
        mask = self._signal_set(_program_mask() - {32, 33})
        libc.posix_spawnattr_setsigdefault(attributes, defaults)
        libc.posix_spawnattr_setsigmask(attributes, mask)
        setsigdef, setsigmask = 0x04, 0x08
        libc.posix_spawnattr_setflags(attributes, self._ctypes.c_short(setsigdef | setsigmask))
        return attributes

    def _actions_for(self, stdin_fd: int, stdout_fd: int, pass_fds: tuple[int, ...]) -> Any:
        # One prepared set of file actions per descriptor layout: numbers are reused all the time.
        key = (stdin_fd, stdout_fd, *pass_fds)
        actions = self._file_actions.get(key)
        if actions is None:
            if len(self._file_actions) >= 4096:  # layouts with pass_fds vary more: keep it bounded
                self._file_actions.clear()
            actions = self._file_actions_type()
            libc = self._libc
            libc.posix_spawn_file_actions_init(actions)
            libc.posix_spawn_file_actions_adddup2(actions, stdin_fd, 0)
            libc.posix_spawn_file_actions_adddup2(actions, stdout_fd, 1)
            for fd in pass_fds:
                # dup2 of a descriptor onto itself clears its close-on-exec flag (glibc 2.29 on).
                libc.posix_spawn_file_actions_adddup2(actions, fd, fd)
            self._file_actions[key] = actions
        return actions

    def spawn(
        self,
        candidates: tuple[bytes, ...],
        stdin_fd: int,
        stdout_fd: int,
        environment: Sequence[bytes],
        pass_fds: tuple[int, ...],
    ) -> int:
        ctypes = self._ctypes
        envp = self._null_terminated(environment)
        actions = self._actions_for(stdin_fd, stdout_fd, pass_fds)
        saved_error = 0
        for candidate in candidates:
            # A cheap stat first: a missing file would cost a whole vfork to find out.
            if len(candidates) > 1:
                try:
                    os.stat(candidate)
                except FileNotFoundError:
                    continue
                except OSError:
                    pass  # let the spawn report it, as execve would
            pid = ctypes.c_int(0)
            result = self._posix_spawn(ctypes.byref(pid), candidate, actions, self._attributes, self._argv, envp)
            if result == 0:
                return pid.value
            if result != errno.ENOENT:
                saved_error = result
                if result not in (errno.EACCES, errno.EPERM, errno.EISDIR):
                    break
        raise OSError(saved_error or errno.ENOENT, os.strerror(saved_error or errno.ENOENT))
