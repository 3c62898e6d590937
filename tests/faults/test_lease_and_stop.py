"""The worker's lifecycle under faults: the lease while it sends (renewed from
the moment it is taken, no send once it may belong to another process), and
a stop that fits its budget however slow CouchDB is."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from support import DB, ONE_WORKER, seed

from notifier import worker as worker_module
from notifier.checkpoint import CheckpointStore
from notifier.config import SmtpConfig
from notifier.couch import CouchClient
from notifier.errors import LeaseLost
from notifier.lease import Holder, Lease
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for
from notifier.worker import Worker, WorkerSettings

pytestmark = pytest.mark.anyio

LEASE_ID = "messages.worker-0-of-1.lease"


class SlowBulk(httpx.AsyncBaseTransport):
    """Holds ``_bulk_docs`` requests (claims and marks) for ``delay`` seconds."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.delay = 0.0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and self.delay:
            await asyncio.sleep(self.delay)
        return await self.inner.handle_async_request(request)


class Stalled(httpx.AsyncBaseTransport):
    """Once ``stalled``, holds every write until the request's read timeout."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.stalled = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if (
            self.stalled
            and request.method in ("PUT", "POST")
            and "_changes" not in request.url.path
        ):
            await asyncio.sleep(request.extensions["timeout"]["read"])
            raise httpx.ReadTimeout("no answer", request=request)
        return await self.inner.handle_async_request(request)


class SlowLogin(EmailHandler):
    """An SMTP server whose login takes ``login_seconds``."""

    login_seconds = 0.0

    async def check(self) -> None:
        await asyncio.sleep(self.login_seconds)
        await super().check()


@asynccontextmanager
async def worker_with_lease(
    fake: FakeCouch,
    sink: SmtpSink,
    *,
    ttl: float,
    clock: Callable[[], float] = time.time,
    login_seconds: float = 0.0,
    transport: httpx.AsyncBaseTransport | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[Worker, Lease, asyncio.Task[None]]]:
    async with (
        CouchClient(
            url=IN_PROCESS_URL, transport=transport or fake.transport(), timeout=30.0
        ) as couch,
        SlowLogin(
            composer=Composer(sender="n@example.com", database=DB),
            pool=SmtpPool(SmtpConfig(host=sink.host, port=sink.port), size=5),
        ) as handler,
    ):
        handler.login_seconds = login_seconds
        common: dict[str, Any] = {"database": "workersequences", "source_database": DB}
        lease = Lease(couch, shard=ONE_WORKER, ttl=ttl, clock=clock, **common)
        worker = Worker(
            couch=couch,
            handler=handler,
            checkpoints=CheckpointStore(couch, shard=ONE_WORKER, **common),
            settings=WorkerSettings(
                database=DB,
                shard=ONE_WORKER,
                heartbeat=0.3,
                checkpoint_interval=0.1,
                **settings,
            ),
            lease=lease,
        )
        task = asyncio.create_task(worker.run())
        try:
            yield worker, lease, task
        finally:
            worker.stop()
            await asyncio.gather(task, return_exceptions=True)


async def test_the_lease_is_renewed_while_start_up_waits_for_a_slow_smtp_login(
    smtp_sink: SmtpSink,
) -> None:
    fake = FakeCouch(databases=[DB, "workersequences"])
    async with worker_with_lease(fake, smtp_sink, ttl=0.6, login_seconds=1.5) as (worker, _, _):
        await wait_for(lambda: fake.get("workersequences", LEASE_ID) is not None)
        async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
            other = Lease(
                couch,
                database="workersequences",
                source_database=DB,
                shard=ONE_WORKER,
                ttl=0.6,
                holder=Holder(run_id="other", host="elsewhere", pid=1),
            )
            stopping = asyncio.Event()
            standby = asyncio.create_task(other.acquire(stopping))
            await wait_for(worker.ready.is_set, timeout=10)
            assert not standby.done(), "the lease expired while the worker was starting"
            stopping.set()
            assert await standby is False


async def test_no_send_starts_on_a_lease_whose_deadline_passed_unrenewed(
    smtp_sink: SmtpSink,
) -> None:
    fake = FakeCouch(databases=[DB, "workersequences"])
    now = [time.time()]
    async with worker_with_lease(fake, smtp_sink, ttl=30.0, clock=lambda: now[0]) as (
        worker,
        _,
        task,
    ):
        await wait_for(worker.ready.is_set, timeout=10)
        # The process was paused past its lease's deadline (the renewal is
        # due only 10 s later): whatever arrives now must not be sent.
        now[0] += 60
        seed(fake, 3)
        with pytest.raises(LeaseLost, match="expired before it could be renewed"):
            await asyncio.wait_for(task, timeout=10)
    assert smtp_sink.messages == []


async def test_no_send_starts_after_the_lease_was_lost(smtp_sink: SmtpSink) -> None:
    fake = FakeCouch(databases=[DB, "workersequences"])
    slow = SlowBulk(fake.transport())
    async with worker_with_lease(fake, smtp_sink, ttl=0.9, transport=slow) as (worker, _, task):
        await wait_for(worker.ready.is_set, timeout=10)
        # Claims take 1.5 s to land; meanwhile the next renewal (every 0.3 s)
        # finds that another process has the lease.
        slow.delay = 1.5
        seed(fake, 3)
        current = fake.get("workersequences", LEASE_ID)
        assert current is not None
        fake.put(
            "workersequences", {**current, "run_id": "usurper", "expires_at": time.time() + 600}
        )
        with pytest.raises(LeaseLost, match="another process took over"):
            await asyncio.wait_for(task, timeout=15)
        assert worker.stats.abandoned == 3
    assert smtp_sink.messages == []


async def test_a_stop_fits_its_budget_while_couchdb_stalls_every_write(
    smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scaled down from 30 s of drain and 10 s of final writes.
    monkeypatch.setattr(worker_module, "FINAL_WRITES_TIMEOUT", 2.0)
    monkeypatch.setattr(worker_module, "RELEASE_RESERVE", 0.5)
    fake = FakeCouch(databases=[DB, "workersequences"])
    stalled = Stalled(fake.transport())
    smtp_sink.delay = 0.3
    async with worker_with_lease(
        fake, smtp_sink, ttl=30.0, transport=stalled, drain_timeout=1.0, mark_batch_delay=0.2
    ) as (worker, _, task):
        await wait_for(worker.ready.is_set, timeout=10)
        seed(fake, 5)
        await wait_for(lambda: worker.in_flight == 5, timeout=10)
        # From now on CouchDB takes no write: not the marks, not the
        # checkpoint, not the lease release (each would wait 30 s).
        stalled.stalled = True
        stopped = time.monotonic()
        worker.stop()
        await asyncio.wait_for(task, timeout=20)
        took = time.monotonic() - stopped
    assert took < 1.0 + 2.0 + 1.0, f"the stop took {took:.1f}s"
