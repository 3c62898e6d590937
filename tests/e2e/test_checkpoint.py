"""The checkpoint store against PouchDB Server: creation, races, strict reads."""

from __future__ import annotations

import pytest
from realservers import CouchTestDB, unique_db_name

from notifier.checkpoint import CheckpointStore
from notifier.couch import CouchClient
from notifier.errors import CouchFatalError
from notifier.shard import Shard

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

SHARD = Shard(worker_id=1, worker_count=3)


def store(client: CouchClient, database: str) -> CheckpointStore:
    return CheckpointStore(client, database=database, source_database="messages", shard=SHARD)


async def test_first_load_creates_the_database_and_finds_nothing(couch: CouchTestDB) -> None:
    database = unique_db_name("checkpoints")
    async with CouchClient(url=couch.url) as client:
        assert await store(client, database).load() is None
        info = await client.database_info(database)
    assert info["db_name"] == database


async def test_saved_seq_comes_back_exactly_as_given(couch: CouchTestDB) -> None:
    database = unique_db_name("checkpoints")
    opaque = "12-g1AAAAFTeJzLYWBg4MhgTmHgz8tPSTV0MDQy1zMAQsMcoEQiQ1L9_"
    async with CouchClient(url=couch.url) as client:
        first = store(client, database)
        await first.load()
        await first.save(opaque)
        assert await store(client, database).load() == opaque
    doc = couch.client.get(f"/{database}/messages.worker-1-of-3").json()
    assert (doc["worker_id"], doc["worker_count"], doc["database"]) == (1, 3, "messages")


async def test_a_409_on_the_checkpoint_is_handled(couch: CouchTestDB) -> None:
    database = unique_db_name("checkpoints")
    async with CouchClient(url=couch.url) as client:
        a, b = store(client, database), store(client, database)
        await a.load()
        await b.load()
        await a.save(5)
        await b.save(6)  # b has no rev yet: 409, re-read, write
        await a.save(7)  # a's rev is stale now
        assert await store(client, database).load() == 7
    assert a.writes == 2 and b.writes == 1


async def test_a_checkpoint_without_since_stops_the_worker(couch: CouchTestDB) -> None:
    database = unique_db_name("checkpoints")
    async with CouchClient(url=couch.url) as client:
        await client.create_database(database)
        await client.put_doc(database, {"_id": "messages.worker-1-of-3", "oops": 1})
        with pytest.raises(CouchFatalError, match="has no 'since' field"):
            await store(client, database).load()
