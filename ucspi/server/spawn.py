"""The program's environment and its start with posix_spawn (docs/behaviour.md §6.6, 6.7).

posix_spawn is called through ctypes, not os.posix_spawn: ctypes releases the GIL while the
vfork'd child execs, and takes the environment as a raw array, so it can pass what the original
passes (duplicate entries, entries without `=`, the empty name a rule can set) in its order.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import heapq
import os
import signal
from collections.abc import Sequence

from ucspi.environ import first_values, pathexec_changes, read_initial_environment  # noqa: F401 - re-exported
from ucspi.server.peer import Peer, Relay
from ucspi.server.proxy import TLV_VARIABLE_NAMES

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
# Opaque glibc structures: 80 and 336 bytes on x86-64; room to spare for other ABIs.
_FileActions = ctypes.c_char * 1024
_Attributes = ctypes.c_char * 1024
_SigSet = ctypes.c_char * 128

_posix_spawn = _libc.posix_spawn
_posix_spawn.restype = ctypes.c_int
_posix_spawn.argtypes = [
    ctypes.POINTER(ctypes.c_int),
    ctypes.c_char_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_char_p),
    ctypes.POINTER(ctypes.c_char_p),
]
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08


def _ipv4_variables(peer: Peer) -> list[tuple[bytes, bytes | None]]:
    """The 0.88 variables in the original's order (docs/behaviour.md §6.7); None removes a variable."""
    return [
        (b"PROTO", b"TCP"),
        (b"TCPLOCALIP", peer.local_ip),
        (b"TCPLOCALPORT", b"%d" % peer.local_port),
        (b"TCPLOCALHOST", peer.local_host),
        (b"TCPREMOTEIP", peer.remote_ip),
        (b"TCPREMOTEPORT", b"%d" % peer.remote_port),
        (b"TCPREMOTEHOST", peer.remote_host),
        (b"TCPREMOTEINFO", peer.remote_info),
    ]


def _ipv6_variables(peer: Peer) -> list[tuple[bytes, bytes | None]]:
    """An IPv6 client's variables, with their TCP6* twins, in the order of Debian's IPv6 build."""
    local_port = b"%d" % peer.local_port
    remote_port = b"%d" % peer.remote_port
    changes: list[tuple[bytes, bytes | None]] = [
        (b"PROTO", b"TCP6"),
        (b"TCPLOCALIP", peer.local_ip),
        (b"TCP6LOCALIP", peer.local_ip),
        (b"TCPLOCALPORT", local_port),
        (b"TCP6LOCALPORT", local_port),
        (b"TCPLOCALHOST", peer.local_host),
        (b"TCP6LOCALHOST", peer.local_host),
    ]
    if peer.interface is not None:
        changes.append((b"TCP6INTERFACE", peer.interface))
    changes += [
        (b"TCPREMOTEIP", peer.remote_ip),
        (b"TCP6REMOTEIP", peer.remote_ip),
        (b"TCPREMOTEPORT", remote_port),
        (b"TCP6REMOTEPORT", remote_port),
        (b"TCPREMOTEHOST", peer.remote_host),
        (b"TCP6REMOTEHOST", peer.remote_host),
        (b"TCPREMOTEINFO", peer.remote_info),
        (b"TCP6REMOTEINFO", peer.remote_info),
    ]
    return changes


def _proxy_variables(relay: Relay) -> list[tuple[bytes, bytes | None]]:
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
    return changes + _proxy_variables(relay)


# systemd's hand-over to us alone (sd_listen_fds, sd_notify): a program that saw them could take
# the listeners for its own or send READY=1/STOPPING=1 in our name (README, differences item 12).
SUPERVISOR_VARIABLES = frozenset({b"LISTEN_PID", b"LISTEN_FDS", b"LISTEN_FDNAMES", b"LISTEN_PIDFDID", b"NOTIFY_SOCKET"})


def without_supervisor_variables(entries: list[bytes]) -> list[bytes]:
    """entries but those naming a SUPERVISOR_VARIABLES variable (every one, duplicates too)."""
    return [entry for entry in entries if entry.partition(b"=")[0] not in SUPERVISOR_VARIABLES or b"=" not in entry]


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
        self._plans: dict[tuple[tuple[bytes, bool], ...], list[bytes | int]] = {}

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
        shape = tuple((name, value is None) for name, value in changes)
        plan = self._plans.get(shape)
        if plan is None:
            plan = self._plan(shape)
            if plan is None:
                return pathexec_changes(self.initial, changes)
            if len(self._plans) >= self._PLAN_LIMIT:
                self._plans.clear()
            self._plans[shape] = plan
        return [
            slot if isinstance(slot, bytes) else changes[slot][0] + b"=" + changes[slot][1]  # type: ignore[operator]
            for slot in plan
        ]


def _null_terminated(items: Sequence[bytes]) -> ctypes.Array:
    return (ctypes.c_char_p * (len(items) + 1))(*items, None)


class Spawner:
    """Starts the program with the connection on fds 0 and 1, as the original's child would."""

    def __init__(self, program: Sequence[bytes], search_path: bytes | None) -> None:
        self.program = list(program)
        self._argv = _null_terminated(self.program)
        self._path_entries = (search_path if search_path is not None else b"/bin:/usr/bin").split(b":")
        self._attributes = self._make_attributes()
        self._file_actions: dict[int, _FileActions] = {}

    @staticmethod
    def _make_attributes() -> _Attributes:
        attributes = _Attributes()
        _libc.posix_spawnattr_init(attributes)
        # Python ignores SIGPIPE and SIGXFSZ; the original's child has every handler at default.
        # Signals the server inherited as ignored stay ignored for the child, as in the original.
        defaults = _SigSet()
        _libc.sigemptyset(defaults)
        for number in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGCHLD, signal.SIGTERM):
            _libc.sigaddset(defaults, int(number))
        empty_mask = _SigSet()
        _libc.sigemptyset(empty_mask)
        _libc.posix_spawnattr_setsigdefault(attributes, defaults)
        _libc.posix_spawnattr_setsigmask(attributes, empty_mask)
        _libc.posix_spawnattr_setflags(attributes, ctypes.c_short(_POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK))
        return attributes

    def _actions_for(self, stdin_fd: int, stdout_fd: int, pass_fds: tuple[int, ...]) -> _FileActions:
        # One prepared set of file actions per descriptor layout: numbers are reused all the time.
        key = (stdin_fd, stdout_fd, *pass_fds)
        actions = self._file_actions.get(key)
        if actions is None:
            if len(self._file_actions) >= 4096:  # layouts with pass_fds vary more: keep it bounded
                self._file_actions.clear()
            actions = _FileActions()
            _libc.posix_spawn_file_actions_init(actions)
            _libc.posix_spawn_file_actions_adddup2(actions, stdin_fd, 0)
            _libc.posix_spawn_file_actions_adddup2(actions, stdout_fd, 1)
            for fd in pass_fds:
                # dup2 of a descriptor onto itself clears its close-on-exec flag (glibc 2.29 on).
                _libc.posix_spawn_file_actions_adddup2(actions, fd, fd)
            self._file_actions[key] = actions
        return actions

    def _candidates(self) -> list[bytes]:
        name = self.program[0]
        if b"/" in name:
            return [name]
        # pathexec: an empty PATH element means the current directory.
        return [(directory or b".") + b"/" + name for directory in self._path_entries]

    def spawn(
        self, stdin_fd: int, stdout_fd: int, environment: Sequence[bytes], pass_fds: tuple[int, ...] = ()
    ) -> int:
        """The child's pid; raises OSError with the errno the original's execvp would report.

        stdin_fd and stdout_fd become the program's 0 and 1 (the same connection for tcpserver,
        two pipes for sslserver); pass_fds stay open in the program at their own numbers.
        """
        envp = _null_terminated(environment)
        actions = self._actions_for(stdin_fd, stdout_fd, pass_fds)
        saved_error = 0
        candidates = self._candidates()
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
            result = _posix_spawn(ctypes.byref(pid), candidate, actions, self._attributes, self._argv, envp)
            if result == 0:
                return pid.value
            if result != errno.ENOENT:
                saved_error = result
                if result not in (errno.EACCES, errno.EPERM, errno.EISDIR):
                    break
        raise OSError(saved_error or errno.ENOENT, os.strerror(saved_error or errno.ENOENT))
