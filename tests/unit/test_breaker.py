"""The outage breaker and the crash streak: pure, invariants after every step."""

from __future__ import annotations

import itertools
import random

import pytest

from notifier.breaker import CrashStreak, Gate, OutageBreaker


def breaker(**kw: float) -> OutageBreaker:
    options = {"recipients": 3, "window": 10.0, "probe_first": 1.0, "probe_max": 8.0, **kw}
    return OutageBreaker(**options)  # type: ignore[arg-type]


def test_one_recipient_failing_again_and_again_is_not_an_outage() -> None:
    b = breaker()
    for n in range(20):
        assert not b.failed("same@example.com", now=float(n) / 10)
    assert not b.is_open


def test_many_recipients_failing_within_the_window_are_an_outage() -> None:
    b = breaker()
    assert not b.failed("a@x", now=0.0)
    assert not b.failed("b@x", now=1.0)
    assert b.failed("c@x", now=2.0)
    assert b.is_open
    assert b.permit(2.5).gate is Gate.WAIT


def test_failures_outside_the_window_do_not_add_up() -> None:
    b = breaker()
    b.failed("a@x", now=0.0)
    b.failed("b@x", now=5.0)
    assert not b.failed("c@x", now=10.5), "a@x fell out of the 10 s window"
    assert b.failed("d@x", now=11.0)


def test_a_success_in_between_means_the_relay_works() -> None:
    b = breaker()
    b.failed("a@x", now=0.0)
    b.failed("b@x", now=1.0)
    b.succeeded(now=1.5)
    assert not b.failed("c@x", now=2.0)
    assert not b.is_open


def test_an_unreachable_relay_opens_at_once() -> None:
    b = breaker()
    assert b.failed("a@x", now=0.0, relay_down=True)
    assert b.is_open


def test_probes_come_one_at_a_time_at_doubling_intervals_up_to_the_cap() -> None:
    b = breaker()
    b.failed("a@x", now=0.0, relay_down=True)
    probes, now = [], 0.0
    while len(probes) < 6:
        permit = b.permit(now)
        if permit.gate is Gate.PROBE:
            probes.append(now)
            assert b.permit(now).gate is Gate.WAIT, "one probe at a time"
            b.failed("a@x", now=now, probe=True)
        now = round(now + 0.5, 3)
    gaps = [b - a for a, b in itertools.pairwise(probes)]
    assert probes[0] == 1.0
    assert gaps == [2.0, 4.0, 8.0, 8.0, 8.0]


def test_the_first_answer_closes_it_and_wakes_everyone() -> None:
    b = breaker()
    b.failed("a@x", now=0.0, relay_down=True)
    assert b.permit(1.0).gate is Gate.PROBE
    assert b.succeeded(now=1.2, probe=True)
    assert not b.is_open
    assert b.permit(1.3).gate is Gate.SEND


def test_a_probe_given_up_lets_the_next_one_go() -> None:
    b = breaker()
    b.failed("a@x", now=0.0, relay_down=True)
    assert b.permit(1.0).gate is Gate.PROBE
    b.release_probe()
    assert b.permit(1.0).gate is Gate.PROBE


@pytest.mark.parametrize("seed", range(10))
def test_random_outcomes_keep_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    b = breaker(recipients=rng.randint(1, 5), probe_first=rng.uniform(0.1, 2))
    now = 0.0
    probe_out = False
    recent: list[tuple[float, str]] = []  # failures since the last success, for the model
    for _ in range(3000):
        now += rng.expovariate(2.0)
        permit = b.permit(now)
        if b.is_open:
            assert permit.gate is not Gate.SEND, "nothing is sent while paused"
        else:
            assert permit.gate is Gate.SEND
        if permit.gate is Gate.PROBE:
            assert not probe_out, "at most one probe"
            probe_out = True
        if permit.gate is Gate.WAIT:
            assert permit.wait > 0
            continue
        probe = permit.gate is Gate.PROBE
        roll = rng.random()
        if roll < 0.5:
            who = f"r{rng.randint(0, 8)}"
            was_open = b.is_open
            opened = b.failed(who, now=now, relay_down=rng.random() < 0.05, probe=probe)
            recent = [(t, r) for t, r in recent if t >= now - b.window] + [(now, who)]
            if opened:
                assert not was_open
            elif not was_open and not probe:
                # The model: the breaker opens exactly when enough different
                # recipients failed within the window with no success since.
                assert len({r for _, r in recent}) < b.recipients
        elif roll < 0.97:
            b.succeeded(now=now, probe=probe)
            assert not b.is_open
            recent = []
        else:
            b.release_probe() if probe else None
        if b.is_open and not b._failures:
            recent = []
        probe_out = False
        b._check()


def test_the_crash_streak_counts_only_unexpected_errors_in_a_row() -> None:
    s = CrashStreak(limit=3)
    assert [s.crashed(), s.crashed()] == [False, False]
    s.succeeded()
    assert [s.crashed(), s.crashed(), s.crashed()] == [False, False, True]
    with pytest.raises(ValueError):
        CrashStreak(limit=0)
