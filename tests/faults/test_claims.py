"""Claims: of two workers that see the same message, exactly one sends it.

Workers of two layouts (worker counts) run side by side against the fake
CouchDB, as during a reshard, and claims left behind by workers that are
gone are taken over. See notifier/claim.py.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from typing import Any

import pytest
from support import DB, all_settled, assert_all_delivered_once, messages, running, seed

from notifier import process
from notifier.claim import CLAIM, ClaimPoller
from notifier.couch import CouchClient, seq_param
from notifier.metrics import Observability
from notifier.shard import Shard
from notifier.testing import free_port
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch, FakeCouchError
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for
from notifier.worker import NOTIFIED, RECORD, Worker

pytestmark = pytest.mark.anyio

HERE = socket.gethostname()
SCOPE = process.SCOPE


def claim_by(
    worker: str,
    *,
    expires_at: float,
    host: str = "elsewhere",
    pid: int = 1,
    scope: str | None = "elsewhere-scope",
) -> Any:
    return {
        "worker": worker,
        "run": "r-other",
        "host": host,
        "pid": pid,
        "pid_scope": scope,
        "expires_at": expires_at,
    }


def claimed_message(fake: FakeCouch, n: int, claim: Any) -> str:
    doc_id = f"msg-{n:05d}"
    fake.put(DB, {"_id": doc_id, "to": f"user{n}@example.com", "subject": "s", "body": "b"})
    doc = fake.get(DB, doc_id)
    assert doc is not None
    fake.put(DB, {**doc, CLAIM: claim})
    return doc_id


def claim_metrics(worker: Worker) -> dict[str, float | None]:
    registry = Observability(worker, host="127.0.0.1", port=0).registry
    return {
        name: registry.get_sample_value(f"{name}_total", {"worker": str(worker.settings.shard)})
        for name in ("notifier_claim_conflicts", "notifier_claim_waits", "notifier_claim_takeovers")
    }


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


async def test_two_layouts_side_by_side_send_each_message_once(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # A slow relay keeps messages in flight, so both layouts' owners of a
    # message see it while the other is working on it.
    smtp_sink.delay = 0.02
    recipients = seed(fake, 60)
    layouts = [Shard(worker_id=i, worker_count=n) for n in (2, 3) for i in range(n)]
    async with AsyncExitStack() as stack:
        started = [
            await stack.enter_async_context(running(fake, smtp_sink, shard)) for shard in layouts
        ]
        workers = [worker for worker, _ in started]
        recipients |= seed(fake, 140, start=100)
        await wait_for(all_settled(fake, 200), timeout=60)
        await wait_for(lambda: all(len(w.tracker) == 0 for w in workers))
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert sum(w.stats.sent for w in workers) == 200
    # Both layouts did some of the work, and the races happened.
    assert sum(w.stats.sent for w in workers[:2]) > 0
    assert sum(w.stats.sent for w in workers[2:]) > 0
    assert sum(w.stats.claim_conflicts + w.stats.claim_waits for w in workers) > 0
    # The mark removes the claim.
    assert not [d["_id"] for d in fake.docs(DB) if CLAIM in d]
    assert [store.violations for _, store in started] == [[]] * len(layouts)
    # The claim metrics are the workers' own counts.
    for worker in workers:
        scraped = claim_metrics(worker)
        assert scraped == {
            "notifier_claim_conflicts": worker.stats.claim_conflicts,
            "notifier_claim_waits": worker.stats.claim_waits,
            "notifier_claim_takeovers": worker.stats.takeovers,
        }


async def test_a_live_claim_of_another_worker_is_waited_for_never_sent(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    doc_id = claimed_message(fake, 0, claim_by("1/2", expires_at=time.time() + 600))
    async with running(fake, smtp_sink) as (worker, _):
        await wait_for(lambda: worker.stats.claim_waits >= 2)
        # The holder settles it.
        doc = fake.get(DB, doc_id)
        assert doc is not None
        fake.put(DB, {**doc, NOTIFIED: True})
        await wait_for(lambda: len(worker.tracker) == 0)
    assert smtp_sink.messages == []
    assert worker.stats.sent == 0
    assert worker.stats.skipped == 2  # the message, and the retry index's design doc


@pytest.mark.parametrize("expires", ["already", "in 10 minutes"])
async def test_a_claim_unchanged_for_a_whole_ttl_is_taken_over(
    fake: FakeCouch, smtp_sink: SmtpSink, expires: str
) -> None:
    # The holder's wall clock plays no part: a claim stamped to expire long
    # ago (a fast clock) or far ahead (a slow one) is judged alike, by how
    # long this worker has seen it unchanged.
    now = time.time()
    claim = claim_by("1/2", expires_at=now - 5 if expires == "already" else now + 600)
    doc_id = claimed_message(fake, 0, claim)
    first_look = time.monotonic()
    async with running(fake, smtp_sink, claim_ttl=1.5) as (worker, store):
        await smtp_sink.await_count(1, timeout=20)
        await wait_for(lambda: len(worker.tracker) == 0)
    # Never before the claim had stayed unchanged for a whole ttl.
    (message,) = smtp_sink.messages
    assert message.received_at >= first_look + 1.5
    assert worker.stats.takeovers == 1
    assert worker.stats.claim_waits >= 2
    doc = fake.get(DB, doc_id)
    assert doc is not None
    assert doc[NOTIFIED] is True
    assert CLAIM not in doc
    assert store.violations == []


async def test_a_renewed_claim_is_never_taken_over(fake: FakeCouch, smtp_sink: SmtpSink) -> None:
    # A live holder renews its claim; its wall clock says it expired long ago.
    doc_id = claimed_message(fake, 0, claim_by("1/2", expires_at=time.time() - 60))
    async with running(fake, smtp_sink, claim_ttl=1.0) as (worker, _):
        for n in range(8):  # 2 s, two ttls
            await asyncio.sleep(0.25)
            doc = fake.get(DB, doc_id)
            assert doc is not None
            fake.put(DB, {**doc, CLAIM: {**doc[CLAIM], "claimedAt": f"renewal {n}"}})
        doc = fake.get(DB, doc_id)
        assert doc is not None
        fake.put(DB, {**doc, NOTIFIED: True})
        await wait_for(lambda: len(worker.tracker) == 0)
    assert worker.stats.takeovers == 0
    assert worker.stats.claim_waits >= 2
    assert smtp_sink.messages == []


@pytest.mark.parametrize("left_by", ["an earlier run of this worker", "a process that is gone"])
async def test_a_claim_whose_holder_is_known_to_be_gone_is_taken_over_at_once(
    fake: FakeCouch, smtp_sink: SmtpSink, left_by: str
) -> None:
    far = time.time() + 600
    if left_by == "a process that is gone":
        claim = claim_by("1/2", expires_at=far, host=HERE, pid=dead_pid(), scope=SCOPE)
    else:
        claim = claim_by("0/1", expires_at=far)
    claimed_message(fake, 0, claim)
    async with running(fake, smtp_sink) as (worker, _):
        await smtp_sink.await_count(1, timeout=20)
        await wait_for(lambda: len(worker.tracker) == 0)
    assert worker.stats.takeovers == 1
    assert worker.stats.claim_waits == 0
    assert len(smtp_sink.messages) == 1


async def test_the_claim_is_renewed_while_throttled_and_a_lost_claim_is_not_sent(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    seed(fake, 1)
    seen: list[float] = []
    taken = asyncio.Event()

    def take_over() -> None:
        # Another worker takes the claim over; retried if a renewal lands first.
        while True:
            doc = fake.get(DB, "msg-00000")
            assert doc is not None
            try:
                fake.put(DB, {**doc, CLAIM: claim_by("2/3", expires_at=time.time() + 600)})
                return
            except FakeCouchError:
                continue

    def flaky(envelope: Any) -> str | None:
        doc = fake.get(DB, "msg-00000")
        assert doc is not None
        seen.append(doc[CLAIM]["expires_at"])
        if len(seen) == 4:
            take_over()
            taken.set()
        # Throttled: the message keeps trying here, at the slowed pace,
        # without being deferred (throttle_hold), and its claim is renewed.
        return "454 Throttling failure: Maximum sending rate exceeded"

    smtp_sink.reject = flaky
    async with running(fake, smtp_sink, claim_ttl=1.0, throttle_hold=600.0) as (worker, _):
        await wait_for(taken.is_set, timeout=20)
        await wait_for(lambda: worker.stats.claim_waits >= 1, timeout=20)
        attempts = len(seen)
        # The new holder settles it; this worker never tries again.
        doc = fake.get(DB, "msg-00000")
        assert doc is not None
        fake.put(DB, {**doc, NOTIFIED: True})
        await wait_for(lambda: len(worker.tracker) == 0)
    assert len(seen) == attempts
    assert worker.stats.claim_conflicts == 1
    # Renewed every third of a second while it retried.
    assert len(set(seen)) >= 2
    assert smtp_sink.messages == []


async def test_a_stop_gives_up_waiting_for_another_workers_claim(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # One message to send, then one another worker holds.
    seed(fake, 1)
    doc_id = claimed_message(fake, 1, claim_by("1/2", expires_at=time.time() + 600))
    async with running(fake, smtp_sink, drain_timeout=60.0) as (worker, store):
        await wait_for(lambda: worker.stats.claim_waits >= 1 and store.saved is not None)
    # Given up at once, not cancelled at the drain deadline.
    assert worker.stats.abandoned == 1
    # The checkpoint moved past the first message but stays before the held
    # one: a restart sees it again.
    assert store.saved is not None
    assert doc_id in fake.changed_since(DB, seq_param(store.saved))
    assert len(smtp_sink.messages) == 1
    assert store.violations == []


async def test_with_claims_off_nothing_is_written_before_sending(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    recipients = seed(fake, 5)
    async with running(fake, smtp_sink, claims=False) as (worker, _):
        await wait_for(all_settled(fake, 5))
    assert_all_delivered_once(fake, smtp_sink, recipients)
    # One write per message: the mark (rev 2).
    assert {d["_rev"].split("-")[0] for d in messages(fake)} == {"2"}
    assert all(RECORD in d for d in messages(fake))
    assert worker.claimant is None


def test_the_claim_names_this_process(fake: FakeCouch) -> None:
    from notifier.claim import Claimant

    me = Claimant.this_process("0/2", 60.0)
    claim = me.claim(1000.0)
    assert claim["worker"] == "0/2"
    assert claim["host"] == HERE
    assert claim["pid"] == os.getpid()
    assert claim["expires_at"] == 1060.0


async def test_an_old_row_showing_a_claim_long_settled_is_not_a_takeover(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # A layout that starts during an overlap reads rows written before the
    # other layout settled them: the row still shows that layout's claim.
    gone = claim_by("1/2", expires_at=time.time() + 600, host=HERE, pid=dead_pid(), scope=SCOPE)
    doc_id = claimed_message(fake, 0, gone)
    stale_row = fake.get(DB, doc_id)
    assert stale_row is not None
    fake.put(DB, {**stale_row, NOTIFIED: True})
    async with running(fake, smtp_sink) as (worker, _):
        await worker._settle(doc_id, stale_row)
    assert worker.stats.takeovers == 0
    assert worker.stats.claim_conflicts == 1
    assert smtp_sink.messages == []


async def test_the_claim_outlives_a_wait_for_an_unreachable_smtp_server(
    fake: FakeCouch,
) -> None:
    # An unreachable server uses up no attempts, however long it stays away;
    # the claim is renewed all the same, so no other worker takes it over.
    with SmtpSink(port=free_port()) as sink:
        async with running(fake, sink, claim_ttl=1.0, probe_first=0.1, probe_max=0.1) as (
            worker,
            _,
        ):
            await asyncio.to_thread(sink.stop)
            recipients = seed(fake, 1)
            # A probe every 0.1 s: 2.5 s, 2.5 ttls.
            await wait_for(lambda: worker.delivery.breaker.probes >= 25, timeout=20)
            await asyncio.to_thread(sink.start)
            await wait_for(all_settled(fake, 1), timeout=20)
    assert_all_delivered_once(fake, sink, recipients)
    (doc,) = messages(fake)
    claim_writes = int(doc["_rev"].split("-")[0]) - 2  # less the creation and the mark
    assert claim_writes >= 3, "claimed, then renewed at least twice"


@pytest.mark.parametrize("outage", ["before the claim lands", "after the send, before the mark"])
async def test_a_couchdb_outage_longer_than_the_claim_does_not_send_twice(
    fake: FakeCouch, smtp_sink: SmtpSink, outage: str
) -> None:
    # Two layouts and a claim that lasts 1 s. Either CouchDB refuses writes
    # for 2 s while both workers claim (the claim that lands late must not
    # be stale), or it is down for 2 s right after the send (the holder
    # cannot mark or renew; the waiter must not take over the moment it is
    # back).
    smtp_sink.delay = 0.5
    layouts = [Shard(worker_id=0, worker_count=1), Shard(worker_id=0, worker_count=2)]
    n = next(n for n in range(100) if layouts[1].owns(f"msg-{n:05d}"))
    # Retries after the outage come up to 0.6 s late, on both sides.
    settings = {"claim_ttl": 1.0, "couch_retry_base": 0.3, "couch_retry_cap": 0.6}
    sends = 0

    def down_after_the_first_send(envelope: Any) -> str | None:
        nonlocal sends
        sends += 1
        if sends == 1:
            fake.refuse_connections(seconds=2.0)
        return None

    if outage == "before the claim lands":
        fake.fail_requests(status=503, path=r"/_bulk_docs$")
    else:
        smtp_sink.reject = down_after_the_first_send
    async with AsyncExitStack() as stack:
        workers = [
            (await stack.enter_async_context(running(fake, smtp_sink, shard, **settings)))[0]
            for shard in layouts
        ]
        recipients = seed(fake, 1, start=n)
        if outage == "before the claim lands":
            await asyncio.sleep(2.0)
            fake.clear_faults()
        await wait_for(all_settled(fake, 1), timeout=20)
        await asyncio.sleep(1.5)  # a waiter that would take over has had its ttl
    assert_all_delivered_once(fake, smtp_sink, recipients)
    assert sum(w.stats.takeovers for w in workers) == 0


async def test_a_takeover_that_cannot_be_written_counts_the_whole_ttl_again(
    fake: FakeCouch, smtp_sink: SmtpSink
) -> None:
    # The takeover write gets a 503: CouchDB may have kept the holder from
    # renewing too, so the waiter watches the claim for another whole ttl.
    claimed_message(fake, 0, claim_by("1/2", expires_at=time.time() + 600))
    fake.fail_requests(status=503, path=r"/_bulk_docs$", count=1)
    first_look = time.monotonic()
    async with running(fake, smtp_sink, claim_ttl=1.0) as (worker, _):
        await smtp_sink.await_count(1, timeout=20)
        await wait_for(lambda: len(worker.tracker) == 0)
    (message,) = smtp_sink.messages
    assert message.received_at >= first_look + 2.0
    assert len(fake.events_of("status")) == 1
    assert worker.stats.takeovers == 1


async def test_looks_at_many_claimed_messages_share_one_request(fake: FakeCouch) -> None:
    for n in range(5):
        claimed_message(fake, n, claim_by("1/2", expires_at=time.time() + 600))
    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
        poller = ClaimPoller(couch, database=DB)
        ids = [f"msg-{n:05d}" for n in range(5)]
        docs = await asyncio.gather(*(poller.read(i, within=0.05) for i in ids))
        await poller.aclose()
    assert [d["_id"] for d in docs if d is not None] == ids
    assert poller.polls == 1
    assert couch.requests == 1
