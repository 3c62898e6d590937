"""The in-flight tracker, tested like a data structure: invariants after every step."""

from __future__ import annotations

import random

import pytest

from notifier.tracker import InFlightTracker


def couch3_seq(n: int) -> str:
    """An opaque CouchDB-3-style seq; lexical order differs from feed order past 9."""
    return f"{n}-g1AAAAFTeJzLYWBg4MhgTmHgz8tPSTV0MDQy1zMAQsMcoEQiQ1L9_"


def test_checkpoint_is_none_until_the_first_arrival_is_done() -> None:
    t = InFlightTracker()
    t.add(couch3_seq(1))
    assert t.checkpoint is None
    t.check()


def test_checkpoint_waits_for_the_lowest_unfinished_arrival() -> None:
    t = InFlightTracker()
    first, second, third = (t.add(couch3_seq(n)) for n in (1, 2, 3))
    t.complete(third)
    t.complete(second)
    assert t.checkpoint is None
    t.complete(first)
    assert t.checkpoint == couch3_seq(3)
    t.check()


def test_opaque_seqs_are_never_ordered_by_value() -> None:
    # "10-…" sorts before "9-…" as a string; the checkpoint must follow feed order.
    assert couch3_seq(10) < couch3_seq(9)
    t = InFlightTracker()
    nine, ten = t.add(couch3_seq(9)), t.add(couch3_seq(10))
    t.complete(ten)
    assert t.checkpoint is None
    t.complete(nine)
    assert t.checkpoint == couch3_seq(10)


def test_rows_that_need_no_work_advance_the_checkpoint() -> None:
    t = InFlightTracker()
    t.add_done(couch3_seq(1))
    t.add_done(couch3_seq(2))
    assert t.checkpoint == couch3_seq(2)
    assert len(t) == 0


def test_skipped_rows_behind_an_unfinished_one_do_not_pass_it() -> None:
    t = InFlightTracker()
    t.add_done(couch3_seq(1))
    busy = t.add(couch3_seq(2))
    for n in range(3, 50):
        t.add_done(couch3_seq(n))
    assert t.checkpoint == couch3_seq(1)
    t.complete(busy)
    assert t.checkpoint == couch3_seq(49)
    t.check()


def test_memory_stays_bounded_by_unfinished_rows_not_by_backlog() -> None:
    t = InFlightTracker()
    stuck = t.add(couch3_seq(0))
    for n in range(1, 100_000):
        t.add_done(couch3_seq(n))
    t.check()
    assert len(t._seqs) <= 3
    t.complete(stuck)
    assert t.checkpoint == couch3_seq(99_999)


def test_integer_seqs_work_too() -> None:
    t = InFlightTracker()
    a, b = t.add(7), t.add(8)
    t.complete(a)
    assert t.checkpoint == 7
    t.complete(b)
    assert t.checkpoint == 8


def test_completing_twice_is_an_error() -> None:
    t = InFlightTracker()
    a = t.add(couch3_seq(1))
    t.complete(a)
    with pytest.raises(ValueError, match="not in flight"):
        t.complete(a)


@pytest.mark.parametrize("seed", range(20))
def test_random_completion_order_never_passes_unfinished_work(seed: int) -> None:
    rng = random.Random(seed)
    t = InFlightTracker()
    in_flight: list[int] = []
    done: set[int] = set()
    seq_of: dict[int, str] = {}
    for step in range(2_000):
        action = rng.random()
        if action < 0.45 or not in_flight:
            arrival = t.add(couch3_seq(step))
            seq_of[arrival] = couch3_seq(step)
            in_flight.append(arrival)
        elif action < 0.6:
            arrival = t.add_done(couch3_seq(step))
            seq_of[arrival] = couch3_seq(step)
            done.add(arrival)
        else:
            arrival = in_flight.pop(rng.randrange(len(in_flight)))
            t.complete(arrival)
            done.add(arrival)
        t.check()
        # The model: the highest arrival n such that 1..n are all done.
        contiguous = 0
        while contiguous + 1 in done:
            contiguous += 1
        expected = seq_of[contiguous] if contiguous else None
        assert t.checkpoint == expected, f"seed {seed} step {step}"
        assert t.checkpoint_arrival == contiguous
        if in_flight:
            assert t.checkpoint_arrival < min(in_flight)
    assert len(t) == len(in_flight)
