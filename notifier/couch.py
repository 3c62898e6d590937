"""A small CouchDB HTTP client: the only place that speaks HTTP to CouchDB.

It turns every failure into one of the :mod:`notifier.errors` classes, so the
rest of the daemon decides on "fatal, conflict or retriable" and never looks at
status codes or httpx exceptions.

It works against Apache CouchDB and PouchDB Server alike, and relies on nothing
where they differ:

* ``Accept: application/json`` on every request (PouchDB Server answers
  ``text/plain`` otherwise);
* ``Accept-Encoding: identity`` on the changes feed, because PouchDB Server
  gzips when offered and a gzipped continuous feed is held back until it closes;
* the ``_selector`` filter's selector is sent both in the POST body (where
  CouchDB reads it) and as a ``selector`` query parameter (where PouchDB Server
  reads it; without it, its process dies looking for a design doc);
* seqs are passed back exactly as received, never parsed.
"""

from __future__ import annotations

import json
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from notifier.config import CouchConfig, Secret
from notifier.errors import (
    CouchAccessDenied,
    CouchError,
    CouchFatalError,
    CouchTimeoutError,
    CouchTransientError,
    DocumentConflict,
)
from notifier.tracker import Seq

log = logging.getLogger(__name__)

Doc = dict[str, Any]


_JSON_CONTENT = {"Content-Type": "application/json"}


def encode_json(value: Any) -> bytes:
    """JSON for a request body, ASCII-only.

    Escaping everything non-ASCII (as ``\\uXXXX``) means a document that holds
    a lone UTF-16 surrogate, which JSON allows and JavaScript clients write,
    can still be sent back to CouchDB; a UTF-8 encoder would refuse it.

    >>> encode_json({"s": "cut \\ud83d", "t": "é"})
    b'{"s":"cut \\\\ud83d","t":"\\\\u00e9"}'
    """
    return json.dumps(value, separators=(",", ":")).encode("ascii")


def doc_path(database: str, doc_id: str) -> str:
    """URL path of a document, escaping the id but keeping special prefixes readable.

    >>> doc_path("messages", "a/b c")
    '/messages/a%2Fb%20c'
    >>> doc_path("messages", "_design/x y")
    '/messages/_design/x%20y'
    """
    db = quote(database, safe="")
    for prefix in ("_design/", "_local/"):
        if doc_id.startswith(prefix):
            return f"/{db}/{prefix}{_quote_id(doc_id[len(prefix) :])}"
    return f"/{db}/{_quote_id(doc_id)}"


def _quote_id(doc_id: str) -> str:
    # surrogatepass: an id with a lone surrogate (valid JSON) must not crash
    # the worker; the server answers for it as for any other odd id.
    return quote(doc_id, safe="", errors="surrogatepass")


def seq_param(seq: Seq) -> str:
    """A seq as the ``since`` query parameter: strings verbatim, anything else as JSON.

    >>> seq_param("12-g1AAAA"), seq_param(12), seq_param([3, "x"])
    ('12-g1AAAA', '12', '[3, "x"]')
    """
    return seq if isinstance(seq, str) else json.dumps(seq)


class CouchClient:
    """An async context manager around one ``httpx.AsyncClient`` for one CouchDB server.

    ``transport`` lets tests (and users of :mod:`notifier.testing`) put an
    in-process fake CouchDB behind the very same client code.
    """

    def __init__(
        self,
        *,
        url: str,
        username: str | None = None,
        password: Secret | None = None,
        timeout: float = 30.0,
        verify: bool | str = True,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self._timeout = timeout
        auth = httpx.BasicAuth(username, password.reveal()) if username and password else None
        verify_arg: bool | ssl.SSLContext = (
            verify if isinstance(verify, bool) else (ssl.create_default_context(cafile=verify))
        )
        self._http = httpx.AsyncClient(
            base_url=self.url,
            auth=auth,
            timeout=timeout,
            verify=verify_arg,
            transport=transport,
            headers={"Accept": "application/json"},
            # The connection pool is shared by the feed and the writers; keep
            # enough keep-alive connections for a full batch of parallel marks.
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
        )
        self.requests = 0

    @classmethod
    def from_config(
        cls, config: CouchConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> Self:
        return cls(
            url=config.url,
            username=config.username,
            password=config.password,
            timeout=config.request_timeout,
            verify=config.ca_file if config.ca_file and config.tls_verify else config.tls_verify,
            transport=transport,
        )

    def __repr__(self) -> str:
        return f"<CouchClient {self.url} requests={self.requests}>"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # -- plain requests -------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        json_body: Any = None,
    ) -> Any:
        """Send one request; return the decoded JSON body of a 2xx answer, or raise."""
        what = f"{method} {self.url}{path}"
        self.requests += 1
        try:
            response = await self._http.request(
                method,
                path,
                params=params,
                content=None if json_body is None else encode_json(json_body),
                headers=None if json_body is None else _JSON_CONTENT,
            )
        except httpx.TimeoutException as e:
            raise CouchTimeoutError(f"CouchDB {what}: no answer in time ({_name(e)})") from e
        except httpx.TransportError as e:
            raise CouchTransientError(f"CouchDB {what}: {_name(e)}: {e}") from e
        if response.is_success:
            return _decode(response, what)
        raise _status_error(response, what)

    async def get_doc(self, database: str, doc_id: str) -> Doc | None:
        """The current revision of a document, or ``None`` if it is missing or deleted.

        A missing *database* is not a missing document: it raises CouchFatalError.
        """
        try:
            doc: Doc = await self.request("GET", doc_path(database, doc_id))
        except CouchFatalError as e:
            if e.status == 404 and e.reason in ("missing", "deleted"):
                return None
            raise
        return doc

    async def put_doc(self, database: str, doc: Mapping[str, Any]) -> str:
        """Write a document; return its new rev. A stale ``_rev`` raises DocumentConflict."""
        result = await self.request("PUT", doc_path(database, doc["_id"]), json_body=dict(doc))
        rev: str = result["rev"]
        return rev

    async def delete_doc(self, database: str, doc_id: str, rev: str) -> None:
        """Delete a document revision; a stale ``rev`` raises DocumentConflict."""
        await self.request("DELETE", doc_path(database, doc_id), params={"rev": rev})

    async def bulk_docs(self, database: str, docs: list[Mapping[str, Any]]) -> list[Doc]:
        """Write many documents in one request; per-document conflicts come back in the list."""
        result: list[Doc] = await self.request(
            "POST", f"/{quote(database, safe='')}/_bulk_docs", json_body={"docs": docs}
        )
        return result

    async def get_docs(self, database: str, doc_ids: list[str]) -> dict[str, Doc | None]:
        """The current revision of each document, in one request; ``None`` if missing or deleted."""
        result = await self.request(
            "POST",
            f"/{quote(database, safe='')}/_all_docs",
            params={"include_docs": "true"},
            json_body={"keys": doc_ids},
        )
        found: dict[str, Doc | None] = dict.fromkeys(doc_ids)
        for row in result.get("rows", []):
            doc = row.get("doc")
            # A deleted document's row has a null doc; a missing one has an error.
            if isinstance(doc, dict) and row.get("key") in found:
                found[row["key"]] = doc
        return found

    async def database_info(self, database: str) -> Doc:
        info: Doc = await self.request("GET", f"/{quote(database, safe='')}")
        return info

    async def create_database(self, database: str) -> bool:
        """Create a database; ``False`` if it already existed (412)."""
        try:
            await self.request("PUT", f"/{quote(database, safe='')}")
        except CouchFatalError as e:
            if e.status == 412:
                return False
            raise
        return True

    # -- the changes feed -----------------------------------------------

    @asynccontextmanager
    async def changes(
        self,
        database: str,
        *,
        feed: str,
        since: Seq,
        selector: Mapping[str, Any] | None,
        heartbeat: float | None = None,
        idle_timeout: float | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """Open ``_changes`` and yield an iterator over its raw lines.

        The lines are JSON rows, blank heartbeat lines and, at the end of a
        normal feed, the whole ``{"results": …, "last_seq": …}`` body. Reading
        fails with CouchTimeoutError when no byte (not even a heartbeat)
        arrives for ``idle_timeout`` seconds, so a dead connection is noticed.
        """
        params: dict[str, str] = {
            "feed": feed,
            "include_docs": "true",
            "since": seq_param(since),
        }
        if heartbeat is not None:
            params["heartbeat"] = str(int(heartbeat * 1000))
        if limit is not None:
            params["limit"] = str(limit)
        body: dict[str, Any] = {}
        if selector is not None:
            params["filter"] = "_selector"
            params["selector"] = json.dumps(selector, separators=(",", ":"))
            body["selector"] = selector
        what = f"POST {self.url}/{database}/_changes?feed={feed}"
        timeout = httpx.Timeout(self._timeout, read=idle_timeout or self._timeout)
        self.requests += 1
        try:
            async with self._http.stream(
                "POST",
                f"/{quote(database, safe='')}/_changes",
                params=params,
                content=encode_json(body),
                headers={"Accept-Encoding": "identity", **_JSON_CONTENT},
                timeout=timeout,
            ) as response:
                if not response.is_success:
                    await response.aread()
                    raise _status_error(response, what)
                yield _lines(response, what)
        except httpx.TimeoutException as e:
            raise CouchTimeoutError(f"CouchDB {what}: no data in time ({_name(e)})") from e
        except httpx.TransportError as e:
            raise CouchTransientError(f"CouchDB {what}: {_name(e)}: {e}") from e


async def _lines(response: httpx.Response, what: str) -> AsyncIterator[bytes]:
    # Split on LF only. httpx's aiter_lines() splits like str.splitlines(),
    # also at U+2028, U+2029 and U+0085, which JSON strings may hold raw (and
    # PouchDB Server sends them so): a row would be cut in two, and the feed
    # would stall on it forever. Raw LF never occurs inside JSON.
    # Errors while reading reach changes() (the caller reads inside its
    # `async with`), which turns them into CouchErrors.
    pending = b""
    async for chunk in response.aiter_bytes():
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line
    if pending:
        yield pending


def _name(e: BaseException) -> str:
    return type(e).__name__


def _decode(response: httpx.Response, what: str) -> Any:
    try:
        return json.loads(response.content)
    except ValueError:
        raise CouchTransientError(
            f"CouchDB {what}: {response.status_code} with a body that is not JSON",
            status=response.status_code,
        ) from None


def _status_error(response: httpx.Response, what: str) -> CouchError:
    """Classify a non-2xx answer, quoting CouchDB's own error and reason."""
    status = response.status_code
    error = reason = None
    try:
        body = json.loads(response.content)
        if isinstance(body, dict):
            error, reason = body.get("error"), body.get("reason")
    except ValueError:
        pass
    detail = f"{error}: {reason}" if error else response.reason_phrase
    message = f"CouchDB {what}: {status} {detail}"
    if status == 409:
        return DocumentConflict(message, status=status, error=error, reason=reason)
    if (status >= 500 and status != 501) or status in (408, 429):
        # Overload, restarts, proxies in between: a retry can succeed.
        return CouchTransientError(message, status=status, error=error, reason=reason)
    if status == 401:
        message += " (check [couch] username and its password)"
        return CouchAccessDenied(message, status=status, error=error, reason=reason)
    if status == 403:
        message += " (the [couch] user lacks permission on this database)"
        return CouchAccessDenied(message, status=status, error=error, reason=reason)
    if status == 404 and reason in _MISSING_DATABASE:
        message += " (the database does not exist)"
    if status == 501:
        message += " (this server does not implement it)"
    return CouchFatalError(message, status=status, error=error, reason=reason)


#: The 404 reasons that mean the database (not a document) is missing:
#: PouchDB Server's and CouchDB's.
_MISSING_DATABASE = ("no_db_file", "Database does not exist.")


def short_reason(error: CouchError) -> str:
    """The error without its request line, e.g. ``404 not_found: Database does not exist.``.

    >>> short_reason(CouchError("CouchDB GET http://h/db: 404 not_found: missing"))
    '404 not_found: missing'
    """
    text = str(error)
    if text.startswith("CouchDB ") and ": " in text:
        return text.split(": ", 1)[1]
    return text


def is_missing_database(error: CouchError) -> bool:
    """Whether a 404 is about the database rather than a document."""
    return error.status == 404 and error.reason in _MISSING_DATABASE
