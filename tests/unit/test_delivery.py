"""Delivery attempts under the outage gate and the pace, with a scripted handler:
what each answer does to the breaker, the pace and the message."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from virtual_time import VirtualTime

from notifier.breaker import OutageBreaker
from notifier.delivery import Abandoned, Delivery
from notifier.errors import (
    ChannelUnavailableError,
    InvalidMessageError,
    PermanentDeliveryError,
    ThrottledDeliveryError,
)
from notifier.handler import Receipt
from notifier.lifecycle import Failed, Refused, Sent
from notifier.pacing import Pacer

pytestmark = pytest.mark.anyio

DOC = {"_id": "m1", "to": "ann@example.com"}


class Scripted:
    """A handler that answers from a list: an exception to raise, or a receipt."""

    def __init__(self, *answers: Exception | Receipt) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def check(self) -> None:
        pass

    async def deliver(self, doc: Mapping[str, Any]) -> Receipt:
        self.calls += 1
        answer = self.answers.pop(0) if self.answers else {"messageId": "<m@x>"}
        if isinstance(answer, Exception):
            raise answer
        return answer


def delivery(handler: Scripted, *, pacer: Pacer | None = None, **kw: Any) -> Delivery:
    breaker = OutageBreaker(recipients=3, window=60, probe_first=0.01, probe_max=0.02)
    return Delivery(
        handler, pacer=pacer or Pacer(), breaker=breaker, stopping=asyncio.Event(), **kw
    )


async def paused(d: Delivery) -> None:
    """Open the breaker as an unreachable relay does."""
    d.breaker.failed("x@example.com", now=d._clock(), relay_down=True)
    assert d.paused


async def test_a_malformed_document_does_not_count_as_the_relay_answering() -> None:
    handler = Scripted(InvalidMessageError("no 'to' field"), ChannelUnavailableError("down"))
    d = delivery(handler)
    await paused(d)
    assert await d.attempt(DOC) == Refused("no 'to' field")
    assert d.paused, "a document refused before any relay was asked says nothing of it"
    assert not d.breaker._probing, "the probe was given back"


async def test_a_throttled_probe_keeps_the_relay_paused() -> None:
    handler = Scripted(ThrottledDeliveryError("421 restarting"), {"messageId": "<m@x>"})
    d = delivery(handler)
    await paused(d)
    outcome = await d.attempt(DOC)
    assert outcome == Sent({"messageId": "<m@x>"})
    assert handler.calls == 2, "probed again later, then accepted"
    assert not d.paused


async def test_may_send_is_asked_again_after_the_pace_wait() -> None:
    # The pace makes this send wait; meanwhile the lease (or the claim) goes.
    lost = asyncio.Event()
    handler = Scripted()
    d = delivery(handler, pacer=Pacer(rate=5.0))
    assert isinstance(await d.attempt(DOC), Sent)  # takes the first grant
    asyncio.get_running_loop().call_later(0.05, lost.set)
    with pytest.raises(Abandoned):
        await d.attempt(DOC, may_send=lambda: not lost.is_set())
    assert handler.calls == 1


async def test_a_stop_ends_the_throttle_hold_with_a_durable_deferral() -> None:
    handler = Scripted(*(ThrottledDeliveryError("454 Throttling failure") for _ in range(100)))
    d = delivery(handler, throttle_hold=600.0)
    task = asyncio.create_task(d.attempt(DOC))
    while handler.calls < 2:
        await asyncio.sleep(0.01)
    d._stopping.set()
    outcome = await asyncio.wait_for(task, timeout=5)
    assert outcome == Failed("454 Throttling failure", counts=False)


class AlwaysThrottled(Scripted):
    """A relay that asks the sender to slow down at every try; notes when it was asked."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self._clock = clock
        self.asked_at: list[float] = []

    async def deliver(self, doc: Mapping[str, Any]) -> Receipt:
        self.calls += 1
        self.asked_at.append(self._clock())
        raise ThrottledDeliveryError("454 Throttling failure")


async def test_the_throttle_hold_runs_out_on_its_clock_and_defers_without_an_attempt() -> None:
    t = VirtualTime()
    handler = AlwaysThrottled(t.clock)
    # The slowed pace is what lets the virtual time pass between tries.
    pacer = Pacer(clock=t.clock, sleep=t.sleeper())
    d = delivery(handler, pacer=pacer, throttle_hold=60.0, clock=t.clock)
    # Never stopped: only the hold on the Delivery's clock can end this.
    outcome = await asyncio.wait_for(d.attempt(DOC), timeout=5)
    assert outcome == Failed("454 Throttling failure", counts=False)
    first, *_, before_last, last = handler.asked_at
    assert before_last - first < 60.0 <= last - first, "tried on until the hold, and no longer"
    assert d.throttled == handler.calls == len(handler.asked_at)
    assert not d.paused, "throttling says the relay is up"


@pytest.mark.parametrize(
    ("answer", "closes"),
    [
        (lambda: {"messageId": "<m@x>"}, True),
        # A refusal for good is an answer from a relay that is up.
        (lambda: PermanentDeliveryError("550 5.1.1 no such user"), True),
        (lambda: InvalidMessageError("no recipient"), False),
    ],
)
async def test_only_the_relay_answering_resumes_sending(
    answer: Callable[[], Exception | Receipt], closes: bool
) -> None:
    d = delivery(Scripted(answer()))
    await paused(d)
    await d.attempt(DOC)
    assert d.paused is not closes
