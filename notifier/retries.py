"""Finding deferred messages again when they are due, from what CouchDB holds.

A deferred or scheduled message carries ``notificationRetry.due`` (epoch
milliseconds) and is left out of the changes feed by the selector. Every
worker asks CouchDB for due messages with ``_find``::

    {"selector": {"notificationRetry.due": {"$lte": <now>},
                  "notifiedRecipient": {"$exists": false},
                  "notificationFailed": {"$exists": false}},
     "limit": 100}

``_find`` is the one query that Apache CouchDB 2+ and PouchDB Server both
answer the same way. It is fast with the Mango index this module creates at
start (design document ``_design/notifier-retry``, a JSON index on
``notificationRetry.due``: only deferred documents have the field, so the
index stays as small as the deferred backlog). Creating a design document
needs a database admin; a daemon that is not one logs a warning once and
still works, with each look scanning the database.

Nothing here depends on state in the process: after a restart, a crash or a
reshard, the next look finds every due message. Each worker keeps only its
own shard's; a message two layouts both find is settled once, through its
claim.

Pages are read with CouchDB's ``bookmark`` where the server gives one, and
with ``skip`` where it does not (PouchDB Server) (:func:`find_pages`). A
message that moves between pages while they are read is found at the next
look.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from notifier.couch import CouchClient, Doc
from notifier.errors import CouchAccessDenied, CouchFatalError
from notifier.lifecycle import FAILED, NOTIFIED, RETRY
from notifier.schedule import iso, span
from notifier.shard import Shard

log = logging.getLogger(__name__)

#: The Mango index on the due time.
INDEX: Mapping[str, Any] = {
    "index": {"fields": [f"{RETRY}.due"]},
    "ddoc": "notifier-retry",
    "name": "retry-due",
    "type": "json",
}


#: Seconds between looks for deferred messages with an odd ``notificationRetry``.
ODD_LOOK_EVERY = 3600.0

#: Every unsettled message that has a ``notificationRetry`` at all.
RETRY_SELECTOR: Mapping[str, Any] = {
    RETRY: {"$exists": True},
    NOTIFIED: {"$exists": False},
    FAILED: {"$exists": False},
}


def is_odd(doc: Mapping[str, Any]) -> bool:
    """Whether ``doc``'s ``notificationRetry`` lacks a numeric ``due``.

    >>> is_odd({RETRY: {"due": 5}}), is_odd({RETRY: {"due": "5"}}), is_odd({RETRY: None})
    (False, True, True)
    """
    retry = doc.get(RETRY)
    due = retry.get("due") if isinstance(retry, Mapping) else None
    return isinstance(due, bool) or not isinstance(due, int | float)


def due_selector(now_ms: int) -> dict[str, Any]:
    """The ``_find`` selector for messages due at ``now_ms``.

    >>> due_selector(1000)["notificationRetry.due"]
    {'$lte': 1000}
    """
    return {
        f"{RETRY}.due": {"$lte": now_ms},
        NOTIFIED: {"$exists": False},
        FAILED: {"$exists": False},
    }


class DueMessages:
    """Reads this worker's due deferred messages from one database."""

    def __init__(
        self, couch: CouchClient, *, database: str, shard: Shard, page_size: int = 100
    ) -> None:
        if page_size < 1:
            raise ValueError(f"page_size must be at least 1, got {page_size}")
        self._couch = couch
        self._database = database
        self._shard = shard
        self.page_size = page_size
        self.indexed: bool | None = None
        self.looks = 0
        self.found = 0

    def __repr__(self) -> str:
        return f"<DueMessages {self._database} looks={self.looks} found={self.found}>"

    @property
    def _path(self) -> str:
        return f"/{quote(self._database, safe='')}"

    async def prepare(self) -> None:
        """Create the index if allowed, and prove ``_find`` works on this server.

        A server without ``_find`` (400, 404, 501) stops the worker with a clear
        error: deferred messages could never be found again.
        """
        try:
            result = await self._couch.request("POST", f"{self._path}/_index", json_body=INDEX)
            self.indexed = True
            if isinstance(result, Mapping) and result.get("result") == "created":
                log.info("created the Mango index %s on %s", INDEX["name"], self._database)
        except CouchAccessDenied as e:
            self.indexed = False
            log.warning(
                "cannot create the index that finds deferred messages (%s): a database admin "
                "can create it once with POST /%s/_index and the body %s; until then each "
                "look for due messages scans the whole database",
                e.status,
                self._database,
                json.dumps(INDEX, separators=(",", ":")),
            )
        except CouchFatalError as e:
            raise _no_find(self._database, e) from None
        try:
            # One small query proves _find works here, index or not.
            body = {"selector": due_selector(0), "limit": 1}
            await self._couch.request("POST", f"{self._path}/_find", json_body=body)
        except CouchAccessDenied:
            raise
        except CouchFatalError as e:
            raise _no_find(self._database, e) from None

    async def due(self, now: float) -> AsyncIterator[list[Doc]]:
        """Pages of this shard's messages due at ``now`` (epoch seconds)."""
        self.looks += 1
        async for docs in self._mine(due_selector(int(now * 1000))):
            yield docs

    async def odd(self) -> AsyncIterator[list[Doc]]:
        """Pages of this shard's messages whose ``notificationRetry`` has no
        numeric ``due`` (a hand edit): the selector keeps them out of the
        feed and the due look cannot match them, so they are taken as due.

        It reads every document with the field (no index helps), so the
        worker looks only now and then (:data:`ODD_LOOK_EVERY`).
        """
        async for docs in self._mine(RETRY_SELECTOR):
            odd = [d for d in docs if is_odd(d)]
            if odd:
                yield odd

    async def _mine(self, selector: Mapping[str, Any]) -> AsyncIterator[list[Doc]]:
        async for docs in find_pages(
            self._couch, self._database, selector, page_size=self.page_size
        ):
            mine = [d for d in docs if self._shard.owns(str(d.get("_id")))]
            self.found += len(mine)
            if mine:
                yield mine


async def find_pages(
    couch: CouchClient,
    database: str,
    selector: Mapping[str, Any],
    *,
    page_size: int = 100,
    fields: list[str] | None = None,
) -> AsyncIterator[list[Doc]]:
    """The documents ``selector`` matches, a ``_find`` page at a time.

    Pages follow CouchDB's ``bookmark`` where the server gives one and
    ``skip`` where it does not (PouchDB Server). A document that stops or
    starts matching while the pages are read may be missed or seen twice.
    """
    path = f"/{quote(database, safe='')}/_find"
    bookmark: str | None = None
    skip = 0
    while True:
        body: dict[str, Any] = {"selector": selector, "limit": page_size}
        if fields is not None:
            body["fields"] = fields
        if bookmark:
            body["bookmark"] = bookmark
        elif skip:
            body["skip"] = skip
        result = await couch.request("POST", path, json_body=body)
        docs = [d for d in result.get("docs", []) if isinstance(d, dict)]
        if docs:
            yield docs
        if len(docs) < page_size:
            return
        mark = result.get("bookmark")
        if isinstance(mark, str) and mark not in ("", "nil"):
            bookmark = mark
        else:
            skip += len(docs)


@dataclass(frozen=True, slots=True)
class DeferredSummary:
    """What ``notifier check`` and ``status`` say of the deferred messages of a database."""

    #: Deferred (or scheduled) messages counted, and of those, due now, and
    #: those whose notificationRetry has no numeric due (see is_odd).
    deferred: int
    due: int
    odd: int
    #: True when the count stopped at its cap: there are at least that many.
    capped: bool
    #: Whether the index on the due time exists.
    indexed: bool
    #: Of the messages counted: seconds the longest-due one has waited past
    #: its due time (a worker retries its shard's due messages within
    #: ``scan_interval``, so a long wait means that worker is not running,
    #: not keeping up, or waiting out a relay outage) ...
    overdue: float | None = None
    #: ... and the epoch seconds of the oldest first failure (a message is
    #: dead-lettered ``max_age`` after it).
    failing_since: float | None = None

    def describe(self) -> str:
        r"""
        >>> print(DeferredSummary(3, 1, 0, False, True, 400.0, 0.0).describe().replace(", ", ",\n"))
        3 deferred or scheduled,
        1 of them due now (the longest for 6m),
        the oldest failing since 1970-01-01T00:00:00.000+00:00; the retry index is there
        """
        more = "at least " if self.capped else ""
        index = "the retry index is there" if self.indexed else "no retry index"
        odd = f", {self.odd} with no numeric due time" if self.odd else ""
        overdue = f" (the longest for {span(self.overdue)})" if self.overdue is not None else ""
        since = (
            f", the oldest failing since {iso(self.failing_since)}"
            if self.failing_since is not None
            else ""
        )
        return (
            f"{more}{self.deferred} deferred or scheduled, {self.due} of them due now"
            f"{overdue}{odd}{since}; {index}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "deferred": self.deferred,
            "due": self.due,
            "odd": self.odd,
            "capped": self.capped,
            "indexed": self.indexed,
            "overdue_seconds": None if self.overdue is None else round(self.overdue, 1),
            "failing_since": None if self.failing_since is None else iso(self.failing_since),
        }


#: How many deferred messages ``check`` counts at most.
SUMMARY_CAP = 1000


async def summarise(couch: CouchClient, database: str, *, now: float) -> DeferredSummary:
    """Count a database's deferred messages (up to :data:`SUMMARY_CAP`), those due at
    ``now``, the odd ones, how long the longest-due one has waited and since when
    the oldest has failed, and whether the index exists. Reads every document
    with ``notificationRetry`` (no index helps). Raises CouchError as requests do."""
    listed = await couch.request("GET", f"/{quote(database, safe='')}/_index")
    names = [i.get("name") for i in listed.get("indexes", []) if isinstance(i, Mapping)]
    deferred = due = odd = 0
    now_ms = now * 1000
    earliest_due: float | None = None
    failing_since: float | None = None
    async for page in find_pages(
        couch, database, RETRY_SELECTOR, fields=["_id", RETRY], page_size=min(100, SUMMARY_CAP)
    ):
        for doc in page:
            deferred += 1
            if is_odd(doc):
                odd += 1
                continue
            retry = doc[RETRY]
            if retry["due"] <= now_ms:
                due += 1
                if earliest_due is None or retry["due"] < earliest_due:
                    earliest_due = retry["due"]
            since = retry.get("since")
            if (
                isinstance(since, int | float)
                and not isinstance(since, bool)
                and (failing_since is None or since < failing_since)
            ):
                failing_since = since
        if deferred >= SUMMARY_CAP:
            break
    return DeferredSummary(
        deferred=deferred,
        due=due,
        odd=odd,
        capped=deferred >= SUMMARY_CAP,
        indexed=INDEX["name"] in names,
        overdue=None if earliest_due is None else (now_ms - earliest_due) / 1000,
        failing_since=None if failing_since is None else failing_since / 1000,
    )


def _no_find(database: str, error: CouchFatalError) -> CouchFatalError:
    return CouchFatalError(
        f"the server cannot find deferred messages in {database} with _find ({error}); "
        "notifier needs CouchDB 2 or later, or PouchDB Server",
        status=error.status,
        error=error.error,
        reason=error.reason,
    )
