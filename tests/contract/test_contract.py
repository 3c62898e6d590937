"""The CouchDB contract: one suite, run against FakeCouch (in process and on a socket),
against a real PouchDB Server, and against the CouchDB that COUCHDB_URL names.

A test passes on all backends, or says where PouchDB Server differs from Apache
CouchDB 3 and expects each backend to do what it does (the fake follows
CouchDB 3). Seqs are opaque on every backend: they are only ever fed back as
``since``, never compared or parsed.

Backends: ``fake`` is FakeCouch in process, through ``FakeCouchTransport``;
``fake-socket`` is FakeCouch served on loopback by ``FakeCouchServer`` from a
background thread (the way a subprocess reaches it); ``pouchdb`` is the real
PouchDB Server 4.2 from tests/servers, through the ``couch`` fixture of
tests/conftest.py, which fails the test if the server died during it;
``couchdb`` (only with COUCHDB_URL set) is that server, in a database of the
test's own that is deleted afterwards with every other one the test named.

Requests go out the way notifier sends them: ``Accept: application/json``
always, ``Accept-Encoding: identity`` on feeds, and a selector both in the
POST body (read by CouchDB 3 and the fake) and in the ``selector`` query
parameter (read by PouchDB Server).

Requests that make PouchDB Server's process exit (a selector it cannot
evaluate, ``filter=_selector`` without a ``selector`` query parameter, a
filter naming a missing design doc, ``filter=_design``) are never sent here;
those error cases are tested against the fake only, in tests/test_fake_couch.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from realservers import doc_path, is_pouchdb_server, scratch_database, unique_db_name

from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.remote import server_from_environment
from notifier.testing.server import FakeCouchServer

pytestmark = pytest.mark.anyio

# The CouchDB that COUCHDB_URL names joins the backends when it is set.
BACKENDS = ["fake", "fake-socket", "pouchdb"] + (
    ["couchdb"] if server_from_environment() is not None else []
)
JSON_ACCEPT = {"Accept": "application/json"}
FEED_HEADERS = {"Accept": "application/json", "Accept-Encoding": "identity"}
# How long a test waits for one line of a feed before it fails (not a timing
# assertion: a bound so that a broken feed fails the test instead of hanging).
LINE_WAIT = 5.0


@dataclass
class Target:
    """Where a test's requests go: a server root, a fresh database, and the fake if any.

    ``pouchdb`` says whether the server is PouchDB Server, which a test needs
    to know where it differs from CouchDB 3: the ``couchdb`` backend is
    whatever COUCHDB_URL names, and the test command points it at a second
    PouchDB Server.
    """

    kind: str
    url: str
    db: str
    fake: FakeCouch | None = None
    transport: httpx.AsyncBaseTransport | None = None
    pouchdb: bool = False


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest) -> Iterator[Target]:
    kind: str = request.param
    if kind == "pouchdb":
        # Only this parameter starts PouchDB Server, so `-k fake` needs no Node.js.
        couch = request.getfixturevalue("couch")
        yield Target(kind, couch.url, couch.name, pouchdb=True)
        return
    if kind == "couchdb":
        url = request.getfixturevalue("couchdb_url").url
        with scratch_database(url, request.node.name) as db:
            yield Target(kind, url, db.name, pouchdb=is_pouchdb_server(url))
        return
    fake = FakeCouch(seed=1)
    name = unique_db_name(request.node.name)
    fake.create_database(name)
    if kind == "fake":
        yield Target(kind, IN_PROCESS_URL, name, fake, fake.transport())
        return
    with FakeCouchServer(fake) as server:
        yield Target(kind, server.url, name, fake)


class FeedReader:
    """Reads a streamed ``_changes`` response line by line, never waiting forever."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self._lines = response.aiter_lines()

    async def line(self) -> str | None:
        """The next line (``""`` is a heartbeat); None when the server ended the response."""
        try:
            async with asyncio.timeout(LINE_WAIT):
                return await anext(self._lines)
        except StopAsyncIteration:
            return None
        except TimeoutError:
            pytest.fail(f"the feed sent nothing for {LINE_WAIT}s")

    async def rest(self) -> list[str]:
        """Every remaining line, until the server ends the response."""
        lines = []
        while (line := await self.line()) is not None:
            lines.append(line)
        return lines

    async def row(self) -> dict[str, Any]:
        """The next non-blank line, decoded; fails if the feed ends first."""
        while True:
            line = await self.line()
            assert line is not None, "the feed ended before the expected row"
            if line.strip():
                row: dict[str, Any] = json.loads(line)
                return row


@dataclass
class Backend:
    """A contract test's view of one server: its kind, a client, a fresh database."""

    kind: str
    client: httpx.AsyncClient
    db: str
    fake: FakeCouch | None
    is_pouchdb: bool

    @property
    def db_path(self) -> str:
        return f"/{quote(self.db, safe='')}"

    def doc(self, doc_id: str) -> str:
        return doc_path(self.db, doc_id)

    async def put(self, doc_id: str, doc: dict[str, Any] | None = None) -> str:
        """Create or update a doc that must succeed; return its rev."""
        response = await self.client.put(self.doc(doc_id), json=doc or {})
        assert response.status_code == 201, response.text
        rev: str = response.json()["rev"]
        return rev

    async def remove(self, doc_id: str, rev: str) -> str:
        response = await self.client.delete(self.doc(doc_id), params={"rev": rev})
        assert response.status_code == 200, response.text
        deleted_rev: str = response.json()["rev"]
        return deleted_rev

    def _changes_request(
        self, selector: dict[str, Any] | None, body: dict[str, Any] | None, params: dict[str, Any]
    ) -> tuple[dict[str, str], dict[str, Any]]:
        query = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}
        payload = dict(body or {})
        if selector is not None:
            query["filter"] = "_selector"
            query["selector"] = json.dumps(selector, separators=(",", ":"))
            payload["selector"] = selector
        return query, payload

    async def changes(
        self,
        *,
        selector: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        **params: Any,
    ) -> httpx.Response:
        """A (non-continuous) ``_changes`` request, POSTed the way notifier sends it."""
        query, payload = self._changes_request(selector, body, params)
        return await self.client.post(
            f"{self.db_path}/_changes", params=query, json=payload, headers=FEED_HEADERS
        )

    async def results(self, **kwargs: Any) -> dict[str, Any]:
        """The decoded body of a normal ``_changes`` request that must succeed."""
        response = await self.changes(**kwargs)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    @asynccontextmanager
    async def feed(
        self, *, selector: dict[str, Any] | None = None, **params: Any
    ) -> AsyncIterator[FeedReader]:
        """Open a streamed ``_changes`` request (continuous or longpoll)."""
        query, payload = self._changes_request(selector, None, params)
        async with self.client.stream(
            "POST", f"{self.db_path}/_changes", params=query, json=payload, headers=FEED_HEADERS
        ) as response:
            assert response.status_code == 200
            yield FeedReader(response)


@pytest.fixture
async def backend(target: Target, anyio_backend: str) -> AsyncIterator[Backend]:
    async with httpx.AsyncClient(
        base_url=target.url,
        transport=target.transport,
        headers=JSON_ACCEPT,
        timeout=10.0,
        trust_env=False,
    ) as client:
        yield Backend(target.kind, client, target.db, target.fake, target.pouchdb)


REV = re.compile(r"^(\d+)-[0-9a-f]{32}$")
# The selector notifier uses: only `$exists: false`, which means the same
# thing to CouchDB 3 and PouchDB Server.
NOT_YET_HANDLED = {"notifiedRecipient": {"$exists": False}, "notifyFailed": {"$exists": False}}


def rev_number(rev: str) -> int:
    match = REV.match(rev)
    assert match, f"not an N-<32 hex> rev: {rev!r}"
    return int(match.group(1))


def ids(rows: list[dict[str, Any]]) -> list[str]:
    return [row["id"] for row in rows]


# -- databases -------------------------------------------------------------------------


async def test_creating_a_database_twice_is_412_file_exists(backend: Backend) -> None:
    name = f"/{unique_db_name('created')}"
    created = await backend.client.put(name)
    again = await backend.client.put(name)
    deleted = await backend.client.delete(name)

    assert (created.status_code, created.json()) == (201, {"ok": True})
    assert again.status_code == 412
    assert again.json()["error"] == "file_exists"
    assert (deleted.status_code, deleted.json()) == (200, {"ok": True})


async def test_a_deleted_database_is_gone(backend: Backend) -> None:
    name = f"/{unique_db_name('deleted')}"
    await backend.client.put(name)
    await backend.client.delete(name)

    info = await backend.client.get(name)
    again = await backend.client.delete(name)

    assert info.status_code == 404
    if backend.is_pouchdb:
        # PouchDB Server answers 200 to deleting a database that is not there.
        assert again.status_code == 200
    else:
        # CouchDB 3 answers 404, as for any request to a missing database.
        assert again.status_code == 404
        assert again.json()["error"] == "not_found"


async def test_a_missing_database_is_404_not_found(backend: Backend) -> None:
    missing = f"/{unique_db_name('missing')}"
    responses = [
        await backend.client.get(missing),
        await backend.client.put(f"{missing}/doc", json={}),
        await backend.client.get(f"{missing}/_changes"),
    ]

    for response in responses:
        assert response.status_code == 404
        body = response.json()
        assert body["error"] == "not_found"
        # PouchDB Server says "no_db_file"; CouchDB 3 says "Database does not exist.".
        expected = "no_db_file" if backend.is_pouchdb else "Database does not exist."
        assert body["reason"] == expected


async def test_database_info_counts_live_docs_only(backend: Backend) -> None:
    await backend.put("a")
    rev = await backend.put("b")
    await backend.remove("b", rev)
    await backend.put("_design/app", {"views": {}})

    info = (await backend.client.get(backend.db_path)).json()

    assert info["db_name"] == backend.db
    assert info["doc_count"] == 2  # a and the design doc; b is a tombstone


async def test_update_seq_is_a_position_to_follow_from(backend: Backend) -> None:
    await backend.put("before")
    update_seq = (await backend.client.get(backend.db_path)).json()["update_seq"]
    await backend.put("after")

    body = await backend.results(since=update_seq)

    assert ids(body["results"]) == ["after"]


# -- documents -------------------------------------------------------------------------


async def test_put_creates_revision_1_and_get_returns_the_doc(backend: Backend) -> None:
    response = await backend.client.put(backend.doc("m1"), json={"to": "whaa@example.com"})

    assert response.status_code == 201
    created = response.json()
    assert created["ok"] is True
    assert created["id"] == "m1"
    assert rev_number(created["rev"]) == 1
    doc = (await backend.client.get(backend.doc("m1"))).json()
    assert doc == {"_id": "m1", "_rev": created["rev"], "to": "whaa@example.com"}


async def test_post_generates_an_id(backend: Backend) -> None:
    response = await backend.client.post(backend.db_path, json={"to": "whaa@example.com"})

    assert response.status_code == 201
    created = response.json()
    fetched = (await backend.client.get(backend.doc(created["id"]))).json()
    assert fetched["to"] == "whaa@example.com"
    assert fetched["_rev"] == created["rev"]


async def test_an_update_needs_the_current_rev(backend: Backend) -> None:
    first = await backend.put("m1", {"n": 1})
    second = await backend.put("m1", {"_rev": first, "n": 2})

    stale = await backend.client.put(backend.doc("m1"), json={"_rev": first, "n": 3})
    without = await backend.client.put(backend.doc("m1"), json={"n": 4})

    assert rev_number(second) == 2
    for response in (stale, without):
        assert response.status_code == 409
        # PouchDB Server's reason has no full stop; CouchDB 3's does.
        assert response.json()["error"] == "conflict"
    assert (await backend.client.get(backend.doc("m1"))).json()["n"] == 2


async def test_creating_a_doc_with_a_rev_conflicts(backend: Backend) -> None:
    response = await backend.client.put(backend.doc("new"), json={"_rev": "1-" + "0" * 32})

    assert response.status_code == 409
    assert response.json()["error"] == "conflict"


async def test_a_missing_doc_is_404_missing(backend: Backend) -> None:
    response = await backend.client.get(backend.doc("nope"))

    assert response.status_code == 404
    assert response.json() == {"error": "not_found", "reason": "missing"}


async def test_delete_leaves_a_tombstone(backend: Backend) -> None:
    rev = await backend.put("m1", {"to": "whaa@example.com"})

    deleted = await backend.client.delete(backend.doc("m1"), params={"rev": rev})
    after = await backend.client.get(backend.doc("m1"))
    tombstone = await backend.client.get(backend.doc("m1"), params={"rev": deleted.json()["rev"]})

    assert deleted.status_code == 200
    assert deleted.json()["ok"] is True
    assert rev_number(deleted.json()["rev"]) == 2
    assert after.status_code == 404
    assert after.json()["error"] == "not_found"
    # CouchDB 3 tells a deleted doc from one that never existed; PouchDB
    # Server says "missing" for both.
    assert after.json()["reason"] == ("missing" if backend.is_pouchdb else "deleted")
    assert tombstone.json() == {"_id": "m1", "_rev": deleted.json()["rev"], "_deleted": True}


async def test_deleting_with_a_stale_rev_conflicts(backend: Backend) -> None:
    first = await backend.put("m1")
    await backend.put("m1", {"_rev": first, "n": 2})

    response = await backend.client.delete(backend.doc("m1"), params={"rev": first})

    assert response.status_code == 409
    assert response.json()["error"] == "conflict"


async def test_a_deleted_doc_can_be_created_again(backend: Backend) -> None:
    rev = await backend.put("m1")
    await backend.remove("m1", rev)

    recreated = await backend.put("m1", {"again": True})

    # The new doc continues the tombstone's history instead of starting over.
    assert rev_number(recreated) == 3
    assert (await backend.client.get(backend.doc("m1"))).json()["again"] is True


async def test_a_body_that_is_not_a_json_object_is_400(backend: Backend) -> None:
    not_json = await backend.client.put(
        backend.doc("m1"), content=b"{oops", headers={"Content-Type": "application/json"}
    )
    not_object = await backend.client.put(backend.doc("m2"), json=[1, 2])

    for response in (not_json, not_object):
        assert response.status_code == 400
        assert response.json()["error"] == "bad_request"
    assert not_object.json()["reason"] == "Document must be a JSON object"


async def test_ids_starting_with_an_underscore_are_reserved(backend: Backend) -> None:
    response = await backend.client.put(backend.doc("_secret"), json={})

    assert response.status_code == 400
    # Same reason on both; CouchDB 3 names the error "illegal_docid".
    assert response.json()["error"] == ("bad_request" if backend.is_pouchdb else "illegal_docid")
    assert response.json()["reason"] == "Only reserved document ids may start with underscore."


# -- _bulk_docs ------------------------------------------------------------------------


async def test_bulk_docs_answers_per_doc_with_conflicts(backend: Backend) -> None:
    existing = await backend.put("old")
    await backend.put("taken")

    response = await backend.client.post(
        f"{backend.db_path}/_bulk_docs",
        json={
            "docs": [
                {"_id": "new", "n": 1},
                {"n": 2},
                {"_id": "old", "_rev": existing, "n": 3},
                {"_id": "taken", "n": 4},
                {"_id": "gone", "_rev": "1-" + "0" * 32},
            ]
        },
    )

    assert response.status_code == 201
    results = response.json()
    assert len(results) == 5
    new, generated, updated, taken, gone = results
    assert (new["ok"], new["id"], rev_number(new["rev"])) == (True, "new", 1)
    assert generated["ok"] is True
    assert (await backend.client.get(backend.doc(generated["id"]))).json()["n"] == 2
    assert (updated["ok"], rev_number(updated["rev"])) == (True, 2)
    for conflict, doc_id in ((taken, "taken"), (gone, "gone")):
        assert conflict["id"] == doc_id
        assert conflict["error"] == "conflict"
        assert "ok" not in conflict
    assert "n" not in (await backend.client.get(backend.doc("taken"))).json()


async def test_bulk_docs_deletes_with_deleted_true(backend: Backend) -> None:
    rev = await backend.put("m1")

    response = await backend.client.post(
        f"{backend.db_path}/_bulk_docs",
        json={"docs": [{"_id": "m1", "_rev": rev, "_deleted": True}]},
    )

    assert response.status_code == 201
    assert response.json()[0]["ok"] is True
    assert (await backend.client.get(backend.doc("m1"))).status_code == 404


# -- _all_docs -------------------------------------------------------------------------


async def test_all_docs_lists_live_docs_in_id_order(backend: Backend) -> None:
    await backend.put("b", {"n": 2})
    await backend.put("a", {"n": 1})
    await backend.put("_design/app", {"views": {}})
    rev = await backend.put("c")
    await backend.remove("c", rev)

    body = (
        await backend.client.get(f"{backend.db_path}/_all_docs", params={"include_docs": "true"})
    ).json()

    assert ids(body["rows"]) == ["_design/app", "a", "b"]
    assert body["total_rows"] == 3
    for row in body["rows"]:
        assert row["key"] == row["id"]
        assert row["value"]["rev"] == row["doc"]["_rev"]
    assert [row["doc"].get("n") for row in body["rows"]] == [None, 1, 2]


async def test_all_docs_by_keys_reports_missing_and_deleted_docs(backend: Backend) -> None:
    await backend.put("live")
    rev = await backend.put("dead")
    tombstone = await backend.remove("dead", rev)

    body = (
        await backend.client.get(
            f"{backend.db_path}/_all_docs",
            params={"keys": '["live","dead","never"]', "include_docs": "true"},
        )
    ).json()

    live, dead, never = body["rows"]
    assert live["doc"]["_id"] == "live"
    assert dead["value"] == {"rev": tombstone, "deleted": True}
    assert dead["doc"] is None
    assert never == {"key": "never", "error": "not_found"}


# -- _local docs -----------------------------------------------------------------------


async def test_local_docs_have_their_own_revs_and_stay_out_of_listings(backend: Backend) -> None:
    await backend.put("m1")
    first = await backend.client.put(backend.doc("_local/checkpoint"), json={"seq": "a"})
    second = await backend.client.put(
        backend.doc("_local/checkpoint"), json={"_rev": first.json()["rev"], "seq": "b"}
    )
    stale = await backend.client.put(backend.doc("_local/checkpoint"), json={"seq": "c"})

    assert first.json()["rev"] == "0-1"
    assert second.json()["rev"] == "0-2"
    assert stale.status_code == 409
    assert stale.json()["error"] == "conflict"
    assert (await backend.client.get(backend.doc("_local/checkpoint"))).json()["seq"] == "b"
    assert ids((await backend.results())["results"]) == ["m1"]
    all_docs = (await backend.client.get(f"{backend.db_path}/_all_docs")).json()
    assert ids(all_docs["rows"]) == ["m1"]
    assert (await backend.client.get(backend.db_path)).json()["doc_count"] == 1


# -- _changes, normal feed -------------------------------------------------------------


async def test_normal_feed_has_results_and_last_seq(backend: Backend) -> None:
    rev_a = await backend.put("a")
    rev_b = await backend.put("b")

    response = await backend.changes()

    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"results", "last_seq"}
    assert ids(body["results"]) == ["a", "b"]
    assert [row["changes"] for row in body["results"]] == [[{"rev": rev_a}], [{"rev": rev_b}]]
    assert all("seq" in row and "deleted" not in row for row in body["results"])


async def test_feed_keeps_only_the_latest_change_of_each_doc(backend: Backend) -> None:
    first = await backend.put("a", {"n": 1})
    await backend.put("b")
    latest = await backend.put("a", {"_rev": first, "n": 2})

    rows = (await backend.results())["results"]

    assert ids(rows) == ["b", "a"]
    assert rows[1]["changes"] == [{"rev": latest}]


async def test_deleted_docs_appear_as_deleted(backend: Backend) -> None:
    rev = await backend.put("a")
    tombstone = await backend.remove("a", rev)

    (row,) = (await backend.results(include_docs=True))["results"]

    assert row["id"] == "a"
    assert row["deleted"] is True
    assert row["changes"] == [{"rev": tombstone}]
    assert row["doc"] == {"_id": "a", "_rev": tombstone, "_deleted": True}


async def test_since_resumes_after_the_given_row(backend: Backend) -> None:
    for doc_id in ("a", "b", "c"):
        await backend.put(doc_id)
    rows = (await backend.results())["results"]

    later = (await backend.results(since=rows[0]["seq"]))["results"]

    assert ids(later) == ["b", "c"]


async def test_since_now_skips_history_and_last_seq_resumes(backend: Backend) -> None:
    await backend.put("old")

    now = await backend.results(since="now")
    await backend.put("new")
    resumed = await backend.results(since=now["last_seq"])

    assert now["results"] == []
    assert ids(resumed["results"]) == ["new"]


async def test_limit_caps_the_rows_and_last_seq_resumes(backend: Backend) -> None:
    for doc_id in ("a", "b", "c"):
        await backend.put(doc_id)

    page = await backend.results(limit=2)
    rest = await backend.results(since=page["last_seq"])

    assert ids(page["results"]) == ["a", "b"]
    assert ids(rest["results"]) == ["c"]


async def test_chained_reads_miss_no_document_written_meanwhile(backend: Backend) -> None:
    """Reading on from each answer's ``last_seq`` sees every document at least once,
    even while documents are being created and updated (claimed) during the reads.

    The daemon's resync relies on this: it takes a filtered ``feed=normal``
    answer's ``last_seq`` as a position that covers everything before it. A
    server that answered a ``last_seq`` past a document it left out, while
    writing it, would let the checkpoint pass a message that was never sent.
    """
    writers, per_writer = 3, 60
    expected = {f"w{w}-{i}" for w in range(writers) for i in range(per_writer)}

    async def write(w: int) -> None:
        for i in range(per_writer):
            rev = await backend.put(f"w{w}-{i}", {"to": "a@example.com"})
            await backend.put(f"w{w}-{i}", {"to": "a@example.com", "claim": w, "_rev": rev})

    seen: set[str] = set()
    since: Any = 0
    reads = 0
    tasks = [asyncio.create_task(write(w)) for w in range(writers)]
    try:
        while True:
            writing = not all(task.done() for task in tasks)
            page = await backend.results(selector=NOT_YET_HANDLED, since=since, limit=20)
            seen.update(ids(page["results"]))
            since = page["last_seq"]
            reads += 1
            if not writing and not page["results"]:
                break
            await asyncio.sleep(0)
    finally:
        await asyncio.gather(*tasks)

    assert reads > 2, "the reads did not overlap the writes"
    assert sorted(expected - seen) == []


async def test_include_docs_adds_the_current_doc(backend: Backend) -> None:
    rev = await backend.put("m1", {"to": "whaa@example.com"})

    (row,) = (await backend.results(include_docs=True))["results"]

    assert row["doc"] == {"_id": "m1", "_rev": rev, "to": "whaa@example.com"}


# -- _changes filters ------------------------------------------------------------------


async def test_exists_false_selector_passes_new_docs_tombstones_and_design_docs(
    backend: Backend,
) -> None:
    await backend.put("new", {"to": "whaa@example.com"})
    await backend.put("sent", {"to": "a@example.com", "notifiedRecipient": True})
    await backend.put("failed", {"to": "b@example.com", "notifyFailed": "550 no such user"})
    await backend.put("_design/app", {"views": {}})
    rev = await backend.put("gone", {"to": "c@example.com"})
    await backend.remove("gone", rev)

    rows = (await backend.results(selector=NOT_YET_HANDLED, include_docs=True))["results"]

    # A tombstone has no fields, so it passes `$exists: false`; so does a
    # design doc. The daemon must skip both itself.
    assert ids(rows) == ["new", "_design/app", "gone"]
    assert rows[2]["deleted"] is True


async def test_selector_equality_comparison_and_nested_fields(backend: Backend) -> None:
    await backend.put("a", {"type": "message", "n": 1, "meta": {"lang": "en"}, "tags": ["x"]})
    await backend.put("b", {"type": "message", "n": 2, "meta": {"lang": "de"}, "tags": ["y"]})
    await backend.put("c", {"type": "receipt", "n": 3, "meta": {"lang": "en"}, "tags": []})

    async def matching(selector: dict[str, Any]) -> list[str]:
        return ids((await backend.results(selector=selector))["results"])

    assert await matching({"type": "message"}) == ["a", "b"]
    assert await matching({"type": {"$eq": "message"}, "n": {"$gte": 2}}) == ["b"]
    assert await matching({"$and": [{"n": {"$gt": 1}}, {"n": {"$lte": 3}}]}) == ["b", "c"]
    assert await matching({"n": {"$lt": 2}}) == ["a"]
    assert await matching({"meta.lang": "en"}) == ["a", "c"]
    assert await matching({"meta": {"lang": "de"}}) == ["b"]
    assert await matching({"type": {"$in": ["receipt", "other"]}}) == ["c"]
    assert await matching({"tags": {"$in": ["y"]}}) == ["b"]
    assert await matching({"type": {"$nin": ["message"]}}) == ["c"]
    assert await matching({"n": {"$exists": True}, "type": {"$ne": "message"}}) == ["c"]


async def test_ne_and_not_on_a_missing_field(backend: Backend) -> None:
    await backend.put("fresh", {"to": "whaa@example.com"})
    await backend.put("sent", {"to": "a@example.com", "notifiedRecipient": True})
    await backend.put("unsent", {"to": "b@example.com", "notifiedRecipient": False})

    ne = ids((await backend.results(selector={"notifiedRecipient": {"$ne": True}}))["results"])
    negated = ids(
        (await backend.results(selector={"$not": {"notifiedRecipient": True}}))["results"]
    )

    if backend.is_pouchdb:
        # PouchDB Server lets a doc without the field through `$ne` and `$not`.
        assert ne == negated == ["fresh", "unsent"]
    else:
        # CouchDB 3 (mango): a missing field matches no operator except
        # `$exists: false`, and `$not` is normalised into `$ne`. A daemon
        # using either selector would notify nobody on CouchDB.
        assert ne == negated == ["unsent"]


async def test_doc_ids_filter_sends_only_the_named_docs(backend: Backend) -> None:
    for doc_id in ("a", "b", "c"):
        await backend.put(doc_id)

    body = await backend.results(filter="_doc_ids", body={"doc_ids": ["c", "a", "zz"]})

    assert ids(body["results"]) == ["a", "c"]


# -- _changes, longpoll ----------------------------------------------------------------


async def test_longpoll_answers_at_once_when_there_are_changes(backend: Backend) -> None:
    await backend.put("a")

    body = await backend.results(feed="longpoll")

    assert ids(body["results"]) == ["a"]
    assert "last_seq" in body


async def test_longpoll_waits_for_the_next_change(backend: Backend) -> None:
    await backend.put("old")

    async with backend.feed(feed="longpoll", since="now") as feed:
        # The opening of the results array arrives before any change: the
        # server is now waiting.
        assert (await feed.line()) == '{"results":['
        await backend.put("new")
        rest = await feed.rest()

    body = "".join(['{"results":[', *rest])
    assert [row["id"] for row in json.loads(body)["results"]] == ["new"]


# -- _changes, continuous --------------------------------------------------------------


async def test_continuous_feed_sends_rows_then_heartbeats(backend: Backend) -> None:
    await backend.put("a")
    await backend.put("b")

    async with backend.feed(feed="continuous", heartbeat=100) as feed:
        first = await feed.row()
        second = await feed.row()
        after = await feed.line()

    assert [first["id"], second["id"]] == ["a", "b"]
    assert after == ""  # a heartbeat: a blank line


async def test_continuous_feed_delivers_changes_as_they_happen(backend: Backend) -> None:
    await backend.put("old")

    async with backend.feed(feed="continuous", since="now", heartbeat=100) as feed:
        assert await feed.line() == ""  # connected: the first heartbeat
        rev = await backend.put("new")
        row = await feed.row()

    assert row["id"] == "new"
    assert row["changes"] == [{"rev": rev}]


async def test_continuous_feed_filters_with_a_selector(backend: Backend) -> None:
    async with backend.feed(
        feed="continuous", since="now", heartbeat=100, selector=NOT_YET_HANDLED, include_docs=True
    ) as feed:
        assert await feed.line() == ""
        await backend.put("handled", {"notifiedRecipient": True})
        await backend.put("m1", {"to": "whaa@example.com"})
        row = await feed.row()

    assert row["id"] == "m1"
    assert row["doc"]["to"] == "whaa@example.com"


async def test_continuous_feed_with_limit(backend: Backend) -> None:
    for doc_id in ("a", "b", "c"):
        await backend.put(doc_id)

    async with backend.feed(feed="continuous", limit=2, heartbeat=100) as feed:
        first = await feed.row()
        second = await feed.row()
        third = await feed.row()
        if not backend.is_pouchdb:
            end = await feed.line()

    assert [first["id"], second["id"]] == ["a", "b"]
    if backend.is_pouchdb:
        # PouchDB Server ignores `limit` on a continuous feed and never ends it.
        assert third["id"] == "c"
    else:
        # CouchDB 3 ends the feed after `limit` rows with a last_seq row,
        # which means "reconnect from here".
        assert set(third) == {"last_seq", "pending"}
        assert end is None


async def test_continuous_feed_timeout(backend: Backend) -> None:
    async def write_late() -> None:
        # Staged after the 100 ms timeout (the sleep sets up the scenario;
        # nothing here measures time). Concurrent with opening the feed,
        # because PouchDB Server sends its headers only with the first row.
        await asyncio.sleep(0.4)
        await backend.put("late")

    writer = asyncio.create_task(write_late())
    async with backend.feed(feed="continuous", since="now", timeout=100) as feed:
        row = await feed.row()
        end = None if backend.is_pouchdb else await feed.line()
    await writer

    if backend.is_pouchdb:
        # PouchDB Server ignores `timeout` on a continuous feed: it is still
        # open and delivers the late change.
        assert row["id"] == "late"
    else:
        # CouchDB 3 ends an idle feed after `timeout` with a last_seq row.
        assert set(row) == {"last_seq", "pending"}
        assert end is None


# -- wire details ----------------------------------------------------------------------


async def test_seqs_are_json_values_that_are_fed_back_verbatim(backend: Backend) -> None:
    await backend.put("a")
    await backend.put("b")

    body = await backend.results()
    seqs = [row["seq"] for row in body["results"]] + [body["last_seq"]]
    resumed = [ids((await backend.results(since=seq))["results"]) for seq in seqs]

    assert resumed == [["b"], [], []]
    # PouchDB Server's seqs are integers; CouchDB 3's (and the fake's) are
    # opaque strings such as "12-g1AAAA…". Code must handle both without
    # looking inside.
    expected_type = int if backend.is_pouchdb else str
    assert all(type(seq) is expected_type for seq in seqs)


async def test_content_type_is_json(backend: Backend) -> None:
    with_accept = await backend.client.get(backend.db_path)
    without_accept = await backend.client.get(backend.db_path, headers={"Accept": "*/*"})

    assert with_accept.headers["content-type"].startswith("application/json")
    # PouchDB Server answers text/plain unless the request accepts JSON;
    # CouchDB 3 answers application/json either way.
    expected = "text/plain" if backend.is_pouchdb else "application/json"
    assert without_accept.headers["content-type"].startswith(expected)
    assert without_accept.json()["db_name"] == backend.db


async def test_gzip_when_offered(backend: Backend) -> None:
    # Big enough for PouchDB Server's compression threshold (1 kB).
    await backend.put("big", {"body": "x" * 4096})

    response = await backend.client.post(
        f"{backend.db_path}/_changes",
        params={"include_docs": "true"},
        json={},
        headers={"Accept-Encoding": "gzip"},
    )

    assert response.json()["results"][0]["doc"]["body"] == "x" * 4096
    if backend.is_pouchdb:
        # PouchDB Server compresses when offered, which holds a continuous
        # feed back until its buffer fills: feeds must ask for identity.
        assert response.headers.get("content-encoding") == "gzip"
    else:
        # CouchDB 3 does not compress responses.
        assert "content-encoding" not in response.headers


# -- what real clients met (nano, CouchDB-Python) ------------------------------------------


async def test_all_docs_with_key_lists_only_that_doc(backend: Backend) -> None:
    await backend.put("a")
    await backend.put("b")
    rev = await backend.put("gone")
    await backend.remove("gone", rev)

    one = (await backend.client.get(f"{backend.db_path}/_all_docs", params={"key": '"b"'})).json()
    missing = await backend.client.get(f"{backend.db_path}/_all_docs", params={"key": '"zz"'})
    deleted = await backend.client.get(f"{backend.db_path}/_all_docs", params={"key": '"gone"'})

    assert ids(one["rows"]) == ["b"]
    # As a one-key range: no row for a missing or a deleted doc (unlike `keys`).
    assert missing.json()["rows"] == []
    assert deleted.json()["rows"] == []


async def test_all_docs_update_seq_is_a_position_to_follow_from(backend: Backend) -> None:
    await backend.put("a")

    body = (
        await backend.client.get(f"{backend.db_path}/_all_docs", params={"update_seq": "true"})
    ).json()
    await backend.put("b")

    assert ids((await backend.results(since=body["update_seq"]))["results"]) == ["b"]


async def test_get_with_revs_info_local_seq_and_meta(backend: Backend) -> None:
    first = await backend.put("m1", {"n": 1})
    second = await backend.put("m1", {"_rev": first, "n": 2})

    info = (
        await backend.client.get(
            backend.doc("m1"), params={"revs_info": "true", "local_seq": "true"}
        )
    ).json()
    meta = (await backend.client.get(backend.doc("m1"), params={"meta": "true"})).json()

    assert [r["rev"] for r in info["_revs_info"]] == [second, first]
    assert info["_revs_info"][0]["status"] == "available"
    # The fake keeps only the current body, as a compacted CouchDB does;
    # PouchDB Server keeps old bodies until it compacts.
    assert info["_revs_info"][1]["status"] == ("available" if backend.is_pouchdb else "missing")
    if backend.is_pouchdb:
        # PouchDB Server ignores local_seq and meta.
        assert "_local_seq" not in info and "_revs_info" not in meta
        return
    assert [r["rev"] for r in meta["_revs_info"]] == [second, first]
    # _local_seq is opaque like any seq: fed back as `since`, the doc's own
    # change is behind it.
    later = (await backend.results(since=info["_local_seq"]))["results"]
    assert "m1" not in ids(later)


async def test_batch_ok_is_202_without_a_rev(backend: Backend) -> None:
    put = await backend.client.put(backend.doc("m1"), params={"batch": "ok"}, json={"n": 1})
    post = await backend.client.post(backend.db_path, params={"batch": "ok"}, json={"n": 2})

    if backend.is_pouchdb:
        # PouchDB Server ignores batch=ok and writes at once.
        assert (put.status_code, post.status_code) == (201, 201)
    else:
        # CouchDB 3 accepts the write for later and does not know its rev yet.
        assert (put.status_code, put.json()) == (202, {"ok": True, "id": "m1"})
        assert post.status_code == 202 and set(post.json()) == {"ok", "id"}
    # The fake writes at once, which a client told nothing cannot tell apart.
    assert (await backend.client.get(backend.doc("m1"))).json()["n"] == 1


async def test_if_none_match_with_the_current_etag_is_304(backend: Backend) -> None:
    first = await backend.client.put(backend.doc("m1"), json={"n": 1})
    etag = (await backend.client.get(backend.doc("m1"))).headers["etag"]

    same = await backend.client.get(backend.doc("m1"), headers={"If-None-Match": etag})
    await backend.put("m1", {"_rev": first.json()["rev"], "n": 2})
    changed = await backend.client.get(backend.doc("m1"), headers={"If-None-Match": etag})

    # CouchDB 3's ETag is the rev; PouchDB Server's is a weak hash of the body.
    assert etag.startswith('W/"') if backend.is_pouchdb else etag == f'"{first.json()["rev"]}"'
    assert same.status_code == 304
    assert same.content == b""
    assert changed.status_code == 200
    assert changed.json()["n"] == 2


async def test_all_dbs_takes_a_range_and_a_limit(backend: Backend) -> None:
    prefix = unique_db_name("range")
    names = [f"{prefix}_{c}" for c in "abc"]
    for name in names:
        assert (await backend.client.put(f"/{name}")).status_code == 201

    async def all_dbs(**params: str) -> list[str]:
        listed: list[str] = (await backend.client.get("/_all_dbs", params=params)).json()
        return listed

    ranged = await all_dbs(startkey=json.dumps(names[1]), endkey=json.dumps(names[2]))
    limited = await all_dbs(startkey=json.dumps(names[0]), limit="2")
    for name in names:
        await backend.client.delete(f"/{name}")

    if backend.is_pouchdb:
        # PouchDB Server ignores the range and the limit: every database.
        assert set(names) <= set(ranged) and set(names) <= set(limited)
    else:
        assert ranged == names[1:]
        assert limited == names[:2]


async def test_a_created_database_or_doc_says_where_it_is(backend: Backend) -> None:
    name = unique_db_name("located")
    created_db = await backend.client.put(f"/{name}")
    created_doc = await backend.client.put(f"/{name}/m1", json={})
    posted = await backend.client.post(f"/{name}", json={})
    await backend.client.delete(f"/{name}")

    locations = [r.headers.get("location") for r in (created_db, created_doc, posted)]
    # CouchDB 3 names the new resource by the Host the request used.
    host = backend.client.base_url.netloc.decode().rpartition("@")[2]
    assert locations == [
        f"http://{host}/{name}",
        f"http://{host}/{name}/m1",
        f"http://{host}/{name}/{posted.json()['id']}",
    ]


async def test_status_lines_carry_a_reason_phrase(backend: Backend) -> None:
    created = await backend.client.put(backend.doc("m1"), json={})
    missing = await backend.client.get(backend.doc("nope"))

    assert created.reason_phrase == "Created"
    # CouchDB's web server (mochiweb) says "Object Not Found"; the fake and
    # PouchDB Server say what RFC 9110 does.
    assert missing.reason_phrase in ("Not Found", "Object Not Found")


# -- Mango: _index and _find (how deferred messages are found again) ------------------

RETRY_INDEX = {
    "index": {"fields": ["notificationRetry.due"]},
    "ddoc": "notifier-retry",
    "name": "retry-due",
    "type": "json",
}


def due_selector(now_ms: int) -> dict[str, Any]:
    return {
        "notificationRetry.due": {"$lte": now_ms},
        "notifiedRecipient": {"$exists": False},
        "notificationFailed": {"$exists": False},
    }


async def seed_deferred(backend: Backend) -> None:
    for n, due in enumerate([500, 100, 300, 900, 200]):
        await backend.put(f"m{n}", {"notificationRetry": {"due": due, "attempts": 1}})
    await backend.put("sent", {"notificationRetry": {"due": 50}, "notifiedRecipient": True})
    await backend.put("fresh", {"to": "a@example.com"})
    await backend.put("odd", {"notificationRetry": {"due": "soon"}})


async def find(backend: Backend, body: dict[str, Any]) -> dict[str, Any]:
    response = await backend.client.post(f"{backend.db_path}/_find", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def test_creating_an_index_twice_says_it_exists(backend: Backend) -> None:
    first = await backend.client.post(f"{backend.db_path}/_index", json=RETRY_INDEX)
    second = await backend.client.post(f"{backend.db_path}/_index", json=RETRY_INDEX)
    assert first.status_code == 200, first.text
    assert first.json() == {
        "id": "_design/notifier-retry",
        "name": "retry-due",
        "result": "created",
    }
    assert second.json()["result"] == "exists"
    ddoc = (await backend.client.get(backend.doc("_design/notifier-retry"))).json()
    assert ddoc["language"] == "query"
    listed = (await backend.client.get(f"{backend.db_path}/_index")).json()
    assert "retry-due" in [index["name"] for index in listed["indexes"]]


@pytest.mark.parametrize("indexed", [True, False], ids=["indexed", "no index"])
async def test_find_selects_due_deferred_messages_only(backend: Backend, indexed: bool) -> None:
    if indexed:
        await backend.client.post(f"{backend.db_path}/_index", json=RETRY_INDEX)
    await seed_deferred(backend)
    answer = await find(backend, {"selector": due_selector(300), "limit": 100})
    # Numbers only ("soon" collates after every number), settled ones left out.
    assert sorted(doc["_id"] for doc in answer["docs"]) == ["m1", "m2", "m4"]
    assert all(REV.match(doc["_rev"]) for doc in answer["docs"])
    if indexed:
        # In the index's order: by due time.
        assert [doc["_id"] for doc in answer["docs"]] == ["m1", "m4", "m2"]
    else:
        assert "No matching index found" in answer.get("warning", "")


async def test_find_pages_with_limit_and_skip(backend: Backend) -> None:
    await backend.client.post(f"{backend.db_path}/_index", json=RETRY_INDEX)
    await seed_deferred(backend)
    pages = [
        await find(backend, {"selector": due_selector(1000), "limit": 2, "skip": skip})
        for skip in (0, 2, 4)
    ]
    assert [[d["_id"] for d in page["docs"]] for page in pages] == [
        ["m1", "m4"],
        ["m2", "m0"],
        ["m3"],
    ]


async def test_find_with_a_bookmark_continues_after_the_last_row(backend: Backend) -> None:
    await backend.client.post(f"{backend.db_path}/_index", json=RETRY_INDEX)
    await seed_deferred(backend)
    first = await find(backend, {"selector": due_selector(1000), "limit": 2})
    if backend.is_pouchdb:
        # PouchDB Server 4.2 has no bookmarks (notifier pages with skip there);
        # CouchDB 3 and the fake answer one.
        assert "bookmark" not in first
        return
    later = await find(
        backend, {"selector": due_selector(1000), "limit": 10, "bookmark": first["bookmark"]}
    )
    assert [d["_id"] for d in later["docs"]] == ["m2", "m0", "m3"]


async def test_find_returns_only_the_fields_asked_for(backend: Backend) -> None:
    await backend.put("dead", {"notificationFailed": {"reason": "550", "failedAt": "t"}, "x": 1})
    answer = await find(
        backend,
        {
            "selector": {"notificationFailed": {"$exists": True}},
            "fields": ["_id", "notificationFailed"],
        },
    )
    assert answer["docs"] == [
        {"_id": "dead", "notificationFailed": {"reason": "550", "failedAt": "t"}}
    ]


async def test_find_without_a_selector_is_400(backend: Backend) -> None:
    response = await backend.client.post(f"{backend.db_path}/_find", json={"limit": 1})
    assert response.status_code == 400
