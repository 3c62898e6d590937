"""Claims: which worker sends a message, decided by CouchDB's MVCC.

While two layouts (worker counts) run side by side during a reshard, every
message belongs to one worker of each layout, and both see it on the feed.
Before sending, a worker therefore *claims* the message: it writes a
``notificationClaim`` field into the document, with the ``_rev`` it read.
Of two workers that try at once, CouchDB accepts one write and answers the
other with a 409; the loser re-reads the document, finds the winner's claim,
and waits until the document is settled. The mark that records the outcome
removes the claim.

A claim has an expiry (``claim_ttl``). One left behind by a worker that
crashed is taken over by whichever worker next looks at the document:

* at once by a later run of the *same* worker slot (the slot's lease makes
  sure the earlier run is gone), or when the claim's process is known to be
  gone (it ran on this host and its pid no longer exists);
* by any other worker once it has expired.

A worker renews its own claim before a retry when less than half of it is
left, and only starts a send while at least half is left. ``claim_ttl`` is at
least twice the SMTP timeout, so a send ends before its claim can expire.

The claim is an extra write per message, but it goes out in the same
``_bulk_docs`` batches as the marks (:class:`~notifier.marker.BulkWriter`).
The decision about a claim (:func:`assess`) is pure; :class:`ClaimPoller`
re-reads the documents that other workers claimed, many per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from notifier.couch import CouchClient, Doc
from notifier.lease import holder_is_gone, pid_alive

#: The document field that holds a claim.
CLAIM = "notificationClaim"


class Verdict(enum.Enum):
    """What a worker may do with a message, given the claim it carries."""

    #: No claim (or a malformed one): claim it.
    FREE = "free"
    #: Our own claim, with at least half its time left: send.
    MINE = "mine"
    #: Our own claim, with less than half its time left: renew it first.
    RENEW = "renew"
    #: Someone else's claim that no longer counts: take it over.
    ABANDONED = "abandoned"
    #: Someone else's live claim: wait until the message is settled or the claim lapses.
    HELD = "held"


@dataclass(frozen=True, slots=True)
class Assessment:
    verdict: Verdict
    #: Why, in words, for logs (who held the claim, and why it no longer counts).
    reason: str

    @property
    def must_write(self) -> bool:
        return self.verdict in (Verdict.FREE, Verdict.RENEW, Verdict.ABANDONED)


@dataclass(frozen=True, slots=True)
class Claimant:
    """This process, as one worker slot: what it writes into a claim."""

    worker: str
    run_id: str
    host: str
    pid: int
    ttl: float

    @classmethod
    def this_process(cls, worker: str, ttl: float) -> Claimant:
        if ttl <= 0:
            raise ValueError(f"claim ttl must be positive, got {ttl}")
        return cls(
            worker=worker,
            run_id=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            ttl=ttl,
        )

    def claim(self, now: float) -> dict[str, Any]:
        """The claim field's value, written at ``now`` (epoch seconds)."""
        return {
            "worker": self.worker,
            "run": self.run_id,
            "host": self.host,
            "pid": self.pid,
            "expires_at": round(now + self.ttl, 3),
            "claimedAt": datetime.fromtimestamp(now, tz=UTC).isoformat(timespec="milliseconds"),
        }

    def owns(self, doc: Mapping[str, Any]) -> bool:
        """Whether ``doc`` carries a claim written by this very run."""
        claim = doc.get(CLAIM)
        return isinstance(claim, Mapping) and claim.get("run") == self.run_id


def assess(
    doc: Mapping[str, Any],
    me: Claimant,
    *,
    now: float,
    alive: Callable[[int], bool] = pid_alive,
) -> Assessment:
    """What ``me`` may do with the unsettled message ``doc`` at ``now``.

    >>> me = Claimant(worker="0/3", run_id="r2", host="h1", pid=7, ttl=60.0)
    >>> assess({}, me, now=0.0).verdict
    <Verdict.FREE: 'free'>
    >>> theirs = {"worker": "1/2", "run": "r1", "host": "h2", "pid": 5, "expires_at": 100.0}
    >>> assess({CLAIM: theirs}, me, now=50.0).verdict
    <Verdict.HELD: 'held'>
    >>> assess({CLAIM: theirs}, me, now=100.0).reason
    'the claim of worker 1/2 (h2 pid 5) expired'
    >>> gone = {**theirs, "host": "h1"}
    >>> assess({CLAIM: gone}, me, now=50.0, alive=lambda pid: False).verdict
    <Verdict.ABANDONED: 'abandoned'>
    >>> assess({CLAIM: {**theirs, "worker": "0/3"}}, me, now=50.0).reason
    'the claim was left by an earlier run of this worker (h2 pid 5)'
    >>> assess({CLAIM: {**theirs, "run": "r2"}}, me, now=50.0).verdict
    <Verdict.MINE: 'mine'>
    >>> assess({CLAIM: {**theirs, "run": "r2"}}, me, now=71.0).verdict
    <Verdict.RENEW: 'renew'>
    """
    claim = doc.get(CLAIM)
    if claim is None:
        return Assessment(Verdict.FREE, "no claim")
    expires_at = claim.get("expires_at") if isinstance(claim, Mapping) else None
    if not isinstance(claim, Mapping) or not isinstance(expires_at, int | float):
        return Assessment(Verdict.FREE, "the claim is malformed")
    if claim.get("run") == me.run_id:
        if expires_at - now >= me.ttl / 2:
            return Assessment(Verdict.MINE, "our claim")
        return Assessment(Verdict.RENEW, "our claim runs out soon")
    who = f"{claim.get('host')} pid {claim.get('pid')}"
    if claim.get("worker") == me.worker:
        return Assessment(
            Verdict.ABANDONED, f"the claim was left by an earlier run of this worker ({who})"
        )
    holder = f"worker {claim.get('worker')} ({who})"
    if expires_at <= now:
        return Assessment(Verdict.ABANDONED, f"the claim of {holder} expired")
    if holder_is_gone(claim, host=me.host, alive=alive):
        return Assessment(Verdict.ABANDONED, f"the process of {holder} is gone")
    return Assessment(Verdict.HELD, f"claimed by {holder}")


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
