"""Following a database's ``_changes`` feed, forever, through any network weather.

:meth:`ChangeFeed.follow` yields every row the server sends, in order, and
hides reconnects: a dropped connection, a stalled one (no heartbeat within the
idle timeout), a 5xx or a ``last_seq`` row all lead to a reconnect from the
last seq seen, after a jittered exponential backoff. Fatal errors (401, 403,
404, 400) propagate.

Rows of changes that the server filtered out are never sent, so a feed that
stays quiet would never let the checkpoint move past them (the daemon's own
marks are filtered out, for one). When the continuous feed has delivered no
row for ``resync_after`` seconds, the follower therefore asks once with
``feed=normal`` from the same point and yields its ``last_seq`` as a
:class:`Change` with no document: a position that everything before it covers.
PouchDB Server never ends a continuous feed with ``last_seq`` and ignores
``timeout``, so this is also what makes progress visible there.

``connected`` (readiness, the metric, the status line) is true from
CouchDB's first answer until the feed fails: a first answer is asked for
with a quick ``feed=normal&since=now`` request, since a continuous response
on an idle database starts only with its first heartbeat, and a deliberate
reconnect (a resync, a ``last_seq`` row) does not count as a failure.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from notifier.backoff import Backoff
from notifier.couch import CouchClient
from notifier.errors import CouchError, CouchTransientError
from notifier.tracker import Seq

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Change:
    """One row of the feed.

    ``doc_id`` is ``None`` for a bare position (a ``last_seq``): nothing to do,
    but the checkpoint may move to it.
    """

    seq: Seq
    doc_id: str | None
    doc: Mapping[str, Any] | None = None
    deleted: bool = False


def parse_row(row: Mapping[str, Any]) -> Change:
    """A change row (already decoded from JSON) as a :class:`Change`.

    >>> parse_row({"seq": "3-g1", "id": "m1", "changes": [], "doc": {"_id": "m1"}})
    Change(seq='3-g1', doc_id='m1', doc={'_id': 'm1'}, deleted=False)
    >>> parse_row({"seq": 4, "id": "m2", "deleted": True}).deleted
    True
    """
    if "seq" not in row or not isinstance(row.get("id"), str):
        raise CouchTransientError(f"unexpected row in the changes feed: {_clip(row)}")
    doc = row.get("doc")
    return Change(
        seq=row["seq"],
        doc_id=row["id"],
        doc=doc if isinstance(doc, dict) else None,
        deleted=bool(row.get("deleted", False)),
    )


class ChangeFeed:
    """Follows one database's continuous ``_changes`` feed with a server-side selector."""

    def __init__(
        self,
        couch: CouchClient,
        *,
        database: str,
        selector: Mapping[str, Any],
        heartbeat: float = 10.0,
        resync_after: float = 60.0,
        backoff: Backoff | None = None,
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        self._couch = couch
        self._database = database
        self._selector = selector
        self._heartbeat = heartbeat
        # "A little above" the heartbeat: long enough for one late heartbeat,
        # short enough that a dead connection is noticed within seconds.
        self.idle_timeout = heartbeat + max(2.0, heartbeat / 2)
        self._resync_after = resync_after
        self._backoff = backoff or Backoff(base=0.5, cap=30.0)
        self._on_connect = on_connect
        self.connected = False
        self.reconnects = 0
        self.rows = 0

    def __repr__(self) -> str:
        return (
            f"<ChangeFeed {self._database} connected={self.connected} rows={self.rows} "
            f"reconnects={self.reconnects}>"
        )

    async def follow(self, since: Seq) -> AsyncGenerator[Change, None]:
        """Yield every change after ``since``, reconnecting as needed; never returns.

        ``connected`` is true from CouchDB's first answer until the feed
        fails; a deliberate reconnect (a ``last_seq`` row, a resync) keeps it.
        """
        position = since
        incident: CouchError | None = None
        incident_started = 0.0
        try:
            while True:
                try:
                    # aclosing: when the caller stops, the HTTP stream closes
                    # now, not whenever the garbage collector finalises it.
                    async with aclosing(self._session(position)) as session:
                        async for change in session:
                            if incident is not None:
                                log.info(
                                    "changes feed is back after %.1fs and %d attempts",
                                    time.monotonic() - incident_started,
                                    self._backoff.attempts,
                                )
                                incident = None
                            self._backoff.reset()
                            position = change.seq
                            yield change
                except CouchTransientError as e:
                    self.connected = False
                    # Logged once per incident, not once per retry: an operator
                    # wants "CouchDB went away at 10:02, back at 10:07", not noise.
                    if incident is None:
                        incident, incident_started = e, time.monotonic()
                        log.warning("changes feed interrupted: %s; reconnecting with backoff", e)
                    else:
                        log.debug("changes feed still failing: %s", e)
                self.reconnects += 1
                await asyncio.sleep(self._backoff.next_delay())
        finally:
            self.connected = False

    async def _session(self, since: Seq) -> AsyncGenerator[Change, None]:
        """One continuous connection, then (if it went quiet) one resync request.

        Returns normally when the caller should reconnect without delay.
        """
        if not self.connected:
            await self._probe()
        last_row = time.monotonic()
        async with self._couch.changes(
            self._database,
            feed="continuous",
            since=since,
            selector=self._selector,
            heartbeat=self._heartbeat,
            idle_timeout=self.idle_timeout,
        ) as lines:
            log.debug("changes feed connected since=%r", since)
            async for line in lines:
                if not line.strip():
                    # A heartbeat: the connection is alive but nothing happened.
                    if time.monotonic() - last_row >= self._resync_after:
                        break
                    continue
                row = _loads(line)
                if "last_seq" in row:
                    # CouchDB ends a continuous feed this way (timeout or
                    # shutdown): a position to reconnect from, nothing else.
                    self.rows += 1
                    yield Change(seq=row["last_seq"], doc_id=None)
                    return
                self.rows += 1
                last_row = time.monotonic()
                change = parse_row(row)
                since = change.seq
                yield change
            else:
                # The server closed the stream without a last_seq row.
                raise CouchTransientError("CouchDB closed the changes feed")
        async with aclosing(self._resync(since)) as resync:
            async for change in resync:
                yield change

    async def _probe(self) -> None:
        """Count the feed connected as soon as CouchDB answers for it.

        CouchDB and PouchDB Server hold a continuous response back until its
        first line: on an idle database that is the first heartbeat, seconds
        away. A ``feed=normal&since=now`` request with the same selector is
        answered at once, and proves the database, the credentials and the
        filter that the continuous request uses.
        """
        async with self._couch.changes(
            self._database, feed="normal", since="now", selector=self._selector, limit=1
        ) as lines:
            async for _ in lines:
                pass
        self.connected = True
        if self._on_connect is not None:
            self._on_connect()

    async def _resync(self, since: Seq) -> AsyncGenerator[Change, None]:
        """Ask where the filtered feed stands now, yielding any rows on the way."""
        async with self._couch.changes(
            self._database, feed="normal", since=since, selector=self._selector, limit=1000
        ) as lines:
            body = b"".join([line async for line in lines])
        result = _loads(body)
        rows = result.get("results")
        if not isinstance(rows, list) or "last_seq" not in result:
            raise CouchTransientError(f"unexpected changes response: {_clip(result)}")
        for row in rows:
            self.rows += 1
            yield parse_row(row)
        self.rows += 1
        yield Change(seq=result["last_seq"], doc_id=None)


def _loads(text: bytes) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise CouchTransientError(
            f"changes feed sent a line that is not JSON: {text[:80]!r}"
        ) from None
    if not isinstance(value, dict):
        raise CouchTransientError(f"changes feed sent a non-object: {text[:80]!r}")
    return value


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"
