"""The worker lease against the fake CouchDB: one holder, standbys, takeover, loss."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from notifier.couch import CouchClient
from notifier.errors import CouchFatalError, LeaseLost
from notifier.lease import Holder, Lease
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch

pytestmark = pytest.mark.anyio

SHARD = Shard(worker_id=0, worker_count=2)
DB = "workersequences"


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def couch() -> AsyncIterator[tuple[FakeCouch, CouchClient]]:
    fake = FakeCouch()
    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as client:
        yield fake, client


def lease(
    client: CouchClient,
    clock: Clock,
    *,
    host: str = "host-a",
    pid: int = 1,
    alive: bool = True,
    ttl: float = 30.0,
) -> Lease:
    return Lease(
        client,
        database=DB,
        source_database="messages",
        shard=SHARD,
        ttl=ttl,
        holder=Holder(run_id=f"{host}-{pid}", host=host, pid=pid),
        clock=clock,
        alive=lambda _pid: alive,
    )


async def test_the_first_worker_creates_the_database_and_takes_the_lease(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    first = lease(client, Clock())
    assert await first.acquire(asyncio.Event())
    doc = fake.get(DB, "messages.worker-0-of-2.lease")
    assert doc is not None
    assert (doc["host"], doc["pid"], doc["expires_at"]) == ("host-a", 1, 1_030.0)


async def test_a_second_process_waits_until_the_holder_releases(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    _, client = couch
    clock = Clock()
    holder = lease(client, clock, ttl=0.3)
    standby = lease(client, clock, host="host-b", ttl=0.3)
    assert await holder.acquire(asyncio.Event())
    waiting = asyncio.create_task(standby.acquire(asyncio.Event()))
    await asyncio.sleep(0.3)
    assert not waiting.done(), "the standby must not take a live holder's lease"
    await holder.release()
    assert await asyncio.wait_for(waiting, timeout=5)


async def test_an_expired_lease_is_taken_over_and_its_old_holder_learns_it(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    _, client = couch
    clock = Clock()
    old = lease(client, clock)
    assert await old.acquire(asyncio.Event())
    clock.now += 31
    new = lease(client, clock, host="host-b")
    assert await new.acquire(asyncio.Event())
    with pytest.raises(LeaseLost, match="expired before it could be renewed"):
        await old.renew()


async def test_a_holder_whose_lease_was_taken_over_cannot_renew(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    clock = Clock()
    old = lease(client, clock)
    assert await old.acquire(asyncio.Event())
    # Someone overwrote it (an operator, or a takeover we did not see).
    current = fake.get(DB, "messages.worker-0-of-2.lease")
    assert current is not None
    fake.put(DB, {**current, "run_id": "other"})
    with pytest.raises(LeaseLost, match="another process took over"):
        await old.renew()


async def test_a_dead_holder_on_this_host_is_taken_over_at_once(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    _, client = couch
    clock = Clock()
    crashed = lease(client, clock, pid=111)
    assert await crashed.acquire(asyncio.Event())
    restarted = lease(client, clock, pid=222, alive=False)
    assert await asyncio.wait_for(restarted.acquire(asyncio.Event()), timeout=2)


async def test_a_live_holder_on_another_host_is_not_judged_by_local_pids(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    _, client = couch
    clock = Clock()
    assert await lease(client, clock, host="host-a", pid=111).acquire(asyncio.Event())
    other = lease(client, clock, host="host-b", pid=222, alive=False, ttl=30.0)
    stopping = asyncio.Event()
    waiting = asyncio.create_task(other.acquire(stopping))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    stopping.set()
    assert await asyncio.wait_for(waiting, timeout=15) is False


async def test_a_renewal_that_cannot_reach_couchdb_before_expiry_loses_the_lease(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    clock = Clock()
    holder = lease(client, clock, ttl=0.3)
    assert await holder.acquire(asyncio.Event())
    fake.fail_requests(status=503)
    keeping = asyncio.create_task(holder.keep())
    await asyncio.sleep(0.2)
    clock.now += 1  # time passes beyond the expiry while CouchDB answers 503
    with pytest.raises(LeaseLost, match="lease expired before it could be renewed"):
        await asyncio.wait_for(keeping, timeout=5)


async def test_a_fatal_couchdb_error_is_not_mistaken_for_a_free_lease(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    fake.fail_requests(status=403, path="lease")
    with pytest.raises(CouchFatalError, match="403"):
        await lease(client, Clock()).acquire(asyncio.Event())
