"""Batched marks against the fake CouchDB: one request for many writes, per-doc outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from notifier.couch import CouchClient
from notifier.errors import CouchTransientError, DocumentConflict, DocumentRefused
from notifier.marker import BulkWriter, row_error
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch

pytestmark = pytest.mark.anyio

DB = "messages"


@pytest.fixture
async def setup() -> AsyncIterator[tuple[FakeCouch, CouchClient]]:
    fake = FakeCouch(databases=[DB])
    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as client:
        yield fake, client


def bulk_requests(fake: FakeCouch) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/_bulk_docs"))


async def test_concurrent_writes_share_one_request(setup: tuple[FakeCouch, CouchClient]) -> None:
    fake, client = setup
    writer = BulkWriter(client, database=DB, max_batch=100, max_delay=0.05)
    revs = await asyncio.gather(*(writer.write({"_id": f"m{n}", "n": n}) for n in range(30)))
    assert bulk_requests(fake) == 1
    assert all(rev.startswith("1-") for rev in revs)
    assert len(fake.docs(DB)) == 30


async def test_a_full_batch_goes_out_at_once_and_the_rest_follows(
    setup: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = setup
    writer = BulkWriter(client, database=DB, max_batch=10, max_delay=0.05)
    await asyncio.gather(*(writer.write({"_id": f"m{n}"}) for n in range(25)))
    assert bulk_requests(fake) == 3


async def test_a_conflict_fails_only_its_own_writer(setup: tuple[FakeCouch, CouchClient]) -> None:
    fake, client = setup
    fake.put(DB, {"_id": "taken"})
    writer = BulkWriter(client, database=DB)
    results = await asyncio.gather(
        writer.write({"_id": "free"}),
        writer.write({"_id": "taken", "stale": True}),
        return_exceptions=True,
    )
    assert isinstance(results[0], str)
    assert isinstance(results[1], DocumentConflict)
    assert bulk_requests(fake) == 1


async def test_a_failed_request_reaches_every_writer(setup: tuple[FakeCouch, CouchClient]) -> None:
    fake, client = setup
    fake.fail_requests(status=503, path="_bulk_docs", count=1)
    writer = BulkWriter(client, database=DB)
    results = await asyncio.gather(
        *(writer.write({"_id": f"m{n}"}) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, CouchTransientError) for r in results)
    assert fake.docs(DB) == []


async def test_when_everyone_in_flight_is_waiting_the_batch_does_not_wait(
    setup: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = setup
    # A delay far beyond the wait below: only `waiting_for` can send it.
    writer = BulkWriter(client, database=DB, max_delay=60.0, waiting_for=lambda: 3)
    writes = [asyncio.create_task(writer.write({"_id": f"m{n}"})) for n in range(3)]
    done, _ = await asyncio.wait(writes, timeout=5)
    assert len(done) == 3
    assert bulk_requests(fake) == 1


def test_forbidden_rows_are_refusals_of_that_document_not_access_errors() -> None:
    # A daemon without access has its whole request refused; a forbidden row
    # is a validation function's answer about one document.
    error = row_error({"id": "m1", "error": "forbidden", "reason": "validation"}, DB)
    assert isinstance(error, DocumentRefused)
    assert not isinstance(error, PermissionError)
    assert error.status == 403


async def test_close_sends_what_is_queued(setup: tuple[FakeCouch, CouchClient]) -> None:
    fake, client = setup
    writer = BulkWriter(client, database=DB, max_delay=60.0)
    pending = asyncio.create_task(writer.write({"_id": "late"}))
    await asyncio.sleep(0)
    await writer.aclose()
    assert (await pending).startswith("1-")
    assert fake.get(DB, "late") is not None


async def test_shuffled_answers_reach_their_own_writers(
    setup: tuple[FakeCouch, CouchClient],
) -> None:
    # CouchDB does not promise the order of a _bulk_docs answer: each writer
    # must get the outcome of its own document, not of the one in its place.
    fake, client = setup
    stale = {f"m{n}" for n in range(0, 20, 3)}
    for doc_id in stale:
        fake.put(DB, {"_id": doc_id})
    fake.shuffle_bulk_answers()
    writer = BulkWriter(client, database=DB)
    ids = [f"m{n}" for n in range(20)]
    results = await asyncio.gather(
        *(writer.write({"_id": doc_id, "new": True}) for doc_id in ids), return_exceptions=True
    )
    assert fake.events_of("shuffled"), "the answer really came shuffled"
    for doc_id, result in zip(ids, results, strict=True):
        if doc_id in stale:
            assert isinstance(result, DocumentConflict), doc_id
        else:
            stored = fake.get(DB, doc_id)
            assert stored is not None
            assert result == stored["_rev"], doc_id


async def test_two_writes_of_one_id_never_share_a_batch(
    setup: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = setup
    writer = BulkWriter(client, database=DB, max_delay=0.05)
    first = asyncio.create_task(writer.write({"_id": "m1", "n": 1}))
    second = asyncio.create_task(writer.write({"_id": "m1", "n": 2}))
    results = await asyncio.gather(first, second, return_exceptions=True)
    assert bulk_requests(fake) == 2
    # Both carry no _rev: exactly one of them creates the doc.
    revs = [r for r in results if isinstance(r, str)]
    assert len(revs) == 1
    assert sum(isinstance(r, DocumentConflict) for r in results) == 1
    stored = fake.get(DB, "m1")
    assert stored is not None and stored["_rev"] == revs[0]


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param([{"id": "m0", "ok": True, "rev": "1-a"}], id="a row missing"),
        pytest.param(
            [{"id": "m0", "ok": True, "rev": "1-a"}, {"id": "m0", "ok": True, "rev": "1-a"}],
            id="one id twice",
        ),
        pytest.param(
            [{"id": "m0", "ok": True, "rev": "1-a"}, {"id": "zz", "ok": True, "rev": "1-b"}],
            id="an id not asked for",
        ),
        pytest.param(
            [{"ok": True, "rev": "1-a"}, {"ok": True, "rev": "1-b"}], id="rows without ids"
        ),
    ],
)
async def test_an_answer_that_cannot_be_paired_fails_the_whole_request(
    answer: list[dict[str, object]],
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(201, json=answer)

    transport = httpx.MockTransport(handler)
    async with CouchClient(url="http://couch.invalid:5984", transport=transport) as client:
        writer = BulkWriter(client, database=DB)
        results = await asyncio.gather(
            writer.write({"_id": "m0"}), writer.write({"_id": "m1"}), return_exceptions=True
        )
    assert all(isinstance(r, CouchTransientError) for r in results), results
    assert "exactly once" in str(results[0])


async def test_a_document_without_an_id_is_refused(setup: tuple[FakeCouch, CouchClient]) -> None:
    _, client = setup
    with pytest.raises(ValueError, match="_id"):
        await BulkWriter(client, database=DB).write({"no": "id"})
