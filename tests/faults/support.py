"""Shared by the fault tests: a worker in process against the fake CouchDB
(through its httpx transport) and a real SMTP sink, with audited checkpoints."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from notifier.checkpoint import CheckpointStore
from notifier.config import SmtpConfig
from notifier.couch import CouchClient, seq_param
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.schedule import RetrySchedule
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for
from notifier.tracker import Seq
from notifier.worker import FAILED, NOTIFIED, RETRY, Worker, WorkerSettings

DB = "messages"
ONE_WORKER = Shard(worker_id=0, worker_count=1)


def seed(fake: FakeCouch, count: int, start: int = 0) -> set[str]:
    recipients = set()
    for n in range(start, start + count):
        to = f"user{n}@example.com"
        fake.put(DB, {"_id": f"msg-{n:05d}", "to": to, "subject": f"s{n}", "body": "b"})
        recipients.add(to)
    return recipients


class AuditedCheckpoints(CheckpointStore):
    """Checks, at every write, that the checkpoint does not pass unsettled messages."""

    def __init__(self, fake: FakeCouch, couch: CouchClient, shard: Shard) -> None:
        super().__init__(couch, database="workersequences", source_database=DB, shard=shard)
        self.fake = fake
        self.shard = shard
        self.violations: list[str] = []
        self.saves: list[Seq] = []

    async def save(self, seq: Seq) -> None:
        # Docs changed after `seq` are what a restart from it would see again;
        # every other message must already be settled.
        after = set(self.fake.changed_since(DB, seq_param(seq)))
        for doc in messages(self.fake):
            mine = self.shard.owns(doc["_id"])
            # A deferred message is done for the feed: it is found again by its due time.
            done = NOTIFIED in doc or FAILED in doc or RETRY in doc
            if mine and doc["_id"] not in after and not done:
                self.violations.append(f"checkpoint {seq!r} passed unsettled {doc['_id']}")
        self.saves.append(seq)
        await super().save(seq)


@asynccontextmanager
async def running(
    fake: FakeCouch,
    sink: SmtpSink,
    shard: Shard = ONE_WORKER,
    **settings: Any,
) -> AsyncIterator[tuple[Worker, AuditedCheckpoints]]:
    options: dict[str, Any] = {
        "heartbeat": 0.3,
        "checkpoint_interval": 0.1,
        "max_parallel": 5,
        "schedule": RetrySchedule(first=0.2, cap=0.5, max_age=60.0),
        "scan_interval": 0.1,
        "probe_first": 0.05,
        "probe_max": 0.3,
        "couch_retry_base": 0.05,
        "couch_retry_cap": 0.3,
        "drain_timeout": 10.0,
        **settings,
    }
    async with (
        CouchClient(url=IN_PROCESS_URL, transport=fake.transport(), timeout=5.0) as couch,
        EmailHandler(
            composer=Composer(sender="n@example.com", database=DB),
            pool=SmtpPool(SmtpConfig(host=sink.host, port=sink.port), size=5),
        ) as handler,
    ):
        store = AuditedCheckpoints(fake, couch, shard)
        worker = Worker(
            couch=couch,
            handler=handler,
            checkpoints=store,
            settings=WorkerSettings(database=DB, shard=shard, **options),
        )
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: worker.ready.is_set() or task.done())
        try:
            yield worker, store
        finally:
            assert not task.done(), "the worker stopped on its own"
            worker.stop()
            await task


def assert_all_delivered_once(fake: FakeCouch, sink: SmtpSink, recipients: set[str]) -> None:
    assert sink.count_by_recipient() == {r: 1 for r in recipients}
    docs = messages(fake)
    assert len(docs) == len(recipients)
    assert all(doc.get(NOTIFIED) is True for doc in docs)


def messages(fake: FakeCouch) -> list[dict[str, Any]]:
    """The message documents: design documents (the retry index) left out."""
    return [d for d in fake.docs(DB) if not d["_id"].startswith("_design/")]


def all_settled(fake: FakeCouch, count: int) -> Callable[[], bool]:
    return lambda: sum(NOTIFIED in d or FAILED in d for d in fake.docs(DB)) >= count
