"""The worker in process, against a real PouchDB Server and a real SMTP server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import httpx
import pytest
from realservers import CouchTestDB
from scenario import MakeConfig, message, seed

from notifier.checkpoint import CheckpointStore
from notifier.claim import CLAIM
from notifier.couch import CouchClient
from notifier.errors import CouchFatalError, DeliveryFatalError, HandlerCrashing
from notifier.handler import Receipt
from notifier.shard import Shard
from notifier.testing.smtp import ReceivedEnvelopeInfo, SmtpSink
from notifier.testing.worker import run_until, wait_for, worker_running
from notifier.worker import FAILED, NOTIFIED, RECORD, RETRY, Worker, WorkerSettings

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]


def checkpoint_doc(couch: CouchTestDB, database: str, doc_id: str) -> dict[str, Any] | None:
    response = couch.client.get(f"/{database}/{doc_id}")
    return response.json() if response.status_code == 200 else None


def bulk_ascii_json(couch: CouchTestDB, docs: list[dict[str, Any]]) -> None:
    """Write docs as ASCII JSON, which can carry a lone surrogate as JSON allows."""
    response = couch.client.post(
        f"/{couch.name}/_bulk_docs",
        content=json.dumps({"docs": docs}),
        headers={"Content-Type": "application/json"},
    )
    assert all(row.get("ok") for row in response.json()), response.text


def settled(couch: CouchTestDB) -> list[dict[str, Any]]:
    return [d for d in couch.all_docs() if NOTIFIED in d or FAILED in d]


async def test_every_message_is_sent_once_marked_and_checkpointed(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    recipients = seed(couch, 50)
    config = make_config()
    worker = await run_until(config, lambda: len(smtp_sink.messages) >= 50)

    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    docs = couch.all_docs()
    assert all(d[NOTIFIED] is True for d in docs)
    assert all(d[RECORD]["worker"] == "0/1" for d in docs)
    sent_ids = {m.message["Message-ID"] for m in smtp_sink.messages}
    assert sent_ids == {d[RECORD]["messageId"] for d in docs}
    ckpt = checkpoint_doc(couch, config.couch.checkpoint_database, f"{couch.name}.worker-0-of-1")
    assert ckpt is not None and "since" in ckpt
    assert worker.stats.sent == 50


async def test_a_restart_sends_nothing_again(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 20)
    config = make_config()
    await run_until(config, lambda: len(smtp_sink.messages) >= 20)
    async with worker_running(config) as again:
        # Give the second run time to see the whole feed: its checkpoint
        # covers everything, and the marks keep the rest out of the filter.
        await wait_for(lambda: again.feed.connected, timeout=10)
        await asyncio.sleep(1.5)
    assert len(smtp_sink.messages) == 20
    assert again.stats.sent == 0


async def test_messages_added_while_running_are_delivered(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 5)
    async with worker_running(make_config()):
        await smtp_sink.await_count(5, timeout=20)
        await asyncio.to_thread(seed, couch, 5, 100)
        await smtp_sink.await_count(10, timeout=20)
    assert len(smtp_sink.messages) == 10


async def test_bad_documents_are_dead_lettered_and_good_ones_still_go(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    bulk_ascii_json(
        couch,
        [
            message(1),
            {"_id": "no-to", "subject": "x"},
            {"_id": "to-number", "to": 42},
            {"_id": "bcc-injection", "to": "a@example.com\r\nBcc: evil@example.com"},
            {"_id": "empty"},
            {"_id": "lone-surrogate", "to": "a@example.com", "subject": "cut \ud83d"},
            message(2),
        ],
    )
    await run_until(make_config(), lambda: len(settled(couch)) >= 7)

    assert sorted(smtp_sink.count_by_recipient()) == ["user1@example.com", "user2@example.com"]
    failed = {d["_id"]: d[FAILED]["reason"] for d in couch.all_docs() if FAILED in d}
    assert failed == {
        "no-to": "no 'to' field: no recipient to notify",
        "to-number": "'to' is a number, expected one email address as a string",
        "bcc-injection": "'to' contains a line break",
        "empty": "no 'to' field: no recipient to notify",
        "lone-surrogate": "'subject' is not valid Unicode text (a lone surrogate at position 4)",
    }
    assert all(NOTIFIED not in d for d in couch.all_docs() if FAILED in d)


async def test_design_docs_and_deleted_docs_are_skipped_but_advance_the_checkpoint(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    couch.put({"_id": "_design/app", "views": {}})
    rev = couch.put(message(1))["rev"]
    couch.delete("msg-00001", rev)
    couch.put(message(2))
    config = make_config()
    async with worker_running(config) as worker:
        await smtp_sink.await_count(1, timeout=20)
        await wait_for(lambda: worker.tracker.arrived >= 3 and len(worker.tracker) == 0)
    assert smtp_sink.count_by_recipient() == {"user2@example.com": 1}
    assert worker.stats.skipped == 3  # the design docs (ours: the retry index) and the tombstone
    info = couch.client.get(f"/{couch.name}").json()
    ckpt = checkpoint_doc(couch, config.couch.checkpoint_database, f"{couch.name}.worker-0-of-1")
    assert ckpt is not None
    # The checkpoint reached the last row the feed sent (the doc we marked is
    # filtered out, so it is one short of update_seq on this server).
    assert ckpt["since"] == worker.tracker.checkpoint
    assert info["update_seq"] != 0


async def test_a_quiet_feed_still_moves_the_checkpoint_past_filtered_changes(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 3)
    config = make_config()
    client = CouchClient(url=couch.url)
    settings = WorkerSettings(
        database=couch.name,
        shard=Shard(worker_id=0, worker_count=1),
        heartbeat=0.2,
        resync_after=0.5,
        checkpoint_interval=0.2,
    )
    from notifier.mailer import EmailHandler, SmtpPool
    from notifier.message import Composer

    async with (
        client,
        EmailHandler(
            composer=Composer(sender="n@example.com", database=couch.name),
            pool=SmtpPool(config.smtp, size=2),
        ) as handler,
    ):
        store = CheckpointStore(
            client,
            database=config.couch.checkpoint_database,
            source_database=couch.name,
            shard=settings.shard,
        )
        worker = Worker(couch=client, handler=handler, checkpoints=store, settings=settings)
        task = asyncio.create_task(worker.run())
        update_seq = None

        async def caught_up() -> bool:
            nonlocal update_seq
            update_seq = (await client.database_info(couch.name))["update_seq"]
            return len(smtp_sink.messages) == 3 and store.saved == update_seq

        # The three marks are changes the selector hides; only the resync
        # request can reveal that the feed stands past them.
        await wait_for(caught_up, timeout=20)
        worker.stop()
        await task
    assert store.saved == update_seq


async def test_two_shards_split_the_work_without_overlap(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    recipients = seed(couch, 60)
    config = make_config(worker={"worker_count": 2})
    async with worker_running(config, worker_id=0) as w0, worker_running(config, worker_id=1) as w1:
        await smtp_sink.await_count(60, timeout=30)
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    shard0 = Shard(worker_id=0, worker_count=2)
    owned_by_0 = sum(shard0.owns(f"msg-{n:05d}") for n in range(60))
    assert w0.stats.sent == owned_by_0
    assert w1.stats.sent == 60 - owned_by_0
    assert 0 < owned_by_0 < 60


class RecordingHandler:
    """A handler that records concurrency and can act while a message is in flight."""

    def __init__(self, worker_box: list[Worker], delay: float = 0.05) -> None:
        self.worker_box = worker_box
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0
        self.max_unread_gap = 0
        self.delivered: list[str] = []
        self.during: dict[str, Any] = {}

    async def check(self) -> None:
        return None

    async def deliver(self, doc: Mapping[str, Any]) -> Receipt:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        worker = self.worker_box[0]
        # Rows taken off the feed but not finished: never more than the cap.
        self.max_unread_gap = max(self.max_unread_gap, len(worker.tracker))
        try:
            action = self.during.pop(doc["_id"], None)
            if action is not None:
                await action()
            await asyncio.sleep(self.delay)
            self.delivered.append(doc["_id"])
            return {"channel": "test"}
        finally:
            self.in_flight -= 1


async def start_worker(
    couch: CouchTestDB, handler: RecordingHandler, box: list[Worker], *, max_parallel: int
) -> tuple[CouchClient, Worker, asyncio.Task[None]]:
    client = CouchClient(url=couch.url)
    settings = WorkerSettings(
        database=couch.name,
        shard=Shard(worker_id=0, worker_count=1),
        max_parallel=max_parallel,
        heartbeat=0.5,
        checkpoint_interval=0.2,
    )
    store = CheckpointStore(
        client, database="ckpt_" + couch.name, source_database=couch.name, shard=settings.shard
    )
    worker = Worker(couch=client, handler=handler, checkpoints=store, settings=settings)
    box.append(worker)
    return client, worker, asyncio.create_task(worker.run())


async def test_at_most_max_parallel_in_flight_and_the_feed_waits(couch: CouchTestDB) -> None:
    seed(couch, 40)
    box: list[Worker] = []
    # Sends long enough that the claims written before them (batched, one
    # round trip) cannot keep four from overlapping.
    handler = RecordingHandler(box, delay=0.2)
    client, worker, task = await start_worker(couch, handler, box, max_parallel=4)
    async with client:
        await wait_for(lambda: len(handler.delivered) == 40, timeout=30)
        worker.stop()
        await task
    assert handler.max_in_flight == 4
    assert handler.max_unread_gap <= 4
    assert sorted(handler.delivered) == sorted(f"msg-{n:05d}" for n in range(40))


@pytest.mark.parametrize("max_parallel", [1, 2])
async def test_user_edit_while_in_flight_sends_once_and_keeps_the_edit(
    couch: CouchTestDB, max_parallel: int
) -> None:
    # With one slot, the edit's row waits unread until the first copy is
    # marked, and then describes a revision older than the mark. With two,
    # it arrives while the first copy is still in flight.
    seed(couch, 1)
    box: list[Worker] = []
    handler = RecordingHandler(box)

    async def user_edits() -> None:
        doc = await asyncio.to_thread(couch.get, "msg-00000")
        doc["subject"] = "edited by the user"
        await asyncio.to_thread(couch.put, doc)

    handler.during["msg-00000"] = user_edits
    client, worker, task = await start_worker(couch, handler, box, max_parallel=max_parallel)
    async with client:
        await wait_for(lambda: NOTIFIED in couch.get("msg-00000"), timeout=20)
        # Let the edited revision come through the feed too.
        await asyncio.sleep(1.0)
        worker.stop()
        await task
    doc = couch.get("msg-00000")
    assert handler.delivered == ["msg-00000"]
    # Four rows: the retry index's design doc, the message, the echo of the
    # worker's claim, and the edit.
    assert worker.tracker.arrived == 4, "the edit came through the feed as a row of its own"
    assert doc["subject"] == "edited by the user"
    assert doc[NOTIFIED] is True
    assert worker.stats.conflicts == 1


async def test_doc_deleted_while_in_flight_is_not_resurrected(couch: CouchTestDB) -> None:
    seed(couch, 2)
    box: list[Worker] = []
    handler = RecordingHandler(box)

    async def user_deletes() -> None:
        doc = await asyncio.to_thread(couch.get, "msg-00000")
        await asyncio.to_thread(couch.delete, "msg-00000", doc["_rev"])

    handler.during["msg-00000"] = user_deletes
    client, worker, task = await start_worker(couch, handler, box, max_parallel=2)
    async with client:
        await wait_for(lambda: len(worker.tracker) == 0 and worker.tracker.arrived >= 2)
        worker.stop()
        await task
    assert couch.client.get(f"/{couch.name}/msg-00000").status_code == 404
    assert sorted(handler.delivered) == ["msg-00000", "msg-00001"]


async def test_smtp_5xx_dead_letters_and_4xx_is_deferred_until_max_age(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 3)
    refusals: dict[str, int] = {}

    def reject(info: ReceivedEnvelopeInfo) -> str | None:
        to = info.rcpt_tos[0]
        refusals[to] = refusals.get(to, 0) + 1
        if to == "user0@example.com":
            return "550 5.1.1 no such user"
        if to == "user1@example.com" and refusals[to] <= 2:
            return "451 4.3.0 try again later"
        if to == "user2@example.com":
            return "452 4.2.2 mailbox full"
        return None

    smtp_sink.reject = reject
    config = make_config(delivery={"retry_first": 0.2, "retry_max": 0.4, "max_age": 2.0})
    async with worker_running(config):
        await wait_for(lambda: len(settled(couch)) == 3, timeout=60)
    docs = {d["_id"]: d for d in couch.all_docs()}
    assert docs["msg-00000"][FAILED]["reason"].startswith("SMTP server refused the message: 550")
    assert docs["msg-00001"][NOTIFIED] is True
    assert docs["msg-00001"][RECORD]["attempts"] == 3
    assert RETRY not in docs["msg-00001"], "the mark removes the retry state"
    # Tried until max_age (2 s here; 5 days by default), then given up with the reply.
    reason = docs["msg-00002"][FAILED]["reason"]
    assert reason.startswith("gave up after "), reason
    assert "last reply: SMTP server refused the message: 452 4.2.2 mailbox full" in reason
    assert refusals["user2@example.com"] >= 3
    failed = docs["msg-00002"][FAILED]
    tried_for = datetime.fromisoformat(failed["failedAt"]) - datetime.fromisoformat(
        failed["firstFailedAt"]
    )
    assert tried_for.total_seconds() >= 2.0, "not given up before max_age"
    assert smtp_sink.count_by_recipient() == {"user1@example.com": 1}


async def test_a_missing_database_is_fatal(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    config = make_config(couch={"database": "does_not_exist"})
    with pytest.raises(CouchFatalError, match="404"):
        async with worker_running(config):
            pass
    assert smtp_sink.messages == []


async def test_smtp_login_failure_is_fatal_before_anything_is_taken(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed(couch, 2)
    with SmtpSink(username="notifier", password="right") as sink:
        config = make_config(smtp={"port": sink.port})
        from dataclasses import replace

        from notifier.config import Secret

        config = replace(
            config, smtp=replace(config.smtp, username="notifier", password=Secret("wrong"))
        )
        with pytest.raises(DeliveryFatalError, match="refused the login"):
            async with worker_running(config):
                pass
        assert "wrong" not in repr(config)
    assert all(NOTIFIED not in d for d in couch.all_docs())


class FailingCheckpointReads(httpx.AsyncBaseTransport):
    """Real HTTP to the server, except that checkpoint reads get a 500."""

    def __init__(self, checkpoint_db: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._checkpoint_db = checkpoint_db
        self.failed = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path.startswith(f"/{self._checkpoint_db}/"):
            self.failed += 1
            return httpx.Response(500, json={"error": "internal", "reason": "disk on fire"})
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_an_unreadable_checkpoint_stops_the_worker_instead_of_starting_from_zero(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 3)
    config = make_config()
    transport = FailingCheckpointReads(config.couch.checkpoint_database)
    with pytest.raises(Exception, match="500") as info:
        async with worker_running(config, transport=transport):
            pass
    assert not isinstance(info.value, AssertionError)
    assert transport.failed == 1
    assert smtp_sink.messages == []


async def test_an_unexpected_handler_error_defers_that_doc_and_goes_on(
    couch: CouchTestDB,
) -> None:
    seed(couch, 3)
    box: list[Worker] = []
    handler = RecordingHandler(box)

    async def bug() -> None:
        raise KeyError("surprise")

    handler.during["msg-00001"] = bug
    client, worker, task = await start_worker(couch, handler, box, max_parallel=2)
    async with client:
        await wait_for(lambda: len(settled(couch)) == 2, timeout=20)
        await wait_for(lambda: RETRY in couch.get("msg-00001"), timeout=20)
        worker.stop()
        await task  # the worker did not stop on its own
    # A bug is not the message's fault: deferred like a temporary failure,
    # never dead-lettered for it.
    doc = couch.get("msg-00001")
    assert FAILED not in doc
    assert doc[RETRY]["lastReply"] == "unexpected error: KeyError: 'surprise'"
    assert sorted(handler.delivered) == ["msg-00000", "msg-00002"]


async def test_unexpected_errors_in_a_row_stop_the_worker_and_dead_letter_nothing(
    couch: CouchTestDB,
) -> None:
    seed(couch, 12)
    box: list[Worker] = []
    handler = RecordingHandler(box)

    async def broken_template() -> None:
        raise TypeError("unsupported operand type(s)")

    for n in range(12):
        handler.during[f"msg-{n:05d}"] = broken_template
    client, _, task = await start_worker(couch, handler, box, max_parallel=1)
    async with client:
        with pytest.raises(HandlerCrashing, match="10 messages in a row"):
            await asyncio.wait_for(task, timeout=30)
    assert handler.delivered == []
    assert all(FAILED not in d and NOTIFIED not in d for d in couch.all_docs())


class RefusingMarks(httpx.AsyncBaseTransport):
    """Real HTTP, except that the server refuses every write of one document.

    Single writes get the status; in a _bulk_docs batch the document is taken
    out before the batch is forwarded, and its row comes back as an error.
    """

    def __init__(
        self,
        database: str,
        doc_id: str,
        refuse: Callable[[dict[str, Any]], bool] = lambda doc: True,
    ) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._database = database
        self._doc_id = doc_id
        self._refuse = refuse
        self.refused = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        error = {"id": self._doc_id, "error": "too_large", "reason": "the document is too large"}
        single = request.method == "PUT" and path == f"/{self._database}/{self._doc_id}"
        if single and self._refuse(json.loads(await request.aread())):
            self.refused += 1
            return httpx.Response(413, json=error)
        if request.method == "POST" and path == f"/{self._database}/_bulk_docs":
            docs = json.loads(await request.aread())["docs"]
            index = next(
                (i for i, d in enumerate(docs) if d.get("_id") == self._doc_id and self._refuse(d)),
                None,
            )
            if index is not None:
                self.refused += 1
                rest = docs[:index] + docs[index + 1 :]
                rows: list[dict[str, Any]] = []
                if rest:
                    forwarded = httpx.Request(
                        "POST",
                        request.url,
                        headers={
                            "Content-Type": "application/json",
                            "Accept": "application/json",
                            # On a server that needs them: the original's credentials.
                            **{k: v for k, v in request.headers.items() if k == "authorization"},
                        },
                        content=json.dumps({"docs": rest}),
                    )
                    response = await self._inner.handle_async_request(forwarded)
                    rows = json.loads(await response.aread())
                rows.insert(index, error)
                return httpx.Response(201, json=rows)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_sent_message_the_server_will_not_let_us_mark_counts_as_done(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 2)
    transport = RefusingMarks(couch.name, "msg-00000")
    async with worker_running(make_config(), transport=transport) as worker:
        await wait_for(lambda: len(settled(couch)) == 1 and len(worker.tracker) == 0)
    # Stopping (and resending after every restart) would be worse than an
    # unmarked doc: it was delivered once, logged, and the checkpoint moved on.
    assert smtp_sink.count_by_recipient() == {"user0@example.com": 1, "user1@example.com": 1}
    assert worker.stats.unwritable == 1
    assert transport.refused == 3, "the claim, the mark, the bare outcome"
    assert NOTIFIED not in couch.get("msg-00000")


async def test_a_mark_refused_as_too_large_falls_back_to_the_bare_flag(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    # The claim fits, the mark with its record does not: the flag alone
    # settles the message and drops the claim, so no other worker sends it.
    seed(couch, 2)
    transport = RefusingMarks(couch.name, "msg-00000", refuse=lambda doc: RECORD in doc)
    async with worker_running(make_config(), transport=transport) as worker:
        await wait_for(lambda: len(settled(couch)) == 2 and len(worker.tracker) == 0)
    assert smtp_sink.count_by_recipient() == {"user0@example.com": 1, "user1@example.com": 1}
    assert transport.refused == 1
    assert worker.stats.unwritable == 0
    doc = couch.get("msg-00000")
    assert doc[NOTIFIED] is True
    assert RECORD not in doc and CLAIM not in doc


async def test_a_relay_refusing_our_sender_stops_the_worker_instead_of_dead_lettering(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed(couch, 5)
    smtp_sink.reject_sender = lambda address: "550 5.7.1 sender not allowed"
    with pytest.raises(DeliveryFatalError, match=r"refused the sender 'notify@example\.com'"):
        async with worker_running(make_config()):
            await wait_for(lambda: False, timeout=20)
    assert all(FAILED not in d and NOTIFIED not in d for d in couch.all_docs())
