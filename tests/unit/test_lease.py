"""The worker lease against the fake CouchDB: one holder, standbys, takeover, loss."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import httpx
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
        # One pid scope per host name here: a host's own pids can be judged.
        holder=Holder(run_id=f"{host}-{pid}", host=host, pid=pid, scope=f"{host}-scope"),
        clock=clock,
        alive=lambda _pid, _start: alive,
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


class AnswerLost(httpx.AsyncBaseTransport):
    """Applies the next ``lost`` lease writes, then drops their answers."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.lost = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if self.lost and request.method == "PUT" and request.url.path.endswith(".lease"):
            self.lost -= 1
            await response.aread()
            raise httpx.ReadError("connection reset while reading the answer", request=request)
        return response


async def test_a_renewal_whose_answer_was_lost_is_retried_not_taken_for_a_loss() -> None:
    fake = FakeCouch()
    transport = AnswerLost(fake.transport())
    async with CouchClient(url=IN_PROCESS_URL, transport=transport) as client:
        clock = Clock()
        holder = lease(client, clock, ttl=0.6)
        assert await holder.acquire(asyncio.Event())
        transport.lost = 1
        keeping = asyncio.create_task(holder.keep())
        # The first renewal is applied but its answer lost; its retry gets a
        # 409 from its own write. The lease is still ours: keep renewing.
        await asyncio.sleep(1.0)
        assert transport.lost == 0
        assert not keeping.done(), keeping.exception() if keeping.done() else None
        keeping.cancel()
        await asyncio.gather(keeping, return_exceptions=True)
    doc = fake.get(DB, "messages.worker-0-of-2.lease")
    assert doc is not None and doc["run_id"] == "host-a-1"
    assert holder.renewals >= 2


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


async def test_the_lease_records_when_its_holder_started_and_keeps_it_across_renewals(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    clock = Clock()
    holder = lease(client, clock)
    assert not holder.taken.is_set()
    assert await holder.acquire(asyncio.Event())
    assert holder.taken.is_set() and holder.started_at == 1_000.0
    clock.now += 10
    await holder.renew()
    doc = fake.get(DB, "messages.worker-0-of-2.lease")
    assert doc is not None
    assert (doc["started_at"], doc["expires_at"]) == (1_000.0, 1_040.0)
    assert doc["run_id"] == "host-a-1"


async def test_a_clean_stop_leaves_a_released_marker_instead_of_deleting_the_lease(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    clock = Clock()
    holder = lease(client, clock, pid=7)
    assert await holder.acquire(asyncio.Event())
    clock.now += 125
    await holder.release()
    doc = fake.get(DB, "messages.worker-0-of-2.lease")
    assert doc is not None, "the released lease must stay, so the slot's last run is known"
    assert "run_id" not in doc
    assert {k: doc[k] for k in ("released_at", "expires_at", "started_at")} == {
        "released_at": 1_125.0,
        "expires_at": 1_125.0,
        "started_at": 1_000.0,
    }
    assert (doc["host"], doc["pid"], doc["worker_id"], doc["worker_count"]) == ("host-a", 7, 0, 2)
    await holder.release()  # a second release is a no-op
    again = fake.get(DB, "messages.worker-0-of-2.lease")
    assert again is not None and again["_rev"] == doc["_rev"]


async def test_a_released_lease_is_taken_at_once_even_by_a_host_whose_clock_is_behind(
    couch: tuple[FakeCouch, CouchClient], caplog: pytest.LogCaptureFixture
) -> None:
    fake, client = couch
    ahead, behind = Clock(), Clock()
    ahead.now += 300  # the releasing host's clock is 5 minutes ahead
    holder = lease(client, ahead, ttl=600.0)
    assert await holder.acquire(asyncio.Event())
    await holder.release()
    released = fake.get(DB, "messages.worker-0-of-2.lease")
    assert released is not None and released["expires_at"] > behind.now
    caplog.set_level(logging.INFO, logger="notifier.lease")
    standby = lease(client, behind, host="host-b", ttl=600.0)
    # Were the released lease judged by its expiry, this would wait 5 minutes.
    assert await asyncio.wait_for(standby.acquire(asyncio.Event()), timeout=5)
    assert "worker 0/2: took the lease (it was released)" in caplog.text
    taken = fake.get(DB, "messages.worker-0-of-2.lease")
    assert taken is not None and taken["host"] == "host-b" and "released_at" not in taken
    assert taken["started_at"] == behind.now


async def test_releasing_a_lease_another_process_took_leaves_theirs_alone(
    couch: tuple[FakeCouch, CouchClient],
) -> None:
    fake, client = couch
    holder = lease(client, Clock())
    assert await holder.acquire(asyncio.Event())
    current = fake.get(DB, "messages.worker-0-of-2.lease")
    assert current is not None
    fake.put(DB, {**current, "run_id": "other", "host": "host-b"})
    await holder.release()
    doc = fake.get(DB, "messages.worker-0-of-2.lease")
    assert doc is not None
    assert doc["run_id"] == "other" and "released_at" not in doc
