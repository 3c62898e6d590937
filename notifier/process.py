"""Whether the process that wrote a lease or a claim is gone, judged only where it can be.

A lease or a claim records the pid of the process that wrote it, so that a
crashed holder can be replaced at once instead of after its expiry. But a pid
means something only inside one pid namespace of one boot of one kernel. Two
containers with the same host name (host networking, separate pid
namespaces) each see the other's live process as a pid that does not exist,
and judging by host name and pid would hand a live holder's work to a second
sender.

So the writer also records *where* its pid is valid, its ``pid_scope``: the
kernel's boot id and the inodes of its pid and time namespaces, and *when*
its process started, its ``pid_start`` (clock ticks after boot, from
``/proc/PID/stat``), which tells a reused pid from the original. A reader
judges the writer gone only when its own scope is the same and either no
process has that pid, or the one that has it started at another time. In
every other case (another scope, an unknown scope, a record without these
fields, a process it may not inspect) it is not judged: the caller waits for
the lease or claim to expire, as it would for a holder on another machine.

``ProcSubset=pid`` in a systemd unit hides ``/proc/sys``, and with it the
boot id; the shipped unit hands it in as ``NOTIFIER_BOOT_ID=%b``. Without
either, this process has no scope: it never judges another gone, and nobody
judges it gone.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

#: Environment variable a systemd unit sets to its boot id (``%b``).
BOOT_ID_ENV = "NOTIFIER_BOOT_ID"

#: ``alive(pid, start)``: whether a process with ``pid`` exists here and, if
#: ``start`` is known, started then. Unknown counts as alive.
Alive = Callable[[int, int | None], bool]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _boot_id(environ: Mapping[str, str]) -> str | None:
    raw = _read("/proc/sys/kernel/random/boot_id") or environ.get(BOOT_ID_ENV, "")
    boot = raw.replace("-", "").lower()
    return boot if len(boot) == 32 and all(c in "0123456789abcdef" for c in boot) else None


def _namespace(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return "-"  # a kernel without this namespace kind: the same for every process


def this_scope(environ: Mapping[str, str] | None = None) -> str | None:
    """Where this process's pid is valid, or ``None`` when that cannot be told.

    The boot id is needed: a pid namespace's inode is only unique within one
    boot (the initial one has the same inode on every machine).
    """
    boot = _boot_id(os.environ if environ is None else environ)
    pid_ns = _namespace("pid")
    if boot is None or pid_ns == "-":
        return None
    return f"{boot}/{pid_ns}/{_namespace('time')}"


def _proc_is_ours() -> bool:
    """Whether ``/proc`` shows this process's pid namespace (not so in a pid
    namespace that did not mount its own ``/proc``: its pids are not ours)."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def start_ticks(pid: int | None = None) -> int | None:
    """When process ``pid`` (default: this one) started, in clock ticks after
    boot; ``None`` if that cannot be read."""
    if not _proc_is_ours():
        return None
    stat = _read(f"/proc/{'self' if pid is None else pid}/stat")
    if stat is None:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or
    # parentheses itself: count the fields after the last ')'.
    fields = stat.rpartition(")")[2].split()
    with contextlib.suppress(IndexError, ValueError):
        return int(fields[19])  # field 22, starttime
    return None


def process_alive(pid: int, start: int | None) -> bool:
    """Whether a process with ``pid`` that started at ``start`` may exist (see :data:`Alive`)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    if start is None:
        return True
    # Another user's process may be hidden from /proc (hidepid): unknown.
    now = start_ticks(pid)
    return now is None or now == start


def identity() -> dict[str, Any]:
    """The fields a lease or claim carries to identify this process."""
    return {"pid": os.getpid(), "pid_scope": SCOPE, "pid_start": start_ticks()}


def is_gone(record: Mapping[str, Any], *, here: str | None, alive: Alive = process_alive) -> bool:
    """Whether the process that wrote ``record`` surely no longer exists.

    ``here`` is the reader's scope (:func:`this_scope`); ``None`` never judges.

    >>> record = {"pid": 5, "pid_scope": "b/pid:[1]/time:[2]", "pid_start": 70}
    >>> is_gone(record, here="b/pid:[1]/time:[2]", alive=lambda pid, start: False)
    True
    >>> is_gone(record, here="b/pid:[9]/time:[2]", alive=lambda pid, start: False)
    False
    >>> is_gone({"pid": 5}, here=None, alive=lambda pid, start: False)
    False
    """
    pid, start = record.get("pid"), record.get("pid_start")
    if here is None or record.get("pid_scope") != here:
        return False
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    if isinstance(start, bool) or not isinstance(start, int):
        start = None
    return not alive(pid, start)


#: This process's scope, read once: it does not change while it runs.
SCOPE = this_scope()
