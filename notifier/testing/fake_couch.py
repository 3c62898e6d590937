"""An in-memory CouchDB 3 for tests: stateful, strict where it matters, faulty on demand.

:class:`FakeCouch` answers the CouchDB HTTP API that notifier and its users'
scripts speak: databases, documents with real MVCC (``N-<32 hex>`` revs, 409
on a stale or missing ``_rev``, tombstones), ``_bulk_docs``, ``_all_docs``,
``_local/`` docs, optional Basic auth, and the ``_changes`` feed in its normal,
longpoll and continuous forms with ``since``, ``limit``, ``include_docs``,
``heartbeat``, ``timeout`` and the ``_selector``, ``_doc_ids`` and ``_design``
filters.

What it promises:

* **It behaves like Apache CouchDB 3, not like PouchDB Server.** Seqs are
  opaque strings (``"10-g1AAAA…"`` sorts before ``"9-g1AAAA…"``), a selector
  follows mango semantics (a missing field matches no operator except
  ``{"$exists": false}``, and ``$not`` is pushed down the same way CouchDB
  does it), the ``_selector`` filter reads its selector from the POST body.
  Where CouchDB would answer with an error, the fake does too; where the fake
  cannot do what CouchDB does (JavaScript filters, views, attachments, some
  mango operators), it answers an error that says so, never a silent
  approximation. ``docs/testing.md`` lists every known difference.
* **Faults on demand, and a record of them.** Error statuses for the next
  requests or for a path, added latency, a feed cut after N rows, a feed that
  stalls (no heartbeats either), refused connections, a replayed window of
  changes on reconnect. Every fault that fires is appended to
  :attr:`FakeCouch.events`; every request to :attr:`FakeCouch.requests`.
* **Transport-independent.** :meth:`FakeCouch.handle` takes a method, raw
  path, raw query, headers and body and returns a :class:`FakeResponse` whose
  body is bytes or an async iterator of chunks. :class:`FakeCouchTransport`
  serves it to an ``httpx.AsyncClient`` in process (streaming, honouring the
  client's read timeout); :mod:`notifier.testing.server` serves it on a
  loopback socket.
* **Thread-safe state.** The state lives behind one lock and feeds are woken
  with ``call_soon_threadsafe``, so a test thread may write docs while a
  socket server in a background thread streams the feed.

The fake needs an asyncio event loop; it does not run under trio.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, NoReturn, TypeAlias
from urllib.parse import parse_qsl, unquote

import httpx
from sortedcontainers import SortedDict

from notifier.testing import fake_find

__all__ = [
    "IN_PROCESS_URL",
    "FakeCouch",
    "FakeCouchError",
    "FakeCouchTransport",
    "FakeResponse",
    "FaultEvent",
    "FeedCut",
    "RequestRecord",
    "SelectorError",
    "compile_selector",
    "selector_matches",
]

log = logging.getLogger(__name__)

#: The base URL to give an httpx client that uses :class:`FakeCouchTransport`.
#: ``.invalid`` is a reserved TLD, so a client that bypasses the transport by
#: mistake fails to resolve instead of reaching some real host.
IN_PROCESS_URL: Final = "http://fakecouch.invalid:5984"

#: CouchDB's ``[chttpd] changes_timeout`` default: the longest a feed waits
#: for a change, and the cap on ``heartbeat`` and ``timeout``.
DEFAULT_MAX_TIMEOUT: Final = 60.0
# Chunks an in-process streamed answer may run ahead of its reader.
_STREAM_BUFFER_CHUNKS: Final = 256

JSON: TypeAlias = Any
Doc: TypeAlias = dict[str, Any]
HeadersLike: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]
FeedStyle: TypeAlias = Literal["normal", "longpoll", "continuous"]

_FEEDS: Final[dict[str, FeedStyle]] = {
    "normal": "normal",
    "longpoll": "longpoll",
    "continuous": "continuous",
    "live": "continuous",
}
_DB_NAME = re.compile(r"^[a-z][a-z0-9_$()+/-]*$")
# CouchDB accepts any rev id after "N-" (and answers a conflict if it is unknown).
_REV = re.compile(r"^[0-9]+-.+$")
_LOCAL_REV = re.compile(r"^0-([0-9]+)$")
# Special members CouchDB accepts in a written doc. The read-only ones are
# dropped silently, as CouchDB does; `_attachments` is refused (see below).
_WRITABLE_SPECIALS: Final = frozenset({"_id", "_rev", "_deleted", "_revisions"})
_IGNORED_SPECIALS: Final = frozenset(
    {"_conflicts", "_deleted_conflicts", "_local_seq", "_revs_info"}
)
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
_ERROR_NAMES: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "request_timeout",
    409: "conflict",
    412: "precondition_failed",
    429: "too_many_requests",
    500: "unknown_error",
    502: "bad_gateway",
    503: "service_unavailable",
    504: "gateway_timeout",
}
_MALFORMED_SINCE: Final = "Malformed sequence supplied in 'since' parameter."
_CONFLICT_REASON: Final = "Document update conflict."
_NO_DB_REASON: Final = "Database does not exist."


# -- public types ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FakeResponse:
    """What :meth:`FakeCouch.handle` answers.

    ``body`` is the whole body as bytes, or an async iterator of chunks for a
    streamed answer (every ``_changes`` response). An iterator may raise
    :class:`FeedCut`, which a transport turns into a dropped connection.
    """

    status: int
    headers: list[tuple[str, str]]
    body: bytes | AsyncIterator[bytes]

    @property
    def streaming(self) -> bool:
        return not isinstance(self.body, bytes)

    def json(self) -> JSON:
        """The decoded body of a non-streamed answer."""
        if not isinstance(self.body, bytes):
            raise TypeError("a streamed response has no single JSON body; iterate it")
        return json.loads(self.body)


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault that fired (or a fault switch that was thrown).

    ``kind`` is one of: ``status`` (an injected error status), ``latency``,
    ``cut`` (a feed dropped after some rows), ``stall``, ``refusing`` /
    ``accepting`` (the connection switch), ``refused`` (an in-process request
    refused while the switch is on), ``dropped`` (open connections dropped),
    ``replay`` (a feed started before the requested ``since``) and ``rewind``
    (a ``since`` from another database or an earlier incarnation of this one,
    restarted from 0 as CouchDB does).
    """

    kind: str
    method: str
    path: str
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the fake answered (or was asked to answer)."""

    method: str
    path: str
    query: str
    status: int


class FakeCouchError(Exception):
    """An error answer: status, CouchDB's ``error`` and ``reason`` fields.

    Raised by the fake's Python helpers (for example :meth:`FakeCouch.put` on
    a conflict) and turned into the HTTP answer by :meth:`FakeCouch.handle`.
    """

    def __init__(self, status: int, error: str, reason: str) -> None:
        super().__init__(f"{status} {error}: {reason}")
        self.status = status
        self.error = error
        self.reason = reason

    def response(self) -> FakeResponse:
        return _json_response(self.status, {"error": self.error, "reason": self.reason})


class SelectorError(FakeCouchError, ValueError):
    """A selector the fake refuses: malformed, or using an operator it does not support."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, "bad_request", reason)


class FeedCut(Exception):
    """Raised by a streamed body: the transport must drop the connection, unfinished."""


# -- mango selectors -------------------------------------------------------------------

# Operators CouchDB 3 knows that the fake does not evaluate. A selector using
# one gets a 400 that names it: matching it wrongly would pass a test that
# fails on CouchDB.
_KNOWN_UNSUPPORTED_OPS: Final = frozenset(
    {
        "$nor",
        "$all",
        "$elemMatch",
        "$allMatch",
        "$keyMapMatch",
        "$size",
        "$type",
        "$mod",
        "$regex",
        "$beginsWith",
        "$text",
        "$where",
        "$geoWithin",
        "$geoIntersects",
        "$near",
        "$nearSphere",
    }
)
_COMPARISONS: Final = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
_NEGATED: Final = {
    "$lt": "$gte",
    "$lte": "$gt",
    "$gt": "$lte",
    "$gte": "$lt",
    "$eq": "$ne",
    "$ne": "$eq",
    "$in": "$nin",
    "$nin": "$in",
}
_NOT_FOUND: Final = object()
_BAD_PATH: Final = object()


def compile_selector(selector: JSON) -> Callable[[Mapping[str, Any]], bool]:
    """Normalise a mango selector the way CouchDB 3 does and return its predicate.

    Raises :class:`SelectorError` for a malformed selector, an unknown operator
    or an operator the fake does not evaluate. Supported: ``$eq $ne $gt $gte
    $lt $lte $in $nin $exists $and $or $not``, implicit equality, implicit
    ``$and`` and nested or dotted field paths.

    >>> is_new = compile_selector({"notifiedRecipient": {"$exists": False}})
    >>> is_new({"_id": "m1"}), is_new({"_id": "m1", "notifiedRecipient": True})
    (True, False)
    >>> compile_selector({"notifiedRecipient": {"$ne": True}})({"_id": "m1"})
    False
    """
    if not isinstance(selector, dict):
        raise SelectorError("Selector error: expected a JSON object")
    if not selector:
        return lambda doc: True
    normalized = _norm_negations(_norm_fields(_norm_ops(selector), ""))
    _check_field_names(normalized)
    return lambda doc: _match(normalized, doc)


def selector_matches(selector: JSON, doc: Mapping[str, Any]) -> bool:
    """Whether CouchDB 3 would let ``doc`` through ``selector`` (see :func:`compile_selector`).

    >>> selector_matches({"$not": {"notifiedRecipient": True}}, {"_id": "m1"})
    False
    >>> selector_matches({"a.b": {"$gt": 1}}, {"a": {"b": 2}})
    True
    """
    return compile_selector(selector)(doc)


def _norm_ops(sel: JSON) -> JSON:
    """Make every operator explicit (CouchDB's ``norm_ops``)."""
    if not isinstance(sel, dict) or not sel:
        return {"$eq": sel}
    if len(sel) > 1:
        return {"$and": [_norm_ops({key: value}) for key, value in sel.items()]}
    ((key, arg),) = sel.items()
    if key in ("$and", "$or"):
        if not isinstance(arg, list):
            _bad_arg(key, arg)
        return {key: [_norm_ops(a) for a in arg]}
    if key == "$not":
        if not isinstance(arg, dict):
            _bad_arg(key, arg)
        return {key: _norm_ops(arg)}
    if key in ("$in", "$nin"):
        if not isinstance(arg, list):
            _bad_arg(key, arg)
        return sel
    if key == "$exists":
        if not isinstance(arg, bool):
            _bad_arg(key, arg)
        return sel
    if key in _COMPARISONS:
        return sel
    if key in _KNOWN_UNSUPPORTED_OPS:
        raise SelectorError(
            f"Selector operator {key} is valid in CouchDB but not supported by FakeCouch "
            f"(it evaluates $eq $ne $gt $gte $lt $lte $in $nin $exists $and $or $not)"
        )
    if key.startswith("$"):
        # CouchDB's own wording for an operator it does not know.
        raise SelectorError(f"Invalid operator: {key}")
    return {key: _norm_ops(arg)}


def _bad_arg(op: str, arg: JSON) -> NoReturn:
    raise SelectorError(f"Bad argument for operator {op}: {json.dumps(arg)}")


def _norm_fields(sel: JSON, path: str) -> JSON:
    """Push field names down to the operators, as dotted paths (CouchDB's ``norm_fields``)."""
    ((key, arg),) = sel.items()
    if key in ("$and", "$or"):
        return {key: [_norm_fields(a, path) for a in arg]}
    if key == "$not":
        return {key: _norm_fields(arg, path)}
    if key.startswith("$"):
        return {path: sel}
    # {"a": {"b": …}} and {"a.b": …} are the same path.
    return _norm_fields(arg, f"{path}.{key}" if path else key)


def _norm_negations(sel: JSON) -> JSON:
    """Move every ``$not`` down to the terminals (CouchDB's ``norm_negations``)."""
    ((key, arg),) = sel.items()
    if key == "$not":
        return _negate(arg)
    if key in ("$and", "$or"):
        return {key: [_norm_negations(a) for a in arg]}
    return sel


def _negate(sel: JSON) -> JSON:
    ((key, arg),) = sel.items()
    if key == "$not":
        return _norm_negations(arg)
    if key == "$and":
        return {"$or": [_negate(a) for a in arg]}
    if key == "$or":
        return {"$and": [_negate(a) for a in arg]}
    if key in _NEGATED:
        return {_NEGATED[key]: arg}
    if key == "$exists":
        return {"$exists": not arg}
    if key.startswith("$"):
        return {"$not": sel}
    return {key: _negate(arg)}


def _check_field_names(sel: JSON) -> None:
    ((key, arg),) = sel.items()
    if key in ("$and", "$or"):
        for a in arg:
            _check_field_names(a)
    elif key == "$not":
        _check_field_names(arg)
    elif key == "":
        raise SelectorError("Invalid selector: an operator needs a field name")


def _parse_field(path: str) -> list[str]:
    """Split a dotted field path; ``\\.`` is a literal dot (as in mango_util:parse_field)."""
    parts: list[str] = []
    current: list[str] = []
    chars = iter(path)
    for ch in chars:
        if ch == "\\":
            nxt = next(chars, "")
            current.append(nxt if nxt == "." else ch + nxt)
        elif ch == ".":
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _get_field(value: JSON, parts: Sequence[str]) -> JSON:
    for name in parts:
        if isinstance(value, Mapping):
            if name not in value:
                return _NOT_FOUND
            value = value[name]
        elif isinstance(value, list):
            if not name.isdigit() or int(name) >= len(value):
                return _BAD_PATH
            value = value[int(name)]
        else:
            return _BAD_PATH
    return value


def _match(sel: JSON, doc: JSON) -> bool:
    ((key, arg),) = sel.items()
    if key == "$and":
        return all(_match(a, doc) for a in arg)
    if key == "$or":
        return any(_match(a, doc) for a in arg)
    if key == "$not":
        return not _match(arg, doc)
    value = _get_field(doc, _parse_field(key))
    if value is _NOT_FOUND:
        # The rule that trips up `$ne` selectors: a missing field matches
        # nothing but `$exists: false`.
        return bool(arg == {"$exists": False})
    if value is _BAD_PATH:
        return False
    return _match_cond(arg, value, raw=(key == "_id"))


def _match_cond(cond: JSON, value: JSON, *, raw: bool) -> bool:
    ((op, arg),) = cond.items()
    if op == "$exists":
        return bool(arg)
    if op == "$in":
        if isinstance(value, list):
            return any(_collate(v, a, raw=raw) == 0 for a in arg for v in value)
        return any(_collate(value, a, raw=raw) == 0 for a in arg)
    if op == "$nin":
        if isinstance(value, list):
            return not any(_collate(v, a, raw=raw) == 0 for a in arg for v in value)
        return all(_collate(value, a, raw=raw) != 0 for a in arg)
    c = _collate(value, arg, raw=raw)
    if op == "$eq":
        return c == 0
    if op == "$ne":
        return c != 0
    if op == "$lt":
        return c < 0
    if op == "$lte":
        return c <= 0
    if op == "$gt":
        return c > 0
    if op == "$gte":
        return c >= 0
    raise SelectorError(f"Invalid operator: {op}")  # unreachable after normalisation


def _type_rank(value: JSON) -> int:
    # CouchDB's view collation: null < false < true < numbers < strings < arrays < objects.
    if value is None:
        return 0
    if value is False:
        return 1
    if value is True:
        return 2
    if isinstance(value, int | float):
        return 3
    if isinstance(value, str):
        return 4
    if isinstance(value, list):
        return 5
    return 6


def _collate(a: JSON, b: JSON, *, raw: bool = False) -> int:
    """Compare two JSON values in CouchDB's collation order (strings by code point)."""
    ra, rb = _type_rank(a), _type_rank(b)
    if ra != rb:
        return -1 if ra < rb else 1
    if ra in (3, 4):
        return int(a > b) - int(a < b)
    if ra == 5:
        for x, y in zip(a, b, strict=False):
            c = _collate(x, y, raw=raw)
            if c:
                return c
        return (len(a) > len(b)) - (len(a) < len(b))
    if ra == 6:
        for (ka, va), (kb, vb) in zip(a.items(), b.items(), strict=False):
            c = _collate(ka, kb) or _collate(va, vb)
            if c:
                return c
        return (len(a) > len(b)) - (len(a) < len(b))
    return 0


# -- storage ---------------------------------------------------------------------------


@dataclass(slots=True)
class _Doc:
    id: str
    pos: int
    rev_hashes: list[str]  # newest first, like CouchDB's _revisions.ids
    body: Doc
    deleted: bool
    seq: int

    @property
    def rev(self) -> str:
        return f"{self.pos}-{self.rev_hashes[0]}"

    def to_json(self, *, revs: bool = False) -> Doc:
        out: Doc = {"_id": self.id, "_rev": self.rev, **self.body}
        if self.deleted:
            out["_deleted"] = True
        if revs:
            out["_revisions"] = {"start": self.pos, "ids": list(self.rev_hashes)}
        return out


@dataclass(slots=True)
class _LocalDoc:
    id: str
    version: int
    body: Doc

    @property
    def rev(self) -> str:
        return f"0-{self.version}"

    def to_json(self) -> Doc:
        return {"_id": self.id, "_rev": self.rev, **self.body}


@dataclass(slots=True)
class _Database:
    name: str
    incarnation: int
    docs: dict[str, _Doc] = field(default_factory=dict)
    local: dict[str, _LocalDoc] = field(default_factory=dict)
    # seq -> doc id, holding only each doc's latest seq: that is what makes
    # the feed send only the latest change of each doc.
    by_seq: SortedDict = field(default_factory=SortedDict)
    update_seq: int = 0

    @property
    def doc_count(self) -> int:
        return sum(1 for d in self.docs.values() if not d.deleted)

    @property
    def doc_del_count(self) -> int:
        return sum(1 for d in self.docs.values() if d.deleted)


# -- faults ----------------------------------------------------------------------------


@dataclass(slots=True)
class _RequestRule:
    """Matches requests by method and path; fires ``remaining`` times (None: forever)."""

    path: re.Pattern[str] | None
    method: str | None
    remaining: int | None
    status: int = 0
    delay: float = 0.0

    def take(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


@dataclass(slots=True)
class _FeedFault:
    kind: Literal["cut", "stall"]
    after_rows: int
    feed: str | None
    remaining: int | None


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


def _compile_pattern(path: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if path is None or isinstance(path, re.Pattern):
        return path
    return re.compile(path)


# -- the fake --------------------------------------------------------------------------


class FakeCouch:
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

    def create_database(self, name: str) -> None:
        """Create an empty database; FakeCouchError 412 if it exists, 400 for a bad name."""
        with self._lock:
            if not _DB_NAME.match(name):
                raise FakeCouchError(
                    400,
                    "illegal_database_name",
                    f"Name: '{name}'. Only lowercase characters (a-z), digits (0-9), and any "
                    "of the characters _, $, (, ), +, -, and / are allowed. "
                    "Must begin with a letter.",
                )
            if name in self._dbs:
                raise FakeCouchError(
                    412,
                    "file_exists",
                    "The database could not be created, the file already exists.",
                )
            self._incarnations += 1
            self._dbs[name] = _Database(name=name, incarnation=self._incarnations)

    def delete_database(self, name: str) -> None:
        """Delete a database; open feeds on it end with their ``last_seq``."""
        with self._lock:
            self._db(name)
            del self._dbs[name]
        self._notify(name)

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
        if len(seg) == 1:
            return self._database_endpoint(method, top, params, headers, body)
        db_name, rest = top, seg[1:]
        if rest[0] in ("_design", "_local") and len(rest) >= 2:
            doc_id = f"{rest[0]}/{rest[1]}"
            if len(rest) > 2:
                self._db_checked(db_name)
                raise _not_implemented(method, decoded_path)
            return self._document_endpoint(method, db_name, doc_id, params, body)
        if rest[0] == "_index":
            return self._index(method, db_name, rest[1:], headers, body)
        if len(rest) > 1:
            raise _not_implemented(method, decoded_path)  # attachments
        name = rest[0]
        if name == "_find":
            _allow(method, "POST")
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
        return self._document_endpoint(method, db_name, name, params, body)

    def _server_endpoint(self, method: str, seg: list[str], params: dict[str, str]) -> FakeResponse:
        if seg == ["_up"]:
            _allow(method, "GET", "HEAD")
            return _json_response(200, {"status": "ok"})
        if seg == ["_all_dbs"]:
            _allow(method, "GET", "HEAD")
            return _json_response(200, self.database_names())
        if seg == ["_uuids"]:
            _allow(method, "GET", "HEAD")
            count = _int_param(params, "count", 1) or 1
            with self._lock:
                uuids = [self._new_id() for _ in range(count)]
            return _json_response(200, {"uuids": uuids})
        raise _not_implemented(method, "/" + "/".join(seg))

    # -- databases ---------------------------------------------------------------------

    def _db(self, name: str) -> _Database:
        db = self._dbs.get(name)
        if db is None:
            raise FakeCouchError(404, "not_found", _NO_DB_REASON)
        return db

    def _db_checked(self, name: str) -> _Database:
        with self._lock:
            return self._db(name)

    def _database_endpoint(
        self, method: str, name: str, params: dict[str, str], headers: dict[str, str], body: bytes
    ) -> FakeResponse:
        if method in ("GET", "HEAD"):
            with self._lock:
                db = self._db(name)
                info = {
                    "db_name": name,
                    "update_seq": self._seq(db, db.update_seq),
                    "purge_seq": self._seq(db, 0),
                    "doc_count": db.doc_count,
                    "doc_del_count": db.doc_del_count,
                    "sizes": {"file": 0, "external": 0, "active": 0},
                    "props": {},
                    "compact_running": False,
                    "instance_start_time": "0",
                    "disk_format_version": 8,
                    "cluster": {"q": 2, "n": 1, "w": 1, "r": 1},
                }
            return _json_response(200, info)
        if method == "PUT":
            self.create_database(name)
            return _json_response(201, {"ok": True})
        if method == "DELETE":
            self.delete_database(name)
            return _json_response(200, {"ok": True})
        if method == "POST":
            _require_json_ctype(headers)
            doc = _json_body(body)
            if not isinstance(doc, dict):
                raise FakeCouchError(400, "bad_request", "Document must be a JSON object")
            with self._lock:
                doc_id, rev = self._write(self._db(name), doc, doc_id=None, query_rev=None)
            self._notify(name)
            return _json_response(201, {"ok": True, "id": doc_id, "rev": rev})
        raise _method_not_allowed("GET,HEAD,PUT,DELETE,POST")

    # -- documents ---------------------------------------------------------------------

    def _document_endpoint(
        self, method: str, db_name: str, doc_id: str, params: dict[str, str], body: bytes
    ) -> FakeResponse:
        if method in ("GET", "HEAD"):
            with self._lock:
                db = self._db(db_name)
                if "open_revs" in params:
                    raise _not_implemented(method, f"/{db_name}/{doc_id}?open_revs")
                doc_json = self._read(db, doc_id, params)
            return _json_response(200, doc_json, etag=doc_json["_rev"])
        if method == "PUT":
            doc = _json_body(body)
            if not isinstance(doc, dict):
                raise FakeCouchError(400, "bad_request", "Document must be a JSON object")
            with self._lock:
                new_id, rev = self._write(
                    self._db(db_name), doc, doc_id=doc_id, query_rev=params.get("rev")
                )
            self._notify(db_name)
            return _json_response(201, {"ok": True, "id": new_id, "rev": rev}, etag=rev)
        if method == "DELETE":
            with self._lock:
                db = self._db(db_name)
                # CouchDB opens the doc first: a missing or deleted doc is a
                # 404, whatever the rev.
                self._read(db, doc_id, {})
                new_id, rev = self._write(
                    db, {"_deleted": True}, doc_id=doc_id, query_rev=params.get("rev")
                )
            self._notify(db_name)
            return _json_response(200, {"ok": True, "id": new_id, "rev": rev}, etag=rev)
        if method == "COPY":
            raise _not_implemented(method, f"/{db_name}/{doc_id}")
        raise _method_not_allowed("GET,HEAD,PUT,DELETE")

    def _read(self, db: _Database, doc_id: str, params: Mapping[str, str]) -> Doc:
        if doc_id.startswith("_local/"):
            local = db.local.get(doc_id)
            if local is None:
                raise FakeCouchError(404, "not_found", "missing")
            return local.to_json()
        doc = db.docs.get(doc_id)
        rev = params.get("rev")
        if doc is None:
            raise FakeCouchError(404, "not_found", "missing")
        revs = _bool_param(params, "revs", default=False)
        if rev is not None:
            # Only the current rev is kept: older ones read as missing, as on
            # a CouchDB that has just compacted.
            if rev != doc.rev:
                raise FakeCouchError(404, "not_found", "missing")
            return doc.to_json(revs=revs)
        if doc.deleted:
            raise FakeCouchError(404, "not_found", "deleted")
        return doc.to_json(revs=revs)

    def _write(
        self, db: _Database, doc: Doc, *, doc_id: str | None, query_rev: str | None
    ) -> tuple[str, str]:
        """Apply one interactive edit under the lock; return (id, new rev) or raise."""
        if doc_id is None:
            raw_id = doc.get("_id")
            if raw_id is None:
                doc_id = self._new_id()
            elif not isinstance(raw_id, str):
                raise FakeCouchError(400, "illegal_docid", "Document id must be a string")
            else:
                doc_id = raw_id
        _check_doc_id(doc_id)
        body_rev = doc.get("_rev")
        if body_rev is not None and not isinstance(body_rev, str):
            raise FakeCouchError(400, "bad_request", "Invalid rev format")
        if query_rev is not None and body_rev is not None and query_rev != body_rev:
            raise FakeCouchError(
                400,
                "bad_request",
                "Document rev from request body and query string have different values",
            )
        rev = query_rev if query_rev is not None else body_rev
        deleted = doc.get("_deleted", False) is True
        fields = _user_fields(doc)
        if doc_id.startswith("_local/"):
            return doc_id, self._write_local(db, doc_id, fields, rev, deleted)
        if rev is not None and not _REV.match(rev):
            raise FakeCouchError(400, "bad_request", "Invalid rev format")

        existing = db.docs.get(doc_id)
        if existing is None:
            if rev is not None:
                raise FakeCouchError(409, "conflict", _CONFLICT_REASON)
            pos, history = 1, []
        elif existing.deleted:
            # A tombstone can be extended without naming its rev.
            if rev is not None and rev != existing.rev:
                raise FakeCouchError(409, "conflict", _CONFLICT_REASON)
            pos, history = existing.pos + 1, existing.rev_hashes
        else:
            if rev != existing.rev:
                raise FakeCouchError(409, "conflict", _CONFLICT_REASON)
            pos, history = existing.pos + 1, existing.rev_hashes

        self._writes += 1
        digest = hashlib.blake2b(
            json.dumps(
                [self._salt, self._writes, db.name, doc_id, rev, deleted, fields],
                sort_keys=True,
                default=str,
            ).encode(),
            digest_size=16,
        ).hexdigest()
        db.update_seq += 1
        if existing is not None:
            del db.by_seq[existing.seq]
        new = _Doc(
            id=doc_id,
            pos=pos,
            rev_hashes=[digest, *history][:1000],
            body=fields,
            deleted=deleted,
            seq=db.update_seq,
        )
        db.docs[doc_id] = new
        db.by_seq[new.seq] = doc_id
        return doc_id, new.rev

    def _write_local(
        self, db: _Database, doc_id: str, fields: Doc, rev: str | None, deleted: bool
    ) -> str:
        # Local docs: never replicated, not in the feed, no update_seq bump,
        # revs "0-N"; CouchDB still checks the rev.
        existing = db.local.get(doc_id)
        if rev is not None and not _LOCAL_REV.match(rev):
            raise FakeCouchError(400, "bad_request", "Invalid rev format")
        if existing is None:
            if rev is not None and rev != "0-0":
                raise FakeCouchError(409, "conflict", _CONFLICT_REASON)
            version = 0
        else:
            if rev != existing.rev:
                raise FakeCouchError(409, "conflict", _CONFLICT_REASON)
            version = existing.version
        if deleted:
            if existing is None:
                raise FakeCouchError(404, "not_found", "missing")
            del db.local[doc_id]
            return "0-0"
        db.local[doc_id] = _LocalDoc(id=doc_id, version=version + 1, body=fields)
        return f"0-{version + 1}"

    def _new_id(self) -> str:
        return f"{self._random.getrandbits(128):032x}"

    def _bulk_docs(self, db_name: str, headers: dict[str, str], body: bytes) -> FakeResponse:
        _require_json_ctype(headers)
        request = _json_body(body)
        if not isinstance(request, dict) or "docs" not in request:
            raise FakeCouchError(400, "bad_request", "POST body must include `docs` parameter.")
        if not isinstance(request["docs"], list):
            raise FakeCouchError(400, "bad_request", "`docs` parameter must be an array.")
        if request.get("new_edits", True) is not True:
            raise _not_implemented("POST", f"/{db_name}/_bulk_docs with new_edits=false")
        docs = request["docs"]
        if not all(isinstance(d, dict) for d in docs):
            raise FakeCouchError(400, "bad_request", "Document must be a JSON object")
        results: list[Doc] = []
        with self._lock:
            db = self._db(db_name)
            # Validation errors fail the whole request, as in CouchDB;
            # conflicts are per doc.
            for doc in docs:
                if isinstance(doc.get("_id"), str):
                    _check_doc_id(doc["_id"])
                _user_fields(doc)
            for doc in docs:
                try:
                    doc_id, rev = self._write(db, dict(doc), doc_id=None, query_rev=None)
                except FakeCouchError as e:
                    if e.status != 409:
                        raise
                    results.append({"id": doc.get("_id"), "error": e.error, "reason": e.reason})
                else:
                    results.append({"ok": True, "id": doc_id, "rev": rev})
            self._maybe_shuffle(db_name, results)
        self._notify(db_name)
        return _json_response(201, results)

    def _maybe_shuffle(self, db_name: str, results: list[Doc]) -> None:
        if self._bulk_shuffles == 0 or len(results) < 2:
            return
        if self._bulk_shuffles is not None:
            self._bulk_shuffles -= 1
        before = list(results)
        self._random.shuffle(results)
        if results == before:
            results.reverse()
        self._event("shuffled", "POST", f"/{db_name}/_bulk_docs", f"{len(results)} rows")

    # -- mango (see notifier.testing.fake_find) ---------------------------------------

    def _find(self, db_name: str, headers: dict[str, str], body: bytes) -> FakeResponse:
        _require_json_ctype(headers)
        request = _json_body(body)
        with self._lock:
            db = self._db(db_name)
            live = [d.to_json() for d in db.docs.values() if not d.deleted]
            docs = [d for d in live if not d["_id"].startswith("_design/")]
            indexes = fake_find.indexes_of(d for d in live if d["_id"].startswith("_design/"))
            try:
                answer = fake_find.find(
                    docs,
                    indexes,
                    request,
                    compile_selector=compile_selector,
                    collate=_collate,
                )
            except fake_find.FindError as e:
                raise FakeCouchError(e.status, e.error, e.reason) from None
        return _json_response(200, copy.deepcopy(answer))

    def _index(
        self, method: str, db_name: str, rest: list[str], headers: dict[str, str], body: bytes
    ) -> FakeResponse:
        with self._lock:
            db = self._db(db_name)
            design = [
                d.to_json()
                for d in db.docs.values()
                if not d.deleted and d.id.startswith("_design/")
            ]
            indexes = fake_find.indexes_of(design)
        if not rest:
            _allow(method, "GET", "POST")
            if method == "GET":
                special = {
                    "ddoc": None,
                    "name": "_all_docs",
                    "type": "special",
                    "def": {"fields": [{"_id": "asc"}]},
                }
                listed = [special, *(i.to_json() for i in indexes)]
                return _json_response(200, {"total_rows": len(listed), "indexes": listed})
            _require_json_ctype(headers)
            try:
                ddoc_id, name, index = fake_find.parse_index_request(_json_body(body), self._new_id)
            except fake_find.FindError as e:
                raise FakeCouchError(e.status, e.error, e.reason) from None
            with self._lock:
                db = self._db(db_name)
                existing = db.docs.get(ddoc_id)
                current = existing.to_json() if existing and not existing.deleted else None
                updated = fake_find.index_design_doc(current, index)
                if updated is not None:
                    self._write(db, updated, doc_id=None, query_rev=None)
            if updated is None:
                return _json_response(200, {"result": "exists", "id": ddoc_id, "name": name})
            self._notify(db_name)
            return _json_response(200, {"result": "created", "id": ddoc_id, "name": name})
        if len(rest) == 3 and method == "DELETE":
            ddoc, kind, name = rest
            ddoc_id = ddoc if ddoc.startswith("_design/") else f"_design/{ddoc}"
            if kind != "json" or not any(i.ddoc == ddoc_id and i.name == name for i in indexes):
                raise FakeCouchError(404, "not_found", "Index not found")
            with self._lock:
                db = self._db(db_name)
                current = db.docs[ddoc_id].to_json()
                views = {k: v for k, v in current["views"].items() if k != name}
                if views:
                    self._write(db, {**current, "views": views}, doc_id=None, query_rev=None)
                else:
                    self._write(
                        db,
                        {"_id": ddoc_id, "_rev": current["_rev"], "_deleted": True},
                        doc_id=None,
                        query_rev=None,
                    )
            self._notify(db_name)
            return _json_response(200, {"ok": True})
        raise _not_implemented(method, f"/{db_name}/_index/" + "/".join(rest))

    def _all_docs(
        self,
        method: str,
        db_name: str,
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> FakeResponse:
        _allow(method, "GET", "HEAD", "POST")
        include_docs = _bool_param(params, "include_docs", default=False)
        descending = _bool_param(params, "descending", default=False)
        inclusive_end = _bool_param(params, "inclusive_end", default=True)
        limit = _int_param(params, "limit", None)
        skip = _int_param(params, "skip", 0) or 0
        keys: JSON = None
        if "keys" in params:
            keys = _json_param(params, "keys")
        if method == "POST":
            _require_json_ctype(headers)
            request = _json_body(body)
            if isinstance(request, dict) and "keys" in request:
                keys = request["keys"]
        start = _json_param(params, "startkey", _json_param(params, "start_key", None))
        end = _json_param(params, "endkey", _json_param(params, "end_key", None))
        with self._lock:
            db = self._db(db_name)
            rows: list[Doc] = []
            if keys is not None:
                if not isinstance(keys, list):
                    raise FakeCouchError(400, "bad_request", "`keys` body member must be an array.")
                for key in keys:
                    doc = db.docs.get(key) if isinstance(key, str) else None
                    if doc is None:
                        rows.append({"key": key, "error": "not_found"})
                    elif doc.deleted:
                        rows.append(
                            {
                                "id": doc.id,
                                "key": doc.id,
                                "value": {"rev": doc.rev, "deleted": True},
                                **({"doc": None} if include_docs else {}),
                            }
                        )
                    else:
                        rows.append(_all_docs_row(doc, include_docs))
            else:
                # _all_docs orders ids by raw (byte) collation, not ICU.
                ids = sorted((i for i, d in db.docs.items() if not d.deleted), reverse=descending)
                for doc_id in ids:
                    if start is not None and (doc_id < start if not descending else doc_id > start):
                        continue
                    if end is not None:
                        past = doc_id > end if not descending else doc_id < end
                        if past or (not inclusive_end and doc_id == end):
                            continue
                    rows.append(_all_docs_row(db.docs[doc_id], include_docs))
            rows = rows[skip:]
            if limit is not None:
                rows = rows[:limit]
            total = db.doc_count
        return _json_response(200, {"total_rows": total, "offset": skip, "rows": rows})

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


# -- the in-process transport ----------------------------------------------------------


class FakeCouchTransport(httpx.AsyncBaseTransport):
    """Serves a :class:`FakeCouch` to an ``httpx.AsyncClient`` without sockets.

    Unlike ``httpx.ASGITransport`` it streams: a continuous feed yields its
    rows as they happen, and closing the response stops the feed. It also
    honours the request's read timeout (httpx leaves that to the transport),
    so a stalled feed or a long latency raises ``httpx.ReadTimeout`` just as
    over a socket. A cut feed raises ``httpx.RemoteProtocolError``; refused
    connections raise ``httpx.ConnectError``.
    """

    def __init__(self, couch: FakeCouch) -> None:
        self.couch = couch

    def __repr__(self) -> str:
        return f"<FakeCouchTransport {self.couch!r}>"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.decode("ascii")
        path, _, query = raw_path.partition("?")
        if self.couch.refusing_connections:
            self.couch.note_refused(request.method, path)
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        body = await request.aread()
        read_timeout = _read_timeout(request)
        try:
            async with asyncio.timeout(read_timeout):
                answer = await self.couch.handle(
                    request.method, path, query, request.headers.multi_items(), body
                )
        except TimeoutError:
            raise httpx.ReadTimeout("timed out", request=request) from None
        if isinstance(answer.body, bytes):
            return httpx.Response(
                answer.status, headers=answer.headers, content=answer.body, request=request
            )
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=_FeedStream(answer.body, read_timeout, request),
            request=request,
        )


class _FeedStream(httpx.AsyncByteStream):
    """A streamed answer, produced as a server would: whether or not the client reads.

    A task runs the feed into a bounded buffer (the socket buffers of a real
    connection), so a feed's ``timeout`` runs out, heartbeats are produced and
    a cut happens on the server's clock, not when the client next reads; a
    client that stops reading still holds the server back once the buffer is
    full.
    """

    def __init__(
        self, body: AsyncIterator[bytes], read_timeout: float | None, request: httpx.Request
    ) -> None:
        self._body = body
        self._read_timeout = read_timeout
        self._request = request
        self._buffer: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(
            _STREAM_BUFFER_CHUNKS
        )
        self._pump = asyncio.get_running_loop().create_task(self._produce())

    async def _produce(self) -> None:
        try:
            async for chunk in self._body:
                await self._buffer.put(chunk)
        except Exception as e:
            await self._buffer.put(e)
        else:
            await self._buffer.put(None)
        finally:
            if isinstance(self._body, AsyncGenerator):
                await self._body.aclose()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._read_timeout):
                    item = await self._buffer.get()
            except TimeoutError:
                await self.aclose()
                raise httpx.ReadTimeout("timed out", request=self._request) from None
            if item is None:
                return
            if isinstance(item, FeedCut):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(incomplete chunked read)",
                    request=self._request,
                )
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        # Closing the response is the client hanging up: the feed stops.
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)


# -- small helpers ---------------------------------------------------------------------


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _read_timeout(request: httpx.Request) -> float | None:
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        value = timeouts.get("read")
        if isinstance(value, int | float):
            return float(value)
    return None


def _check_count(count: int | None) -> None:
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None (forever), not {count}")


def _lower_headers(headers: HeadersLike) -> dict[str, str]:
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {k.lower(): v for k, v in items}


def _base_headers() -> list[tuple[str, str]]:
    return [
        ("content-type", "application/json"),
        ("cache-control", "must-revalidate"),
        ("server", "FakeCouch (CouchDB 3 API)"),
    ]


def _json_response(status: int, payload: JSON, *, etag: str | None = None) -> FakeResponse:
    headers = _base_headers()
    if etag is not None:
        headers.append(("etag", f'"{etag}"'))
    return FakeResponse(
        status, headers, json.dumps(payload, separators=(",", ":")).encode() + b"\n"
    )


def _error(status: int, error: str, reason: str) -> FakeResponse:
    return _json_response(status, {"error": error, "reason": reason})


def _not_implemented(method: str, what: str) -> FakeCouchError:
    return FakeCouchError(501, "not_implemented", f"FakeCouch does not implement {method} {what}")


def _method_not_allowed(allowed: str) -> FakeCouchError:
    return FakeCouchError(405, "method_not_allowed", f"Only {allowed} allowed")


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise _method_not_allowed(",".join(allowed))


def _require_json_ctype(headers: Mapping[str, str]) -> None:
    if "application/json" not in headers.get("content-type", ""):
        raise FakeCouchError(415, "bad_content_type", "Content-Type must be application/json")


def _json_body(body: bytes) -> JSON:
    try:
        return json.loads(body)
    except ValueError:
        raise FakeCouchError(400, "bad_request", "invalid UTF-8 JSON") from None


def _json_param(params: Mapping[str, str], name: str, default: JSON = None) -> JSON:
    if name not in params:
        return default
    try:
        return json.loads(params[name])
    except ValueError:
        raise FakeCouchError(
            400, "query_parse_error", f"Invalid value for JSON parameter {name}"
        ) from None


def _bool_param(params: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = params.get(name)
    if value is None:
        return default
    if value in ("true", "false"):
        return value == "true"
    raise FakeCouchError(400, "query_parse_error", f'Invalid boolean parameter: "{value}"')


def _int_param(params: Mapping[str, str], name: str, default: int | None) -> int | None:
    value = params.get(name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        number = -1
    if number < 0:
        raise FakeCouchError(400, "query_parse_error", f'Invalid value for integer: "{value}"')
    return number


def _check_doc_id(doc_id: str) -> None:
    if not doc_id:
        raise FakeCouchError(400, "illegal_docid", "Document id must not be empty")
    if doc_id.startswith("_") and not doc_id.startswith(("_design/", "_local/")):
        raise FakeCouchError(
            400, "illegal_docid", "Only reserved document ids may start with underscore."
        )


def _user_fields(doc: Mapping[str, Any]) -> Doc:
    """The doc's own fields; special members validated as CouchDB does."""
    fields: Doc = {}
    for key, value in doc.items():
        if key.startswith("_"):
            if key in _WRITABLE_SPECIALS or key in _IGNORED_SPECIALS:
                continue
            if key == "_attachments":
                raise FakeCouchError(
                    501, "not_implemented", "FakeCouch does not implement attachments"
                )
            raise FakeCouchError(400, "doc_validation", f"Bad special document member: {key}")
        fields[key] = value
    return fields


def _all_docs_row(doc: _Doc, include_docs: bool) -> Doc:
    row: Doc = {"id": doc.id, "key": doc.id, "value": {"rev": doc.rev}}
    if include_docs:
        row["doc"] = doc.to_json()
    return row
