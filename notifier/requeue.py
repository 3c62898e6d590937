"""``notifier requeue``: send dead letters again.

A dead letter (``notificationFailed``) needs a person: a relay that refused
everyone for longer than ``[delivery] max_age``, a template fixed since, an
address corrected in the document. :func:`requeue` selects dead letters by
document id, by the reason (a regular expression, Python's ``re.search``)
and by age (when they failed), and for each one removes the failure and the
retry state, and appends the failure, with ``requeuedAt``, to
``notificationHistory``. The document then matches the workers' selector
again, comes through their feeds as a new change, and is sent; its
Message-ID is the same as before.

It is safe while workers run: workers never touch a dead letter, and each
document is written with the ``_rev`` that was read. A 409 (a person, or a
second requeue, wrote first) re-reads the document and decides again; a
document that is no longer a dead letter is reported and left alone.

Dead letters are found with ``_find`` on ``notificationFailed``: first the
candidates' ids and failures (a few hundred bytes each), then the documents
themselves, read and written in batches of :data:`BATCH`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import httpx

from notifier.claim import CLAIM
from notifier.config import Config
from notifier.couch import CouchClient, Doc
from notifier.lifecycle import FAILED, HISTORY, RETRY
from notifier.marker import row_error
from notifier.retries import find_pages
from notifier.schedule import iso

__all__ = ["RequeueReport", "Requeued", "Selection", "parse_age", "requeue", "selection_from"]

#: Documents read and written per request.
BATCH = 100
#: Times a document is re-read after a 409 before it is reported as busy.
CONFLICT_RETRIES = 3

Action = Literal["requeued", "would requeue", "skipped", "failed"]


@dataclass(frozen=True, slots=True)
class Requeued:
    """What was done with one document, and why."""

    id: str
    action: Action
    reason: str | None = None
    failed_at: str | None = None
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "action": self.action,
            "reason": self.reason,
            "failedAt": self.failed_at,
            "why": self.why or None,
        }


@dataclass(slots=True)
class RequeueReport:
    database: str
    dry_run: bool
    generated_at: float
    examined: int = 0
    messages: list[Requeued] = field(default_factory=list)

    def count(self, action: Action) -> int:
        return sum(1 for m in self.messages if m.action == action)

    @property
    def ok(self) -> bool:
        return self.count("failed") == 0

    def to_json(self) -> dict[str, Any]:
        return {
            "database": self.database,
            "dry_run": self.dry_run,
            "generated_at": iso(self.generated_at),
            "examined": self.examined,
            "requeued": self.count("requeued"),
            "would_requeue": self.count("would requeue"),
            "skipped": self.count("skipped"),
            "failed": self.count("failed"),
            "messages": [m.to_json() for m in self.messages],
        }

    def render(self) -> str:
        lines = [
            f"notifier requeue: database {self.database!r}, at {iso(self.generated_at)}"
            + (" (dry run: nothing is written)" if self.dry_run else "")
        ]
        for m in self.messages:
            detail = m.why or f"failed {m.failed_at}: {m.reason}"
            lines.append(f"  {m.action:<14} {m.id}  {detail}")
        done = self.count("would requeue" if self.dry_run else "requeued")
        verb = "would be requeued" if self.dry_run else "requeued"
        summary = f"{done} of {self.examined} dead letters examined {verb}"
        if self.count("skipped"):
            summary += f", {self.count('skipped')} skipped"
        if self.count("failed"):
            summary += f", {self.count('failed')} could not be written"
        lines.append(summary + ".")
        if done and not self.dry_run:
            lines.append("Running workers send them as their changes arrive.")
        return "\n".join(lines) + "\n"


def parse_age(text: str) -> float:
    """A duration such as ``90s``, ``30m``, ``12h`` or ``7d``, in seconds.

    >>> parse_age("90s"), parse_age("30m"), parse_age("1.5h"), parse_age("7d")
    (90.0, 1800.0, 5400.0, 604800.0)
    """
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhd])\s*", text)
    if match is None:
        raise ValueError(f"expected a duration such as 90s, 30m, 12h or 7d, got {text!r}")
    return float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


@dataclass(frozen=True, slots=True)
class Selection:
    """Which dead letters to requeue; every given criterion must hold."""

    ids: tuple[str, ...] = ()
    reason: re.Pattern[str] | None = None
    older_than: float | None = None
    newer_than: float | None = None

    def why_not(self, failure: Any, now: float) -> str | None:
        """None if a dead letter with this ``notificationFailed`` is selected, else why not."""
        if not isinstance(failure, Mapping):
            return "its notificationFailed is not an object"
        reason = str(failure.get("reason", ""))
        if self.reason is not None and not self.reason.search(reason):
            return "the reason does not match"
        if self.older_than is None and self.newer_than is None:
            return None
        failed_at = _epoch(failure.get("failedAt"))
        if failed_at is None:
            return "it has no failedAt time to judge its age by"
        age = now - failed_at
        if self.older_than is not None and age < self.older_than:
            return "it failed too recently"
        if self.newer_than is not None and age > self.newer_than:
            return "it failed too long ago"
        return None


async def requeue(
    config: Config,
    selection: Selection,
    *,
    dry_run: bool = False,
    now: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> RequeueReport:
    """Requeue the dead letters of ``[couch] database`` that ``selection`` picks."""
    now = time.time() if now is None else now
    database = config.couch.database
    report = RequeueReport(database=database, dry_run=dry_run, generated_at=now)
    async with CouchClient.from_config(config.couch, transport=transport) as couch:
        await couch.database_info(database)  # a clear 404 for a wrong name
        candidates = await _candidates(couch, database, selection, report)
        picked: list[str] = []
        for doc_id, failure in candidates:
            why = selection.why_not(failure, now)
            if why is None:
                picked.append(doc_id)
            elif selection.ids:
                report.messages.append(Requeued(doc_id, "skipped", why=why))
        for start in range(0, len(picked), BATCH):
            await _requeue_batch(
                couch, database, picked[start : start + BATCH], selection, report, now
            )
    return report


async def _candidates(
    couch: CouchClient, database: str, selection: Selection, report: RequeueReport
) -> list[tuple[str, Any]]:
    """(id, notificationFailed) of each dead letter that could be selected."""
    if selection.ids:
        # Each id once: two writes of one document in a request would conflict
        # with each other, and the report would call the requeued one skipped.
        unique = list(dict.fromkeys(selection.ids))
        found: list[tuple[str, Any]] = []
        for start in range(0, len(unique), BATCH):
            ids = unique[start : start + BATCH]
            docs = await couch.get_docs(database, ids)
            for doc_id in ids:
                doc = docs.get(doc_id)
                report.examined += 1
                if doc is None:
                    report.messages.append(Requeued(doc_id, "skipped", why="no such document"))
                elif FAILED not in doc:
                    report.messages.append(Requeued(doc_id, "skipped", why="not a dead letter"))
                else:
                    found.append((doc_id, doc[FAILED]))
        return found
    found = []
    selector = {FAILED: {"$exists": True}}
    async for page in find_pages(couch, database, selector, fields=["_id", FAILED]):
        for doc in page:
            report.examined += 1
            found.append((str(doc["_id"]), doc.get(FAILED)))
    return found


async def _requeue_batch(
    couch: CouchClient,
    database: str,
    ids: list[str],
    selection: Selection,
    report: RequeueReport,
    now: float,
) -> None:
    pending = ids
    for _ in range(CONFLICT_RETRIES + 1):
        docs = await couch.get_docs(database, pending)
        writes: list[Mapping[str, Any]] = []
        for doc_id in pending:
            doc = docs.get(doc_id)
            failure = None if doc is None else doc.get(FAILED)
            why = "no such document" if doc is None else None
            if why is None and failure is None:
                why = "no longer a dead letter (requeued or settled meanwhile)"
            if why is None:
                why = selection.why_not(failure, now)
            if why is not None:
                report.messages.append(Requeued(doc_id, "skipped", why=why))
                continue
            assert doc is not None
            if report.dry_run:
                report.messages.append(_entry(doc_id, failure, "would requeue"))
                continue
            writes.append(_requeued(doc, now))
        if not writes:
            return
        rows = await couch.bulk_docs(database, writes)
        answers = {row.get("id"): row for row in rows}
        conflicted: list[str] = []
        for write in writes:
            doc_id = write["_id"]
            row = answers.get(doc_id)
            failure = write[HISTORY][-1]
            if row is not None and "error" not in row:
                report.messages.append(_entry(doc_id, failure, "requeued"))
            elif row is not None and row.get("error") == "conflict":
                conflicted.append(doc_id)
            else:
                why = "no answer for it" if row is None else str(row_error(row, database))
                report.messages.append(_entry(doc_id, failure, "failed", why))
        if not conflicted:
            return
        pending = conflicted
    for doc_id in pending:
        report.messages.append(
            Requeued(doc_id, "failed", why=f"written by someone else {CONFLICT_RETRIES + 1} times")
        )


def _requeued(doc: Doc, now: float) -> Doc:
    """The document without its failure, retry state and claim; the failure kept as history."""
    history = doc.get(HISTORY)
    past = list(history) if isinstance(history, list) else []
    failure = doc[FAILED] if isinstance(doc[FAILED], Mapping) else {"reason": str(doc[FAILED])}
    past.append({**failure, "requeuedAt": iso(now)})
    kept = {k: v for k, v in doc.items() if k not in (FAILED, RETRY, CLAIM, HISTORY)}
    return {**kept, HISTORY: past}


def _entry(doc_id: str, failure: Any, action: Action, why: str = "") -> Requeued:
    failure = failure if isinstance(failure, Mapping) else {}
    reason = failure.get("reason")
    failed_at = failure.get("failedAt")
    return Requeued(
        doc_id,
        action,
        reason=None if reason is None else str(reason),
        failed_at=None if failed_at is None else str(failed_at),
        why=why,
    )


def _epoch(value: object) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def selection_from(
    *,
    ids: Iterable[str] = (),
    reason: str | None = None,
    older_than: str | None = None,
    newer_than: str | None = None,
) -> Selection:
    """A :class:`Selection` from command-line text; ValueError names what is wrong."""
    try:
        pattern = None if reason is None else re.compile(reason)
    except re.error as e:
        raise ValueError(f"--reason: not a regular expression: {e}") from None
    return Selection(
        ids=tuple(ids),
        reason=pattern,
        older_than=None if older_than is None else parse_age(older_than),
        newer_than=None if newer_than is None else parse_age(newer_than),
    )
