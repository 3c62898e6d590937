"""Pacing: the rate limit and the adaptive rate (pure), and the async shell on a
virtual clock, so that nothing here depends on how fast this machine is."""

from __future__ import annotations

import asyncio
import itertools
import random

import pytest
from virtual_time import VirtualTime

from notifier.pacing import (
    DECREASE_HOLD,
    HEADROOM,
    MIN_RATE,
    AdaptiveRate,
    DomainLimit,
    Pacer,
    RateLimit,
    recipient_domain,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize("seed", range(5))
def test_grants_are_never_closer_than_one_over_the_rate(seed: int) -> None:
    rng = random.Random(seed)
    rate = rng.choice([0.5, 3.0, 14.0, 250.0])
    limit = RateLimit(rate)
    now, grants = 0.0, []
    for _ in range(3000):
        now += rng.expovariate(rate * 20)  # a backlog: demand far above the rate
        wait = limit.delay(now)
        assert wait >= 0
        now += wait
        limit.take(now)
        grants.append(now)
    gaps = [b - a for a, b in itertools.pairwise(grants)]
    assert min(gaps) >= 1 / rate - 1e-9
    # Under excess demand the achieved rate is the rate (within 5%).
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(rate, rel=0.05)


def test_no_window_of_one_second_holds_more_than_the_rate() -> None:
    rate = 10.0
    limit = RateLimit(rate)
    grants = []
    now = 0.0
    for _ in range(200):
        now += limit.delay(now)
        limit.take(now)
        grants.append(now)
    for i, start in enumerate(grants):
        # (less a nanosecond of float rounding in the sums of 1/rate)
        in_window = [g for g in grants[i:] if g < start + 1.0 - 1e-9]
        assert len(in_window) <= rate


@pytest.mark.parametrize("seed", range(5))
def test_late_grants_do_not_lower_the_rate(seed: int) -> None:
    # Timers fire up to a few milliseconds late; a limit that restarted its
    # spacing from each late grant would lose that time at every send (6%
    # at 100/s with 0.6 ms of lateness).
    rng = random.Random(seed)
    rate = rng.choice([20.0, 100.0, 400.0])
    limit = RateLimit(rate)
    now, grants = 0.0, []
    for _ in range(4000):
        now += limit.delay(now) + rng.uniform(0, min(0.002, 0.5 / rate))
        limit.take(now)
        grants.append(now)
    achieved = (len(grants) - 1) / (grants[-1] - grants[0])
    assert achieved == pytest.approx(rate, rel=0.01)
    # Never more than one grant beyond the rate in a second, however late.
    for i, start in enumerate(grants):
        assert sum(1 for g in grants[i : i + int(rate) + 2] if g < start + 1.0) <= rate + 1


@pytest.mark.parametrize("rate", [1.0, 20.0, 100.0])
def test_with_headroom_transactions_up_to_50_ms_apart_stay_within_the_quota(rate: float) -> None:
    # The relay counts when a transaction ends; ends vary by up to 50 ms here.
    rng = random.Random(int(rate))
    limit = RateLimit(rate * HEADROOM)
    now, counted = 0.0, []
    for _ in range(int(rate) * 20):
        now += limit.delay(now) + rng.uniform(0, 0.001)
        limit.take(now)
        counted.append(now + rng.uniform(0, 0.05))
    counted.sort()
    for i, start in enumerate(counted):
        in_second = [c for c in counted[i : i + int(rate) + 2] if c < start + 1.0]
        assert len(in_second) <= rate


def test_taking_a_grant_early_is_a_bug_that_is_caught() -> None:
    limit = RateLimit(1.0)
    limit.take(0.0)
    with pytest.raises(AssertionError, match="early"):
        limit.take(0.5)


@pytest.mark.parametrize("seed", range(5))
def test_adaptive_rate_keeps_its_bounds_and_recovers(seed: int) -> None:
    rng = random.Random(seed)
    ceiling = rng.choice([None, 1.0, 10.0, 500.0])
    a = AdaptiveRate(ceiling)
    now = 0.0
    for _ in range(2000):
        now += rng.expovariate(2.0)
        if rng.random() < 0.3:
            before, decreased = a.limit, a._decreased_at
            a.throttled(now=now, observed=rng.uniform(0, 100))
            if now - decreased < DECREASE_HOLD:
                assert a.limit == before, "one burst of throttling replies halves once"
        else:
            a.refresh(now=now)
        if a.limit is not None:
            assert a.limit >= MIN_RATE
            assert ceiling is None or a.limit <= ceiling
    # Quiet for long enough: back to the configured rate (or to none).
    a.refresh(now=now + 3600)
    assert a.limit == ceiling
    assert not a.slowed


def test_a_throttle_without_a_configured_rate_halves_the_observed_one() -> None:
    a = AdaptiveRate(None)
    a.throttled(now=10.0, observed=40.0)
    assert a.limit == 20.0
    a.refresh(now=13.0)
    assert a.limit == pytest.approx(32.0)  # +10% of 40 per quiet second
    a.refresh(now=20.0)
    assert a.limit == pytest.approx(60.0), "past the old pace: the relay has not objected yet"
    a.refresh(now=25.0)
    assert a.limit is None, "twice the old pace without an objection: no limit"


def test_with_no_rate_set_the_pace_settles_around_the_relays_quota() -> None:
    # A relay that objects whenever the pace is above its quota, checked each second.
    quota = 50.0
    a = AdaptiveRate(None)
    paces = []
    for second in range(300):
        a.refresh(now=float(second))
        pace = a.limit if a.limit is not None else 600.0  # unpaced: far above
        if pace > quota:
            a.throttled(now=second + 0.5, observed=pace)
        paces.append(min(pace, quota))
    settled = paces[60:]
    assert quota / 2 <= min(settled)
    assert sum(settled) / len(settled) >= 0.7 * quota


async def test_the_pacer_spaces_sends_at_the_rate_in_arrival_order() -> None:
    t = VirtualTime()
    pacer = Pacer(rate=4.0, clock=t.clock, sleep=t.sleeper())
    started: list[tuple[int, float]] = []

    async def send(n: int) -> None:
        async with pacer.slot("example.com"):
            started.append((n, t.now))

    await asyncio.gather(*(send(n) for n in range(20)))
    assert [n for n, _ in started] == list(range(20)), "first come, first served"
    times = [at for _, at in started]
    interval = 1 / (4.0 * HEADROOM)  # a little under the configured rate
    assert all(b - a >= interval - 1e-9 for a, b in itertools.pairwise(times))
    assert times[-1] == pytest.approx(19 * interval)


async def test_a_domain_limit_caps_concurrency_and_rate_for_that_domain_only() -> None:
    t = VirtualTime()
    sleepers: list[str] = []
    pacer = Pacer(
        domains={"slow.example": DomainLimit(max_parallel=2, max_rate=1.0)},
        clock=t.clock,
        sleep=t.sleeper(sleepers),
    )
    running = {"slow.example": 0, "fast.example": 0}
    most = dict(running)
    starts: dict[str, list[float]] = {"slow.example": [], "fast.example": []}

    async def send(domain: str) -> None:
        async with pacer.slot(domain):
            starts[domain].append(t.now)
            running[domain] += 1
            most[domain] = max(most[domain], running[domain])
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            running[domain] -= 1

    await asyncio.gather(
        *(
            asyncio.create_task(send(domain), name=f"{domain}-{n}")
            for n in range(10)
            for domain in ("slow.example", "fast.example")
        )
    )
    assert most["slow.example"] <= 2
    assert most["fast.example"] > 2, "other domains are not held back"
    slow = starts["slow.example"]
    assert all(b - a >= 1.0 - 1e-9 for a, b in itertools.pairwise(slow))
    assert sleepers and all(name.startswith("slow.example") for name in sleepers), (
        "only the limited domain waits"
    )


async def test_a_throttling_reply_slows_the_pacer_and_quiet_speeds_it_up() -> None:
    t = VirtualTime()
    pacer = Pacer(rate=10.0, clock=t.clock, sleep=t.sleeper())
    pacer.throttled()
    assert pacer.limit == 5.0
    t.now += 100.0
    async with pacer.slot("x"):
        pass
    assert pacer.limit == 10.0


def test_domains_are_lower_case_idna_and_empty_for_a_non_address() -> None:
    assert recipient_domain("A@B.Example") == "b.example"
    assert recipient_domain("a@BÜCHER.example") == "xn--bcher-kva.example"
    assert recipient_domain("no-at-sign") == "no-at-sign", "the whole text, as rpartition gives"
    assert recipient_domain(42) == ""


async def test_a_throttle_with_no_rate_set_halves_the_pace_of_the_last_seconds() -> None:
    t = VirtualTime()
    pacer = Pacer(clock=t.clock, sleep=t.sleeper())
    for _ in range(40):  # 40 a second for three seconds, unpaced
        t.now += 1 / 40
        async with pacer.slot("example.com"):
            pass
    t.now += 1 / 40
    for _ in range(80):
        async with pacer.slot("example.com"):
            pass
        t.now += 1 / 40
    assert pacer.waits == 0, "nothing was paced"
    pacer.throttled()
    assert pacer.limit == pytest.approx(20.0, rel=0.15)
