"""Layouts: the worker counts a database is run with, which one is current, which are retired.

A *layout* is one worker count ``M``: the slots ``<database>.worker-N-of-M``,
each with a checkpoint document and a lease document in the checkpoint
database. During a rolling reshard two layouts run side by side: the
operator starts the new layout's workers while the old ones still run, then
stops the old ones.

The pure functions here read those documents:

* :func:`running_layouts` and :func:`newer_layouts`: which layouts run now,
  since when (the earliest ``started_at`` among a layout's live leases), and
  which started after a given one;
* :func:`layout_states`: for ``notifier status`` and ``notifier
  prune-checkpoints``, when each layout last ran, which running layout is the
  newest ("current"), and which are *retired*: none of their workers has run
  for ``retire_after`` seconds while another layout has run since.

:class:`LayoutWatch` is the running worker's side: a task that looks at the
leases once the worker holds its own and every :data:`CHECK_INTERVAL`
seconds, and logs one warning when a newer layout runs (a reshard is under
way, or a machine has the wrong worker count), and one line when it is gone.
It only reads, and a CouchDB error never stops the worker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from notifier import process
from notifier.couch import CouchClient, Doc, is_missing_database
from notifier.errors import CouchError, CouchFatalError
from notifier.lease import Lease, lease_state, parse_time
from notifier.process import Alive, process_alive
from notifier.shard import Shard

log = logging.getLogger(__name__)

#: Seconds between a running worker's looks for a newer layout.
CHECK_INTERVAL = 60.0

#: ``(worker_count, worker_id)``: one worker slot of one layout.
Slot = tuple[int, int]


def slot_pattern(database: str) -> re.Pattern[str]:
    """The ids of ``database``'s checkpoint and lease documents.

    >>> match = slot_pattern("messages").fullmatch("messages.worker-1-of-3.lease")
    >>> match[1], match[2], match[3]
    ('1', '3', '.lease')
    >>> slot_pattern("messages").fullmatch("messagesx.worker-0-of-1") is None
    True
    """
    prefix = re.escape(f"{database}.worker-")
    return re.compile(prefix + r"(0|[1-9][0-9]*)-of-([1-9][0-9]*)(\.lease)?")


def parse_slot(database: str, doc_id: str) -> tuple[Slot, bool] | None:
    """``((count, id), is_lease)`` for a slot document id of ``database``, else ``None``.

    >>> parse_slot("messages", "messages.worker-2-of-3.lease")
    ((3, 2), True)
    >>> parse_slot("messages", "messages.worker-0-of-1")
    ((1, 0), False)
    >>> parse_slot("messages", "messages.worker-3-of-3") is None  # no such worker
    True
    """
    match = slot_pattern(database).fullmatch(doc_id)
    if match is None:
        return None
    count, worker_id = int(match[2]), int(match[1])
    if worker_id >= count:
        return None
    return (count, worker_id), bool(match[3])


@dataclass(frozen=True, slots=True)
class SlotDocs:
    """The checkpoint and lease documents of one database's worker slots, by slot."""

    checkpoints: Mapping[Slot, Mapping[str, Any]]
    leases: Mapping[Slot, Mapping[str, Any]]

    @property
    def worker_counts(self) -> list[int]:
        return sorted({count for count, _ in (*self.checkpoints, *self.leases)})

    def slots(self, worker_count: int) -> list[Slot]:
        return sorted(s for s in {*self.checkpoints, *self.leases} if s[0] == worker_count)


async def read_slot_docs(
    couch: CouchClient, *, checkpoint_database: str, database: str
) -> SlotDocs | None:
    """Every checkpoint and lease document of ``database``'s workers, in one request.

    ``None`` when the checkpoint database does not exist (no worker has run).
    Documents whose id is no worker slot (``messages.worker-notes``) are left out.
    """
    prefix = f"{database}.worker-"
    try:
        listing = await couch.request(
            "GET",
            f"/{quote(checkpoint_database, safe='')}/_all_docs",
            params={
                "include_docs": "true",
                "startkey": json.dumps(prefix),
                "endkey": json.dumps(prefix + "\ufff0"),
            },
        )
    except CouchFatalError as e:
        if not is_missing_database(e):
            raise
        return None
    checkpoints: dict[Slot, Doc] = {}
    leases: dict[Slot, Doc] = {}
    rows = listing.get("rows", []) if isinstance(listing, dict) else []
    for row in rows if isinstance(rows, list) else []:
        doc = row.get("doc") if isinstance(row, dict) else None
        doc_id = row.get("id") if isinstance(row, dict) else None
        if not isinstance(doc, dict) or not isinstance(doc_id, str):
            continue
        parsed = parse_slot(database, doc_id)
        if parsed is not None:
            slot, is_lease = parsed
            (leases if is_lease else checkpoints)[slot] = doc
    return SlotDocs(checkpoints=checkpoints, leases=leases)


def lease_is_live(
    lease: Mapping[str, Any] | None,
    *,
    now: float,
    here: str | None = None,
    alive: Alive = process_alive,
) -> bool:
    """Whether a process holds this lease at ``now``.

    Not released, not expired, and (when ``here`` is the reader's pid scope,
    see :mod:`notifier.process`) not held by a process known to be gone.

    >>> lease_is_live({"run_id": "a", "expires_at": 130.0}, now=100.0)
    True
    >>> lease_is_live({"run_id": "a", "expires_at": 90.0}, now=100.0)
    False
    >>> lease_is_live({"released_at": 95.0, "expires_at": 195.0}, now=100.0)
    False
    """
    return lease_state(lease, now=now, here=here, alive=alive) == "live"


def slot_last_ran(
    checkpoint: Mapping[str, Any] | None,
    lease: Mapping[str, Any] | None,
    *,
    now: float,
    live: bool,
) -> float | None:
    """When a worker slot last ran: ``now`` while its lease is live, else the latest trace.

    The traces are the lease's ``released_at`` (a clean stop), ``renewed_at``
    and ``expires_at`` (a crash leaves the lease behind; never later than
    ``now``), and the checkpoint's ``updated_at``. ``None`` if there is none.

    >>> slot_last_ran({"updated_at": "1970-01-01T00:01:40+00:00"}, None, now=500.0, live=False)
    100.0
    >>> slot_last_ran(None, {"released_at": 300.0, "expires_at": 300.0}, now=500.0, live=False)
    300.0
    >>> slot_last_ran(None, {"expires_at": 900.0}, now=500.0, live=False)  # a gone holder
    500.0
    """
    if live:
        return now
    times: list[float] = []
    if lease is not None:
        for key in ("released_at", "renewed_at", "expires_at"):
            value = parse_time(lease.get(key))
            if value is not None:
                times.append(min(value, now))
    if checkpoint is not None:
        updated = parse_time(checkpoint.get("updated_at"))
        if updated is not None:
            times.append(min(updated, now))
    return max(times, default=None)


@dataclass(frozen=True, slots=True)
class LayoutRun:
    """A layout that runs now: its live workers and since when."""

    worker_count: int
    #: The earliest ``started_at`` among its live leases; ``None`` if none
    #: records it (workers of a version before ``started_at`` existed).
    started_at: float | None
    worker_ids: tuple[int, ...]
    hosts: tuple[str, ...]

    def describe(self) -> str:
        """
        >>> LayoutRun(3, 1740917267.0, (0, 1, 2), ("hostA", "hostB")).describe()
        '3 workers, since 2025-03-02 12:07:47 UTC, on hostA, hostB'
        """
        count = workers_text(self.worker_count)
        since = "start unknown" if self.started_at is None else f"since {_clock(self.started_at)}"
        hosts = ", ".join(self.hosts) or "unknown hosts"
        return f"{count}, {since}, on {hosts}"


def running_layouts(
    leases: Mapping[Slot, Mapping[str, Any]],
    *,
    now: float,
    here: str | None = None,
    alive: Alive = process_alive,
) -> dict[int, LayoutRun]:
    """The layouts with at least one live lease at ``now``, by worker count.

    >>> leases = {
    ...     (2, 0): {"run_id": "a", "host": "h1", "started_at": 50.0, "expires_at": 130.0},
    ...     (2, 1): {"run_id": "b", "host": "h2", "started_at": 40.0, "expires_at": 90.0},
    ...     (3, 0): {"run_id": "c", "host": "h3", "started_at": 70.0, "expires_at": 130.0},
    ... }
    >>> running = running_layouts(leases, now=100.0)
    >>> running[2]
    LayoutRun(worker_count=2, started_at=50.0, worker_ids=(0,), hosts=('h1',))
    >>> sorted(running)
    [2, 3]
    """
    live: dict[int, list[tuple[int, Mapping[str, Any]]]] = {}
    for (count, worker_id), lease in sorted(leases.items()):
        if lease_is_live(lease, now=now, here=here, alive=alive):
            live.setdefault(count, []).append((worker_id, lease))
    runs: dict[int, LayoutRun] = {}
    for count, found in live.items():
        starts = [
            t for t in (parse_time(lease.get("started_at")) for _, lease in found) if t is not None
        ]
        hosts = sorted({h for _, lease in found if isinstance(h := lease.get("host"), str)})
        runs[count] = LayoutRun(
            worker_count=count,
            started_at=min(starts, default=None),
            worker_ids=tuple(worker_id for worker_id, _ in found),
            hosts=tuple(hosts),
        )
    return runs


def newer_layouts(
    leases: Mapping[Slot, Mapping[str, Any]],
    *,
    worker_count: int,
    started_at: float,
    now: float,
    here: str | None = None,
    alive: Alive = process_alive,
) -> list[LayoutRun]:
    """The running layouts that started after the layout of ``worker_count``, oldest first.

    ``started_at`` is when the asking worker took its own lease: its layout
    started then or earlier (a sibling's live lease may be older). A layout
    whose start is unknown (its workers predate ``started_at``) counts as
    older.

    >>> leases = {
    ...     (2, 0): {"run_id": "a", "host": "h1", "started_at": 50.0, "expires_at": 130.0},
    ...     (3, 1): {"run_id": "c", "host": "h3", "started_at": 70.0, "expires_at": 130.0},
    ... }
    >>> [run.worker_count for run in newer_layouts(leases, worker_count=2, started_at=50.0,
    ...                                             now=100.0)]
    [3]
    >>> newer_layouts(leases, worker_count=3, started_at=70.0, now=100.0)
    []
    """
    runs = running_layouts(leases, now=now, here=here, alive=alive)
    mine = runs.get(worker_count)
    my_start = started_at
    if mine is not None and mine.started_at is not None:
        my_start = min(my_start, mine.started_at)
    newer = [
        run
        for count, run in runs.items()
        if count != worker_count and run.started_at is not None and run.started_at > my_start
    ]
    return sorted(newer, key=lambda run: (run.started_at or 0.0, run.worker_count))


def newest(runs: Iterable[LayoutRun]) -> LayoutRun | None:
    """The running layout that started last (an unknown start counts as oldest)."""
    return max(
        runs,
        key=lambda run: (run.started_at is not None, run.started_at or 0.0, run.worker_count),
        default=None,
    )


@dataclass(frozen=True, slots=True)
class LayoutState:
    """One layout as ``status`` and ``prune-checkpoints`` judge it at ``now``."""

    worker_count: int
    #: The layout's workers that hold a live lease now, and since when; ``None``
    #: when none does.
    run: LayoutRun | None
    #: When a worker of the layout last ran (``now`` while one runs); ``None``
    #: when no document says.
    last_ran: float | None
    #: The newest running layout.
    current: bool
    #: None of its workers runs, and another layout has run more recently:
    #: it was replaced (a reshard), so falling behind is expected of it.
    superseded: bool
    #: Superseded, and none of its workers has run for ``retire_after`` seconds.
    retired: bool

    @property
    def running(self) -> bool:
        return self.run is not None


def layout_states(
    docs: SlotDocs,
    *,
    now: float,
    retire_after: float,
    here: str | None = None,
    alive: Alive = process_alive,
) -> dict[int, LayoutState]:
    """Every layout of ``docs``: running or not, when it last ran, current, retired.

    A layout none of whose documents says when it ran is never retired: what
    cannot be judged is kept.

    >>> docs = SlotDocs(
    ...     checkpoints={(1, 0): {"updated_at": "1970-01-01T00:01:40+00:00"}},
    ...     leases={(2, 0): {"run_id": "a", "started_at": 900.0, "expires_at": 1030.0},
    ...             (2, 1): {"released_at": 950.0, "expires_at": 950.0}},
    ... )
    >>> states = layout_states(docs, now=1000.0, retire_after=600.0)
    >>> states[1].retired, states[1].superseded, states[1].last_ran, states[1].current
    (True, True, 100.0, False)
    >>> states[2].retired, states[2].last_ran, states[2].current
    (False, 1000.0, True)
    """
    runs = running_layouts(docs.leases, now=now, here=here, alive=alive)
    current = newest(runs.values())
    last_ran: dict[int, float | None] = {}
    for count in docs.worker_counts:
        times = [
            t
            for slot in docs.slots(count)
            if (
                t := slot_last_ran(
                    docs.checkpoints.get(slot),
                    docs.leases.get(slot),
                    now=now,
                    live=lease_is_live(docs.leases.get(slot), now=now, here=here, alive=alive),
                )
            )
            is not None
        ]
        last_ran[count] = max(times, default=None)
    states: dict[int, LayoutState] = {}
    for count, ran in last_ran.items():
        ran_since = [t for other, t in last_ran.items() if other != count and t is not None]
        superseded = count not in runs and ran is not None and any(t > ran for t in ran_since)
        states[count] = LayoutState(
            worker_count=count,
            run=runs.get(count),
            last_ran=ran,
            current=current is not None and current.worker_count == count,
            superseded=superseded,
            retired=superseded and ran is not None and now - ran >= retire_after,
        )
    return states


class LayoutWatch:
    """A running worker's look-out for a newer layout (see the module docstring).

    ``await run()`` as a task next to the worker, and cancel it at shutdown.
    """

    def __init__(
        self,
        couch: CouchClient,
        *,
        checkpoint_database: str,
        database: str,
        shard: Shard,
        lease: Lease,
        interval: float = CHECK_INTERVAL,
        clock: Callable[[], float] = time.time,
        alive: Alive = process_alive,
    ) -> None:
        self._couch = couch
        self._checkpoint_database = checkpoint_database
        self._database = database
        self._shard = shard
        self._lease = lease
        self._interval = interval
        self._clock = clock
        self._alive = alive
        self._here = process.SCOPE
        self._failing = False
        #: The newer layouts seen at the last successful check.
        self.newer: tuple[LayoutRun, ...] = ()
        self.checks = 0
        self.failures = 0

    def __repr__(self) -> str:
        newer = ",".join(str(run.worker_count) for run in self.newer) or "none"
        return (
            f"<LayoutWatch {self._shard} checks={self.checks} failures={self.failures} "
            f"newer={newer}>"
        )

    async def run(self) -> None:
        """Check once the lease is ours, then every ``interval`` seconds, until cancelled."""
        await self._lease.taken.wait()
        while True:
            await self.check()
            await asyncio.sleep(self._interval)

    async def check(self) -> None:
        """Look at the leases once; log when a newer layout appears or is gone."""
        try:
            docs = await read_slot_docs(
                self._couch,
                checkpoint_database=self._checkpoint_database,
                database=self._database,
            )
        except Exception as e:
            # Only advice: a failure must never stop the worker. Say it once
            # per outage; the next period tries again.
            self.failures += 1
            if not self._failing:
                self._failing = True
                log.warning(
                    "worker %s: could not check for a newer layout, will try again every %.0fs: %s",
                    self._shard,
                    self._interval,
                    e if isinstance(e, CouchError) else f"{type(e).__name__}: {e}",
                )
            else:
                log.debug("worker %s: layout check failed again: %s", self._shard, e)
            return
        if self._failing:
            self._failing = False
            log.debug("worker %s: layout check works again", self._shard)
        now = self._clock()
        started_at = self._lease.started_at if self._lease.started_at is not None else now
        newer = newer_layouts(
            {} if docs is None else docs.leases,
            worker_count=self._shard.worker_count,
            started_at=started_at,
            now=now,
            here=self._here,
            alive=self._alive,
        )
        self.checks += 1
        log.debug(
            "worker %s: layout check %d: newer layouts running: %s",
            self._shard,
            self.checks,
            "; ".join(run.describe() for run in newer) or "none",
        )
        before = {run.worker_count for run in self.newer}
        after = {run.worker_count for run in newer}
        if after - before:
            log.warning("%s", newer_layout_warning(self._shard, newer))
        elif before and not after:
            log.info(
                "worker %s: the newer layout (%s) is no longer running; this worker's layout "
                "(%s) is the newest running one",
                self._shard,
                ", ".join(workers_text(count) for count in sorted(before)),
                workers_text(self._shard.worker_count),
            )
        self.newer = tuple(newer)


def newer_layout_warning(shard: Shard, newer: Iterable[LayoutRun]) -> str:
    """The warning a worker logs when a newer layout runs.

    >>> run = LayoutRun(3, 1740917267.0, (0, 1, 2), ("hostA", "hostB"))
    >>> print(newer_layout_warning(Shard(worker_id=0, worker_count=2), [run]))
    ... # doctest: +NORMALIZE_WHITESPACE
    worker 0/2: a newer layout is running (3 workers, since 2025-03-02 12:07:47 UTC, on hostA,
    hostB); this worker's layout is 2 workers. If you are resharding, stop this worker once the
    new layout has caught up (docs/operations.md, 'Reshard'); otherwise check --worker-count and
    NOTIFIER_WORKER_COUNT on every machine
    """
    runs = list(newer)
    what = "a newer layout is" if len(runs) == 1 else "newer layouts are"
    return (
        f"worker {shard}: {what} running ({'; '.join(run.describe() for run in runs)}); "
        f"this worker's layout is {workers_text(shard.worker_count)}. If you are resharding, "
        "stop this worker once the new layout has caught up (docs/operations.md, 'Reshard'); "
        "otherwise check --worker-count and NOTIFIER_WORKER_COUNT on every machine"
    )


def workers_text(count: int) -> str:
    """
    >>> workers_text(1), workers_text(3)
    ('1 worker', '3 workers')
    """
    return f"{count} worker{'s' if count != 1 else ''}"


def iso_time(epoch: float) -> str:
    """
    >>> iso_time(1740910540.2)
    '2025-03-02T10:15:40+00:00'
    """
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def format_duration(seconds: float) -> str:
    """
    >>> format_duration(42.4), format_duration(303), format_duration(7500)
    ('42s', '5m03s', '2h05m')
    >>> format_duration(273600), format_duration(-3)
    ('3d04h', '-3s')
    """
    if seconds < 0:
        return "-" + format_duration(-seconds)
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
