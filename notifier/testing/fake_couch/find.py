"""Mango queries: ``_find`` and ``_index``, as CouchDB 3 answers them.

Indexes live where CouchDB keeps them, in design documents with
``"language": "query"``, so they show in ``_all_docs`` and the changes feed
like any design document. A query uses a JSON index when every field of the
index is constrained by the selector (other than by ``$exists: false``);
results then come in the index's order (its fields' values, then ``_id``),
and documents without the indexed fields are not in it. Without a usable
index every document is scanned in ``_id`` order and the answer carries
CouchDB's warning. ``sort`` needs an index that starts with the sort fields
(``no_usable_index`` otherwise), as in CouchDB; sorting on ``_id`` alone needs
none.

``bookmark`` continues strictly after the last row of the previous page, by
its index key, so rows that drop out between pages do not shift the next
page (``skip`` does shift it, as in CouchDB). Refused with a clear error:
``partial_filter_selector``, text indexes and unknown request keys.
"""

from __future__ import annotations

import base64
import binascii
import copy
import functools
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from notifier.testing.fake_couch.documents import DocumentsMixin
from notifier.testing.fake_couch.mango import _collate, compile_selector
from notifier.testing.fake_couch.wire import (
    Doc,
    FakeCouchError,
    FakeResponse,
    _allow,
    _json_body,
    _json_response,
    _not_implemented,
    _only,
    _require_json_ctype,
)

__all__ = [
    "FindMixin",
    "MangoIndex",
    "find",
    "index_design_doc",
    "indexes_of",
    "parse_index_request",
]

NO_INDEX_WARNING = "No matching index found, create an index to optimize query time."
_FIND_KEYS = frozenset(
    {
        "selector",
        "limit",
        "skip",
        "sort",
        "fields",
        "use_index",
        "bookmark",
        "execution_stats",
        "r",
        "conflicts",
        "update",
        "stable",
    }
)


@dataclass(frozen=True, slots=True)
class MangoIndex:
    ddoc: str  # "_design/…"
    name: str
    fields: tuple[str, ...]
    directions: tuple[str, ...]

    def to_json(self) -> Doc:
        return {
            "ddoc": self.ddoc,
            "name": self.name,
            "type": "json",
            "partitioned": False,
            "def": {"fields": [{f: d} for f, d in zip(self.fields, self.directions, strict=True)]},
        }


def parse_index_request(body: Any, new_id: Callable[[], str]) -> tuple[str, str, MangoIndex]:
    """``POST _index``'s body as (ddoc id, index name, index)."""
    if not isinstance(body, dict) or not isinstance(body.get("index"), dict):
        raise FakeCouchError(400, "missing_required_key", "Missing required key: index")
    unknown = sorted(set(body) - {"index", "ddoc", "name", "type", "partitioned"})
    if unknown:
        raise FakeCouchError(400, "bad_request", f"Invalid key {unknown[0]} for index request")
    kind = body.get("type", "json")
    if kind != "json":
        raise FakeCouchError(501, "not_implemented", f"the fake has no {kind!r} indexes, only json")
    spec = body["index"]
    if "partial_filter_selector" in spec:
        raise FakeCouchError(
            501, "not_implemented", "the fake does not implement partial_filter_selector"
        )
    if set(spec) - {"fields"}:
        raise FakeCouchError(400, "bad_request", f"Invalid key in index: {sorted(set(spec))}")
    raw_fields = spec.get("fields")
    if not isinstance(raw_fields, list) or not raw_fields:
        raise FakeCouchError(400, "bad_request", "Index fields must be a non-empty array")
    fields, directions = _sort_spec(raw_fields)
    ddoc = body.get("ddoc") or new_id()
    name = body.get("name") or new_id()
    if not isinstance(ddoc, str) or not isinstance(name, str):
        raise FakeCouchError(400, "bad_request", "ddoc and name must be strings")
    ddoc_id = _ddoc_id(ddoc)
    return ddoc_id, name, MangoIndex(ddoc_id, name, fields, directions)


def _ddoc_id(ddoc: str) -> str:
    return ddoc if ddoc.startswith("_design/") else f"_design/{ddoc}"


def index_design_doc(existing: Mapping[str, Any] | None, index: MangoIndex) -> Doc | None:
    """The design document with ``index`` added, or None if it is already there."""
    views = dict((existing or {}).get("views") or {})
    definition = {
        "map": {"fields": dict(zip(index.fields, index.directions, strict=True))},
        "reduce": "_count",
        "options": {"def": {"fields": list(index.fields)}},
    }
    if views.get(index.name) == definition:
        return None
    views[index.name] = definition
    return {**(existing or {}), "_id": index.ddoc, "language": "query", "views": views}


def indexes_of(design_docs: Iterable[Mapping[str, Any]]) -> list[MangoIndex]:
    """The JSON indexes defined by the database's ``"language": "query"`` design docs."""
    found = []
    for doc in design_docs:
        if doc.get("language") != "query" or not isinstance(doc.get("views"), dict):
            continue
        for name, view in sorted(doc["views"].items()):
            spec = view.get("map", {}).get("fields") if isinstance(view, dict) else None
            if isinstance(spec, dict) and spec:
                found.append(
                    MangoIndex(doc["_id"], name, tuple(spec), tuple(str(d) for d in spec.values()))
                )
    return found


def find(docs: Iterable[Doc], indexes: list[MangoIndex], body: Any) -> Doc:
    """Answer a ``_find`` request over ``docs`` (live, non-design documents)."""
    if not isinstance(body, dict):
        raise FakeCouchError(400, "bad_request", "Request body must be a JSON object")
    unknown = sorted(set(body) - _FIND_KEYS)
    if unknown:
        raise FakeCouchError(400, "bad_request", f"Invalid key {unknown[0]} for find request")
    if "selector" not in body:
        raise FakeCouchError(400, "missing_required_key", "Missing required key: selector")
    selector = body["selector"]
    matches = compile_selector(selector)
    limit = _count(body, "limit", 25)
    skip = _count(body, "skip", 0)
    sort_fields, sort_dirs = _sort_spec(body.get("sort") or [])
    constrained = _constrained_fields(selector)
    usable = [i for i in indexes if all(f in constrained for f in i.fields)]
    warning = None
    index: MangoIndex | None = None
    if sort_fields and sort_fields != ("_id",):
        if len(set(sort_dirs)) > 1:
            raise FakeCouchError(
                400,
                "unsupported_mixed_sort",
                "Sorts currently only support a single direction for all fields.",
            )
        usable = [i for i in usable if i.fields[: len(sort_fields)] == sort_fields]
        if not usable:
            raise FakeCouchError(
                400,
                "no_usable_index",
                "No global index exists for this sort, try indexing by the sort fields.",
            )
    requested = body.get("use_index")
    if requested is not None:
        wanted = [i for i in usable if _names(i, requested)]
        if wanted:
            usable = wanted
        else:
            warning = (
                f"{_requested(requested)} was not used because it does not contain a valid "
                "index for this query."
            )
    if usable:
        index = max(usable, key=lambda i: len(i.fields))
    elif warning is None:
        warning = NO_INDEX_WARNING
    descending = bool(sort_dirs) and sort_dirs[0] == "desc"

    def key(doc: Doc) -> list[Any]:
        fields = index.fields if index is not None else ()
        return [_get(doc, f) for f in fields] + [doc["_id"]]

    rows = [d for d in docs if (index is None or all(_has(d, f) for f in index.fields))]
    rows = [d for d in rows if matches(d)]
    keyed = [(key(d), d) for d in rows]

    def by_key(a: tuple[list[Any], Doc], b: tuple[list[Any], Doc]) -> int:
        return _collate(a[0], b[0])

    keyed.sort(key=functools.cmp_to_key(by_key), reverse=descending)
    rows = [d for _, d in keyed]
    examined = len(rows)
    after = _bookmark(body.get("bookmark"))
    if after is not None:
        rows = [
            d
            for d in rows
            if (_collate(key(d), after) < 0 if descending else _collate(key(d), after) > 0)
        ]
    page = rows[skip : skip + limit]
    answer: Doc = {
        "docs": [_project(d, body.get("fields")) for d in page],
        "bookmark": _encode_bookmark(key(page[-1])) if page else "nil",
    }
    if warning is not None:
        answer["warning"] = warning
    if body.get("execution_stats") is True:
        answer["execution_stats"] = {
            "total_keys_examined": 0,
            "total_docs_examined": examined,
            "total_quorum_docs_examined": 0,
            "results_returned": len(page),
            "execution_time_ms": 0.0,
        }
    return answer


def _count(body: Mapping[str, Any], key: str, default: int) -> int:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FakeCouchError(400, "bad_request", f"Invalid value for {key}: {value!r}")
    return value


def _sort_spec(raw: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not isinstance(raw, list):
        raise FakeCouchError(400, "bad_request", "sort and fields must be arrays")
    fields, dirs = [], []
    for item in raw:
        if isinstance(item, str):
            fields.append(item)
            dirs.append("asc")
        elif isinstance(item, dict) and len(item) == 1:
            ((field, direction),) = item.items()
            if direction not in ("asc", "desc"):
                raise FakeCouchError(400, "bad_request", f"Invalid sort direction: {direction!r}")
            fields.append(field)
            dirs.append(direction)
        else:
            raise FakeCouchError(400, "bad_request", f"Invalid sort field: {item!r}")
    return tuple(fields), tuple(dirs)


def _constrained_fields(selector: Any, prefix: str = "") -> set[str]:
    """Field paths the selector constrains in a way an index can answer."""
    out: set[str] = set()
    if not isinstance(selector, dict):
        return out
    for key, value in selector.items():
        if key == "$and" and isinstance(value, list):
            for part in value:
                out |= _constrained_fields(part, prefix)
            continue
        if key.startswith("$"):
            continue
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value and not any(k.startswith("$") for k in value):
            out |= _constrained_fields(value, path + ".")
        elif not (isinstance(value, dict) and value.get("$exists") is False):
            out.add(path)
    return out


def _path(field: str) -> list[str]:
    return field.split(".")


def _has(doc: Mapping[str, Any], field: str) -> bool:
    value: Any = doc
    for part in _path(field):
        if not isinstance(value, dict) or part not in value:
            return False
        value = value[part]
    return True


def _get(doc: Mapping[str, Any], field: str) -> Any:
    value: Any = doc
    for part in _path(field):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def _project(doc: Doc, fields: Any) -> Doc:
    if fields is None:
        return doc
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise FakeCouchError(400, "bad_request", "fields must be an array of strings")
    out: Doc = {}
    for field in fields:
        if not _has(doc, field):
            continue
        *parents, last = _path(field)
        target = out
        for part in parents:
            target = target.setdefault(part, {})
        target[last] = _get(doc, field)
    return out


def _names(index: MangoIndex, requested: Any) -> bool:
    if isinstance(requested, str):
        return index.ddoc in (requested, f"_design/{requested}")
    if isinstance(requested, list) and len(requested) == 2:
        ddoc, name = requested
        return index.ddoc in (ddoc, f"_design/{ddoc}") and index.name == name
    raise FakeCouchError(400, "bad_request", f"Invalid use_index: {requested!r}")


def _requested(requested: Any) -> str:
    return ", ".join(map(str, requested)) if isinstance(requested, list) else str(requested)


def _encode_bookmark(key: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode("ascii")


def _bookmark(raw: Any) -> list[Any] | None:
    if raw is None or raw == "nil":
        return None
    try:
        key = json.loads(base64.urlsafe_b64decode(str(raw).encode("ascii")))
    except (ValueError, binascii.Error, UnicodeError):
        raise FakeCouchError(400, "invalid_bookmark", f"Invalid bookmark value: {raw!r}") from None
    if not isinstance(key, list):
        raise FakeCouchError(400, "invalid_bookmark", f"Invalid bookmark value: {raw!r}")
    return key


class FindMixin(DocumentsMixin):
    """The ``_find`` and ``_index`` endpoints of :class:`~notifier.testing.fake_couch.FakeCouch`."""

    def _find(self, db_name: str, headers: dict[str, str], body: bytes) -> FakeResponse:
        _require_json_ctype(headers)
        request = _json_body(body)
        with self._lock:
            db = self._db(db_name)
            live = [d.to_json() for d in db.docs.values() if not d.deleted]
            docs = [d for d in live if not d["_id"].startswith("_design/")]
            indexes = indexes_of(d for d in live if d["_id"].startswith("_design/"))
            answer = find(docs, indexes, request)
        return _json_response(200, copy.deepcopy(answer))

    def _index(
        self,
        method: str,
        db_name: str,
        rest: list[str],
        params: dict[str, str],
        headers: dict[str, str],
        body: bytes,
    ) -> FakeResponse:
        _only(params, frozenset(), method, f"/{db_name}/_index")
        with self._lock:
            db = self._db(db_name)
            design = [
                d.to_json()
                for d in db.docs.values()
                if not d.deleted and d.id.startswith("_design/")
            ]
            indexes = indexes_of(design)
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
            ddoc_id, name, index = parse_index_request(_json_body(body), self._new_id)
            with self._lock:
                db = self._db(db_name)
                existing = db.docs.get(ddoc_id)
                current = existing.to_json() if existing and not existing.deleted else None
                updated = index_design_doc(current, index)
                if updated is not None:
                    self._write(db, updated, doc_id=None, query_rev=None)
            if updated is None:
                return _json_response(200, {"result": "exists", "id": ddoc_id, "name": name})
            self._notify(db_name)
            return _json_response(200, {"result": "created", "id": ddoc_id, "name": name})
        if len(rest) == 3 and method == "DELETE":
            ddoc, kind, name = rest
            ddoc_id = _ddoc_id(ddoc)
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
