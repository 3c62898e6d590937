"""The per-message decision (notifier.lifecycle.decide): every case, then seeded
random histories checked against the promises the worker relies on."""

from __future__ import annotations

import random
from typing import Any

import pytest

from notifier.claim import CLAIM, Assessment, Verdict
from notifier.lifecycle import (
    FAILED,
    NOTIFIED,
    RECORD,
    RETRY,
    SEND_AT,
    Claim,
    Failed,
    Forget,
    Refused,
    Send,
    Sent,
    Wait,
    Write,
    decide,
    is_settled,
)
from notifier.schedule import RetrySchedule

NOW = 1_800_000_000.0
S = RetrySchedule(first=60, cap=3600, max_age=86_400, jitter=0)
DOC = {"_id": "m1", "_rev": "1-a", "to": "a@example.com"}


def step(doc: dict[str, Any] | None, **kw: Any) -> Any:
    kw.setdefault("now", NOW)
    return decide(doc, schedule=S, worker="0/1", **kw)


def deferred(due: float, **state: Any) -> dict[str, Any]:
    return {**DOC, RETRY: {"attempts": 1, "due": int(due * 1000), **state}}


def test_gone_or_settled_messages_are_forgotten() -> None:
    assert step(None) == Forget("deleted")
    assert step({**DOC, NOTIFIED: True}) == Forget("settled")
    assert step({**DOC, FAILED: {"reason": "x"}}) == Forget("settled")


def test_a_fresh_message_is_sent_or_claimed_first() -> None:
    assert step(DOC) == Send()
    assert step(DOC, claim=Assessment(Verdict.FREE, "no claim")) == Claim("no claim")
    assert step(DOC, claim=Assessment(Verdict.MINE, "ours")) == Send()
    assert step(DOC, claim=Assessment(Verdict.HELD, "by 1/2")) == Wait("by 1/2")
    assert step(DOC, claim=Assessment(Verdict.ABANDONED, "gone")) == Claim("gone", takeover=True)


def test_a_message_another_worker_holds_is_waited_for_before_anything_is_written() -> None:
    # Even with a sendAt ahead (clocks differ): our deferral would take its claim away.
    held = Assessment(Verdict.HELD, "by 1/2")
    doc = {**DOC, SEND_AT: "2027-01-15T09:00:00Z"}
    assert step(doc, claim=held) == Wait("by 1/2")
    assert step(deferred(NOW + 60), claim=held) == Wait("by 1/2")


def test_a_dead_letter_with_an_absurd_first_failure_time_still_writes() -> None:
    doc = deferred(NOW - 1, since=-(10**19))
    write = step(doc, outcome=Failed("451 still"))
    assert write.kind == "dead"
    assert write.apply(doc)[FAILED]["firstFailedAt"] == "1970-01-01T00:00:00.000+00:00"


def test_a_sent_message_is_marked_and_loses_its_claim_and_retry_state() -> None:
    doc = {**deferred(NOW - 1), CLAIM: {"run": "r"}}
    write = step(doc, outcome=Sent({"messageId": "<x@y>"}))
    assert isinstance(write, Write) and write.kind == "sent"
    marked = write.apply(doc)
    assert marked[NOTIFIED] is True
    assert marked[RECORD]["messageId"] == "<x@y>"
    assert marked[RECORD]["attempts"] == 2
    assert CLAIM not in marked and RETRY not in marked
    assert marked["to"] == DOC["to"], "the user's fields are kept"


def test_a_refused_message_is_dead_lettered_with_the_reason() -> None:
    write = step(DOC, outcome=Refused("550 no such user"))
    assert isinstance(write, Write) and write.kind == "dead"
    assert write.apply(DOC)[FAILED]["reason"] == "550 no such user"


def test_a_temporary_failure_defers_on_the_schedule() -> None:
    write = step(DOC, outcome=Failed("451 4.3.5 later"))
    assert isinstance(write, Write) and write.kind == "deferred"
    retry = write.apply(DOC)[RETRY]
    assert retry["attempts"] == 1
    assert retry["due"] == int((NOW + 60) * 1000)
    assert retry["since"] == int(NOW * 1000)
    assert retry["lastReply"] == "451 4.3.5 later"
    again = step(write.apply(DOC), now=NOW + 60, outcome=Failed("451 again"))
    assert again.apply(DOC)[RETRY]["attempts"] == 2
    assert again.apply(DOC)[RETRY]["due"] == int((NOW + 60 + 120) * 1000)
    assert again.apply(DOC)[RETRY]["since"] == int(NOW * 1000), "since the first failure"


def test_throttling_defers_without_using_up_an_attempt() -> None:
    doc = deferred(NOW - 1, since=int((NOW - 100) * 1000))
    write = step(doc, outcome=Failed("454 Throttling", counts=False))
    assert write.apply(doc)[RETRY]["attempts"] == 1


def test_throttled_deferrals_still_back_off() -> None:
    """A quota exhausted for hours must not be asked about every message each minute."""
    doc = dict(DOC)
    dues = []
    for n in range(1, 5):
        write = step(doc, now=NOW, outcome=Failed("454 Throttling", counts=False))
        doc = write.apply(doc)
        assert doc[RETRY]["attempts"] == 0, "throttling uses up no attempt"
        assert doc[RETRY]["throttled"] == n
        dues.append(doc[RETRY]["due"] / 1000 - NOW)
    assert dues == [60, 120, 240, 480]
    # A counted failure after them waits on from where the throttling left off.
    write = step(doc, now=NOW, outcome=Failed("451 4.3.5 later"))
    assert write.apply(doc)[RETRY]["attempts"] == 1
    assert write.apply(doc)[RETRY]["due"] / 1000 - NOW == 960


def test_a_message_is_dead_lettered_only_at_max_age_and_names_the_last_reply() -> None:
    doc = deferred(NOW - 1, attempts=9, since=int((NOW - 86_399) * 1000))
    assert step(doc, outcome=Failed("451 still")).kind == "deferred"
    write = step(doc, now=NOW + 1, outcome=Failed("451 4.3.5 still broken"))
    assert write.kind == "dead"
    reason = write.apply(doc)[FAILED]["reason"]
    assert "10 attempts over 1d" in reason and "451 4.3.5 still broken" in reason
    assert RETRY not in write.apply(doc)


def test_a_deferred_message_is_left_alone_until_due() -> None:
    assert step(deferred(NOW + 30)) == Forget("deferred until 2027-01-15T08:00:30.000+00:00")
    assert step(deferred(NOW - 1)) == Send()


def test_a_message_with_a_future_send_at_is_scheduled_not_sent() -> None:
    doc = {**DOC, SEND_AT: "2027-01-15T09:00:00Z"}  # an hour after NOW
    write = step(doc, claim=Assessment(Verdict.FREE, "no claim"))
    assert isinstance(write, Write) and write.kind == "scheduled"
    retry = write.apply(doc)[RETRY]
    assert retry["due"] == int((NOW + 3600) * 1000)
    assert retry["attempts"] == 0 and retry["scheduled"] is True
    # Written once; after that it is left alone until then, and sent at the time.
    assert isinstance(step(write.apply(doc)), Forget)
    assert step(write.apply(doc), now=NOW + 3600) == Send()


def test_a_later_send_at_than_the_retry_moves_the_hold() -> None:
    doc = {**deferred(NOW + 10), SEND_AT: int((NOW + 500) * 1000)}
    write = step(doc)
    assert write.kind == "scheduled"
    assert write.apply(doc)[RETRY]["due"] == int((NOW + 500) * 1000)
    assert write.apply(doc)[RETRY]["attempts"] == 1, "attempts are kept"


def test_an_unparseable_send_at_is_dead_lettered_with_the_reason() -> None:
    write = step({**DOC, SEND_AT: "next tuesday"})
    assert write.kind == "dead"
    assert "'sendAt'" in write.apply(DOC)[FAILED]["reason"]


def test_the_bare_form_of_each_write_keeps_what_applications_and_workers_need() -> None:
    sent = step(DOC, outcome=Sent({"messageId": "<x>"})).bare()
    assert sent.set == {NOTIFIED: True}
    dead = step(DOC, outcome=Refused("r" * 900)).bare()
    assert dead.set == {FAILED: {"reason": "r" * 500}}
    later = step(DOC, outcome=Failed("451")).bare()
    assert set(later.set[RETRY]) == {"attempts", "due", "since"}


OUTCOMES = [
    None,
    Sent({"messageId": "<m>"}),
    Refused("550"),
    Failed("451"),
    Failed("454", counts=False),
]


@pytest.mark.parametrize("seed", range(20))
def test_random_histories_keep_the_promises(seed: int) -> None:
    rng = random.Random(seed)
    now = NOW
    doc: dict[str, Any] | None = dict(DOC)
    if rng.random() < 0.3:
        doc[SEND_AT] = int((now + rng.uniform(-100, 5000)) * 1000)
    attempts_seen = 0
    for _ in range(200):
        now += rng.expovariate(1 / 600)
        if doc is None or is_settled(doc):
            assert isinstance(step(doc, now=now), Forget)
            break
        verdict = rng.choice([None, *(Assessment(v, v.value) for v in Verdict)])
        outcome = rng.choice(OUTCOMES)
        result = step(doc, now=now, claim=verdict, outcome=outcome)
        retry = doc.get(RETRY) or {}
        due = retry.get("due", 0) / 1000
        send_at = doc.get(SEND_AT, 0) / 1000
        if outcome is None:
            if isinstance(result, Send):
                assert due <= now and send_at <= now, "never sent before it is due"
                assert verdict is None or verdict.verdict is Verdict.MINE
            if isinstance(result, Wait):
                assert verdict is not None and verdict.verdict is Verdict.HELD
        if isinstance(result, Write):
            new = result.apply(doc)
            assert CLAIM not in new, "every write gives the claim up"
            if result.kind == "sent":
                assert new[NOTIFIED] is True and RETRY not in new
            if result.kind == "dead":
                assert FAILED in new and RETRY not in new
                assert isinstance(outcome, Refused) or (
                    isinstance(outcome, Failed)
                    and now - retry.get("since", now * 1000) / 1000 >= S.max_age
                )
            if result.kind in ("deferred", "scheduled"):
                assert new[RETRY]["due"] / 1000 > now, "deferred into the future"
                assert new[RETRY]["attempts"] >= attempts_seen, "attempts never go back"
                attempts_seen = new[RETRY]["attempts"]
            doc = new
