"""Scenario 9, real relays: the ``notifier`` process against relays that say "later".

Relays keep temporary conditions for minutes or hours and expect the sender
to keep trying, as a mail queue does. Each scenario runs the real process
against the fake CouchDB on a loopback socket and an aiosmtpd relay that
behaves like one of them, with the mail queue's times scaled down through
configuration (``[delivery]``), not by changing code paths:

* 9a greylisting: every recipient's attempts are refused for a while;
* 9b a sending quota answered like Amazon SES ("454 Throttling failure");
* 9c a relay with a configuration mistake: "451 4.3.5" to everyone for a
  while, then it recovers;
* 9d "421" that closes the connection, past a rate (Postfix's anvil
  answers "421 4.7.0 Error: too many connections" this way).

Each counts, per recipient, the emails delivered, duplicated and the
documents dead-lettered: every one must end delivered exactly once, and
none dead-lettered.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from harness import (
    NotifierCli,
    all_settled,
    docs_by_recipient,
    first_arrival,
    seed_messages,
    wait_until,
)
from scenario import ScenarioRecord

from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.worker import FAILED, NOTIFIED, RECORD, RETRY

SETTLE_TIMEOUT = 90.0


def outcome(fake: FakeCouch, sink: SmtpSink, recipients: list[str]) -> dict[str, Any]:
    """Delivered, duplicated and dead-lettered, per recipient and in all."""
    docs = docs_by_recipient(fake)
    sent = sink.count_by_recipient()
    return {
        "delivered": {r: sent[r] for r in recipients},
        "duplicated": {r: sent[r] - 1 for r in recipients if sent[r] > 1},
        "dead": [r for r in recipients if FAILED in docs[r]],
        "unmarked": [r for r in recipients if docs[r].get(NOTIFIED) is not True],
        "retry_left": [r for r in recipients if RETRY in docs[r]],
    }


def assert_each_delivered_once(result: dict[str, Any], recipients: list[str]) -> None:
    assert result["dead"] == [], "nothing is dead-lettered for a relay's temporary condition"
    assert result["duplicated"] == {}
    assert result["delivered"] == {r: 1 for r in recipients}
    assert result["unmarked"] == [] and result["retry_left"] == []


def test_greylisting_delays_every_new_recipient_and_loses_none(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    greylist = 2.0
    smtp_sink.greylist = greylist
    seeded = seed_messages(fake_couch, 30)
    # Postgrey's 5 minutes against a first retry after a minute, scaled down.
    delivery = {"retry_first": 0.5, "retry_max": 1.0}
    process = notifier_cli.start(notifier_cli.config(delivery=delivery))
    started = time.monotonic()
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "every email", process)
    assert process.stop() == 0, process.output()
    result = outcome(fake_couch, smtp_sink, seeded.recipients)
    refused = [r for r in smtp_sink.refused if r.stage == "RCPT"]

    scenario_record.scenario = "9a. Relay: greylisting"
    scenario_record.faults = f"every recipient refused with 450 4.2.0 Greylisted for {greylist:g} s"
    scenario_record.count(smtp_sink.count_by_recipient(), seeded.recipients)
    arrived = first_arrival(smtp_sink, seeded.recipients, after=started)
    assert arrived is not None
    scenario_record.recovery_seconds = round(
        max(m.received_at for m in smtp_sink.messages) - started, 2
    )
    scenario_record.notes = (
        f"{len(refused)} refusals, all deferred and retried on the schedule "
        "(0.5 s doubling to 1 s here; a minute to hours by default); recovery = start to "
        "the last email"
    )
    assert_each_delivered_once(result, seeded.recipients)
    assert {r.rcpt_tos[0] for r in refused} == set(seeded.recipients), "each was greylisted"
    docs = docs_by_recipient(fake_couch)
    assert all(docs[r][RECORD]["attempts"] >= 2 for r in seeded.recipients)
    # Greylisting is about one recipient: it never pauses the relay.
    assert process.count("the relay looks down") == 0


def test_a_sending_quota_slows_the_sender_and_costs_no_attempt(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    quota = 25
    smtp_sink.quota = quota
    seeded = seed_messages(fake_couch, 200)
    process = notifier_cli.start(notifier_cli.config(worker={"max_parallel": 10}))
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "every email", process)
    assert process.stop() == 0, process.output()
    result = outcome(fake_couch, smtp_sink, seeded.recipients)
    throttled = [r for r in smtp_sink.refused if r.reply.startswith("454")]

    scenario_record.scenario = "9b. Relay: sending quota (454 Throttling failure)"
    scenario_record.faults = f"more than {quota} messages in a second answered 454, as Amazon SES"
    scenario_record.count(smtp_sink.count_by_recipient(), seeded.recipients)
    scenario_record.notes = (
        f"{len(throttled)} throttling replies; each halved the pace at most once a second "
        "and used up no attempt; no [smtp] max_rate set"
    )
    assert_each_delivered_once(result, seeded.recipients)
    assert throttled, "the quota was reached: this test tests something"
    docs = docs_by_recipient(fake_couch)
    assert {docs[r][RECORD]["attempts"] for r in seeded.recipients} == {1}, (
        "throttling uses up no attempt"
    )
    # Slowed down rather than hammering: far fewer refusals than messages.
    assert len(throttled) < len(seeded.ids)


def test_a_relay_refusing_everyone_for_a_while_is_an_outage_not_bad_messages(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    outage = 4.0
    first = seed_messages(fake_couch, 10)
    process = notifier_cli.start(notifier_cli.config(worker={"max_parallel": 4}))
    wait_until(
        lambda: all_settled(fake_couch, first.ids), SETTLE_TIMEOUT, "the first emails", process
    )
    # A configuration mistake on the relay: every recipient refused for now.
    smtp_sink.refuse_everyone(outage)
    fault_start = time.monotonic()
    during = seed_messages(fake_couch, 40, start=100)
    wait_until(
        lambda: all_settled(fake_couch, during.ids), SETTLE_TIMEOUT, "the emails after it", process
    )
    assert process.stop() == 0, process.output()
    seeded = first + during
    result = outcome(fake_couch, smtp_sink, seeded.recipients)
    refused = [r for r in smtp_sink.refused if r.reply.startswith("451")]

    scenario_record.scenario = "9c. Relay: 451 4.3.5 to everyone for a while"
    scenario_record.faults = f"every RCPT answered 451 4.3.5 for {outage:g} s, 40 messages waiting"
    scenario_record.count(smtp_sink.count_by_recipient(), seeded.recipients)
    arrived = first_arrival(smtp_sink, during.recipients, after=fault_start + outage)
    assert arrived is not None
    scenario_record.recovery_seconds = round(arrived - (fault_start + outage), 2)
    scenario_record.notes = (
        f"{len(refused)} refusals; sending paused after 10 different recipients (outage_"
        "recipients) and probed; max_age 60 s here, so a counted outage would still lose "
        "nothing, but no attempt was counted while paused"
    )
    assert_each_delivered_once(result, seeded.recipients)
    assert process.count("the relay looks down") >= 1
    assert process.count("the relay accepts mail again") >= 1
    # While paused, probes only: far fewer refusals than messages times retries.
    assert len(refused) < 10 + 40
    # At most the refusal counted before the pause, then the send itself.
    docs = docs_by_recipient(fake_couch)
    assert max(docs[r][RECORD]["attempts"] for r in during.recipients) <= 2


def test_a_421_that_closes_the_connection_slows_down_and_loses_nothing(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    limit = 20
    recent: deque[float] = deque()
    closed: list[str] = []

    def past_the_rate(address: str) -> bool:
        # Runs on the relay's one thread: more than `limit` recipients in the
        # last second and the session is dropped with a 421.
        now = time.monotonic()
        while recent and recent[0] <= now - 1.0:
            recent.popleft()
        if len(recent) >= limit:
            closed.append(address)
            return True
        recent.append(now)
        return False

    smtp_sink.close_421 = past_the_rate
    seeded = seed_messages(fake_couch, 200)
    process = notifier_cli.start(notifier_cli.config(worker={"max_parallel": 5}))
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "every email", process)
    assert process.stop() == 0, process.output()
    result = outcome(fake_couch, smtp_sink, seeded.recipients)

    scenario_record.scenario = "9d. Relay: 421 and the connection closed"
    scenario_record.faults = (
        f"421 4.7.0 and the connection closed past {limit} recipients in a second"
    )
    scenario_record.count(smtp_sink.count_by_recipient(), seeded.recipients)
    scenario_record.notes = (
        f"{len(closed)} sessions closed; each a throttling reply: retried on a new "
        "connection at a slower pace, no attempt used"
    )
    assert_each_delivered_once(result, seeded.recipients)
    assert closed, "the rate was reached: this test tests something"
    assert len(closed) < len(seeded.ids), "slowed down rather than hammering"
    docs = docs_by_recipient(fake_couch)
    assert {docs[r][RECORD]["attempts"] for r in seeded.recipients} == {1}
