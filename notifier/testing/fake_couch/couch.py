"""The fake CouchDB itself: its state, Python helpers, fault switches and HTTP routing."""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, Literal
from urllib.parse import parse_qsl, quote, unquote

import httpx

from notifier.couch import doc_path
from notifier.testing.fake_couch.changes import DEFAULT_MAX_TIMEOUT, ChangesMixin, _Waiter
from notifier.testing.fake_couch.documents import _Database, key_range
from notifier.testing.fake_couch.faults import (
    FaultEvent,
    RequestRecord,
    _check_count,
    _compile_pattern,
    _FeedFault,
    _RequestRule,
)
from notifier.testing.fake_couch.find import FindMixin
from notifier.testing.fake_couch.transport import FakeCouchTransport
from notifier.testing.fake_couch.wire import (
    _ERROR_NAMES,
    Doc,
    FakeCouchError,
    FakeResponse,
    HeadersLike,
    _allow,
    _bool_param,
    _error,
    _int_param,
    _json_param,
    _json_response,
    _lower_headers,
    _not_implemented,
    _only,
    _with_location,
)

log = logging.getLogger(__name__)

#: The base URL to give an httpx client that uses :class:`FakeCouchTransport`.
#: ``.invalid`` is a reserved TLD, so a client that bypasses the transport by
#: mistake fails to resolve instead of reaching some real host.
IN_PROCESS_URL: Final = "http://fakecouch.invalid:5984"

# Endpoints CouchDB has and the fake does not: answered with 501 so that a
# test never mistakes "not implemented here" for "missing" (404).
_UNIMPLEMENTED_DB_ENDPOINTS: Final = frozenset(
    {
        "_explain",
        "_revs_diff",
        "_missing_revs",
        "_compact",
        "_view_cleanup",
        "_security",
        "_purge",
        "_purged_infos_limit",
        "_revs_limit",
        "_bulk_get",
        "_design_docs",
        "_local_docs",
        "_ensure_full_commit",
        "_partition",
        "_shards",
        "_sync_shards",
        "_auto_purge",
    }
)


class FakeCouch(FindMixin, ChangesMixin):
    """A stateful in-memory CouchDB 3 server. See the module docstring for what it promises.

    Keyword arguments:

    ``databases``
        names of databases to create empty at start.
    ``users``
        ``{name: password}``; when given, every request except ``GET /`` and
        ``GET /_up`` needs valid Basic credentials (401 otherwise), as on a
        CouchDB 3 whose databases are admin-only.
    ``replay_window``
        when positive, a ``_changes`` request with a ``since`` (other than 0
        and ``now``) starts that many changes earlier, as a CouchDB cluster
        does after a node failure. Can be changed at any time.
    ``selector_query_fallback``
        when false (the default), ``filter=_selector`` without a selector in
        the POST body gets a 400, as on CouchDB 3, so code that sends the
        selector only where PouchDB Server reads it fails here and not in
        production. When true, the fake falls back to the ``selector`` query
        parameter, as PouchDB Server does.
    ``max_timeout``
        seconds; CouchDB's ``changes_timeout``: the cap on ``heartbeat`` and
        ``timeout`` and the timeout of a feed that gives none.
    ``seed``
        makes generated ids, revs and seqs reproducible.

    The fault methods (``fail_next``, ``fail_requests``, ``add_latency``,
    ``cut_feed_after``, ``stall_feed_after``, ``refuse_connections``,
    ``drop_connections``, ``shuffle_bulk_answers``) may be called at any time, from any thread.
    """

    def __init__(
        self,
        *,
        databases: Iterable[str] = (),
        users: Mapping[str, str] | None = None,
        replay_window: int = 0,
        selector_query_fallback: bool = False,
        max_timeout: float = DEFAULT_MAX_TIMEOUT,
        seed: int | None = None,
    ) -> None:
        if replay_window < 0:
            raise ValueError(f"replay_window must be >= 0, not {replay_window}")
        if max_timeout <= 0:
            raise ValueError(f"max_timeout must be > 0, not {max_timeout}")
        self.users: dict[str, str] | None = dict(users) if users is not None else None
        self.replay_window = replay_window
        self.selector_query_fallback = selector_query_fallback
        self.max_timeout = max_timeout
        self.events: list[FaultEvent] = []
        self.requests: list[RequestRecord] = []

        self._lock = threading.RLock()
        self._random = random.Random(seed)
        self._salt = f"{self._random.getrandbits(64):016x}"
        self._dbs: dict[str, _Database] = {}
        self._incarnations = 0
        self._writes = 0
        # seq string -> (incarnation, number): lets `since` take any seq the
        # fake ever issued, and tell "another database" from "garbage".
        self._seq_book: dict[str, tuple[int, int]] = {}
        self._generation = 0
        self._drop_generation = 0
        self._waiters: list[_Waiter] = []
        self._listeners: list[Callable[[], None]] = []
        self._failures: list[_RequestRule] = []
        self._latencies: list[_RequestRule] = []
        self._feed_faults: list[_FeedFault] = []
        self._bulk_shuffles: int | None = 0
        self._refusing = False
        self._refuse_until: float | None = None
        self._open_feeds = 0
        for name in databases:
            self.create_database(name)

    def __repr__(self) -> str:
        with self._lock:
            return (
                f"<FakeCouch dbs={len(self._dbs)} requests={len(self.requests)} "
                f"open_feeds={self._open_feeds} events={len(self.events)}"
                f"{' refusing' if self.refusing_connections else ''}>"
            )

    # -- Python helpers (no HTTP) ------------------------------------------------------

    def transport(self) -> FakeCouchTransport:
        """An httpx transport that serves this fake in process (use with :data:`IN_PROCESS_URL`)."""
        return FakeCouchTransport(self)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An ``httpx.AsyncClient`` wired to this fake; keyword arguments go to the client."""
        kwargs.setdefault("base_url", IN_PROCESS_URL)
        kwargs.setdefault("headers", {"Accept": "application/json"})
        return httpx.AsyncClient(transport=self.transport(), **kwargs)

    @property
    def open_feeds(self) -> int:
        """How many ``_changes`` responses are being streamed right now."""
        with self._lock:
            return self._open_feeds

    def database_names(self) -> list[str]:
        with self._lock:
            return sorted(self._dbs)

    def put(self, database: str, doc: Mapping[str, Any]) -> str:
        """Write a doc with CouchDB's MVCC rules; return its new rev.

        A doc without ``_id`` gets a generated one. Raises FakeCouchError (409
        on a conflict). ``_local/`` ids are local docs.
        """
        # A JSON round trip validates the doc and keeps later changes to the
        # caller's objects out of the stored state.
        stored = json.loads(json.dumps(doc))
        with self._lock:
            _, rev = self._write(self._db(database), stored, doc_id=None, query_rev=None)
        self._notify(database)
        return rev

    def get(self, database: str, doc_id: str) -> Doc | None:
        """The current doc as CouchDB returns it, or None if it is missing or deleted."""
        with self._lock:
            db = self._db(database)
            if doc_id.startswith("_local/"):
                local = db.local.get(doc_id)
                return copy.deepcopy(local.to_json()) if local else None
            doc = db.docs.get(doc_id)
            return None if doc is None or doc.deleted else copy.deepcopy(doc.to_json())

    def delete(self, database: str, doc_id: str, rev: str) -> str:
        """Delete a doc (leaving a tombstone); return the tombstone's rev.

        Raises FakeCouchError: 404 if it is missing or already deleted, 409 on
        a stale rev.
        """
        with self._lock:
            db = self._db(database)
            self._read(db, doc_id, {})
            _, new_rev = self._write(db, {"_deleted": True}, doc_id=doc_id, query_rev=rev)
        self._notify(database)
        return new_rev

    def docs(self, database: str) -> list[Doc]:
        """Every live doc (design docs included, local docs not), in id order."""
        with self._lock:
            db = self._db(database)
            return copy.deepcopy(
                [db.docs[i].to_json() for i in sorted(db.docs) if not db.docs[i].deleted]
            )

    def changed_since(self, database: str, since: str) -> list[str]:
        """Ids of the docs whose latest change comes after ``since``, in feed order.

        What a client restarting from that seq would see again: no filter,
        no replay window, no faults, and no request recorded. Tests use it
        to check that a checkpoint never passes unfinished work.
        """
        with self._lock:
            db = self._db(database)
            position, _ = self._resolve_since(db, since, "GET", f"/{database}/_changes")
            return [db.by_seq[s] for s in db.by_seq.irange(minimum=position + 1)]

    def update_seq(self, database: str) -> str:
        """The database's current update seq, as an opaque string."""
        with self._lock:
            db = self._db(database)
            return self._seq(db, db.update_seq)

    # -- faults ------------------------------------------------------------------------

    def fail_next(self, count: int = 1, *, status: int = 503) -> None:
        """Answer the next ``count`` requests (any path) with ``status``."""
        self.fail_requests(status=status, count=count)

    def fail_requests(
        self,
        *,
        status: int = 503,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> None:
        """Answer requests whose path matches ``path`` (``re.search`` on the decoded path)
        and ``method`` with ``status``: ``count`` times, or until :meth:`clear_faults`."""
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an error status (4xx or 5xx), not {status}")
        _check_count(count)
        with self._lock:
            self._failures.append(
                _RequestRule(
                    path=_compile_pattern(path),
                    method=method.upper() if method else None,
                    remaining=count,
                    status=status,
                )
            )

    def add_latency(
        self,
        seconds: float,
        *,
        path: str | re.Pattern[str] | None = None,
        method: str | None = None,
        count: int | None = None,
    ) -> None:
        """Delay the answer (before its headers) to matching requests by ``seconds``.

        Matching rules add up. A delay longer than the client's read timeout
        makes the in-process transport raise ``httpx.ReadTimeout``, as a
        socket would.
        """
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        _check_count(count)
        with self._lock:
            self._latencies.append(
                _RequestRule(
                    path=_compile_pattern(path),
                    method=method.upper() if method else None,
                    remaining=count,
                    delay=seconds,
                )
            )

    def cut_feed_after(
        self, rows: int, *, count: int | None = 1, feed: str | None = "continuous"
    ) -> None:
        """Drop the next ``count`` feeds (``feed`` type; None: any) after ``rows`` change rows.

        The connection ends without the end of the body: httpx raises
        ``RemoteProtocolError``, through the socket server as in process.
        """
        self._add_feed_fault("cut", rows, count, feed)

    def stall_feed_after(
        self, rows: int = 0, *, count: int | None = 1, feed: str | None = "continuous"
    ) -> None:
        """Make the next ``count`` feeds go silent after ``rows`` change rows: no rows, no
        heartbeats, no end, until the client gives up or connections are dropped."""
        self._add_feed_fault("stall", rows, count, feed)

    def shuffle_bulk_answers(self, *, count: int | None = None) -> None:
        """Answer the next ``count`` ``_bulk_docs`` requests (None: all, until
        :meth:`clear_faults`) with their result rows in another order.

        PouchDB Server has been seen doing this after a restart, and CouchDB
        does not promise the order; a client must pair rows with its
        documents by ``id``. A request of two or more documents always gets
        an order different from the request's.
        """
        _check_count(count)
        with self._lock:
            self._bulk_shuffles = count

    def refuse_connections(self, seconds: float | None = None) -> None:
        """Act as a server that is down: refuse new connections and drop open ones.

        For ``seconds``, or until :meth:`accept_connections`. In process, a
        request raises ``httpx.ConnectError``; the socket server closes its
        listening socket (and reopens it on the same port afterwards).
        """
        if seconds is not None and seconds < 0:
            raise ValueError(f"seconds must be >= 0, not {seconds}")
        with self._lock:
            self._refusing = True
            self._refuse_until = None if seconds is None else time.monotonic() + seconds
            self._drop_generation += 1
            detail = "until accept_connections()" if seconds is None else f"for {seconds:g}s"
            self._event("refusing", "", "", detail)
        self._notify(None)
        self._call_listeners()

    def accept_connections(self) -> None:
        """End :meth:`refuse_connections` now."""
        with self._lock:
            was = self.refusing_connections
            self._refusing = False
            self._refuse_until = None
            if was:
                self._event("accepting", "", "", "")
        self._call_listeners()

    @property
    def refusing_connections(self) -> bool:
        with self._lock:
            if (
                self._refusing
                and self._refuse_until is not None
                and time.monotonic() >= self._refuse_until
            ):
                self._refusing = False
                self._refuse_until = None
            return self._refusing

    @property
    def refusal_remaining(self) -> float | None:
        """Seconds until a timed refusal ends; None when not refusing or refusing indefinitely."""
        with self._lock:
            if not self.refusing_connections or self._refuse_until is None:
                return None
            return max(0.0, self._refuse_until - time.monotonic())

    def drop_connections(self) -> None:
        """Drop every open connection now (open feeds end unfinished); new ones are accepted."""
        with self._lock:
            self._drop_generation += 1
            self._event("dropped", "", "", f"{self._open_feeds} open feeds")
        self._notify(None)
        self._call_listeners()

    def clear_faults(self) -> None:
        """Remove every pending fault and accept connections again. Events stay recorded."""
        with self._lock:
            self._failures.clear()
            self._latencies.clear()
            self._feed_faults.clear()
            self._bulk_shuffles = 0
        self.accept_connections()

    def events_of(self, kind: str) -> list[FaultEvent]:
        """The recorded events of one kind."""
        with self._lock:
            return [e for e in self.events if e.kind == kind]

    @property
    def drop_generation(self) -> int:
        """Bumped each time open connections must be dropped (used by the socket server)."""
        with self._lock:
            return self._drop_generation

    def add_listener(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from any thread) when the connection switches change.

        Returns a function that removes it. The socket server uses this to
        close and reopen its listening socket.
        """
        with self._lock:
            self._listeners.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._listeners:
                    self._listeners.remove(callback)

        return remove

    def note_refused(self, method: str, path: str) -> None:
        """Record a request a transport refused because connections are refused."""
        with self._lock:
            self._event("refused", method, unquote(path), "connection refused")

    def _add_feed_fault(
        self, kind: Literal["cut", "stall"], rows: int, count: int | None, feed: str | None
    ) -> None:
        if rows < 0:
            raise ValueError(f"rows must be >= 0, not {rows}")
        _check_count(count)
        if feed not in (None, "normal", "longpoll", "continuous"):
            raise ValueError(f"feed must be normal, longpoll, continuous or None, not {feed!r}")
        with self._lock:
            self._feed_faults.append(
                _FeedFault(kind=kind, after_rows=rows, feed=feed, remaining=count)
            )

    def _event(self, kind: str, method: str, path: str, detail: str) -> None:
        self.events.append(FaultEvent(kind, method, path, detail, time.monotonic()))
        log.debug("fake couch fault %s %s %s: %s", kind, method, path, detail)

    def _call_listeners(self) -> None:
        with self._lock:
            listeners = list(self._listeners)
        for callback in listeners:
            callback()

    # -- HTTP --------------------------------------------------------------------------

    async def handle(
        self,
        method: str,
        path: str,
        query: str = "",
        headers: HeadersLike = (),
        body: bytes = b"",
    ) -> FakeResponse:
        """Answer one HTTP request. ``path`` and ``query`` are raw (still percent-encoded)."""
        method = method.upper()
        hdrs = _lower_headers(headers)
        decoded_path = unquote(path)
        # 499 ("client closed request") stays if the caller gives up first,
        # for example on a read timeout during injected latency.
        status = 499
        try:
            try:
                response = await self._handle(method, path, decoded_path, query, hdrs, body)
            except FakeCouchError as e:
                response = e.response()
            except Exception as e:
                # A bug in the fake: answer loudly rather than hang the caller.
                log.exception("FakeCouch failed on %s %s", method, decoded_path)
                response = _error(
                    500, "unknown_error", f"FakeCouch failed: {type(e).__name__}: {e}"
                )
            if method == "HEAD" and isinstance(response.body, bytes):
                response = FakeResponse(response.status, response.headers, b"")
            status = response.status
            return response
        finally:
            with self._lock:
                self.requests.append(RequestRecord(method, decoded_path, query, status))
            log.debug("fake couch %s %s?%s -> %d", method, decoded_path, query, status)

    async def _handle(
        self,
        method: str,
        path: str,
        decoded_path: str,
        query: str,
        headers: dict[str, str],
        body: bytes,
    ) -> FakeResponse:
        with self._lock:
            delay = sum(r.delay for r in self._latencies if r.take(method, decoded_path))
            if delay:
                self._event("latency", method, decoded_path, f"{delay:g}s")
        if delay:
            await asyncio.sleep(delay)
        with self._lock:
            failure = next((r for r in self._failures if r.take(method, decoded_path)), None)
            if failure is not None:
                self._event("status", method, decoded_path, str(failure.status))
        if failure is not None:
            return _error(
                failure.status, _ERROR_NAMES.get(failure.status, "error"), "injected fault"
            )

        segments = [unquote(s) for s in path.split("/")[1:]]
        if segments and segments[-1] == "":
            segments.pop()
        self._check_auth(method, segments, headers)
        params = dict(parse_qsl(query, keep_blank_values=True))
        return await self._route(method, segments, params, headers, body, decoded_path)

    def _check_auth(self, method: str, segments: list[str], headers: dict[str, str]) -> None:
        if self.users is None:
            return
        header = headers.get("authorization")
        if header is not None:
            scheme, _, encoded = header.partition(" ")
            try:
                name, _, password = base64.b64decode(encoded).decode().partition(":")
            except ValueError:
                name = password = ""
            if scheme.lower() != "basic" or self.users.get(name) != password:
                raise FakeCouchError(401, "unauthorized", "Name or password is incorrect.")
            return
        public = method in ("GET", "HEAD") and segments in ([], ["_up"], ["_uuids"])
        if not public:
            raise FakeCouchError(401, "unauthorized", "You are not authorized to access this db.")

    async def _route(
        self,
        method: str,
        seg: list[str],
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
        decoded_path: str,
    ) -> FakeResponse:
        if not seg:
            _allow(method, "GET", "HEAD")
            _only(params, frozenset(), method, "/")
            return _json_response(
                200,
                {
                    "couchdb": "Welcome",
                    "version": "3.3.3",
                    "vendor": {"name": "FakeCouch (notifier.testing)"},
                    "features": [],
                },
            )
        top = seg[0]
        if top.startswith("_"):
            return self._server_endpoint(method, seg, params)
        # CouchDB says where a created database or doc is, by the Host it was asked.
        base_url = f"http://{headers.get('host', IN_PROCESS_URL.removeprefix('http://'))}"
        if len(seg) == 1:
            response = self._database_endpoint(method, top, params, headers, body)
            if response.status == 201 and method == "PUT":
                return _with_location(response, base_url, _db_path(top))
            if response.status == 201:
                created = json.loads(response.body) if isinstance(response.body, bytes) else {}
                return _with_location(response, base_url, doc_path(top, created.get("id", "")))
            return response
        db_name, rest = top, seg[1:]
        if rest[0] in ("_design", "_local") and len(rest) >= 2:
            doc_id = f"{rest[0]}/{rest[1]}"
            if len(rest) > 2:
                self._db_checked(db_name)
                raise _not_implemented(method, decoded_path)
            return _located(
                self._document_endpoint(method, db_name, doc_id, params, headers, body),
                base_url,
                doc_path(db_name, doc_id),
            )
        if rest[0] == "_index":
            return self._index(method, db_name, rest[1:], params, headers, body)
        if len(rest) > 1:
            raise _not_implemented(method, decoded_path)  # attachments
        name = rest[0]
        if name == "_find":
            _allow(method, "POST")
            _only(params, frozenset(), method, decoded_path)
            return self._find(db_name, headers, body)
        if name == "_all_docs":
            return self._all_docs(method, db_name, params, headers, body)
        if name == "_bulk_docs":
            _allow(method, "POST")
            return self._bulk_docs(db_name, headers, body)
        if name == "_changes":
            _allow(method, "GET", "POST")
            return self._changes(method, db_name, params, headers, body, decoded_path)
        if name in _UNIMPLEMENTED_DB_ENDPOINTS:
            self._db_checked(db_name)
            raise _not_implemented(method, decoded_path)
        return _located(
            self._document_endpoint(method, db_name, name, params, headers, body),
            base_url,
            doc_path(db_name, name),
        )

    def _server_endpoint(self, method: str, seg: list[str], params: dict[str, str]) -> FakeResponse:
        where = "/" + "/".join(seg)
        if seg == ["_up"]:
            _allow(method, "GET", "HEAD")
            _only(params, frozenset(), method, where)
            return _json_response(200, {"status": "ok"})
        if seg == ["_all_dbs"]:
            _allow(method, "GET", "HEAD")
            _only(params, _ALL_DBS_PARAMS, method, where)
            start = _json_param(params, "startkey", _json_param(params, "start_key", None))
            end = _json_param(params, "endkey", _json_param(params, "end_key", None))
            skip = _int_param(params, "skip", 0) or 0
            limit = _int_param(params, "limit", None)
            names = key_range(
                self.database_names(),
                start=start,
                end=end,
                descending=_bool_param(params, "descending", default=False),
                inclusive_end=_bool_param(params, "inclusive_end", default=True),
            )[skip:]
            return _json_response(200, names if limit is None else names[:limit])
        if seg == ["_uuids"]:
            _allow(method, "GET", "HEAD")
            _only(params, frozenset({"count"}), method, where)
            count = _int_param(params, "count", 1) or 1
            with self._lock:
                uuids = [self._new_id() for _ in range(count)]
            return _json_response(200, {"uuids": uuids})
        raise _not_implemented(method, "/" + "/".join(seg))


_ALL_DBS_PARAMS: Final = frozenset(
    {
        "startkey",
        "start_key",
        "endkey",
        "end_key",
        "limit",
        "skip",
        "descending",
        "inclusive_end",
    }
)


def _db_path(database: str) -> str:
    return "/" + quote(database, safe="")


def _located(response: FakeResponse, base_url: str, path: str) -> FakeResponse:
    return _with_location(response, base_url, path) if response.status == 201 else response
