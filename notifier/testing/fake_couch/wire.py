"""The HTTP side of the fake CouchDB: answers, errors and query parameters.

:class:`FakeResponse` is what the fake answers, whatever carries it (the
in-process transport or the socket server); :class:`FakeCouchError` is an
error answer, raised anywhere and turned into CouchDB's ``{"error",
"reason"}`` body. The parameter helpers parse query parameters the way
CouchDB does and refuse a malformed one with CouchDB's 400.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

JSON: TypeAlias = Any
Doc: TypeAlias = dict[str, Any]
HeadersLike: TypeAlias = Mapping[str, str] | Iterable[tuple[str, str]]

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

    def json(self) -> JSON:
        """The decoded body of a non-streamed answer."""
        if not isinstance(self.body, bytes):
            raise TypeError("a streamed response has no single JSON body; iterate it")
        return json.loads(self.body)


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


class FeedCut(Exception):
    """Raised by a streamed body: the transport must drop the connection, unfinished."""


def _only(params: Mapping[str, str], allowed: frozenset[str], method: str, where: str) -> None:
    """Refuse every query parameter the endpoint does not implement, naming it.

    CouchDB ignores some parameters it does not know; the fake cannot tell
    those from ones it would have to honour, so it answers 501 rather than
    pretend a parameter took effect.
    """
    for name in params:
        if name not in allowed:
            raise FakeCouchError(
                501,
                "not_implemented",
                f"FakeCouch does not implement the query parameter {name!r} on {method} {where} "
                f"(it implements: {', '.join(sorted(allowed)) or 'none'})",
            )


def _with_location(response: FakeResponse, base_url: str, path: str) -> FakeResponse:
    """``response`` with CouchDB's ``Location`` header: where the created resource is."""
    headers = [*response.headers, ("location", f"{base_url}{path}")]
    return FakeResponse(response.status, headers, response.body)


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
