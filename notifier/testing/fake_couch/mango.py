"""Mango selectors as CouchDB 3 evaluates them, for the ``_selector`` filter.

:func:`compile_selector` normalises a selector the way CouchDB's
``mango_selector`` does (explicit operators, field paths pushed down,
negations moved to the terminals) and returns its predicate. What CouchDB 3
would refuse, or what the fake does not evaluate, raises
:class:`SelectorError`, a 400 that names the operator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, NoReturn

from notifier.testing.fake_couch.wire import JSON, FakeCouchError


class SelectorError(FakeCouchError, ValueError):
    """A selector the fake refuses: malformed, or using an operator it does not support."""

    def __init__(self, reason: str) -> None:
        super().__init__(400, "bad_request", reason)


# Operators CouchDB 3 knows that the fake does not evaluate. A selector using
# one gets a 400 that names it: matching it wrongly would pass a test that
# fails on CouchDB.
_KNOWN_UNSUPPORTED_OPS: Final = frozenset(
    {
        "$nor",
        "$keyMapMatch",
        "$text",
        "$where",
        "$geoWithin",
        "$geoIntersects",
        "$near",
        "$nearSphere",
    }
)
_COMPARISONS: Final = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
# Operators whose argument is a selector applied to each element of an array.
_ELEMENT_MATCHES: Final = frozenset({"$elemMatch", "$allMatch"})
_TYPES: Final = ("null", "boolean", "number", "string", "array", "object")
_SUPPORTED: Final = (
    "$eq $ne $gt $gte $lt $lte $in $nin $exists $type $size $mod $regex $beginsWith "
    "$all $elemMatch $allMatch $and $or $not"
)
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
    if key in _ELEMENT_MATCHES:
        if not isinstance(arg, dict):
            _bad_arg(key, arg)
        return {key: _norm_ops(arg)}
    if key in _ARGUMENT_CHECKS:
        if not _ARGUMENT_CHECKS[key](arg):
            _bad_arg(key, arg)
        return sel
    if key in _KNOWN_UNSUPPORTED_OPS:
        raise SelectorError(
            f"Selector operator {key} is valid in CouchDB but not supported by FakeCouch "
            f"(it evaluates {_SUPPORTED})"
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
    if key in _ELEMENT_MATCHES:
        # The inner selector applies to each element: its paths start there.
        return {path: {key: _norm_negations(_norm_fields(arg, ""))}}
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
    # An empty path is the value itself: an element inside $elemMatch.
    value = _get_field(doc, _parse_field(key)) if key else doc
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
    if op == "$not":
        return not _match_cond(arg, value, raw=raw)
    if op in _ELEMENT_MATCHES:
        if not isinstance(value, list) or not value:
            return False
        each = all if op == "$allMatch" else any
        return each(_match(arg, element) for element in value)
    if op == "$all":
        # CouchDB: a non-empty list whose every member is in the value (or
        # that equals it, for an array of arrays).
        if not isinstance(value, list) or not arg:
            return False
        return value == arg or all(any(_collate(v, a) == 0 for v in value) for a in arg)
    if op == "$size":
        return isinstance(value, list) and len(value) == arg
    if op == "$type":
        return bool(_type_name(value) == arg)
    if op == "$mod":
        if not _is_integer(value):
            return False
        divisor, remainder = arg
        # Erlang's rem: the result takes the sign of the dividend (Python's % does not).
        return bool(value - divisor * int(value / divisor) == remainder)
    if op == "$regex":
        return isinstance(value, str) and re.search(arg, value) is not None
    if op == "$beginsWith":
        return isinstance(value, str) and value.startswith(arg)
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


def _type_name(value: JSON) -> str:
    """The JSON type of ``value``, as ``$type`` names it."""
    rank = _type_rank(value)
    # false and true (ranks 1 and 2) are both "boolean".
    return _TYPES[rank - 1 if rank >= 2 else rank]


def _is_integer(value: JSON) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _valid_regex(arg: JSON) -> bool:
    # CouchDB compiles the pattern with PCRE; the fake with Python's re. A
    # pattern only PCRE understands (\p{...}, (?R), \h…) is refused here.
    if not isinstance(arg, str):
        return False
    try:
        re.compile(arg)
    except re.error:
        return False
    return True


def _valid_mod(arg: JSON) -> bool:
    return (
        isinstance(arg, list) and len(arg) == 2 and all(_is_integer(a) for a in arg) and arg[0] != 0
    )


_ARGUMENT_CHECKS: Final[dict[str, Callable[[JSON], bool]]] = {
    "$regex": _valid_regex,
    "$beginsWith": lambda arg: isinstance(arg, str),
    "$size": lambda arg: _is_integer(arg) and arg >= 0,
    "$all": lambda arg: isinstance(arg, list),
    "$mod": _valid_mod,
    "$type": lambda arg: arg in _TYPES,
}
