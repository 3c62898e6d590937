"""One live process per worker slot: a lease document, arbitrated by CouchDB's MVCC.

Two processes started with the same ``--worker-id`` and ``--worker-count`` (a
copy-pasted unit on a second machine, a manual run beside the service) would
both send every message of their shard. Before it reads anything, a worker
therefore takes the lease ``<database>.worker-<id>-of-<count>.lease`` in the
checkpoint database, and renews it every third of ``lease_ttl``. CouchDB's
``_rev`` decides every race: of two writers with the same revision, one gets
a 409.

A second process finds the lease held and waits as a standby, re-checking
until the holder releases it, lets it expire, or is seen to be gone: a holder
whose process surely no longer exists (a crash, SIGKILL, before systemd
restarts the unit) is taken over at once, so a restart does not wait out the
TTL. Only a process in the same pid namespace of the same boot can tell
that (:mod:`notifier.process`); anywhere else, only expiry does.

The lease document also records when its slot ran: ``started_at`` (epoch
seconds) is when the holding process took it, kept across renewals, and a
clean stop does not delete the document but overwrites it with a *released*
marker (``released_at``, no ``run_id``), which is free to take at once. So
``notifier status`` can tell when each layout started and last ran, even
after it stopped (see :mod:`notifier.layout`).

A holder that cannot renew before its lease expires (it was paused, or cut off
from CouchDB) must assume another process took over: it raises
:class:`~notifier.errors.LeaseLost` and the worker stops. Expiry uses the
wall clock, so hosts sharing a database need synchronised clocks (NTP); the
TTL (30 s by default) is far above ordinary skew. A 409 on a renewal is not
a loss by itself (the previous attempt may have been applied and its answer
lost): the lease is read again, and only another holder's run id in it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from notifier import process
from notifier.checkpoint import checkpoint_id
from notifier.couch import CouchClient, is_missing_database
from notifier.errors import CouchFatalError, CouchTransientError, DocumentConflict, LeaseLost
from notifier.process import Alive, process_alive
from notifier.shard import Shard

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Holder:
    """Who this process is, as written into the lease.

    ``scope`` and ``start`` say where its pid is valid and when it started
    (see :mod:`notifier.process`); without them nobody judges it gone.
    """

    run_id: str
    host: str
    pid: int
    scope: str | None = None
    start: int | None = None

    @classmethod
    def this_process(cls) -> Holder:
        me = process.identity()
        return cls(
            run_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=me["pid"],
            scope=me["pid_scope"],
            start=me["pid_start"],
        )

    def fields(self) -> dict[str, Any]:
        """Who holds it, as the lease document says."""
        return {
            "host": self.host,
            "pid": self.pid,
            "pid_scope": self.scope,
            "pid_start": self.start,
        }


def parse_time(value: Any) -> float | None:
    """Epoch seconds from a number or an ISO 8601 string (UTC if it names no zone).

    >>> parse_time(1740910540.5), parse_time("2025-03-02T10:15:40+00:00")
    (1740910540.5, 1740910540.0)
    >>> parse_time("yesterday") is None, parse_time(True) is None
    (True, True)
    """
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


LeaseState = Literal["missing", "released", "expired", "gone", "live"]


def lease_state(
    lease: Mapping[str, Any] | None,
    *,
    now: float,
    here: str | None,
    alive: Alive = process_alive,
) -> LeaseState:
    """Whether anyone holds a lease at ``now``, and if not, why not.

    ``gone``: its holder's process surely no longer exists, as seen from the
    pid scope ``here`` (:func:`notifier.process.is_gone`); with ``here=None``
    that is not checked.

    >>> lease_state({"run_id": "a", "expires_at": 130.0}, now=100.0, here=None)
    'live'
    >>> lease_state({"run_id": "a", "expires_at": 90.0}, now=100.0, here=None)
    'expired'
    >>> lease_state({"released_at": 95.0, "expires_at": 195.0}, now=100.0, here=None)
    'released'
    """
    if lease is None:
        return "missing"
    if is_released(lease):
        return "released"
    expires_at = parse_time(lease.get("expires_at"))
    if expires_at is None or expires_at <= now:
        return "expired"
    if process.is_gone(lease, here=here, alive=alive):
        return "gone"
    return "live"


def free_to_take(
    lease: Mapping[str, Any] | None,
    *,
    me: Holder,
    now: float,
    alive: Alive = process_alive,
) -> str | None:
    """Why the lease may be taken now, or ``None`` if someone else holds it.

    >>> me = Holder(run_id="b", host="h1", pid=2, scope="s1")
    >>> free_to_take(None, me=me, now=100.0)
    'no lease yet'
    >>> held = {"run_id": "a", "host": "h2", "pid": 1, "expires_at": 130.0}
    >>> free_to_take(held, me=me, now=100.0) is None
    True
    >>> free_to_take(held, me=me, now=131.0)
    'the lease expired'
    >>> dead = {**held, "pid_scope": "s1"}
    >>> free_to_take(dead, me=me, now=100.0, alive=lambda pid, start: False)
    'its holder (h2 pid 1) is gone'

    A released lease is free at once, whatever the clocks say:

    >>> released = {"host": "h2", "pid": 1, "released_at": 120.0, "expires_at": 120.0}
    >>> free_to_take(released, me=me, now=100.0)
    'it was released'
    """
    state = lease_state(lease, now=now, here=me.scope, alive=alive)
    if state == "missing":
        return "no lease yet"
    if state == "released":
        return "it was released"
    assert lease is not None
    if lease.get("run_id") == me.run_id:
        return "it is ours"
    if state == "expired":
        return "the lease expired"
    if state == "gone":
        return f"its holder ({lease.get('host')} pid {lease.get('pid')}) is gone"
    return None


def is_released(lease: Mapping[str, Any]) -> bool:
    """Whether the lease was given up by a clean stop (nobody holds it).

    >>> is_released({"released_at": 120.0, "host": "h"}), is_released({"run_id": "a"})
    (True, False)
    """
    released_at = lease.get("released_at")
    return (
        "run_id" not in lease
        and isinstance(released_at, int | float)
        and not isinstance(released_at, bool)
    )


def lease_id(database: str, shard: Shard) -> str:
    """
    >>> lease_id("messages", Shard(worker_id=0, worker_count=2))
    'messages.worker-0-of-2.lease'
    """
    return f"{checkpoint_id(database, shard)}.lease"


class Lease:
    """The lease of one worker slot. ``acquire``, then ``keep`` (a task), then ``release``."""

    #: Seconds between a standby's looks at the lease.
    STANDBY_POLL = 1.0

    def __init__(
        self,
        couch: CouchClient,
        *,
        database: str,
        source_database: str,
        shard: Shard,
        ttl: float = 30.0,
        holder: Holder | None = None,
        clock: Callable[[], float] = time.time,
        alive: Alive = process_alive,
    ) -> None:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        self._couch = couch
        self._database = database
        self.doc_id = lease_id(source_database, shard)
        self._shard = shard
        self.ttl = ttl
        self.holder = holder or Holder.this_process()
        self._clock = clock
        self._alive = alive
        self._rev: str | None = None
        self.expires_at = 0.0
        self.renewals = 0
        #: When this process took the lease (epoch seconds); ``None`` until then.
        self.started_at: float | None = None
        #: Set once this process has taken the lease.
        self.taken = asyncio.Event()
        #: While waiting as a standby: who holds the lease ("HOST pid N").
        self.standing_by: str | None = None

    def __repr__(self) -> str:
        state = "held" if self.held else "not held"
        return f"<Lease {self.doc_id} {state} renewals={self.renewals}>"

    @property
    def held(self) -> bool:
        return self._rev is not None and self._clock() < self.expires_at

    async def acquire(self, stopping: asyncio.Event) -> bool:
        """Take the lease, waiting as a standby while another live process holds it.

        Returns ``False`` if ``stopping`` was set first. Once it stands by,
        a CouchDB outage is waited out rather than ending the process: a
        standby is a healthy service (systemd must not restart it).
        """
        failing = False
        while not stopping.is_set():
            try:
                current = await self._read()
                reason = free_to_take(current, me=self.holder, now=self._clock(), alive=self._alive)
                if reason is not None:
                    try:
                        await self._write(current)
                    except DocumentConflict:
                        continue  # another process won the race for it: look again
                    log.info("worker %s: took the lease (%s)", self._shard, reason)
                    self.standing_by = None
                    self.taken.set()
                    return True
            except CouchTransientError as e:
                if self.standing_by is None:
                    raise  # not yet started: fail fast, as every start-up step does
                if not failing:
                    failing = True
                    log.warning("worker %s: standby cannot read the lease: %s", self._shard, e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), timeout=self.STANDBY_POLL)
                continue
            failing = False
            assert current is not None
            who = f"{current.get('host')} pid {current.get('pid')}"
            if self.standing_by != who:
                self.standing_by = who
                log.warning(
                    "worker %s is already running on %s; waiting as a standby until it stops "
                    "or its lease expires (check for a duplicate --worker-id)",
                    self._shard,
                    who,
                )
            # Look again soon: a clean stop releases the lease, and a standby
            # should take over within a second, not at the next expiry. A GET a
            # second per standby costs CouchDB nothing.
            remaining = float(current.get("expires_at", 0)) - self._clock()
            delay = min(max(remaining, 0.05), self.STANDBY_POLL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), timeout=delay)
        return False

    async def keep(self) -> None:
        """Renew every third of the TTL until cancelled; raise LeaseLost when it is lost."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            failing = False
            while True:
                try:
                    # Raises LeaseLost once the lease has expired unrenewed.
                    await self.renew()
                    break
                except CouchTransientError as e:
                    if not failing:
                        failing = True
                        log.warning("worker %s: lease renewal failed, retrying: %s", self._shard, e)
                    await asyncio.sleep(min(self.ttl / 10, 1.0))

    def ensure_held(self) -> None:
        """Raise LeaseLost once the lease's deadline has passed unrenewed."""
        if self._clock() >= self.expires_at:
            raise LeaseLost(
                f"worker {self._shard}: the lease expired before it could be renewed "
                "(the process was paused, or CouchDB unreachable); another process may "
                "have taken over"
            )

    async def renew(self) -> None:
        current: Mapping[str, Any] | None = {"_id": self.doc_id, "_rev": self._rev}
        while True:
            self.ensure_held()
            try:
                await self._write(current, started_at=self.started_at)
                break
            except DocumentConflict:
                pass
            # Not lost yet: an earlier attempt may have been applied and its
            # answer lost. Only another holder's run id says it was taken.
            current = await self._read()
            holder = None if current is None else current.get("run_id")
            if holder is not None and holder != self.holder.run_id:
                assert current is not None
                raise LeaseLost(
                    f"worker {self._shard}: another process took over the lease "
                    f"{self._database}/{self.doc_id} ({current.get('host')} pid "
                    f"{current.get('pid')})"
                )
        self.renewals += 1

    async def release(self) -> None:
        """Give the lease up, so a standby can take over at once.

        The document stays, marked released, so that when this slot last ran
        (and when it started) is still known after the stop.
        """
        if self._rev is None:
            return
        rev, self._rev = self._rev, None
        now = self._clock()
        doc: dict[str, Any] = {
            "_id": self.doc_id,
            "_rev": rev,
            "released_at": now,
            **self.holder.fields(),
            "worker_id": self._shard.worker_id,
            "worker_count": self._shard.worker_count,
            "started_at": self.started_at,
            "expires_at": now,
        }
        # A conflict means someone else holds it now: it is not ours to release.
        with contextlib.suppress(DocumentConflict):
            await self._couch.put_doc(self._database, doc)

    async def _read(self) -> Mapping[str, Any] | None:
        try:
            return await self._couch.get_doc(self._database, self.doc_id)
        except CouchFatalError as e:
            if not is_missing_database(e):
                raise
        # The first worker ever: the checkpoint database does not exist yet.
        await self._couch.create_database(self._database)
        return None

    async def _write(
        self, current: Mapping[str, Any] | None, *, started_at: float | None = None
    ) -> None:
        """Write the lease over ``current``; its ``_rev`` decides (DocumentConflict).

        ``started_at`` is kept from the first write; ``None`` means "now".
        """
        now = self._clock()
        if started_at is None:
            started_at = now
        doc: dict[str, Any] = {
            "_id": self.doc_id,
            "run_id": self.holder.run_id,
            **self.holder.fields(),
            "worker_id": self._shard.worker_id,
            "worker_count": self._shard.worker_count,
            "started_at": started_at,
            "expires_at": now + self.ttl,
            "renewed_at": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="seconds"),
        }
        if current is not None and current.get("_rev"):
            doc["_rev"] = current["_rev"]
        self._rev = await self._couch.put_doc(self._database, doc)
        self.expires_at = now + self.ttl
        self.started_at = started_at
