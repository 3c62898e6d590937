"""Databases, documents and revisions: CouchDB 3's MVCC rules, in memory.

Every write goes through :meth:`DocumentsMixin._write`: ``N-<32 hex>``
revs, a 409 on a stale or missing ``_rev``, tombstones that a new write
extends, ``_local/`` docs with ``0-N`` revs that never reach the feed. Only
the current revision of a doc is kept (as on a compacted CouchDB), so there
is always exactly one leaf.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sortedcontainers import SortedDict

from notifier.testing.fake_couch.mango import _collate
from notifier.testing.fake_couch.state import CouchState
from notifier.testing.fake_couch.wire import (
    JSON,
    Doc,
    FakeCouchError,
    FakeResponse,
    _allow,
    _base_headers,
    _bool_param,
    _int_param,
    _json_body,
    _json_param,
    _json_response,
    _method_not_allowed,
    _not_implemented,
    _only,
    _require_json_ctype,
)

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
_CONFLICT_REASON: Final = "Document update conflict."


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


class DocumentsMixin(CouchState):
    """Databases and documents of :class:`~notifier.testing.fake_couch.FakeCouch`, and
    their HTTP endpoints."""

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

    # -- databases ---------------------------------------------------------------------

    def _database_endpoint(
        self, method: str, name: str, params: dict[str, str], headers: dict[str, str], body: bytes
    ) -> FakeResponse:
        _only(params, _DATABASE_PARAMS.get(method, frozenset()), method, f"/{name}")
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
            for shards in ("q", "n"):
                # Shard settings: accepted and checked, with nothing to shard.
                _int_param(params, shards, None)
            if _bool_param(params, "partitioned", default=False):
                raise _not_implemented(method, f"/{name}?partitioned=true")
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
            return _write_answer(201, doc_id, rev, params)
        raise _method_not_allowed("GET,HEAD,PUT,DELETE,POST")

    # -- documents ---------------------------------------------------------------------

    def _document_endpoint(
        self,
        method: str,
        db_name: str,
        doc_id: str,
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> FakeResponse:
        _only(params, _DOCUMENT_PARAMS.get(method, frozenset()), method, f"/{db_name}/{doc_id}")
        if method in ("GET", "HEAD"):
            with self._lock:
                db = self._db(db_name)
                for name in ("open_revs", "atts_since"):
                    if name in params:
                        raise _not_implemented(method, f"/{db_name}/{doc_id}?{name}")
                doc_json = self._read(db, doc_id, params)
            etag = f'"{doc_json["_rev"]}"'
            if headers.get("if-none-match") == etag:
                # The client's copy is current: CouchDB sends no body.
                return FakeResponse(304, [*_base_headers(), ("etag", etag)], b"")
            return _json_response(200, doc_json, etag=doc_json["_rev"])
        if method == "PUT":
            doc = _json_body(body)
            if not isinstance(doc, dict):
                raise FakeCouchError(400, "bad_request", "Document must be a JSON object")
            if params.get("new_edits") == "false":
                raise _not_implemented(method, f"/{db_name}/{doc_id}?new_edits=false")
            _bool_param(params, "new_edits", default=True)
            with self._lock:
                new_id, rev = self._write(
                    self._db(db_name), doc, doc_id=doc_id, query_rev=params.get("rev")
                )
            self._notify(db_name)
            return _write_answer(201, new_id, rev, params)
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
            return _write_answer(200, new_id, rev, params)
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
        meta = _bool_param(params, "meta", default=False)
        revs_info = _bool_param(params, "revs_info", default=False) or meta
        local_seq = _bool_param(params, "local_seq", default=False)
        # There is only ever one leaf: no conflicts to list, and the latest
        # leaf of any rev is the current one. Accepted and checked.
        for name in ("conflicts", "deleted_conflicts", "latest", "atts", "att_encoding_info"):
            _bool_param(params, name, default=False)
        if rev is not None:
            # Only the current rev is kept: older ones read as missing, as on
            # a CouchDB that has just compacted.
            if rev != doc.rev:
                raise FakeCouchError(404, "not_found", "missing")
        elif doc.deleted:
            raise FakeCouchError(404, "not_found", "deleted")
        out = doc.to_json(revs=revs)
        if revs_info:
            # CouchDB's answer after compaction: older revs are "missing".
            out["_revs_info"] = [
                {"rev": f"{doc.pos - i}-{h}", "status": "missing" if i else "available"}
                for i, h in enumerate(doc.rev_hashes)
            ]
        if local_seq:
            out["_local_seq"] = self._seq(db, doc.seq)
        return out

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

    def _all_docs(
        self,
        method: str,
        db_name: str,
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> FakeResponse:
        _allow(method, "GET", "HEAD", "POST")
        _only(params, _ALL_DOCS_PARAMS, method, f"/{db_name}/_all_docs")
        for name in ("conflicts", "stable", "sorted"):
            # One leaf per doc, one node, always sorted: nothing to change.
            _bool_param(params, name, default=False)
        if params.get("update", "true") not in ("true", "false", "lazy"):
            raise FakeCouchError(400, "query_parse_error", "Invalid value for `update`")
        include_docs = _bool_param(params, "include_docs", default=False)
        update_seq = _bool_param(params, "update_seq", default=False)
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
        if "key" in params:
            # One key is the range from it to itself, as in a view.
            if keys is not None:
                raise FakeCouchError(400, "query_parse_error", "`keys` is incompatible with `key`")
            start = end = _json_param(params, "key")
            inclusive_end = True
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
                live = (i for i, d in db.docs.items() if not d.deleted)
                for doc_id in key_range(
                    live, start=start, end=end, descending=descending, inclusive_end=inclusive_end
                ):
                    rows.append(_all_docs_row(db.docs[doc_id], include_docs))
            rows = rows[skip:]
            if limit is not None:
                rows = rows[:limit]
            answer: Doc = {"total_rows": db.doc_count, "offset": skip, "rows": rows}
            if update_seq:
                answer["update_seq"] = self._seq(db, db.update_seq)
        return _json_response(200, answer)


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


def key_range(
    keys: Iterable[str], *, start: JSON, end: JSON, descending: bool, inclusive_end: bool
) -> list[str]:
    """The keys from ``start`` to ``end`` (None: open), in raw code point order.

    How ``_all_docs`` and ``_all_dbs`` list ids and names: raw collation,
    not ICU; a start or end key that is not a string sorts by CouchDB's type
    order (numbers before strings, arrays and objects after).
    """
    direction = -1 if descending else 1
    chosen = []
    for key in sorted(keys, reverse=descending):
        if start is not None and _collate(key, start) * direction < 0:
            continue
        if end is not None:
            past = _collate(key, end) * direction
            if past > 0 or (past == 0 and not inclusive_end):
                continue
        chosen.append(key)
    return chosen


def _write_answer(status: int, doc_id: str, rev: str, params: Mapping[str, str]) -> FakeResponse:
    """The answer to a single write; ``batch=ok`` gets CouchDB's 202 without a rev."""
    batch = params.get("batch")
    if batch is not None and batch != "ok":
        raise FakeCouchError(400, "bad_request", f'Invalid value for batch: "{batch}" (only "ok")')
    if batch == "ok":
        # CouchDB may write a batched doc later; the fake writes it at once,
        # which a client cannot tell apart (it was not told the rev).
        return _json_response(202, {"ok": True, "id": doc_id})
    return _json_response(status, {"ok": True, "id": doc_id, "rev": rev}, etag=rev)


_DATABASE_PARAMS: Final[dict[str, frozenset[str]]] = {
    "PUT": frozenset({"q", "n", "partitioned"}),
    "POST": frozenset({"batch"}),
}
_DOCUMENT_PARAMS: Final[dict[str, frozenset[str]]] = {
    "GET": frozenset(
        {
            "rev",
            "revs",
            "revs_info",
            "local_seq",
            "meta",
            "conflicts",
            "deleted_conflicts",
            "latest",
            "atts",
            "att_encoding_info",
            "open_revs",
            "atts_since",
        }
    ),
    "PUT": frozenset({"rev", "batch", "new_edits"}),
    "DELETE": frozenset({"rev", "batch"}),
}
_DOCUMENT_PARAMS["HEAD"] = _DOCUMENT_PARAMS["GET"]
_ALL_DOCS_PARAMS: Final = frozenset(
    {
        "conflicts",
        "descending",
        "endkey",
        "end_key",
        "include_docs",
        "inclusive_end",
        "key",
        "keys",
        "limit",
        "skip",
        "startkey",
        "start_key",
        "update_seq",
        "stable",
        "sorted",
        "update",
    }
)
