"""The life of one message document, as a pure decision: what to do next.

The worker carries out steps; this module decides them. :func:`decide`
takes the document as last read, the verdict on its claim (when claims are
on) and the outcome of the last delivery attempt (if one was just made), and
returns the next :data:`Step`:

* :class:`Forget`: nothing to do: the message is deleted, settled, or
  durably deferred until later (it is found again when due);
* :class:`Wait`: another worker holds its claim; look again soon;
* :class:`Claim`: write our claim (or take over an abandoned one);
* :class:`Send`: deliver it now;
* :class:`Write`: record an outcome on the document: sent, dead-lettered,
  deferred after a temporary failure, or held for its ``sendAt``.

A deferred or scheduled message carries ``notificationRetry``: the
attempts counted so far, when the next one is due (``due``, epoch
milliseconds, which ``_find`` compares; ``dueAt`` for people), since when it
has been failing and the last reply. The server-side selector leaves such
documents out of the feed, so the row counts as done and the checkpoint
moves on; :mod:`notifier.retries` finds them again when they are due, after
any restart, crash or reshard. A ``Write`` also removes our claim.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias

from notifier.claim import CLAIM, Assessment, Verdict
from notifier.schedule import BadSendAt, RetrySchedule, iso, parse_send_at, span

#: The flag existing applications already read.
NOTIFIED = "notifiedRecipient"
#: The richer record next to it: when, by which worker, the Message-ID.
RECORD = "notification"
#: A dead letter: why the message could not be delivered.
FAILED = "notificationFailed"
#: A deferral: attempts so far, when the next is due, the last reply.
RETRY = "notificationRetry"
#: Earlier dead letters of a message that ``notifier requeue`` sent again.
HISTORY = "notificationHistory"
#: When the message may be sent, at the earliest (RFC 3339 or epoch ms); the user's.
SEND_AT = "sendAt"

#: The server-side filter. Only ``$exists: false`` behaves the same on CouchDB
#: and PouchDB Server (in CouchDB a missing field matches no other operator),
#: and no ``$or`` (PouchDB Server can crash evaluating one). Deferred
#: messages are left out: they are found by their due time instead.
SELECTOR: Mapping[str, Any] = {
    NOTIFIED: {"$exists": False},
    FAILED: {"$exists": False},
    RETRY: {"$exists": False},
}


def is_settled(doc: Mapping[str, Any]) -> bool:
    """Whether a document is already notified or dead-lettered."""
    return NOTIFIED in doc or FAILED in doc


# -- what happened to the last attempt --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """The channel accepted the message; ``receipt`` is stored with the mark."""

    receipt: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Refused:
    """The message can never be delivered; ``reason`` is the dead letter's."""

    reason: str


@dataclass(frozen=True, slots=True)
class Failed:
    """A temporary failure. ``counts``: whether it uses up an attempt (a
    throttling reply does not: it is the sender's pace, not the message)."""

    reply: str
    counts: bool = True


Outcome: TypeAlias = Sent | Refused | Failed


# -- what to do next ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Forget:
    reason: str


@dataclass(frozen=True, slots=True)
class Wait:
    reason: str


@dataclass(frozen=True, slots=True)
class Claim:
    reason: str
    takeover: bool = False


@dataclass(frozen=True, slots=True)
class Send:
    pass


WriteKind: TypeAlias = Literal["sent", "dead", "deferred", "scheduled"]


@dataclass(frozen=True, slots=True)
class Write:
    """Fields to set and fields to remove on the document, and why."""

    kind: WriteKind
    set: Mapping[str, Any]
    unset: tuple[str, ...] = field(default=(CLAIM,))
    #: For logs: the reason of a dead letter, the reply of a deferral.
    detail: str = ""

    def apply(self, doc: Mapping[str, Any]) -> dict[str, Any]:
        """``doc`` with this outcome written on it.

        >>> Write("sent", {NOTIFIED: True}, (CLAIM, RETRY)).apply(
        ...     {"_id": "m", CLAIM: {}, RETRY: {}, "to": "a@b.c"})
        {'_id': 'm', 'to': 'a@b.c', 'notifiedRecipient': True}
        """
        return {**{k: v for k, v in doc.items() if k not in self.unset}, **self.set}

    def bare(self) -> Write:
        """The least of this outcome, for a server that refuses the full one as too
        large: the flag, the dead letter's reason, the retry's timing.

        >>> len(Write("dead", {FAILED: {"reason": "x" * 900}}).bare().set[FAILED]["reason"])
        500
        """
        if self.kind == "sent":
            return Write(self.kind, {NOTIFIED: True}, self.unset, self.detail)
        if self.kind == "dead":
            reason = str(self.set[FAILED].get("reason", ""))[:500]
            return Write(self.kind, {FAILED: {"reason": reason}}, self.unset, self.detail)
        retry = self.set[RETRY]
        keep = {k: retry[k] for k in ("attempts", "throttled", "due", "since") if k in retry}
        return Write(self.kind, {RETRY: keep}, self.unset, self.detail)


Step: TypeAlias = Forget | Wait | Claim | Send | Write


@dataclass(frozen=True, slots=True)
class RetryState:
    """A document's ``notificationRetry``, read leniently (it may be hand-edited)."""

    attempts: int = 0
    #: Deferrals after throttling replies: they use up no attempt, but the
    #: next one still waits longer each time, so that a quota that stays
    #: exhausted for hours is not asked again about every message each minute.
    throttled: int = 0
    #: Epoch seconds of the next attempt.
    due: float | None = None
    #: Epoch seconds of the first failure (None: it has not failed yet).
    since: float | None = None
    last_reply: str | None = None

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> RetryState | None:
        """The retry state on ``doc``, or None when it has none.

        >>> RetryState.of({RETRY: {"attempts": 2, "due": 1500, "since": 1000}})
        RetryState(attempts=2, throttled=0, due=1.5, since=1.0, last_reply=None)
        >>> RetryState.of({RETRY: "garbage"})
        RetryState(attempts=0, throttled=0, due=None, since=None, last_reply=None)
        """
        raw = doc.get(RETRY)
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            return cls()
        last = raw.get("lastReply")
        return cls(
            attempts=_count(raw.get("attempts")),
            throttled=_count(raw.get("throttled")),
            due=_ms(raw.get("due")),
            since=_ms(raw.get("since")),
            last_reply=last if isinstance(last, str) else None,
        )


def decide(
    doc: Mapping[str, Any] | None,
    *,
    now: float,
    schedule: RetrySchedule,
    worker: str,
    claim: Assessment | None = None,
    outcome: Outcome | None = None,
) -> Step:
    """The next step for a message. Pure; ``now`` is epoch seconds.

    ``claim`` is ``None`` when claims are off; otherwise the verdict on the
    document as read (a held claim that stayed unchanged for a whole ttl
    comes as ABANDONED). ``outcome`` is the result of the attempt just made.

    >>> s = RetrySchedule(first=60, cap=3600, max_age=86400, jitter=0)
    >>> doc = {"_id": "m1", "to": "a@example.com"}
    >>> decide(doc, now=1000, schedule=s, worker="0/1")
    Send()
    >>> step = decide(doc, now=1000, schedule=s, worker="0/1", outcome=Failed("451 later"))
    >>> step.kind, step.set[RETRY]["attempts"], step.set[RETRY]["due"]
    ('deferred', 1, 1060000)
    >>> decide(step.apply(doc), now=1030, schedule=s, worker="0/1")
    Forget(reason='deferred until 1970-01-01T00:17:40.000+00:00')
    >>> decide({**doc, SEND_AT: "soon"}, now=1000, schedule=s, worker="0/1").kind
    'dead'
    """
    if doc is None:
        return Forget("deleted")
    if is_settled(doc):
        return Forget("settled")
    retry = RetryState.of(doc)
    if outcome is None:
        if claim is not None and claim.verdict is Verdict.HELD:
            # Another worker is at it: whatever it does, it must not be undone.
            return Wait(claim.reason)
        try:
            send_at = parse_send_at(doc.get(SEND_AT))
        except BadSendAt as e:
            return _dead_letter(str(e), retry, now=now, worker=worker)
        times = [t for t in (retry.due if retry else None, send_at) if t is not None]
        hold = max(times, default=None)
        if hold is not None and hold > now:
            if retry is not None and retry.due is not None and retry.due >= hold:
                return Forget(f"deferred until {iso(hold)}")
            return _defer(retry, due=hold, now=now, worker=worker, scheduled=True)
        if claim is None or claim.verdict is Verdict.MINE:
            return Send()
        return Claim(claim.reason, takeover=claim.verdict is Verdict.ABANDONED)
    counts = not isinstance(outcome, Failed) or outcome.counts
    attempts = (retry.attempts if retry else 0) + (1 if counts else 0)
    throttled = (retry.throttled if retry else 0) + (0 if counts else 1)
    if isinstance(outcome, Sent):
        record = {**outcome.receipt, "sentAt": iso(now), "worker": worker, "attempts": attempts}
        return Write("sent", {NOTIFIED: True, RECORD: record}, (CLAIM, RETRY))
    if isinstance(outcome, Refused):
        return _dead_letter(outcome.reason, retry, now=now, worker=worker, attempts=attempts)
    since = retry.since if retry is not None and retry.since is not None else now
    if schedule.expired(since=since, now=now):
        return _dead_letter(
            f"gave up after {attempts} attempts over {span(now - since)}; "
            f"last reply: {outcome.reply}",
            retry,
            now=now,
            worker=worker,
            attempts=attempts,
        )
    due = now + schedule.delay(max(attempts + throttled, 1))
    return _defer(
        retry,
        due=due,
        now=now,
        worker=worker,
        attempts=attempts,
        throttled=throttled,
        since=since,
        reply=outcome.reply,
    )


def _defer(
    retry: RetryState | None,
    *,
    due: float,
    now: float,
    worker: str,
    scheduled: bool = False,
    attempts: int | None = None,
    throttled: int | None = None,
    since: float | None = None,
    reply: str | None = None,
) -> Write:
    state: dict[str, Any] = {
        "attempts": attempts if attempts is not None else (retry.attempts if retry else 0),
        "due": _to_ms(due),
        "dueAt": iso(due),
        "deferredAt": iso(now),
        "worker": worker,
    }
    throttled = throttled if throttled is not None else (retry.throttled if retry else 0)
    if throttled:
        state["throttled"] = throttled
    since = since if since is not None else (retry.since if retry else None)
    if since is not None:
        state["since"] = _to_ms(since)
    reply = reply if reply is not None else (retry.last_reply if retry else None)
    if reply is not None:
        state["lastReply"] = reply
    if scheduled:
        state["scheduled"] = True
    kind: WriteKind = "scheduled" if scheduled else "deferred"
    return Write(kind, {RETRY: state}, (CLAIM,), reply or f"until {iso(due)}")


def dead_letter_instead(deferral: Write, why: str, *, now: float, worker: str) -> Write:
    """The dead letter for a message whose deferral CouchDB refused (``why``)."""
    state = deferral.set.get(RETRY, {})
    last = f"; last reply: {state['lastReply']}" if state.get("lastReply") else ""
    reason = f"CouchDB refused to record its deferral ({why}){last}"
    attempts = state.get("attempts") if isinstance(state.get("attempts"), int) else 0
    return _dead_letter(reason[:500], None, now=now, worker=worker, attempts=attempts)


def dead_letter_for_bug(error: BaseException, *, now: float, worker: str) -> Write:
    """The dead letter for a document that :func:`decide` itself failed on (a bug):
    better one message set aside, with the error as its reason, than a worker
    that fails on it after every restart."""
    reason = f"unexpected error deciding what to do: {type(error).__name__}: {error}"
    return _dead_letter(reason[:500], None, now=now, worker=worker)


def _dead_letter(
    reason: str,
    retry: RetryState | None,
    *,
    now: float,
    worker: str,
    attempts: int | None = None,
) -> Write:
    record: dict[str, Any] = {
        "reason": reason,
        "failedAt": iso(now),
        "worker": worker,
        "attempts": attempts if attempts is not None else (retry.attempts if retry else 0),
    }
    if retry is not None and retry.since is not None:
        record["firstFailedAt"] = iso(retry.since)
    return Write("dead", {FAILED: record}, (CLAIM, RETRY), reason)


def _count(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def _ms(value: object) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
        return float(value) / 1000
    return None


def _to_ms(epoch: float) -> int:
    return round(epoch * 1000)
