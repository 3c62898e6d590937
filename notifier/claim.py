"""Claims: which worker sends a message, decided by CouchDB's MVCC.

While two layouts (worker counts) run side by side during a reshard, every
message belongs to one worker of each layout, and both see it on the feed.
Before sending, a worker therefore *claims* the message: it writes a
``notificationClaim`` field into the document, with the ``_rev`` it read.
Of two workers that try at once, CouchDB accepts one write and answers the
other with a 409; the loser re-reads the document, finds the winner's claim,
and waits until the document is settled. The mark that records the outcome
removes the claim.

The holder renews its claim every third of ``claim_ttl`` for as long as it
works on the message (sends, waits between retries), so a live holder's
claim keeps changing. A claim left behind by a worker that crashed is taken
over:

* at once by a later run of the *same* worker slot (the slot's lease makes
  sure the earlier run is gone), or when the claim's process is known to be
  gone (it ran in this pid namespace of this boot and no longer exists; see
  :mod:`notifier.process`);
* by any other worker once it has seen the claim unchanged for a whole
  ``claim_ttl`` (:class:`Watch`), on its own monotonic clock, in looks no
  more than a few seconds apart. Neither host's wall clock matters, and a
  CouchDB outage, which stops the holder's renewals, restarts the count
  instead of running it out.

``expires_at`` in the claim is for people: when it lapses unless renewed.

The claim is an extra write per message, but it goes out in the same
``_bulk_docs`` batches as the marks (:class:`~notifier.marker.BulkWriter`).
The decisions about a claim (:func:`assess`, :class:`Watch`) are pure;
:class:`ClaimPoller` re-reads the documents that other workers claimed, many
per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from notifier import process
from notifier.couch import CouchClient, Doc
from notifier.process import Alive, process_alive

#: The document field that holds a claim.
CLAIM = "notificationClaim"


class Verdict(enum.Enum):
    """What a worker may do with a message, given the claim it carries."""

    #: No claim (or a malformed one): claim it.
    FREE = "free"
    #: Our own claim.
    MINE = "mine"
    #: Someone else's claim whose holder is known to be gone: take it over.
    ABANDONED = "abandoned"
    #: Someone else's claim: wait until the message is settled, or until the
    #: claim has stayed unchanged for a whole ttl (:class:`Watch`).
    HELD = "held"


@dataclass(frozen=True, slots=True)
class Assessment:
    verdict: Verdict
    #: Why, in words, for logs (who held the claim, and why it no longer counts).
    reason: str


@dataclass(frozen=True, slots=True)
class Claimant:
    """This process, as one worker slot: what it writes into a claim."""

    worker: str
    run_id: str
    host: str
    pid: int
    ttl: float
    #: Where ``pid`` is valid and when it started (see :mod:`notifier.process`).
    scope: str | None = None
    start: int | None = None

    @classmethod
    def this_process(cls, worker: str, ttl: float) -> Claimant:
        if ttl <= 0:
            raise ValueError(f"claim ttl must be positive, got {ttl}")
        me = process.identity()
        return cls(
            worker=worker,
            run_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=me["pid"],
            ttl=ttl,
            scope=me["pid_scope"],
            start=me["pid_start"],
        )

    def claim(self, now: float) -> dict[str, Any]:
        """The claim field's value, written (or renewed) at ``now`` (epoch seconds)."""
        return {
            "worker": self.worker,
            "run": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "pid_scope": self.scope,
            "pid_start": self.start,
            "ttl": self.ttl,
            "claimedAt": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds"),
            "expires_at": round(now + self.ttl, 3),
        }

    def owns(self, doc: Mapping[str, Any]) -> bool:
        """Whether ``doc`` carries a claim written by this very run."""
        claim = doc.get(CLAIM)
        return isinstance(claim, Mapping) and claim.get("run") == self.run_id


def assess(doc: Mapping[str, Any], me: Claimant, *, alive: Alive = process_alive) -> Assessment:
    """What ``me`` may do with the unsettled message ``doc``.

    >>> me = Claimant(worker="0/3", run_id="r2", host="h1", pid=7, ttl=60.0, scope="s1")
    >>> assess({}, me).verdict
    <Verdict.FREE: 'free'>
    >>> theirs = {"worker": "1/2", "run": "r1", "host": "h2", "pid": 5, "expires_at": 100.0}
    >>> assess({CLAIM: theirs}, me)
    Assessment(verdict=<Verdict.HELD: 'held'>, reason='claimed by worker 1/2 (h2 pid 5)')
    >>> assess({CLAIM: {**theirs, "worker": "0/3"}}, me).reason
    'the claim was left by an earlier run of this worker (h2 pid 5)'
    >>> gone = {**theirs, "pid_scope": "s1"}
    >>> assess({CLAIM: gone}, me, alive=lambda pid, start: False).reason
    'the process of worker 1/2 (h2 pid 5) is gone'
    >>> assess({CLAIM: {**theirs, "host": "h1"}}, me, alive=lambda pid, start: False).verdict
    <Verdict.HELD: 'held'>
    >>> assess({CLAIM: {**theirs, "run": "r2"}}, me).verdict
    <Verdict.MINE: 'mine'>
    >>> assess({CLAIM: "?"}, me).reason
    'the claim is malformed'
    """
    claim = doc.get(CLAIM)
    if claim is None:
        return Assessment(Verdict.FREE, "no claim")
    if not isinstance(claim, Mapping) or not isinstance(claim.get("run"), str):
        return Assessment(Verdict.FREE, "the claim is malformed")
    if claim["run"] == me.run_id:
        return Assessment(Verdict.MINE, "our claim")
    who = f"{claim.get('host')} pid {claim.get('pid')}"
    if claim.get("worker") == me.worker:
        return Assessment(
            Verdict.ABANDONED, f"the claim was left by an earlier run of this worker ({who})"
        )
    holder = f"worker {claim.get('worker')} ({who})"
    if process.is_gone(claim, here=me.scope, alive=alive):
        return Assessment(Verdict.ABANDONED, f"the process of {holder} is gone")
    return Assessment(Verdict.HELD, f"claimed by {holder}")


@dataclass(slots=True)
class Watch:
    """A waiting worker's view of another worker's claim on one message.

    ``lapsed(claim, now)`` is called at each look (``now`` monotonic); it is
    true once the same claim has been seen unchanged for ``window`` seconds,
    in looks no more than ``max_gap`` apart. A live holder renews its claim
    every third of its ttl, so its claim never stays unchanged that long. A
    longer gap between looks (this worker could not read CouchDB, so the
    holder may not have been able to write either) starts the count again.

    >>> watch = Watch(window=10.0, max_gap=3.0)
    >>> claim = {"run": "r1", "claimedAt": "t0"}
    >>> [watch.lapsed(claim, t) for t in (0.0, 2.0, 4.0, 6.0, 8.0, 10.0)]
    [False, False, False, False, False, True]
    >>> watch.lapsed({"run": "r1", "claimedAt": "t1"}, 12.0)  # renewed
    False
    >>> watch.lapsed({"run": "r1", "claimedAt": "t1"}, 30.0)  # a gap: count again
    False
    """

    window: float
    max_gap: float
    _claim: Any = field(default=None, repr=False)
    _since: float = field(default=0.0, repr=False)
    _last: float = field(default=0.0, repr=False)

    @classmethod
    def of(cls, claim: Mapping[str, Any], own_ttl: float, poll: float) -> Watch:
        """A watch whose window is the longer of our ttl and the holder's, for
        looks ``poll`` seconds apart: a gap of a quarter of the window (the
        holder renews every third of it), or of two polls, breaks the count.

        >>> Watch.of({"ttl": 120}, 60.0, poll=0.5)
        Watch(window=120, max_gap=30.0)
        """
        theirs = claim.get("ttl")
        window = max(own_ttl, theirs) if isinstance(theirs, int | float) else own_ttl
        return cls(window=window, max_gap=max(window / 4, 2 * poll))

    def restart(self) -> None:
        """Count from the next look (a write just failed: the holder's may have too)."""
        self._claim = None

    def lapsed(self, claim: Any, now: float) -> bool:
        if self._claim is None or claim != self._claim or now - self._last > self.max_gap:
            self._claim = claim
            self._since = now
        self._last = now
        return now - self._since >= self.window


def without_claim(doc: Mapping[str, Any]) -> dict[str, Any]:
    """``doc`` minus its claim: what the mark writes back."""
    return {key: value for key, value in doc.items() if key != CLAIM}


class ClaimPoller:
    """Re-reads documents that other workers claimed, many in one ``_all_docs`` request.

    ``await read(doc_id, within=...)`` answers with the document as it is at
    the next poll, at most ``within`` seconds from now. A worker that lost a
    claim race re-reads at once (a short ``within``); one that waits for
    another worker's live claim looks again every half second or so. Either
    way, the messages that wait together cost one request, not one each.
    """

    def __init__(self, couch: CouchClient, *, database: str) -> None:
        self._couch = couch
        self._database = database
        self._waiting: dict[str, list[asyncio.Future[Doc | None]]] = {}
        self._deadline: float | None = None
        self._sooner = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.polls = 0

    def __repr__(self) -> str:
        return f"<ClaimPoller {self._database} waiting={len(self._waiting)} polls={self.polls}>"

    async def read(self, doc_id: str, *, within: float) -> Doc | None:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Doc | None] = loop.create_future()
        self._waiting.setdefault(doc_id, []).append(future)
        deadline = loop.time() + within
        if self._deadline is None or deadline < self._deadline:
            self._deadline = deadline
            self._sooner.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return await future

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            # Sleep until the nearest deadline; a read that needs an answer
            # sooner moves it and wakes this loop.
            while self._deadline is not None and (delay := self._deadline - loop.time()) > 0:
                self._sooner.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sooner.wait(), timeout=delay)
            batch, self._waiting, self._deadline = self._waiting, {}, None
            self.polls += 1
            try:
                docs = await self._couch.get_docs(self._database, list(batch))
            except Exception as e:
                # Each reader decides whether to retry (see Worker._couch_call).
                for futures in batch.values():
                    for future in futures:
                        if not future.done():
                            future.set_exception(e)
                continue
            for doc_id, futures in batch.items():
                for future in futures:
                    if not future.done():
                        future.set_result(docs.get(doc_id))
