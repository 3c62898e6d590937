"""Batched document writes: many marks, one ``_bulk_docs`` request.

Single-document PUTs are the slowest thing a CouchDB-compatible server does,
and one per email would make CouchDB the bottleneck. :class:`BulkWriter`
gathers the writes of messages that finish close together and sends them in
one ``_bulk_docs`` request, then answers each writer as if it had written
alone: with the new rev, or with the error CouchDB gave *that* document (a
409 conflict above all, which the worker handles by re-reading the doc).

A batch goes out when it reaches ``max_batch`` documents, when its oldest
write has waited ``max_delay`` seconds, or as soon as every message that could
still join it is already in it (``waiting_for``): then waiting longer would
only add latency.

Answers are paired with writes by document ``id``, never by position:
CouchDB does not promise to answer in the request's order, and PouchDB Server
has been seen answering out of order after a restart. Pairing by position
then hands one document's conflict to another and that one's success to the
first, which is counted as marked while it never was. So a batch never holds
two writes of one id (a second write of an id starts the next batch), and an
answer that does not name every id it was asked for, and nothing else, fails
the whole request.

A failure of the whole request (network, 5xx, an answer that cannot be
paired) is handed to every writer in the batch, and each retries on its own
terms, so nothing here retries. A retried write that had in fact been applied
gets a 409, which writers already handle by re-reading the document.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

from notifier.couch import CouchClient
from notifier.errors import (
    CouchError,
    CouchFatalError,
    CouchTransientError,
    DocumentConflict,
    DocumentRefused,
)

log = logging.getLogger(__name__)

_Pending = tuple[Mapping[str, Any], "asyncio.Future[str]"]
#: One batch: each document id at most once, in the order written.
_Batch = dict[str, _Pending]


def row_error(row: Mapping[str, Any], database: str) -> CouchError:
    """The error for one failed row of a ``_bulk_docs`` answer, as a single write would raise.

    >>> type(row_error({"id": "m1", "error": "conflict", "reason": "..."}, "db"))
    <class 'notifier.errors.DocumentConflict'>
    >>> str(row_error({"id": "m1", "error": "forbidden", "reason": "no"}, "db"))
    'CouchDB _bulk_docs /db/m1: forbidden: no'
    """
    error, reason = str(row.get("error")), str(row.get("reason"))
    message = f"CouchDB _bulk_docs /{database}/{row.get('id')}: {error}: {reason}"
    if error == "conflict":
        return DocumentConflict(message, status=409, error=error, reason=reason)
    if error in ("forbidden", "unauthorized"):
        status = 403 if error == "forbidden" else 401
        return DocumentRefused(message, status=status, error=error, reason=reason)
    # Anything else is about this document (too large, invalid): a 400.
    return CouchFatalError(message, status=400, error=error, reason=reason)


class BulkWriter:
    """Writes documents of one database in batches. ``await write(doc)`` returns the new rev."""

    def __init__(
        self,
        couch: CouchClient,
        *,
        database: str,
        max_batch: int = 100,
        max_delay: float = 0.05,
        waiting_for: Callable[[], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self._couch = couch
        self._database = database
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._waiting_for = waiting_for
        self._batch: _Batch = {}
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()
        self.batches = 0
        self.written = 0

    def __repr__(self) -> str:
        return (
            f"<BulkWriter {self._database} pending={len(self._batch)} "
            f"batches={self.batches} written={self.written}>"
        )

    async def write(self, doc: Mapping[str, Any]) -> str:
        """Queue ``doc`` (it must have an ``_id``) for the next batch and wait for its
        own outcome."""
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            raise ValueError(f"BulkWriter writes only documents with a string _id, not {doc_id!r}")
        if doc_id in self._batch:
            self._flush()  # one write per id and batch, or answers could not be told apart
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._batch[doc_id] = (doc, future)
        limit = self.max_batch
        if self._waiting_for is not None:
            limit = min(limit, max(1, self._waiting_for()))
        if len(self._batch) >= limit:
            self._flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.max_delay, self._flush)
        return await future

    async def aclose(self) -> None:
        """Send what is queued and wait for every batch in flight."""
        self._flush()
        if self._flushes:
            await asyncio.gather(*self._flushes, return_exceptions=True)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._batch = self._batch, {}
        # Writers that gave up (cancelled at the drain deadline) still get
        # their mark written if it is already queued: harmless, and it spares
        # a resend after the restart.
        if batch:
            task = asyncio.create_task(self._send(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _send(self, batch: _Batch) -> None:
        self.batches += 1
        try:
            rows = await self._couch.bulk_docs(self._database, [doc for doc, _ in batch.values()])
            answers = self._pair(batch, rows)
        except asyncio.CancelledError:
            for _, future in batch.values():
                future.cancel()
            raise
        except Exception as e:
            for _, future in batch.values():
                if not future.done():
                    future.set_exception(e)
            return
        for doc_id, (_, future) in batch.items():
            row = answers[doc_id]
            if future.done():
                continue
            if "error" in row:
                future.set_exception(row_error(row, self._database))
            else:
                self.written += 1
                future.set_result(str(row.get("rev")))

    def _pair(self, batch: _Batch, rows: list[Any]) -> dict[str, Mapping[str, Any]]:
        """Each written id's answer row; CouchTransientError unless the rows name
        exactly the ids written, once each."""
        answers: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            doc_id = row.get("id") if isinstance(row, Mapping) else None
            if not isinstance(doc_id, str) or doc_id not in batch or doc_id in answers:
                break
            answers[doc_id] = row
        else:
            if len(answers) == len(batch):
                return answers
        raise CouchTransientError(
            f"CouchDB _bulk_docs /{self._database}: the answer does not name each of the "
            f"{len(batch)} documents written exactly once ({len(rows)} rows); "
            "treating the whole request as failed"
        )
