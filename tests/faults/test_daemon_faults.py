"""The daemon under CouchDB faults that no real server stages on demand.

Each scenario runs a worker in process against the fake CouchDB (through its
httpx transport) and a real SMTP sink, and asserts what counts:

* nothing is lost: every message is delivered and marked;
* no duplicate: each recipient gets exactly one email;
* the checkpoint never passes unfinished work: at every checkpoint write,
  every message whose latest change is at or before the checkpoint is
  already settled (so a restart from it could not miss one);
* the worker stays alive: it stops only when told to.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from support import DB, all_settled, assert_all_delivered_once, messages, running, seed

from notifier import worker as worker_module
from notifier.claim import CLAIM
from notifier.lifecycle import FAILED, RETRY
from notifier.shard import Shard
from notifier.testing import free_port
from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for

# Faults on demand are the fake's: COUCHDB_URL adds no run on a real server.
pytestmark = [pytest.mark.anyio, pytest.mark.fake_couch_only]


async def test_a_feed_cut_mid_stream_loses_nothing(fake: FakeCouch, smtp_sink: SmtpSink) -> None:
    recipients = seed(fake, 120)
    fake.cut_feed_after(25, count=3)
    async with running(fake, smtp_sink) as (worker, store):
        await wait_for(all_settled(fake, 120), timeout=30)
        await wait_for(lambda: len(worker.tracker) == 0)
    assert len(fake.events_of("cut")) == 3
    assert worker.feed.reconnects >= 3
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert store.violations == []
    assert store.saves, "it checkpointed"


async def test_a_503_storm_is_ridden_out(fake: FakeCouch, smtp_sink: SmtpSink) -> None:
    recipients = seed(fake, 60)
    async with running(fake, smtp_sink) as (_, store):
        await smtp_sink.await_count(5, timeout=20)
        fake.fail_requests(status=503, count=40)
        recipients |= seed(fake, 40, start=1000)
        await wait_for(all_settled(fake, 100), timeout=40)
    assert len(fake.events_of("status")) == 40
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert store.violations == []


async def test_a_stalled_feed_is_noticed_and_reconnected(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    recipients = seed(fake, 30)
    fake.stall_feed_after(10)
    async with running(fake, smtp_sink) as (worker, store):
        await wait_for(all_settled(fake, 30), timeout=30)
        recipients |= seed(fake, 5, start=500)
        await wait_for(all_settled(fake, 35), timeout=30)
    assert fake.events_of("stall")
    assert worker.feed.reconnects >= 1
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert store.violations == []


async def test_a_replayed_window_sends_nothing_twice(fake: FakeCouch, smtp_sink: SmtpSink) -> None:
    # Half the docs belong to another worker and stay unchanged, so a
    # reconnect has earlier rows to replay (settled docs moved past it).
    shard = Shard(worker_id=0, worker_count=2)
    fake.replay_window = 40
    seed(fake, 150)
    mine = {f"user{n}@example.com" for n in range(150) if shard.owns(f"msg-{n:05d}")}
    fake.cut_feed_after(30, count=4)
    async with running(fake, smtp_sink, shard) as (worker, store):
        await wait_for(lambda: len(smtp_sink.messages) >= len(mine), timeout=30)
        await wait_for(lambda: len(worker.tracker) == 0)
        await asyncio.sleep(0.5)  # room for a wrongful resend of a replayed row
    assert fake.events_of("replay")
    assert smtp_sink.count_by_recipient() == {r: 1 for r in mine}
    assert store.violations == []


async def test_a_server_that_refuses_connections_for_a_while(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    recipients = seed(fake, 40)
    async with running(fake, smtp_sink) as (_, store):
        await smtp_sink.await_count(3, timeout=20)
        fake.refuse_connections(seconds=1.5)
        recipients |= seed(fake, 10, start=700)
        await wait_for(all_settled(fake, 50), timeout=40)
    assert fake.events_of("refused")
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert store.violations == []


async def test_smtp_refusing_every_third_message_for_now_delays_but_loses_nothing(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    recipients = seed(fake, 30)
    attempts: dict[str, int] = {}

    def flaky(info: Any) -> str | None:
        to = info.rcpt_tos[0]
        attempts[to] = attempts.get(to, 0) + 1
        n = int(to.removeprefix("user").partition("@")[0])
        return "451 4.3.0 try again later" if n % 3 == 0 and attempts[to] == 1 else None

    smtp_sink.reject = flaky
    async with running(fake, smtp_sink) as (worker, store):
        await wait_for(all_settled(fake, 30), timeout=30)
    assert worker.stats.deferred == 10
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert store.violations == []


async def test_a_worker_that_loses_its_lease_stops_sending(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, notifier_config: Any
) -> None:
    from notifier.errors import LeaseLost
    from notifier.testing.worker import worker_running

    seed(fake_couch, 200)
    smtp_sink.delay = 0.02
    config = notifier_config(worker={"lease_ttl": 0.6, "max_parallel": 2})
    with pytest.raises(LeaseLost, match="another process took over"):
        async with worker_running(config) as worker:
            await smtp_sink.await_count(3, timeout=20)
            lease = fake_couch.get("workersequences", "messages.worker-0-of-1.lease")
            assert lease is not None
            fake_couch.put("workersequences", {**lease, "run_id": "usurper", "pid": 1})
            await wait_for(lambda: worker.stopping, timeout=10)
    sent_at_loss = len(smtp_sink.messages)
    await asyncio.sleep(0.5)
    assert len(smtp_sink.messages) == sent_at_loss, "nothing is sent after the worker stopped"
    assert sent_at_loss < 200


async def test_shuffled_bulk_answers_with_user_edits_mark_every_message(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # PouchDB Server answered _bulk_docs out of order after a restart. With
    # user edits in flight, some marks in a batch conflict: each conflict
    # must reach its own message, or a message is counted as marked while
    # it never was.
    recipients = seed(fake, 40)
    fake.shuffle_bulk_answers()
    smtp_sink.delay = 0.2
    edited: set[str] = set()

    async def edit_while_in_flight() -> None:
        while len(edited) < 20:
            for doc in messages(fake):
                n = int(doc["_id"].split("-")[1])
                if n % 2 == 0 and CLAIM in doc and doc["_id"] not in edited:
                    fake.put(DB, {**doc, "subject": "edited by the user"})
                    edited.add(doc["_id"])
            await asyncio.sleep(0.01)

    async with running(fake, smtp_sink, max_parallel=8) as (worker, store):
        editor = asyncio.create_task(edit_while_in_flight())
        await wait_for(all_settled(fake, 40), timeout=30)
        await asyncio.wait_for(editor, timeout=10)
        await wait_for(lambda: len(worker.tracker) == 0)
    assert len(fake.events_of("shuffled")) > 0
    assert_all_delivered_once(fake, smtp_sink, recipients)
    for doc in messages(fake):
        assert CLAIM not in doc, f"{doc['_id']} kept its claim"
        if doc["_id"] in edited:
            assert doc["subject"] == "edited by the user"
    assert store.violations == []


async def test_a_stop_takes_in_no_more_due_messages_while_it_drains(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # Deferred messages already due: only the look for due ones takes them in.
    for n in range(30):
        retry = {"attempts": 1, "due": 1000, "since": 1000, "lastReply": "451 later"}
        fake.put(DB, {"_id": f"msg-{n:05d}", "to": f"user{n}@example.com", RETRY: retry})
    smtp_sink.delay = 0.5  # a drain five looks long (scan_interval 0.1 s)
    async with running(fake, smtp_sink, max_parallel=2, drain_timeout=10.0) as (worker, _):
        await wait_for(lambda: worker.in_flight == 2, timeout=20)
        looks = worker._due.looks
        worker.stop()
        await asyncio.sleep(0.3)  # mid-drain; leaving the block waits for the rest
    # Intake stops first: no look for due messages during the drain, so
    # nothing new is claimed only to be given up.
    assert worker._due.looks == looks
    assert worker.stats.abandoned == 0
    assert worker.stats.sent == len(smtp_sink.messages) == 2
    assert sum(RETRY in d for d in messages(fake)) == 28, "the rest wait for the next start"


async def test_a_hand_edited_retry_state_without_a_due_time_is_sent_not_stuck(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # The selector keeps any notificationRetry out of the feed, and the look
    # for due messages compares numbers: these would wait forever.
    odd = {"due": "tomorrow"}, {"attempts": 2}, "garbage", {"due": {"at": 1}}
    for n, retry in enumerate(odd):
        fake.put(DB, {"_id": f"msg-{n:05d}", "to": f"user{n}@example.com", RETRY: retry})
    async with running(fake, smtp_sink):
        await wait_for(all_settled(fake, len(odd)), timeout=20)
    assert smtp_sink.count_by_recipient() == {f"user{n}@example.com": 1 for n in range(len(odd))}
    assert all(RETRY not in d for d in messages(fake))


async def test_a_paused_relay_with_nothing_in_flight_is_probed_with_due_messages(
    fake: FakeCouch,
) -> None:
    # The message that paused sending leaves (deleted during the outage):
    # then only a due deferred message can probe the relay.
    with SmtpSink(port=free_port()) as sink:
        async with running(fake, sink, claim_ttl=0.6, max_parallel=2) as (worker, _):
            await asyncio.to_thread(sink.stop)
            seed(fake, 1)
            await wait_for(lambda: worker.delivery.paused, timeout=20)
            doc = fake.get(DB, "msg-00000")
            assert doc is not None
            fake.delete(DB, "msg-00000", doc["_rev"])
            await wait_for(lambda: worker.in_flight == 0, timeout=20)
            assert worker.delivery.paused, "nothing answered the relay"
            retry = {"attempts": 1, "due": 1000, "since": 1000, "lastReply": "451 later"}
            fake.put(DB, {"_id": "due-1", "to": "later@example.com", RETRY: retry})
            await asyncio.to_thread(sink.start)
            await wait_for(lambda: len(sink.messages) == 1, timeout=20)
        assert not worker.delivery.paused
        assert sink.count_by_recipient() == {"later@example.com": 1}


async def test_a_bug_deciding_about_one_document_dead_letters_it_and_the_shard_goes_on(
    fake: FakeCouch, smtp_sink: SmtpSink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A bug in the pure lifecycle for one document must not stop the worker
    # (it would fail on it again after every restart), nor stall the others.
    real_decide = worker_module.decide

    def decide(doc: Any, **kw: Any) -> Any:
        if doc is not None and doc.get("_id") == "msg-00002":
            raise KeyError("boom")
        return real_decide(doc, **kw)

    monkeypatch.setattr(worker_module, "decide", decide)
    recipients = seed(fake, 5)
    async with running(fake, smtp_sink) as (worker, _):
        await wait_for(all_settled(fake, 5), timeout=20)
    by_id = {d["_id"]: d for d in messages(fake)}
    reason = by_id["msg-00002"][FAILED]["reason"]
    assert reason == "unexpected error deciding what to do: KeyError: 'boom'"
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients - {"user2@example.com"}}
    assert worker.delivery.crashes == 1
