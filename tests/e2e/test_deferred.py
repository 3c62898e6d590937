"""Deferred and scheduled messages against PouchDB Server: written on the document,
the checkpoint moving on, found again by their due time after a restart, sent once;
and documents a validation function will not let the daemon write."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from realservers import CouchTestDB
from scenario import message

from notifier.claim import CLAIM
from notifier.config import Config
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import run_until, wait_for, worker_running
from notifier.worker import FAILED, NOTIFIED, RECORD, RETRY

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

MakeConfig = Callable[..., Config]


def rfc3339(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="milliseconds")


async def test_a_scheduled_message_waits_for_its_time_without_holding_the_checkpoint(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    at = time.time() + 3.0
    # The sink stamps arrivals with the monotonic clock.
    due = time.monotonic() + (at - time.time())
    couch.bulk(
        [
            message(1, sendAt=rfc3339(at)),
            message(2, sendAt=int(at * 1000)),
            message(3, sendAt="next Tuesday"),
            message(4, sendAt=rfc3339(time.time() - 60)),  # already due
            message(5),
        ]
    )
    async with worker_running(make_config()) as worker:
        await wait_for(lambda: worker.stats.scheduled == 2, timeout=20)
        # Both scheduled rows are done for the feed: nothing is in flight for them.
        await wait_for(lambda: len(worker.tracker) == 0 and worker.in_flight == 0)
        # ... so the checkpoint is saved past them while they still wait.
        await wait_for(lambda: worker._checkpoints.saved == worker.tracker.checkpoint)
        assert sorted(smtp_sink.count_by_recipient()) == ["user4@example.com", "user5@example.com"]
        assert couch.get("msg-00001")[RETRY]["due"] == int(at * 1000)
        await smtp_sink.await_count(4, timeout=20)
    received = {m.rcpt_tos[0]: m.received_at for m in smtp_sink.messages}
    assert smtp_sink.count_by_recipient() == {f"user{n}@example.com": 1 for n in (1, 2, 4, 5)}
    # Not before their time (10 ms for the clocks' resolution).
    assert received["user1@example.com"] >= due - 0.01
    assert received["user2@example.com"] >= due - 0.01
    bad = couch.get("msg-00003")[FAILED]["reason"]
    assert bad.startswith("'sendAt' is not RFC 3339 with an offset"), bad
    for n in (1, 2):
        doc = couch.get(f"msg-0000{n}")
        assert doc[NOTIFIED] is True and RETRY not in doc and CLAIM not in doc


async def test_a_restart_while_messages_are_deferred_sends_each_once_when_due(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    ids = [f"msg-{n:05d}" for n in range(20)]
    couch.bulk([message(n) for n in range(20)])
    smtp_sink.reject = lambda info: "451 4.3.0 try again later"
    # The first retry is due 2 s after the failure: after the stop below.
    # (More refusals than outage_recipients would pause the relay instead.)
    config = make_config(delivery={"retry_first": 2.0, "retry_max": 4.0, "outage_recipients": 100})
    first = await run_until(config, lambda: all(RETRY in couch.get(i) for i in ids), timeout=30)
    assert first.stats.deferred == 20
    assert smtp_sink.messages == []
    smtp_sink.reject = None
    second = await run_until(config, lambda: len(smtp_sink.messages) >= 20, timeout=30)
    # Found again from CouchDB alone: the second process never saw them on its feed.
    assert second.stats.sent == 20
    assert smtp_sink.count_by_recipient() == {f"user{n}@example.com": 1 for n in range(20)}
    for doc_id in ids:
        doc = couch.get(doc_id)
        assert doc[NOTIFIED] is True and RETRY not in doc
        assert doc[RECORD]["attempts"] == 2


VALIDATION = """
function (newDoc, oldDoc, userCtx) {
  if (newDoc._id === 'msg-00001' && (newDoc.notificationClaim || newDoc.notifiedRecipient)) {
    throw({forbidden: 'msg-00001 is handled by hand'});
  }
}
"""


@pytest.mark.parametrize("claims", [True, False], ids=["claims on", "claims off"])
async def test_a_document_a_validation_function_refuses_affects_only_itself(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig, claims: bool
) -> None:
    couch.put({"_id": "_design/guard", "validate_doc_update": VALIDATION.strip()})
    assert all(row.get("ok") for row in couch.bulk([message(n) for n in range(5)]))
    config = make_config(worker={"claims": claims})
    async with worker_running(config) as worker:
        await wait_for(lambda: worker.stats.sent == 4 + (not claims), timeout=30)
        await wait_for(lambda: len(worker.tracker) == 0)
        # The shard goes on: later messages are sent too.
        couch.bulk([message(n) for n in range(5, 8)])
        await wait_for(lambda: worker.stats.sent == 7 + (not claims), timeout=30)
    sent = smtp_sink.count_by_recipient()
    if claims:
        # Refused the claim: never sent, since we could not say we were sending it.
        assert "user1@example.com" not in sent
    else:
        # Refused the mark after the send: delivered once, counted as done.
        assert sent["user1@example.com"] == 1
    assert all(n == 1 for n in sent.values())
    assert worker.stats.unwritable == 1
    assert NOTIFIED not in couch.get("msg-00001")
    assert all(couch.get(f"msg-0000{n}")[NOTIFIED] is True for n in (0, 2, 3, 4, 5, 6, 7))


async def test_a_validation_function_refusing_every_claim_is_not_a_credentials_problem(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    # An "unauthorized" row is the validation function's word about one
    # document; the daemon's own access is fine. It used to stop the worker
    # with exit 77, and every manual restart sent the email again.
    couch.put(
        {
            "_id": "_design/guard",
            "validate_doc_update": "function (d) { if (d.notificationClaim) "
            "{ throw({unauthorized: 'no claims here'}); } }",
        }
    )
    assert all(row.get("ok") for row in couch.bulk([message(n) for n in range(3)]))
    async with worker_running(make_config()) as worker:
        await wait_for(lambda: worker.stats.unwritable == 3, timeout=30)
        assert worker.phase == "running"
    assert smtp_sink.messages == []
    assert worker.stats.sent == 0


async def test_a_refused_deferral_becomes_a_dead_letter_that_shows(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    # Not written, a deferral would be found by nobody, ever.
    guard = "function (d) { if (d.notificationRetry) { throw({forbidden: 'no retries here'}); } }"
    couch.put({"_id": "_design/guard", "validate_doc_update": guard})
    assert all(row.get("ok") for row in couch.bulk([message(1)]))
    smtp_sink.reject = lambda info: "451 4.3.0 try again later"
    async with worker_running(make_config()) as worker:
        await wait_for(lambda: FAILED in couch.get("msg-00001"), timeout=30)
    reason = couch.get("msg-00001")[FAILED]["reason"]
    assert reason.startswith("CouchDB refused to record its deferral (forbidden: no retries here)")
    assert reason.endswith("451 4.3.0 try again later")
    assert worker.stats.unwritable >= 1
