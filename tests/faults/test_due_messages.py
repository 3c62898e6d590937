"""Finding deferred messages with _find (notifier/retries.py) when the server
cannot: no _find at all stops the worker with a clear error; no right to create
the index only costs speed."""

from __future__ import annotations

import logging
import time

import pytest
from support import DB

from notifier.couch import CouchClient
from notifier.errors import CouchAccessDenied, CouchFatalError
from notifier.retries import INDEX, DueMessages
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.worker import NOTIFIED, RETRY

pytestmark = pytest.mark.anyio

#: One of two workers, so that the due look shows it keeps only its own shard's.
SHARD = Shard(worker_id=0, worker_count=2)


@pytest.mark.parametrize("status", [400, 404, 501])
async def test_a_server_without_find_stops_the_worker_with_a_clear_error(
    fake: FakeCouch, status: int
) -> None:
    fake.fail_requests(status=status, method="POST", path=f"^/{DB}/_find$")
    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
        due = DueMessages(couch, database=DB, shard=SHARD)
        with pytest.raises(CouchFatalError) as raised:
            await due.prepare()
    error = raised.value
    assert not isinstance(error, CouchAccessDenied)
    assert error.status == status
    message = str(error)
    assert f"the server cannot find deferred messages in {DB} with _find" in message
    assert "notifier needs CouchDB 2 or later, or PouchDB Server" in message


async def test_no_right_to_create_the_index_warns_once_and_due_messages_are_still_found(
    fake: FakeCouch, caplog: pytest.LogCaptureFixture
) -> None:
    now = time.time()
    past, future = int(now * 1000) - 60_000, int(now * 1000) + 3_600_000
    ids = [f"msg-{n:05d}" for n in range(12)]
    for doc_id in ids:
        fake.put(DB, {"_id": doc_id, "to": "ann@example.com", RETRY: {"attempts": 1, "due": past}})
    fake.put(DB, {"_id": "later", "to": "ann@example.com", RETRY: {"due": future}})
    fake.put(DB, {"_id": "sent", "to": "ann@example.com", RETRY: {"due": past}, NOTIFIED: True})
    fake.put(DB, {"_id": "fresh", "to": "ann@example.com"})
    mine = {doc_id for doc_id in ids if SHARD.owns(doc_id)}
    assert mine and mine != set(ids), "both shards have due messages"
    fake.fail_requests(status=403, method="POST", path=f"^/{DB}/_index$")

    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
        due = DueMessages(couch, database=DB, shard=SHARD, page_size=5)
        with caplog.at_level(logging.WARNING, logger="notifier.retries"):
            await due.prepare()
        found = [doc["_id"] async for page in due.due(now) for doc in page]

    assert due.indexed is False
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "cannot create the index that finds deferred messages (403)" in warnings[0].getMessage()
    assert f"POST /{DB}/_index" in warnings[0].getMessage()
    assert fake.get(DB, f"_design/{INDEX['ddoc']}") is None, "no index was created"
    assert sorted(found) == sorted(mine), "each due message of this shard, once"
