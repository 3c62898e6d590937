"""The ``_changes`` feed: normal, longpoll and continuous, with CouchDB 3's seqs and filters.

Seqs are opaque strings shaped like CouchDB 3's (``"12-g1AAAA…"``) whose text
order is not their order. A feed is an async generator that a transport
streams; it wakes when a write is noticed (:meth:`ChangesMixin._notify`,
from any thread), sends heartbeats, ends on ``timeout`` or ``limit`` with
its ``last_seq``, and fires the feed faults (cut, stall).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from typing import Final, Literal, TypeAlias

from notifier.testing.fake_couch.documents import _Database, _Doc
from notifier.testing.fake_couch.faults import _FeedFault
from notifier.testing.fake_couch.mango import compile_selector
from notifier.testing.fake_couch.state import CouchState
from notifier.testing.fake_couch.wire import (
    JSON,
    Doc,
    FakeCouchError,
    FakeResponse,
    FeedCut,
    _base_headers,
    _bool_param,
    _int_param,
    _json_body,
    _json_param,
    _not_implemented,
    _only,
    _require_json_ctype,
)

FeedStyle: TypeAlias = Literal["normal", "longpoll", "continuous"]

#: CouchDB's ``[chttpd] changes_timeout`` default: the longest a feed waits
#: for a change, and the cap on ``heartbeat`` and ``timeout``.
DEFAULT_MAX_TIMEOUT: Final = 60.0

_FEEDS: Final[dict[str, FeedStyle]] = {
    "normal": "normal",
    "longpoll": "longpoll",
    "continuous": "continuous",
    "live": "continuous",
}
_MALFORMED_SINCE: Final = "Malformed sequence supplied in 'since' parameter."


@dataclass(slots=True)
class _FeedPlan:
    db: _Database
    style: FeedStyle
    position: int
    include_docs: bool
    limit: int | None
    heartbeat: float | None
    timeout: float
    accept: Callable[[_Doc], bool]
    fault: _FeedFault | None
    method: str
    path: str
    drop_generation: int


@dataclass(slots=True)
class _Waiter:
    db: str | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None]


class ChangesMixin(CouchState):
    """The ``_changes`` endpoint of :class:`~notifier.testing.fake_couch.FakeCouch`."""

    # -- waking feeds ------------------------------------------------------------------

    def _notify(self, database: str | None) -> None:
        """Wake feeds waiting on ``database`` (None: all), whatever loop or thread they run in."""
        with self._lock:
            self._generation += 1
            wake = [w for w in self._waiters if database is None or w.db in (None, database)]
            self._waiters = [w for w in self._waiters if w not in wake]
        for waiter in wake:
            # A closed loop raises RuntimeError: its feed is gone already.
            with contextlib.suppress(RuntimeError):
                waiter.loop.call_soon_threadsafe(_resolve, waiter.future)

    async def _wait(self, database: str, seen: int, timeout: float | None) -> bool:
        """Wait for a change after generation ``seen``; False when ``timeout`` passed first."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = _Waiter(database, loop, future)
        with self._lock:
            if self._generation != seen:
                return True
            self._waiters.append(waiter)
        try:
            if timeout is None:
                await future
                return True
            try:
                async with asyncio.timeout(timeout):
                    await future
            except TimeoutError:
                return False
            return True
        finally:
            with self._lock:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)

    # -- the changes feed --------------------------------------------------------------

    def _seq(self, db: _Database, n: int) -> str:
        """The opaque seq string for position ``n`` of ``db``, in CouchDB 3's shape."""
        digest = hashlib.blake2b(
            f"{self._salt}:{db.incarnation}:{n}".encode(), digest_size=33
        ).digest()
        seq = f"{n}-g1AAAA{base64.urlsafe_b64encode(digest).decode()}"
        self._seq_book[seq] = (db.incarnation, n)
        return seq

    def _resolve_since(self, db: _Database, raw: str, method: str, path: str) -> tuple[int, bool]:
        """(position, is_a_real_seq) for a ``since`` parameter."""
        if raw == "now":
            return db.update_seq, False
        if raw == "0":
            return 0, False
        known = self._seq_book.get(raw)
        if known is None:
            raise FakeCouchError(400, "bad_request", _MALFORMED_SINCE)
        incarnation, n = known
        if incarnation != db.incarnation:
            # CouchDB cannot place a seq of other shards (another database,
            # or this one before it was recreated): it starts from 0.
            self._event("rewind", method, path, f"since {raw[:16]}… is not from this database")
            return 0, False
        return n, True

    def _changes(
        self,
        method: str,
        db_name: str,
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        decoded_path: str,
    ) -> FakeResponse:
        _only(params, _CHANGES_PARAMS, method, decoded_path)
        for name in ("conflicts", "attachments", "att_encoding_info"):
            # One leaf per doc and no attachments: nothing these could add.
            _bool_param(params, name, default=False)
        if params.get("style", "main_only") not in ("main_only", "all_docs"):
            raise FakeCouchError(400, "bad_request", "`style` must be main_only or all_docs")
        if "seq_interval" in params:
            raise _not_implemented(method, f"{decoded_path}?seq_interval")
        feed = params.get("feed", "normal")
        if feed == "eventsource":
            raise _not_implemented(method, f"{decoded_path}?feed=eventsource")
        style = _FEEDS.get(feed)
        if style is None:
            raise FakeCouchError(
                400,
                "bad_request",
                "Supported `feed` types: normal, continuous, live, longpoll, eventsource",
            )
        if _bool_param(params, "descending", default=False):
            raise _not_implemented(method, f"{decoded_path}?descending=true")
        include_docs = _bool_param(params, "include_docs", default=False)
        limit = _int_param(params, "limit", None)
        if limit is not None:
            limit = max(limit, 1)  # CouchDB sends one row for limit=0
        heartbeat: float | None = None
        if "heartbeat" in params:
            raw_hb = params["heartbeat"]
            if raw_hb == "true":
                heartbeat = self.max_timeout
            else:
                try:
                    hb_ms = int(raw_hb)
                except ValueError:
                    hb_ms = 0
                if hb_ms <= 0:
                    raise FakeCouchError(
                        400,
                        "bad_request",
                        "The heartbeat value should be a positive integer (in milliseconds).",
                    )
                heartbeat = min(self.max_timeout, hb_ms / 1000)
        timeout_ms = _int_param(params, "timeout", None)
        timeout = (
            self.max_timeout if timeout_ms is None else min(self.max_timeout, timeout_ms / 1000)
        )

        with self._lock:
            db = self._db(db_name)
            accept = self._feed_filter(method, db, params, headers, body)
            position, real_since = self._resolve_since(
                db, params.get("since", "0"), method, decoded_path
            )
            if real_since and self.replay_window:
                index = db.by_seq.bisect_right(position)
                start = max(0, index - self.replay_window)
                replayed = index - start
                position = db.by_seq.keys()[start - 1] if start > 0 else 0
                if replayed:
                    self._event(
                        "replay", method, decoded_path, f"restarted {replayed} changes early"
                    )
            fault = None
            for candidate in self._feed_faults:
                if candidate.feed in (None, style) and candidate.remaining != 0:
                    if candidate.remaining is not None:
                        candidate.remaining -= 1
                    fault = candidate
                    break
            plan = _FeedPlan(
                db=db,
                style=style,
                position=position,
                include_docs=include_docs,
                limit=limit,
                heartbeat=heartbeat if style != "normal" else None,
                timeout=timeout,
                accept=accept,
                fault=fault,
                method=method,
                path=decoded_path,
                drop_generation=self._drop_generation,
            )
        return FakeResponse(200, _base_headers(), self._feed(plan))

    def _feed_filter(
        self,
        method: str,
        db: _Database,
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> Callable[[_Doc], bool]:
        name = params.get("filter")
        if name is None:
            return lambda doc: True
        if name == "_selector":
            selector = self._request_selector(method, params, headers, body)
            predicate = compile_selector(selector)
            return lambda doc: predicate(doc.to_json())
        if name == "_doc_ids":
            if method == "POST":
                _require_json_ctype(headers)
                request = _json_body(body)
                ids = request.get("doc_ids") if isinstance(request, dict) else None
            else:
                ids = _json_param(params, "doc_ids", None)
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise FakeCouchError(
                    400, "bad_request", "`doc_ids` filter parameter is not a list of doc ids."
                )
            wanted = frozenset(ids)
            return lambda doc: doc.id in wanted
        if name == "_design":
            return lambda doc: doc.id.startswith("_design/")
        if name == "_view":
            raise _not_implemented(method, f"/{db.name}/_changes?filter=_view")
        ddoc_name, slash, _ = name.partition("/")
        if not slash or not ddoc_name:
            raise FakeCouchError(
                400, "bad_request", "filter parameter must be of the form `designname/filtername`"
            )
        ddoc = db.docs.get(f"_design/{ddoc_name}")
        if ddoc is None:
            raise FakeCouchError(404, "not_found", "missing")
        if ddoc.deleted:
            raise FakeCouchError(404, "not_found", "deleted")
        raise _not_implemented(method, f"/{db.name}/_changes?filter={name} (a JavaScript filter)")

    def _request_selector(
        self, method: str, params: dict[str, str], headers: dict[str, str], body: bytes
    ) -> JSON:
        # CouchDB 3 reads the selector from the POST body only.
        if method == "POST" and body.strip():
            _require_json_ctype(headers)
            request = _json_body(body)
            if not isinstance(request, dict):
                raise FakeCouchError(400, "bad_request", "Request body must be a JSON object")
            if "selector" in request:
                return request["selector"]
        if self.selector_query_fallback and "selector" in params:
            try:
                return json.loads(params["selector"])
            except ValueError:
                raise FakeCouchError(
                    400, "bad_request", "Selector error: expected a JSON object"
                ) from None
        if method == "POST":
            raise FakeCouchError(400, "bad_request", "Selector error: expected a JSON object")
        raise FakeCouchError(400, "bad_request", "Selector must be specified in POST payload")

    def _collect(self, plan: _FeedPlan) -> tuple[list[tuple[int, Doc]], int, bool, int]:
        """Rows after ``plan.position`` that pass the filter: (rows, end, db alive, generation)."""
        with self._lock:
            db = plan.db
            alive = self._dbs.get(db.name) is db
            rows: list[tuple[int, Doc]] = []
            for n in db.by_seq.irange(minimum=plan.position + 1):
                doc = db.docs[db.by_seq[n]]
                if plan.accept(doc):
                    row: Doc = {
                        "seq": self._seq(db, n),
                        "id": doc.id,
                        "changes": [{"rev": doc.rev}],
                    }
                    if doc.deleted:
                        row["deleted"] = True
                    if plan.include_docs:
                        row["doc"] = doc.to_json()
                    rows.append((n, row))
            return rows, db.update_seq, alive, self._generation

    async def _feed(self, plan: _FeedPlan) -> AsyncGenerator[bytes, None]:
        with self._lock:
            self._open_feeds += 1
        try:
            continuous = plan.style == "continuous"
            sent = 0
            limit_hit = False
            last_sent = idle_since = time.monotonic()
            seen_update_seq = -1
            # Whether a row or a blank line went out yet: CouchDB sends one
            # "\n" when it starts waiting with nothing sent, which also gets
            # the (delayed) response headers to the client.
            produced = False
            if not continuous:
                yield b'{"results":[\n'
            while True:
                self._check_dropped(plan)
                rows, end, alive, generation = self._collect(plan)
                if end != seen_update_seq:
                    idle_since, seen_update_seq = time.monotonic(), end
                for n, row in rows:
                    await self._feed_fault(plan, sent)
                    data = json.dumps(row, separators=(",", ":")).encode()
                    if continuous:
                        yield data + b"\n"
                    else:
                        yield data if sent == 0 else b",\r\n" + data
                    sent += 1
                    produced = True
                    plan.position = n
                    last_sent = time.monotonic()
                    if plan.limit is not None and sent >= plan.limit:
                        limit_hit = True
                        break
                else:
                    plan.position = max(plan.position, end)
                if limit_hit or not alive or plan.style == "normal":
                    break
                if plan.style == "longpoll" and sent:
                    break
                await self._feed_fault(plan, sent)
                if not produced:
                    yield b"\n"
                    produced = True
                now = time.monotonic()
                if plan.heartbeat is not None:
                    wait = max(0.0, last_sent + plan.heartbeat - now)
                else:
                    wait = max(0.0, idle_since + plan.timeout - now)
                woke = await self._wait(plan.db.name, generation, wait)
                self._check_dropped(plan)
                if woke:
                    continue
                if plan.heartbeat is not None:
                    yield b"\n"
                    last_sent = time.monotonic()
                    continue
                break  # timeout: the feed ends with its last_seq, as in CouchDB
            with self._lock:
                last_seq = self._seq(plan.db, plan.position)
                pending = len(plan.db.by_seq) - plan.db.by_seq.bisect_right(plan.position)
            if continuous:
                end_row = {"last_seq": last_seq, "pending": pending}
                yield json.dumps(end_row, separators=(",", ":")).encode() + b"\n"
            else:
                yield b'\n],\n"last_seq":%s,"pending":%d}\n' % (
                    json.dumps(last_seq).encode(),
                    pending,
                )
        finally:
            with self._lock:
                self._open_feeds -= 1

    def _check_dropped(self, plan: _FeedPlan) -> None:
        with self._lock:
            dropped = self._drop_generation != plan.drop_generation
        if dropped:
            raise FeedCut("connections dropped")

    async def _feed_fault(self, plan: _FeedPlan, sent: int) -> None:
        fault = plan.fault
        if fault is None or sent < fault.after_rows:
            return
        plan.fault = None
        with self._lock:
            self._event(fault.kind, plan.method, plan.path, f"after {sent} rows")
        if fault.kind == "cut":
            raise FeedCut(f"feed cut after {sent} rows")
        # A stall: nothing at all until the client gives up (it closes the
        # stream, which cancels this wait) or connections are dropped.
        while True:
            with self._lock:
                generation = self._generation
            await self._wait(plan.db.name, generation, None)
            self._check_dropped(plan)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# What the feed implements. `selector` is the query parameter PouchDB Server
# reads; CouchDB 3 ignores it (the selector comes from the body), and so does
# the fake unless `selector_query_fallback` is on. `style=all_docs` lists the
# one leaf a doc has here, as main_only does.
_CHANGES_PARAMS: Final = frozenset(
    {
        "feed",
        "since",
        "limit",
        "include_docs",
        "heartbeat",
        "timeout",
        "filter",
        "doc_ids",
        "selector",
        "descending",
        "conflicts",
        "attachments",
        "att_encoding_info",
        "style",
        "seq_interval",
    }
)
