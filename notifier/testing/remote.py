"""A real CouchDB named by ``COUCHDB_URL``, behind the same helpers as the fake.

Tests that run against the fake CouchDB can also run against a real server:
set ``COUCHDB_URL`` (``http://user:password@host:5984``; the credentials may
instead come from ``COUCHDB_USER`` and ``COUCHDB_PASSWORD``). The pytest
plugin then runs every test that uses ``fake_couch`` twice, once against the
fake and once against that server, where ``fake_couch`` is a
:class:`RemoteCouch`.

What it promises:

* **Safe on a shared server.** A :class:`RemoteCouch` never touches a
  database it did not name: every database name a test uses (``messages``,
  ``workersequences``) is mapped to a unique one (:meth:`RemoteCouch.real_name`),
  and :meth:`RemoteCouch.close` deletes every database it handed out.
* **The fake's data helpers, over HTTP.** ``put``, ``get``, ``delete``,
  ``docs``, ``update_seq``, ``changed_since``, ``create_database``,
  ``delete_database`` and ``database_names`` follow the fake's signatures.
  Seqs are whatever the server says (strings on CouchDB 2+, integers on
  PouchDB Server), never compared or parsed.
* **No silent approximation.** The fake's fault switches (``fail_next``,
  ``cut_feed_after``…) and records (``events``, ``requests``) do not exist on
  a real server: using one raises an error that names it and says how to
  keep the test on the fake (``@pytest.mark.fake_couch_only``).
"""

from __future__ import annotations

import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Final, NoReturn, Self
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx

from notifier.couch import doc_path, seq_param
from notifier.testing.fake_couch import FakeCouch, FakeCouchError

__all__ = [
    "COUCHDB_URL_ENV",
    "RemoteCouch",
    "RemoteCouchError",
    "ServerURL",
    "http_client",
    "server_from_environment",
    "unique_database_name",
]

COUCHDB_URL_ENV: Final = "COUCHDB_URL"
COUCHDB_USER_ENV: Final = "COUCHDB_USER"
COUCHDB_PASSWORD_ENV: Final = "COUCHDB_PASSWORD"  # noqa: S105 (a variable name)

_DB_NAME_UNSAFE = re.compile(r"[^a-z0-9_]+")
# What the fake has and a real server cannot do on demand: every attribute of
# the FakeCouch class, and these, which only its instances have.
_FAKE_ONLY: Final = frozenset({"replay_window", "events", "requests"})


def unique_database_name(hint: str = "test") -> str:
    """A fresh, valid CouchDB database name that mentions ``hint``.

    Database names must start with a lowercase letter and may contain only
    lowercase letters, digits and ``_$()+-/``.

    >>> name = unique_database_name("test_x[param-1]")
    >>> name.startswith("test_x_param_1_"), len(name) == len("test_x_param_1_") + 10
    (True, True)
    """
    slug = _DB_NAME_UNSAFE.sub("_", hint.lower()).strip("_")[:40]
    if not slug or not slug[0].isalpha():
        slug = f"db_{slug}".rstrip("_")
    return f"{slug}_{uuid.uuid4().hex[:10]}"


@dataclass(frozen=True)
class ServerURL:
    """A CouchDB server's root URL and the credentials to use there (``repr`` hides them)."""

    base: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.username is None) != (self.password is None):
            raise ValueError("a CouchDB username needs a password, and a password a username")

    @classmethod
    def parse(cls, url: str, *, username: str | None = None, password: str | None = None) -> Self:
        """Split ``url``'s credentials off; ``username``/``password`` fill in absent ones.

        >>> ServerURL.parse("http://admin:p%40ss@127.0.0.1:5984/")
        ServerURL(base='http://127.0.0.1:5984', username='admin')
        >>> ServerURL.parse("http://127.0.0.1:5984", username="a", password="b").url
        'http://a:b@127.0.0.1:5984'
        """
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not the URL itself: it may hold a password.
            raise ValueError(
                f"expected the http:// or https:// URL of a CouchDB, got scheme "
                f"{parts.scheme!r} and host {parts.hostname!r}"
            )
        if parts.username is not None and username is not None and parts.username != username:
            raise ValueError(
                f"the URL names user {unquote(parts.username)!r} but {COUCHDB_USER_ENV} says "
                f"{username!r}: give the credentials in one place"
            )
        netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
        base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        user = unquote(parts.username) if parts.username is not None else username
        secret = unquote(parts.password) if parts.password is not None else password
        return cls(base=base, username=user, password=secret)

    @property
    def url(self) -> str:
        """The root URL with the credentials in it: an httpx client authenticates with it."""
        if self.username is None or self.password is None:
            return self.base
        parts = urlsplit(self.base)
        userinfo = f"{quote(self.username, safe='')}:{quote(self.password, safe='')}"
        return urlunsplit(parts._replace(netloc=f"{userinfo}@{parts.netloc}"))

    @property
    def auth(self) -> tuple[str, str] | None:
        if self.username is None or self.password is None:
            return None
        return (self.username, self.password)


def server_from_environment(environ: Mapping[str, str] | None = None) -> ServerURL | None:
    """The server ``COUCHDB_URL`` names (credentials from it or ``COUCHDB_USER``/``_PASSWORD``).

    None when ``COUCHDB_URL`` is unset or empty. A malformed value raises
    ValueError that names the variable, rather than quietly testing nothing.
    """
    env = os.environ if environ is None else environ
    url = env.get(COUCHDB_URL_ENV, "").strip()
    if not url:
        return None
    try:
        return ServerURL.parse(
            url,
            username=env.get(COUCHDB_USER_ENV) or None,
            password=env.get(COUCHDB_PASSWORD_ENV) or None,
        )
    except ValueError as e:
        raise ValueError(f"{COUCHDB_URL_ENV}: {e}") from None


def http_client(
    base_url: str, *, timeout: float, auth: tuple[str, str] | None = None
) -> httpx.Client:
    """An httpx client for a real CouchDB or PouchDB Server at ``base_url``."""
    return httpx.Client(
        base_url=base_url,
        auth=auth,
        timeout=timeout,
        # A proxy from the environment must not see test traffic, and
        # PouchDB Server answers text/plain unless JSON is accepted.
        trust_env=False,
        headers={"Accept": "application/json"},
    )


class RemoteCouchError(FakeCouchError):
    """An error answer from the real server: ``status``, ``error`` and ``reason``.

    A :class:`~notifier.testing.fake_couch.FakeCouchError`, so that a test
    written for the fake (``pytest.raises(FakeCouchError)`` on a conflict)
    catches the real server's answer unchanged.
    """


class RemoteCouch:
    """The fake's data helpers against a real CouchDB, in databases of its own.

    Every database name given to a method is a *logical* name, mapped to a
    unique real one by :meth:`real_name` (the same for the object's whole
    life), so tests written for the fake (``fake_couch.put("messages", …)``)
    run unchanged on a shared server. :meth:`close` deletes every database
    it mapped, including the ones the code under test created itself.
    """

    def __init__(
        self,
        *,
        server: ServerURL,
        databases: Iterable[str] = (),
        hint: str = "test",
        timeout: float = 10.0,
    ) -> None:
        self.server = server
        self._prefix = unique_database_name(hint) + "_"
        self._named: dict[str, str] = {}
        self._client = http_client(server.base, timeout=timeout, auth=server.auth)
        for name in databases:
            self.create_database(name)

    def __repr__(self) -> str:
        return f"<RemoteCouch {self.server.base} databases={len(self._named)}>"

    def __getattr__(self, name: str) -> NoReturn:
        if name in _FAKE_ONLY or hasattr(FakeCouch, name):
            raise AttributeError(
                f"{name} is a FakeCouch fault switch or record, which a real CouchDB "
                f"({self.server.base}, from {COUCHDB_URL_ENV}) does not have: mark the test "
                "@pytest.mark.fake_couch_only to run it against the fake only"
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Delete every database this object named (missing ones are fine), then disconnect."""
        try:
            for real in self._named.values():
                response = self._client.delete(_db_path(real))
                if response.status_code not in (200, 202, 404):
                    _raise(response)
        finally:
            self._client.close()

    # -- names -------------------------------------------------------------------------

    def real_name(self, database: str) -> str:
        """The real server's name for the logical ``database`` (stable, unique to this object)."""
        real = self._named.get(database)
        if real is None:
            real = self._named[database] = self._prefix + _DB_NAME_UNSAFE.sub("_", database)
        return real

    def database_names(self) -> list[str]:
        """The logical names of this object's databases that exist on the server, sorted."""
        response = self._client.get("/_all_dbs")
        _check(response)
        existing = set(response.json())
        return sorted(name for name, real in self._named.items() if real in existing)

    # -- the fake's helpers ------------------------------------------------------------

    def create_database(self, name: str) -> None:
        response = self._client.put(_db_path(self.real_name(name)))
        _check(response)

    def delete_database(self, name: str) -> None:
        response = self._client.delete(_db_path(self.real_name(name)))
        _check(response)

    def put(self, database: str, doc: Mapping[str, Any]) -> str:
        """Create or update a doc (PUT with its ``_id``, else POST); return its new rev."""
        real = self.real_name(database)
        if "_id" in doc:
            response = self._client.put(doc_path(real, str(doc["_id"])), json=dict(doc))
        else:
            response = self._client.post(_db_path(real), json=dict(doc))
        _check(response)
        rev: str = response.json()["rev"]
        return rev

    def get(self, database: str, doc_id: str) -> dict[str, Any] | None:
        """The current doc, or None if it is missing or deleted."""
        response = self._client.get(doc_path(self.real_name(database), doc_id))
        if response.status_code == 404 and _body(response).get("reason") in _DOC_GONE:
            return None
        _check(response)
        doc: dict[str, Any] = response.json()
        return doc

    def delete(self, database: str, doc_id: str, rev: str) -> str:
        response = self._client.delete(
            doc_path(self.real_name(database), doc_id), params={"rev": rev}
        )
        _check(response)
        new_rev: str = response.json()["rev"]
        return new_rev

    def docs(self, database: str) -> list[dict[str, Any]]:
        """Every live doc (design docs included), in id order."""
        response = self._client.get(
            f"{_db_path(self.real_name(database))}/_all_docs", params={"include_docs": "true"}
        )
        _check(response)
        return [row["doc"] for row in response.json()["rows"]]

    def update_seq(self, database: str) -> Any:
        """The database's update seq, as the server gives it (opaque)."""
        response = self._client.get(_db_path(self.real_name(database)))
        _check(response)
        return response.json()["update_seq"]

    def changed_since(self, database: str, since: Any) -> list[str]:
        """Ids of the docs whose latest change comes after ``since``, in feed order."""
        response = self._client.get(
            f"{_db_path(self.real_name(database))}/_changes",
            params={"since": seq_param(since)},
        )
        _check(response)
        return [row["id"] for row in response.json()["results"]]


# A 404's reason for a doc, as opposed to its database, being absent.
_DOC_GONE: Final = frozenset({"missing", "deleted"})


def _db_path(real: str) -> str:
    return "/" + quote(real, safe="")


def _body(response: httpx.Response) -> dict[str, Any]:
    with contextlib.suppress(ValueError):
        body = response.json()
        if isinstance(body, dict):
            return body
    return {}


def _check(response: httpx.Response) -> None:
    if response.is_error:
        _raise(response)


def _raise(response: httpx.Response) -> NoReturn:
    body = _body(response)
    raise RemoteCouchError(
        response.status_code,
        str(body.get("error", "error")),
        str(body.get("reason", response.text.strip())),
    )
