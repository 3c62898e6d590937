"""The worker: wires feed, shard filter, concurrency cap, handler, marking,
in-flight tracker and checkpoint store into one pipeline, and owns its lifecycle.

::

    _changes ─► shard filter ─► cap (max_parallel) ─► handler ─► mark doc ─► tracker ─► checkpoint

What it promises (see DESIGN.md):

* A change counts as done only once the handler delivered it *and* the
  document was marked, once it was dead-lettered, or once its deferral (a
  temporary failure, or a ``sendAt`` still ahead) is written on the document,
  from where :mod:`notifier.retries` finds it again when it is due. The
  checkpoint never passes a change that is not done, and never waits for a
  deferred message either.
* What happens to a message next is decided by :func:`notifier.lifecycle.decide`;
  how a delivery is attempted (outage gate, pace, reply classes) by
  :class:`notifier.delivery.Delivery`. This module carries their steps out.
* Every row moves the checkpoint once all rows before it are done, including
  rows it skips (another shard, design docs, tombstones, bare positions).
* At most ``max_parallel`` messages are in flight, and the feed is not read
  while that many are.
* A 409 while marking means someone else wrote the document: it is re-read and
  re-checked, never sent again. A document that shows up again while its first
  copy is still in flight waits for it and is then re-read.
* With claims on (the default), a message is claimed, with its ``_rev``,
  before it is sent, so that of two workers that see it (two layouts during
  a reshard) exactly one sends it; the other waits for it to be settled
  (see :mod:`notifier.claim`).
* Only the holder of the worker's lease (see :mod:`notifier.lease`) reads or
  sends anything; a second process for the same slot waits as a standby.
* Shutdown has one fixed order: stop reading, drain within ``drain_timeout``,
  cancel what is left, write the final checkpoint, release the lease. The
  caller closes the clients afterwards (async context managers it owns).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, ParamSpec, TypeVar

from notifier.backoff import Backoff
from notifier.breaker import OutageBreaker
from notifier.checkpoint import CheckpointStore
from notifier.claim import (
    CLAIM,
    Assessment,
    Claimant,
    ClaimPoller,
    Verdict,
    Watch,
    assess,
)
from notifier.couch import CouchClient, Doc, short_reason
from notifier.delivery import Abandoned, Delivery
from notifier.errors import (
    CouchFatalError,
    CouchTransientError,
    DocumentConflict,
    DocumentRefused,
    LeaseLost,
)
from notifier.feed import Change, ChangeFeed
from notifier.handler import Handler
from notifier.lease import Lease
from notifier.lifecycle import (
    FAILED,
    HISTORY,
    NOTIFIED,
    RECORD,
    RETRY,
    SELECTOR,
    Claim,
    Forget,
    Outcome,
    Send,
    Sent,
    Wait,
    Write,
    dead_letter_for_bug,
    dead_letter_instead,
    decide,
    is_settled,
)
from notifier.marker import BulkWriter
from notifier.pacing import DomainLimit, Pacer
from notifier.retries import ODD_LOOK_EVERY, DueMessages
from notifier.schedule import RetrySchedule
from notifier.shard import Shard
from notifier.tracker import InFlightTracker

log = logging.getLogger(__name__)

__all__ = [
    "FAILED",
    "HISTORY",
    "NOTIFIED",
    "RECORD",
    "RETRY",
    "SELECTOR",
    "Stats",
    "Worker",
    "WorkerSettings",
    "is_settled",
]

#: How many recently settled doc ids to remember. A row read from the feed
#: can describe a revision older than our mark (it sat in the socket buffer
#: while we sent and marked); such a doc is re-read before anything is sent.
#: The buffer holds far fewer rows than this.
RECENT_LIMIT = 10_000

#: Seconds between looks at a message while another worker holds its claim.
CLAIM_POLL = 0.5
#: Seconds a re-read after a lost claim race waits for others to join its request.
REREAD_DELAY = 0.02

#: Seconds the writes after the drain may take together at shutdown: queued
#: marks, the final checkpoint and the lease release. So a stop takes at most
#: drain_timeout plus this, plus closing connections (see stop_timeout).
FINAL_WRITES_TIMEOUT = 10.0
#: Of those, seconds kept for the lease release, so that a standby can take
#: over at once even when the checkpoint write was slow.
RELEASE_RESERVE = 2.0
#: Seconds for what follows: closing SMTP sessions (QUITs, at most 2 s, in
#: parallel) and HTTP connections, and the process's exit.
CLOSE_MARGIN = 5.0


def stop_timeout(drain_timeout: float) -> float:
    """The longest a stop may take: systemd's ``TimeoutStopSec`` must be at least this.

    >>> stop_timeout(30.0)
    45.0
    """
    return drain_timeout + FINAL_WRITES_TIMEOUT + CLOSE_MARGIN


#: Seconds between INFO lines about checkpoint writes.
CHECKPOINT_LOG_INTERVAL = 60.0

T = TypeVar("T")
P = ParamSpec("P")


class _ClaimLost(Exception):
    """Another worker took our claim over while we waited to retry."""


@dataclass(slots=True)
class _Claimed:
    """A message while it is delivered: its latest revision (the claim keeper
    renews it), and whether another worker has taken the claim over."""

    doc: Mapping[str, Any]
    lost: bool = False
    #: Once lost: the message as it was then (``None`` if deleted).
    fresh: Mapping[str, Any] | None = None


@dataclass(slots=True)
class Stats:
    """Live counters, for logs, ``__repr__`` and status lines."""

    sent: int = 0
    dead_lettered: int = 0
    #: Temporary failures written as deferrals; messages held for their sendAt.
    deferred: int = 0
    scheduled: int = 0
    skipped: int = 0
    conflicts: int = 0
    abandoned: int = 0
    #: Claims, marks or deferrals CouchDB refused for good (a validation function).
    unwritable: int = 0
    #: Claims lost to another worker's write (409), waits for another
    #: worker's claim, and claims taken over from a crashed worker.
    claim_conflicts: int = 0
    claim_waits: int = 0
    takeovers: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class WorkerSettings:
    """The knobs of one worker; validated by :mod:`notifier.config` or the caller."""

    database: str
    shard: Shard
    max_parallel: int = 10
    checkpoint_interval: float = 5.0
    drain_timeout: float = 30.0
    heartbeat: float = 10.0
    resync_after: float = 60.0
    # When temporary failures are retried, and when given up.
    schedule: RetrySchedule = field(default_factory=RetrySchedule)
    # Seconds between looks for due deferred messages.
    scan_interval: float = 30.0
    # Pacing: this worker's share of [smtp] max_rate, and per-domain limits.
    max_rate: float | None = None
    domains: Mapping[str, DomainLimit] = field(default_factory=dict)
    throttle_hold: float = 60.0
    # The outage breaker (see notifier.breaker).
    outage_recipients: int = 10
    outage_window: float = 60.0
    probe_first: float = 5.0
    probe_max: float = 120.0
    # Unexpected errors in a row that stop the worker (exit 70).
    crash_limit: int = 10
    # Backoff between CouchDB retries (requests and feed reconnects), in
    # seconds: first delay, and ceiling.
    couch_retry_base: float = 0.5
    couch_retry_cap: float = 30.0
    mark_batch_size: int = 100
    mark_batch_delay: float = 0.05
    # Claim each message before sending it (see notifier.claim).
    claims: bool = True
    claim_ttl: float = 120.0

    def __post_init__(self) -> None:
        if self.max_parallel < 1:
            raise ValueError(f"max_parallel must be at least 1, got {self.max_parallel}")
        if self.scan_interval <= 0:
            raise ValueError(f"scan_interval must be positive, got {self.scan_interval}")


class Worker:
    """One worker process's pipeline. ``await run()``; call ``stop()`` from anywhere."""

    def __init__(
        self,
        *,
        couch: CouchClient,
        handler: Handler,
        checkpoints: CheckpointStore,
        settings: WorkerSettings,
        lease: Lease | None = None,
    ) -> None:
        self._couch = couch
        self._lease = lease
        self._handler = handler
        self._checkpoints = checkpoints
        self.settings = s = settings
        self.feed = ChangeFeed(
            couch,
            database=s.database,
            selector=SELECTOR,
            heartbeat=s.heartbeat,
            resync_after=s.resync_after,
            backoff=Backoff(base=s.couch_retry_base, cap=s.couch_retry_cap),
            # Ready (for systemd and tests) once the lease and checkpoint are
            # taken and the feed is connected.
            on_connect=self._on_feed_connected,
        )
        # Marks go out in _bulk_docs batches. A batch is sent at once when every
        # message in flight is waiting in it: no more can join soon.
        self._writer = BulkWriter(
            couch,
            database=s.database,
            max_batch=s.mark_batch_size,
            max_delay=s.mark_batch_delay,
            waiting_for=lambda: len(self._tasks),
        )
        self.claimant = Claimant.this_process(str(s.shard), s.claim_ttl) if s.claims else None
        self._poller = ClaimPoller(couch, database=s.database)
        self._stopping = asyncio.Event()
        self.delivery = Delivery(
            handler,
            pacer=Pacer(rate=s.max_rate, domains=s.domains),
            breaker=OutageBreaker(
                recipients=s.outage_recipients,
                window=s.outage_window,
                probe_first=s.probe_first,
                probe_max=s.probe_max,
            ),
            stopping=self._stopping,
            throttle_hold=s.throttle_hold,
            crash_limit=s.crash_limit,
        )
        self.delivery.on_delivered = self._delivered
        self._due = DueMessages(couch, database=s.database, shard=s.shard)
        self.tracker = InFlightTracker()
        self.stats = Stats()
        self.ready = asyncio.Event()
        #: "starting", "standby" (waiting for the lease), "running", "draining", "stopped"
        self.phase = "starting"
        #: Seconds an accepted email took to deliver; set by the metrics, if any.
        self.on_delivered: Callable[[float], None] | None = None
        # monotonic time of the last checkpoint pass that left nothing unsaved
        self.checkpoint_ok_at = time.monotonic()
        self._checkpoint_logged_at = -CHECKPOINT_LOG_INTERVAL
        self._slots = asyncio.Semaphore(s.max_parallel)
        self._tasks: set[asyncio.Task[None]] = set()
        self._active: dict[str, asyncio.Event] = {}
        self._recent: OrderedDict[str, None] = OrderedDict()
        self._wake = asyncio.Event()
        self._fatal: BaseException | None = None
        self._saved_arrival = 0
        #: Event-loop time by which the stop's final writes must be done.
        self._writes_deadline: float | None = None
        self._couch_down_since: float | None = None

    def __repr__(self) -> str:
        st = self.stats
        return (
            f"<Worker {self.settings.shard} in_flight={len(self._tasks)} sent={st.sent} "
            f"dead_lettered={st.dead_lettered} deferred={st.deferred} skipped={st.skipped} "
            f"checkpoint_writes={self._checkpoints.writes}>"
        )

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    @property
    def lease_held(self) -> bool:
        """Whether this process holds its slot's lease now."""
        return self._lease is not None and self._lease.held

    @property
    def standing_by(self) -> str | None:
        """While a standby: who holds this worker's lease ("HOST pid N")."""
        if self.phase != "standby" or self._lease is None:
            return None
        return self._lease.standing_by

    def status_line(self) -> str:
        """One line of live counts (systemd's STATUS=, logs)."""
        if (holder := self.standing_by) is not None:
            return (
                f"standby: worker {self.settings.shard} runs on {holder}; "
                "taking over when it stops or its lease expires"
            )
        st = self.stats
        feed = "connected" if self.feed.connected else "disconnected"
        paused = ", relay paused" if self.delivery.paused else ""
        return (
            f"{self.phase}: {st.sent} sent, {st.deferred} deferred, "
            f"{st.dead_lettered} dead-lettered, {self.in_flight} in flight, feed {feed}{paused}"
        )

    def _delivered(self, seconds: float) -> None:
        if self.on_delivered is not None:
            self.on_delivered(seconds)

    def _on_feed_connected(self) -> None:
        if not self.ready.is_set():
            self.ready.set()
            log.info("worker %s: changes feed connected; running", self.settings.shard)

    @property
    def stopping(self) -> bool:
        """Whether the worker was asked to stop or is stopping on a fatal error."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Ask the worker to shut down; safe to call any number of times."""
        self._stopping.set()
        self._wake.set()

    # -- lifecycle ---------------------------------------------------------

    async def run(self) -> None:
        """Follow the feed until :meth:`stop`; then shut down in order.

        Raises the first fatal error (CouchDB auth, missing database, SMTP
        login, the lease lost) after the same orderly shutdown.
        """
        # Fail fast, and with a clear message, on a wrong URL, credentials or
        # database name, before anything else is read or written.
        await self._couch.database_info(self.settings.database)
        if self._lease is None:
            await self._run([])
            return
        self.phase = "standby"
        if not await self._lease.acquire(self._stopping):
            return  # stopped while waiting as a standby
        # Renewed from the moment it is taken: reading the checkpoint and an
        # SMTP login can outlast the lease.
        keeper = asyncio.create_task(self._lease.keep())
        keeper.add_done_callback(self._on_background_done)
        try:
            await self._run([keeper])
        finally:
            keeper.cancel()
            await asyncio.gather(keeper, return_exceptions=True)
            # 5. Give up the lease last, so a standby starts from our final
            # checkpoint; within what is left of the stop's budget.
            deadline = self._writes_deadline or asyncio.get_running_loop().time() + RELEASE_RESERVE
            try:
                async with asyncio.timeout_at(deadline):
                    await self._lease.release()
            except Exception as e:
                log.warning(
                    "worker %s: lease not released (%s); it expires by itself",
                    self.settings.shard,
                    e,
                )

    async def _start_up(self) -> object:
        """Read the checkpoint and check the handler; return where to start."""
        s = self.settings
        # Read only now: while this process waited for the lease, the previous
        # holder may have moved the checkpoint.
        since = await self._checkpoints.load()
        if since is None:
            log.info("worker %s: no checkpoint yet; starting from the beginning", s.shard)
        else:
            log.info("worker %s: resuming from checkpoint %r", s.shard, since)
        await self._due.prepare()
        await self.delivery.check()
        return 0 if since is None else since

    async def _run(self, timers: list[asyncio.Task[None]]) -> None:
        # A stop, or the lease lost, while starting up ends the start-up.
        start = asyncio.ensure_future(self._start_up())
        woken = asyncio.ensure_future(self._wake.wait())
        await asyncio.wait({start, woken}, return_when=asyncio.FIRST_COMPLETED)
        woken.cancel()
        if not start.done():
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
        if self._fatal is not None:
            raise self._fatal
        since = start.result()  # a start-up error propagates: fail fast
        if self._stopping.is_set():
            return
        follower = asyncio.create_task(self._intake(since))
        # The lease keeper (given) stops with the checkpoint timer, and the
        # lease is released after the final checkpoint.
        checkpointer = asyncio.create_task(self._checkpoint_timer())
        for task in (follower, checkpointer):
            task.add_done_callback(self._on_background_done)
        timers = [checkpointer, *timers]
        self.phase = "running"
        try:
            await self._wake.wait()
        finally:
            await self._shutdown(follower, timers)
        if self._fatal is not None:
            raise self._fatal

    async def _shutdown(
        self, follower: asyncio.Task[None], timers: list[asyncio.Task[None]]
    ) -> None:
        s = self.settings
        # 1. Stop intake.
        self.phase = "draining"
        follower.cancel()
        await asyncio.gather(follower, return_exceptions=True)
        # 2. Drain what is in flight, within the deadline.
        if self._tasks:
            log.info(
                "worker %s: draining %d in-flight messages (deadline %gs)",
                s.shard,
                len(self._tasks),
                s.drain_timeout,
            )
            _, pending = await asyncio.wait(set(self._tasks), timeout=s.drain_timeout)
            # 3. Cancel what the deadline left; it was not marked, so it is
            # not done, and the checkpoint stays before it.
            if pending:
                log.warning(
                    "worker %s: drain deadline of %gs passed; %d messages were interrupted "
                    "and will be sent again after a restart",
                    s.shard,
                    s.drain_timeout,
                    len(pending),
                )
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
        await self._poller.aclose()
        for timer in timers:
            timer.cancel()
        await asyncio.gather(*timers, return_exceptions=True)
        # The writes after the drain share one deadline, so that a slow
        # CouchDB cannot stretch the stop past systemd's TimeoutStopSec.
        self._writes_deadline = asyncio.get_running_loop().time() + FINAL_WRITES_TIMEOUT
        try:
            # Marks already queued still go out (they cost no email), then
            # 4. the final checkpoint.
            async with asyncio.timeout_at(self._writes_deadline - RELEASE_RESERVE):
                await self._writer.aclose()
                await self._save_checkpoint()
        except TimeoutError:
            log.error(
                "worker %s: queued marks and the final checkpoint not written within %gs; "
                "the next start resumes from the previous checkpoint",
                s.shard,
                FINAL_WRITES_TIMEOUT - RELEASE_RESERVE,
            )
        except Exception as e:
            log.error(
                "worker %s: final checkpoint not written (%s: %s); the next start resumes "
                "from the previous one",
                s.shard,
                type(e).__name__,
                e,
            )
        self.phase = "stopped"
        st = self.stats
        log.info(
            "worker %s stopped: sent %d, deferred %d, scheduled %d, dead-lettered %d, "
            "skipped %d, throttled %d, relay paused %d times, "
            "claims lost %d, waited for %d, taken over %d, "
            "couch_requests=%d checkpoint_writes=%d checkpoint=%r",
            s.shard,
            st.sent,
            st.deferred,
            st.scheduled,
            st.dead_lettered,
            st.skipped,
            self.delivery.throttled,
            self.delivery.breaker.opened,
            st.claim_conflicts,
            st.claim_waits,
            st.takeovers,
            self._couch.requests,
            self._checkpoints.writes,
            self._checkpoints.saved,
        )

    def _may_send(self) -> bool:
        """Whether a new send may start: never after a fatal error (the lease
        lost above all), nor on a lease whose deadline passed unrenewed."""
        if self._fatal is None and self._lease is not None:
            try:
                self._lease.ensure_held()
            except LeaseLost as e:
                self._fail(e)
        return self._fatal is None

    def _fail(self, error: BaseException) -> None:
        if self._fatal is None:
            self._fatal = error
            log.error("worker %s: stopping on a fatal error: %s", self.settings.shard, error)
        self._stopping.set()
        self._wake.set()

    def _on_background_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._fail(task.exception())  # type: ignore[arg-type]

    def _on_message_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._on_background_done(task)

    # -- intake --------------------------------------------------------------

    async def _intake(self, since: object) -> None:
        """Take in work until cancelled: the feed's rows, and deferred messages as
        they come due. Both stop together, first, at shutdown; the first error
        of either is raised."""
        sources = [
            asyncio.create_task(self._follow(since)),
            asyncio.create_task(self._look_for_due()),
        ]
        try:
            done, _ = await asyncio.wait(sources, return_when=asyncio.FIRST_EXCEPTION)
            for source in done:
                source.result()
        finally:
            for source in sources:
                source.cancel()
            await asyncio.gather(*sources, return_exceptions=True)

    async def _follow(self, since: object) -> None:
        rows = self.feed.follow(since)
        try:
            while True:
                # Take a slot *before* reading: while max_parallel messages are
                # in flight the feed is not read at all, so the backlog stays
                # on the server and memory does not grow with it.
                await self._slots.acquire()
                try:
                    change = await anext(rows)
                except BaseException:
                    self._slots.release()
                    raise
                if not self._wanted(change):
                    self._slots.release()
                    self.tracker.add_done(change.seq)
                    continue
                arrival = self.tracker.add(change.seq)
                assert change.doc_id is not None
                self._start(self._handle(change.doc_id, change.doc, arrival))
        finally:
            await rows.aclose()

    def _start(self, work: Coroutine[Any, Any, None]) -> None:
        """Run one message's work (its slot already taken) as a tracked task."""
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._on_message_done)

    async def _look_for_due(self) -> None:
        """Every ``scan_interval``, and once at start, take in this shard's deferred
        messages that are due. Like the feed, it waits for a free slot per message."""
        failing_since: float | None = None
        odd_looked_at = float("-inf")
        while True:
            # Paused, they would only wait at the gate; but with nothing in
            # flight no message would ever probe the relay, so take them in.
            if not self.delivery.paused or not self._tasks:
                try:
                    await self._take_in(self._due.due(time.time()))
                    if time.monotonic() - odd_looked_at >= ODD_LOOK_EVERY:
                        await self._take_in(self._due.odd())
                        odd_looked_at = time.monotonic()
                except CouchTransientError as e:
                    if failing_since is None:
                        failing_since = time.monotonic()
                        log.warning("cannot look for due deferred messages for now: %s", e)
                else:
                    if failing_since is not None:
                        log.info(
                            "looking for due deferred messages works again after %.1fs",
                            time.monotonic() - failing_since,
                        )
                        failing_since = None
            await asyncio.sleep(self.settings.scan_interval)

    async def _take_in(self, pages: AsyncIterator[list[Doc]]) -> None:
        """Start each message of ``pages`` not already in flight, a slot at a time."""
        async for page in pages:
            for doc in page:
                doc_id = str(doc["_id"])
                if doc_id in self._active:
                    continue
                await self._slots.acquire()
                self._start(self._handle(doc_id, doc, None))

    def _wanted(self, change: Change) -> bool:
        """Whether a row is this worker's work; everything else only moves the checkpoint."""
        doc_id = change.doc_id
        if doc_id is None:
            return False  # a bare position (last_seq)
        if change.deleted or doc_id.startswith("_design/") or not self.settings.shard.owns(doc_id):
            self.stats.skipped += 1
            return False
        if change.doc is not None and is_settled(change.doc):
            self.stats.skipped += 1
            return False
        # The echo of our own claim is not wanted: the message is in flight
        # here, or done, or (given up at a stop) still ahead of the checkpoint.
        return change.doc is None or self.claimant is None or not self.claimant.owns(change.doc)

    # -- one message -----------------------------------------------------------

    async def _handle(
        self, doc_id: str, doc: Mapping[str, Any] | None, arrival: int | None
    ) -> None:
        """Settle one message, from a feed row (``arrival``) or a look for due ones."""
        try:
            waited = False
            # The same document may come again while its first copy is in
            # flight (a user edit, a replayed feed). Wait for that one and
            # look at the document afresh rather than send it twice.
            while (earlier := self._active.get(doc_id)) is not None:
                await earlier.wait()
                waited = True
            done = asyncio.Event()
            self._active[doc_id] = done
            try:
                if waited:
                    # Most likely settled by now; during an overlap many
                    # rows wait like this, so they are re-read in batches.
                    doc = await self._look_again(doc_id, within=REREAD_DELAY)
                elif doc is None or doc_id in self._recent:
                    doc = await self._couch_call(
                        self._couch.get_doc, self.settings.database, doc_id
                    )
                await self._settle(doc_id, doc)
            finally:
                del self._active[doc_id]
                done.set()
            if arrival is not None:
                self.tracker.complete(arrival)
        except Abandoned:
            self.stats.abandoned += 1
        finally:
            self._slots.release()

    async def _settle(self, doc_id: str, doc: Mapping[str, Any] | None) -> None:
        """Carry out :func:`notifier.lifecycle.decide`'s steps until the message is
        settled, deferred or someone else's."""
        claims = self.claimant is not None
        watch: Watch | None = None
        outcome: Outcome | None = None
        while True:
            verdict = None
            if claims and outcome is None and doc is not None and not is_settled(doc):
                verdict, watch = self._judge(doc, watch)
            try:
                step = decide(
                    doc,
                    now=time.time(),
                    schedule=self.settings.schedule,
                    worker=str(self.settings.shard),
                    claim=verdict,
                    outcome=outcome,
                )
            except Exception as e:
                log.exception("message %s: unexpected error deciding what to do", doc_id)
                self.delivery.crashes += 1
                step = dead_letter_for_bug(e, now=time.time(), worker=str(self.settings.shard))
            if isinstance(step, Forget):
                self.stats.skipped += 1
                log.debug("message %s: nothing to do: %s", doc_id, step.reason)
                return
            assert doc is not None
            if isinstance(step, Wait):
                self.stats.claim_waits += 1
                log.debug("message %s: %s; waiting for it", doc_id, step.reason)
                doc = await self._look_again(doc_id, within=CLAIM_POLL)
            elif isinstance(step, Claim):
                try:
                    # A takeover gets one try: if CouchDB cannot take this
                    # write, the holder may not have been able to renew or
                    # mark either, so the count starts again.
                    claimed = await self._claim(doc, retry=not step.takeover)
                except DocumentConflict:
                    # Another worker claimed or settled it first, or a user
                    # edited it (the row may also have been an old one).
                    # Re-read in a batch with the others that lost a race:
                    # during an overlap that is half of them.
                    self.stats.claim_conflicts += 1
                    doc = await self._look_again(doc_id, within=REREAD_DELAY)
                    continue
                except CouchTransientError:
                    # Only a one-shot takeover gets here. After a claim that
                    # lapsed on our watch, the count starts again; one left by
                    # a process known to be gone is simply tried again.
                    if watch is not None:
                        watch.restart()
                    doc = await self._look_again(doc_id, within=CLAIM_POLL)
                    continue
                except DocumentRefused as e:
                    # Never sent: we could not say we are sending it.
                    self._refused(doc_id, "claim", e)
                    return
                if claimed is None:
                    claims = False  # the server takes no claim on this doc
                    continue
                if step.takeover:
                    # Counted once the claim is ours: the row may have shown a
                    # claim that its holder has long since settled.
                    self.stats.takeovers += 1
                    log.info("message %s: took the claim over: %s", doc_id, step.reason)
                doc = claimed
            elif isinstance(step, Send):
                holder = _Claimed(doc)
                try:
                    outcome = await self._deliver_claimed(holder)
                except _ClaimLost:
                    doc, watch = holder.fresh, None
                    continue
                if isinstance(outcome, Sent):
                    self.stats.sent += 1  # accepted by the relay, whatever the mark meets
                doc = holder.doc
            else:
                await self._record(doc, step)
                return

    def _judge(
        self, doc: Mapping[str, Any], watch: Watch | None
    ) -> tuple[Assessment, Watch | None]:
        """The verdict on ``doc``'s claim; a held claim that stayed unchanged for a
        whole ttl (timed here, on our own clock) counts as abandoned."""
        assert self.claimant is not None
        verdict = assess(doc, self.claimant)
        if verdict.verdict is not Verdict.HELD:
            return verdict, watch
        claim = doc[CLAIM]
        watch = watch or Watch.of(claim, self.claimant.ttl, poll=CLAIM_POLL)
        if not watch.lapsed(claim, time.monotonic()):
            return verdict, watch
        reason = f"{verdict.reason} stayed unchanged for {watch.window:g}s"
        return Assessment(Verdict.ABANDONED, reason), watch

    async def _look_again(self, doc_id: str, *, within: float) -> Mapping[str, Any] | None:
        """The doc as of the next poll; given up at once when the worker stops,
        since nothing of ours is in flight for it."""
        read = asyncio.ensure_future(self._couch_call(self._poller.read, doc_id, within=within))
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            await asyncio.wait({read, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not read.done():
                read.cancel()
        if not read.done() or read.cancelled():
            raise Abandoned
        return read.result()

    async def _claim(
        self, doc: Mapping[str, Any], *, retry: bool = True
    ) -> Mapping[str, Any] | None:
        """Write our claim onto ``doc`` with its ``_rev``; return the claimed doc, or
        None when the server refuses the claim's fields on this doc (400, 413).

        Raises DocumentConflict when the doc changed since it was read,
        DocumentRefused when a validation function refuses it, and with
        ``retry=False`` CouchTransientError when CouchDB cannot take it.
        """
        try:
            if not retry:
                return await self._write_claim(doc)
            return await self._couch_call(self._write_claim, doc)
        except CouchFatalError as e:
            if e.status not in (400, 413):
                raise
            # The server refuses our fields on this doc (too large): the mark
            # may be refused too. Send it unclaimed, as without claims, rather
            # than stall the shard.
            log.error("message %s cannot be claimed: %s; sending it unclaimed", doc["_id"], e)
            return None

    async def _write_claim(self, doc: Mapping[str, Any]) -> Mapping[str, Any]:
        # Stamped at each try, so that a claim retried through an outage is
        # not already old when it lands.
        assert self.claimant is not None
        claimed = {**doc, CLAIM: self.claimant.claim(time.time())}
        return {**claimed, "_rev": await self._writer.write(claimed)}

    async def _deliver_claimed(self, claimed: _Claimed) -> Outcome:
        """Attempt delivery while a keeper renews our claim every third of its ttl."""
        if self.claimant is None or not self.claimant.owns(claimed.doc):
            return await self.delivery.attempt(claimed.doc, may_send=self._may_send)
        every = self.claimant.ttl / 3
        keeper: asyncio.Task[None] | None = None

        def start_keeper() -> None:
            nonlocal keeper
            keeper = asyncio.create_task(self._keep_claim(claimed, every))

        # Most sends end long before the first renewal is due: a timer costs
        # them less than a task.
        timer = asyncio.get_running_loop().call_later(every, start_keeper)
        try:
            return await self.delivery.attempt(
                claimed.doc, may_send=lambda: not claimed.lost and self._may_send()
            )
        except Abandoned:
            if claimed.lost:
                raise _ClaimLost from None
            raise
        finally:
            timer.cancel()
            if keeper is not None:
                keeper.cancel()
                await asyncio.gather(keeper, return_exceptions=True)

    async def _keep_claim(self, claimed: _Claimed, every: float) -> None:
        """Renew the claim now and every ``every`` seconds until cancelled; on
        losing it, set ``claimed.lost``."""
        while True:
            try:
                renewed = await self._claim(claimed.doc)
                if renewed is not None:
                    claimed.doc = renewed
                await asyncio.sleep(every)
                continue
            except DocumentConflict:
                pass
            fresh = await self._couch_call(
                self._couch.get_doc, self.settings.database, claimed.doc["_id"]
            )
            assert self.claimant is not None
            if (
                fresh is not None
                and not is_settled(fresh)
                and assess(fresh, self.claimant).verdict in (Verdict.MINE, Verdict.FREE)
            ):
                claimed.doc = fresh  # a user's edit: keep it, claim on top of it
                continue
            # Another worker took the claim over (we could not renew it for a
            # whole ttl), or the message was settled or deleted meanwhile.
            self.stats.claim_conflicts += 1
            log.warning(
                "message %s: our claim was taken over or the message settled while we "
                "worked on it; not sending it again",
                claimed.doc["_id"],
            )
            claimed.fresh, claimed.lost = fresh, True
            return

    async def _record(self, doc: Mapping[str, Any], write: Write) -> None:
        """Write an outcome onto the doc (and drop our claim); on 409 re-read and
        write it on the fresh doc, keeping a user's edit; never resend."""
        database, doc_id = self.settings.database, doc["_id"]
        current: Mapping[str, Any] = doc
        asked, bare = write, False
        while True:
            try:
                await self._couch_call(self._writer.write, write.apply(current))
                break
            except DocumentConflict:
                self.stats.conflicts += 1
            except (CouchFatalError, DocumentRefused) as e:
                if isinstance(e, CouchFatalError) and e.status not in (400, 413):
                    raise  # auth, permissions, a missing database: stop the worker
                if not bare:
                    # Try the bare outcome, without our record: smaller than
                    # the claim the server took, and what applications read.
                    # An unmarked message keeps its claim, and another
                    # layout would send it again once the claim lapses.
                    bare, write = True, write.bare()
                    log.warning(
                        "message %s: the server refused our %s mark (%s); writing the bare one",
                        doc_id,
                        write.kind,
                        short_reason(e),
                    )
                    continue
                if write.kind in ("deferred", "scheduled"):
                    # Not written, a deferral is found by nobody: a dead letter
                    # at least shows, and can be requeued once CouchDB takes it.
                    self._refused(doc_id, write.kind, e)
                    write = dead_letter_instead(
                        asked, short_reason(e), now=time.time(), worker=str(self.settings.shard)
                    )
                    continue
                self._refused(doc_id, write.kind, e)
                return
            fresh = await self._couch_call(self._couch.get_doc, database, doc_id)
            if fresh is None:
                log.info("message %s was deleted while in flight; nothing to mark", doc_id)
                return
            if is_settled(fresh):
                log.info("message %s was marked by someone else meanwhile", doc_id)
                return
            if write.kind in ("deferred", "scheduled") and self._claimed_by_another(fresh):
                # Another worker took it up meanwhile: it decides now; our
                # deferral must not take its claim away.
                log.info("message %s was claimed by another worker meanwhile", doc_id)
                return
            # The user edited it while we were working: keep their edit, add our mark.
            current = fresh
        self._count(doc_id, write)

    def _claimed_by_another(self, doc: Mapping[str, Any]) -> bool:
        return CLAIM in doc and (self.claimant is None or not self.claimant.owns(doc))

    def _count(self, doc_id: str, write: Write) -> None:
        st = self.stats
        if write.kind == "sent":
            self._remember(doc_id)
            log.debug("message %s delivered and marked", doc_id)
        elif write.kind == "dead":
            st.dead_lettered += 1
            self._remember(doc_id)
            log.warning("message %s dead-lettered: %s", doc_id, write.detail)
        elif write.kind == "deferred":
            st.deferred += 1
            log.info("message %s deferred until %s: %s", doc_id, _due_at(write), write.detail)
        else:
            st.scheduled += 1
            log.debug("message %s scheduled for %s", doc_id, _due_at(write))

    def _refused(self, doc_id: str, what: str, error: CouchFatalError | DocumentRefused) -> None:
        """CouchDB will not let us write ``what`` on this document, for good."""
        self.stats.unwritable += 1
        if what == "claim":
            consequence = "it is not sent"
        elif what == "sent":
            consequence = "it was delivered and counts as done"
        elif what in ("deferred", "scheduled"):
            consequence = "writing a dead letter instead, so that it shows and can be requeued"
        else:
            consequence = f"its {what} outcome is not recorded; it counts as done"
        log.error(
            "message %s: CouchDB refused our %s (%s); %s. The shard goes on.",
            doc_id,
            what,
            short_reason(error),
            consequence,
        )

    def _remember(self, doc_id: str) -> None:
        self._recent[doc_id] = None
        if len(self._recent) > RECENT_LIMIT:
            self._recent.popitem(last=False)

    async def _couch_call(
        self, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run a CouchDB request, retrying transient failures until it works.

        A message that was sent must be marked, so this does not give up; the
        drain deadline is what bounds it at shutdown.
        """
        backoff: Backoff | None = None
        while True:
            try:
                result = await call(*args, **kwargs)
            except CouchTransientError as e:
                if self._couch_down_since is None:
                    self._couch_down_since = time.monotonic()
                    log.warning("CouchDB request failed: %s; retrying with backoff", e)
                s = self.settings
                backoff = backoff or Backoff(base=s.couch_retry_base, cap=s.couch_retry_cap)
                await asyncio.sleep(backoff.next_delay())
                continue
            if self._couch_down_since is not None:
                log.info(
                    "CouchDB requests succeed again after %.1fs",
                    time.monotonic() - self._couch_down_since,
                )
                self._couch_down_since = None
            return result

    # -- checkpoints -------------------------------------------------------------

    async def _checkpoint_timer(self) -> None:
        failing_since: float | None = None
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval)
            try:
                await self._save_checkpoint()
            except CouchTransientError as e:
                # Once per incident: an outage is one story, not one per tick.
                if failing_since is None:
                    failing_since = time.monotonic()
                    log.warning("checkpoint not written, will keep trying: %s", e)
                continue
            if failing_since is not None:
                log.info("checkpoint written again after %.1fs", time.monotonic() - failing_since)
                failing_since = None

    async def _save_checkpoint(self) -> None:
        """Write the checkpoint if it moved (arrival numbers tell; seqs are never compared)."""
        arrival = self.tracker.checkpoint_arrival
        seq = self.tracker.checkpoint
        if seq is not None and arrival != self._saved_arrival:
            await self._checkpoints.save(seq)
            self._saved_arrival = arrival
            now = time.monotonic()
            # A lifecycle line with counts, at most once a minute; every
            # write at DEBUG.
            if now - self._checkpoint_logged_at >= CHECKPOINT_LOG_INTERVAL:
                self._checkpoint_logged_at = now
                log.info(
                    "worker %s: checkpoint %r; %s", self.settings.shard, seq, self.status_line()
                )
            else:
                log.debug("checkpoint %r written", seq)
        self.checkpoint_ok_at = time.monotonic()


def _due_at(write: Write) -> str:
    return str(write.set[RETRY].get("dueAt"))
