"""Batched marks against the fake CouchDB: one request for many writes, per-doc outcomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from notifier.couch import CouchClient
from notifier.errors import CouchAccessDenied, CouchTransientError, DocumentConflict
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


def test_forbidden_rows_are_access_errors() -> None:
    error = row_error({"id": "m1", "error": "forbidden", "reason": "validation"}, DB)
    assert isinstance(error, CouchAccessDenied)
    assert error.status == 403


async def test_close_sends_what_is_queued(setup: tuple[FakeCouch, CouchClient]) -> None:
    fake, client = setup
    writer = BulkWriter(client, database=DB, max_delay=60.0)
    pending = asyncio.create_task(writer.write({"_id": "late"}))
    await asyncio.sleep(0)
    await writer.aclose()
    assert (await pending).startswith("1-")
    assert fake.get(DB, "late") is not None
