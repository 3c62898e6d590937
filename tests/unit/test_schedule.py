"""The retry schedule and sendAt parsing: pure, tested with seeded stress."""

from __future__ import annotations

import math
import random

import pytest

from notifier.schedule import BadSendAt, RetrySchedule, iso, parse_send_at, span


def test_delays_double_from_first_up_to_the_cap() -> None:
    s = RetrySchedule(first=60, cap=14_400, max_age=432_000, jitter=0)
    assert [s.delay(n) for n in range(1, 10)] == [
        60,
        120,
        240,
        480,
        960,
        1920,
        3840,
        7680,
        14_400,
    ]
    assert s.delay(500) == 14_400


@pytest.mark.parametrize("seed", range(5))
def test_jittered_delays_stay_within_their_bounds(seed: int) -> None:
    rng = random.Random(seed)
    s = RetrySchedule(first=60, cap=3600, max_age=86_400, jitter=0.2)
    for _ in range(2000):
        n = rng.randint(0, 200)
        delay = s.delay(n, rng)
        base = min(3600, 60 * 2 ** max(n - 1, 0))
        assert delay >= 30, (n, delay)
        assert base * 0.8 - 1e-9 <= delay <= base * 1.2 + 1e-9, (n, delay)


def test_a_backlog_that_failed_together_does_not_come_due_together() -> None:
    s = RetrySchedule(first=60, cap=3600, max_age=86_400, jitter=0.2, rng=random.Random(3))
    dues = sorted(s.delay(1) for _ in range(1000))
    # Spread over the whole ±20% band, not bunched.
    assert dues[0] < 50 and dues[-1] > 70
    assert len({round(d, 3) for d in dues}) > 900


def test_a_message_is_given_up_only_at_max_age() -> None:
    s = RetrySchedule(first=60, cap=3600, max_age=86_400)
    assert not s.expired(since=0, now=86_399.9)
    assert s.expired(since=0, now=86_400)


def test_the_schedule_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="first <= cap"):
        RetrySchedule(first=100, cap=10)
    with pytest.raises(ValueError, match="max_age"):
        RetrySchedule(max_age=0)
    with pytest.raises(ValueError, match="jitter"):
        RetrySchedule(jitter=1.0)


@pytest.mark.parametrize(
    ("value", "epoch"),
    [
        ("2026-12-03T09:00:00Z", 1796288400.0),
        ("2026-12-03T09:00:00z", 1796288400.0),
        ("2026-12-03t10:00:00+01:00", 1796288400.0),
        ("2026-12-03 09:00:00.250+00:00", 1796288400.25),
        ("2026-12-02T23:00:00-10:00", 1796288400.0),
        (1796288400000, 1796288400.0),
        (1796288400250.0, 1796288400.25),
        (0, 0.0),
        (None, None),
    ],
)
def test_send_at_in_either_form(value: object, epoch: float | None) -> None:
    parsed = parse_send_at(value)
    assert parsed == epoch if epoch is None else math.isclose(parsed or 0, epoch)


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("2026-12-03T09:00:00", "RFC 3339 with an offset"),  # no offset: ambiguous
        ("2026-12-03", "RFC 3339 with an offset"),
        ("tomorrow", "RFC 3339 with an offset"),
        ("2026-13-03T09:00:00Z", "not a valid date"),
        ("2026-02-30T09:00:00Z", "not a valid date"),
        (True, "a boolean"),
        (-1, "out of range"),
        (float("nan"), "out of range"),
        (10**17, "out of range"),
        (253402300800000, "out of range"),  # a millisecond after 9999
        # Valid text whose offset takes it outside the years datetime can hold.
        ("0001-01-01T00:00:00+01:00", "not a valid date"),
        ("9999-12-31T23:59:59-01:00", "not a valid date"),
        ("9999-12-31T23:59:59.9999999+00:00", "after the year 9999"),
        ([2026], "list"),
        ({"at": 1}, "dict"),
    ],
)
def test_a_bad_send_at_is_refused_with_the_reason(value: object, why: str) -> None:
    with pytest.raises(BadSendAt, match=why):
        parse_send_at(value)


def test_a_send_at_before_1970_is_in_the_past() -> None:
    assert (parse_send_at("1969-07-20T20:17:40Z") or 0) < 0


def test_iso_never_raises_on_a_hand_edited_time() -> None:
    assert iso(-1e16) == "1970-01-01T00:00:00.000+00:00"
    assert iso(1e20).startswith("9999-12-31T23:59:59")


def test_spans_read_well() -> None:
    assert [span(s) for s in (0.25, 5, 59, 60, 3599, 3600, 90_000, 432_000)] == [
        "0.2s",
        "5s",
        "59s",
        "1m",
        "59m",
        "1h",
        "1d1h",
        "5d",
    ]
