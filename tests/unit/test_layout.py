"""Layouts: which worker count runs, which started last, which are retired; and the look-out.

The pure functions get lease and checkpoint documents as CouchDB holds them
and a ``now``; :class:`LayoutWatch` runs against the in-process fake CouchDB.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest

from notifier.couch import CouchClient
from notifier.layout import (
    LayoutWatch,
    SlotDocs,
    layout_states,
    newer_layouts,
    parse_slot,
    running_layouts,
    slot_last_ran,
)
from notifier.lease import Holder, Lease
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch

NOW = 10_000.0
DAY = 86_400.0


def held(host: str, started_at: float | None, *, expires_in: float = 20.0) -> dict[str, Any]:
    """A lease as a live holder writes it (``expires_in`` < 0: its holder stopped renewing)."""
    doc: dict[str, Any] = {
        "run_id": f"{host}-{started_at}",
        "host": host,
        "pid": 1,
        "pid_scope": f"{host}-scope",
        "expires_at": NOW + expires_in,
    }
    if started_at is not None:
        doc["started_at"] = started_at
    return doc


def released(host: str, started_at: float, at: float) -> dict[str, Any]:
    """A lease as a clean stop leaves it."""
    return {"host": host, "pid": 1, "started_at": started_at, "released_at": at, "expires_at": at}


def checkpoint(updated_at: float) -> dict[str, Any]:
    iso = datetime.fromtimestamp(updated_at, tz=UTC).isoformat(timespec="seconds")
    return {"since": 1, "updated_at": iso}


# -- newer_layouts ----------------------------------------------------------------


def test_a_layout_that_started_after_mine_is_newer_and_one_before_is_not() -> None:
    leases = {
        (1, 0): held("old", 1_000.0),
        (2, 0): held("a", 5_000.0),
        (2, 1): held("b", 5_100.0),
        (3, 0): held("c", 7_000.0),
        (3, 2): held("d", 6_500.0),
        (4, 1): held("e", 9_000.0),
    }
    newer = newer_layouts(leases, worker_count=2, started_at=5_100.0, now=NOW)
    assert [run.worker_count for run in newer] == [3, 4]
    three = newer[0]
    assert three.started_at == 6_500.0  # its earliest live lease
    assert three.worker_ids == (0, 2) and three.hosts == ("c", "d")
    assert newer_layouts(leases, worker_count=4, started_at=9_000.0, now=NOW) == []
    from_the_oldest = newer_layouts(leases, worker_count=1, started_at=1_000.0, now=NOW)
    assert [run.worker_count for run in from_the_oldest] == [2, 3, 4]


def test_expired_and_released_leases_do_not_make_a_layout_run() -> None:
    leases = {
        (2, 0): held("a", 5_000.0),
        (3, 0): held("c", 7_000.0, expires_in=-1.0),  # crashed: expired
        (4, 0): released("d", 8_000.0, at=NOW - 5),  # stopped cleanly
    }
    assert newer_layouts(leases, worker_count=2, started_at=5_000.0, now=NOW) == []
    assert sorted(running_layouts(leases, now=NOW)) == [2]
    # One live worker is enough for a layout to run.
    leases[(3, 1)] = held("c2", 7_500.0)
    (three,) = newer_layouts(leases, worker_count=2, started_at=5_000.0, now=NOW)
    assert (three.worker_count, three.started_at, three.worker_ids) == (3, 7_500.0, (1,))


def test_a_restarted_worker_keeps_the_start_of_its_layout() -> None:
    leases = {
        (2, 0): held("a", 1_000.0),  # running since the layout started
        (2, 1): held("b", 9_000.0),  # this worker, restarted after the new layout began
        (3, 0): held("c", 5_000.0),
    }
    (three,) = newer_layouts(leases, worker_count=2, started_at=9_000.0, now=NOW)
    assert three.worker_count == 3
    # The new layout does not see the restarted worker's layout as newer.
    assert newer_layouts(leases, worker_count=3, started_at=5_000.0, now=NOW) == []


def test_a_layout_restarted_as_a_whole_counts_from_its_restart() -> None:
    leases = {
        (2, 0): held("a", 9_000.0),
        (2, 1): held("b", 9_100.0),
        (3, 0): held("c", 5_000.0),
    }
    assert newer_layouts(leases, worker_count=2, started_at=9_000.0, now=NOW) == []
    assert [
        run.worker_count for run in newer_layouts(leases, worker_count=3, started_at=5e3, now=NOW)
    ] == [2]


def test_my_own_start_counts_even_before_my_lease_is_visible() -> None:
    leases = {(3, 0): held("c", 5_000.0)}
    (three,) = newer_layouts(leases, worker_count=2, started_at=4_000.0, now=NOW)
    assert three.worker_count == 3
    assert newer_layouts(leases, worker_count=2, started_at=6_000.0, now=NOW) == []


def test_a_layout_without_started_at_or_started_with_mine_is_not_newer() -> None:
    leases = {
        (3, 0): held("old-version", None),
        (4, 0): held("same", 5_000.0),
    }
    assert newer_layouts(leases, worker_count=2, started_at=5_000.0, now=NOW) == []


def test_a_lease_whose_holder_is_known_to_be_gone_does_not_run() -> None:
    leases = {(3, 0): held("here", 7_000.0)}
    gone = newer_layouts(
        leases, worker_count=2, started_at=5e3, now=NOW, here="here-scope", alive=lambda *_: False
    )
    assert gone == []
    elsewhere = newer_layouts(
        leases, worker_count=2, started_at=5e3, now=NOW, here="there-scope", alive=lambda *_: False
    )
    assert [run.worker_count for run in elsewhere] == [3]


# -- when a slot last ran, and layout states -----------------------------------------


def test_a_slot_last_ran_now_while_live_else_at_its_latest_trace() -> None:
    assert slot_last_ran(checkpoint(100.0), held("a", 50.0), now=NOW, live=True) == NOW
    # A clean stop: its release.
    assert slot_last_ran(checkpoint(100.0), released("a", 50, at=900.0), now=NOW, live=False) == 900
    # A crash: the lease it left, up to its expiry.
    crashed = {**held("a", 50.0, expires_in=-300.0), "renewed_at": "1970-01-01T00:01:40+00:00"}
    assert slot_last_ran(checkpoint(100.0), crashed, now=NOW, live=False) == NOW - 300
    # A checkpoint written after the lease's last trace.
    assert slot_last_ran(checkpoint(9_500.0), released("a", 5, 900), now=NOW, live=False) == 9_500
    assert slot_last_ran(None, None, now=NOW, live=False) is None
    assert slot_last_ran({"since": 1}, {"host": "a"}, now=NOW, live=False) is None


def docs_of(
    checkpoints: dict[tuple[int, int], dict[str, Any]],
    leases: dict[tuple[int, int], dict[str, Any]],
) -> SlotDocs:
    return SlotDocs(checkpoints=checkpoints, leases=leases)


def test_a_layout_is_retired_after_retire_after_without_a_run_while_another_ran() -> None:
    now = 100 * DAY
    docs = docs_of(
        {
            (1, 0): checkpoint(now - 8 * DAY),
            (2, 0): checkpoint(now - 3 * DAY),
            (2, 1): checkpoint(now - 9 * DAY),
        },
        {
            (1, 0): released("a", now - 30 * DAY, at=now - 7 * DAY - 1),
            (3, 0): {**held("b", now - 2 * DAY), "expires_at": now + 20},
        },
    )
    states = layout_states(docs, now=now, retire_after=7 * DAY)
    assert states[1].retired and states[1].last_ran == now - 7 * DAY - 1
    # One of its workers ran 3 days ago: not retired.
    assert not states[2].retired and states[2].last_ran == now - 3 * DAY
    assert states[3].running and states[3].current and not states[3].retired
    assert states[3].last_ran == now
    assert not states[1].running and not states[1].current
    # A shorter retire_after retires layout 2 too; never the running one.
    shorter = layout_states(docs, now=now, retire_after=DAY)
    assert [c for c, s in sorted(shorter.items()) if s.retired] == [1, 2]
    assert not layout_states(docs, now=now, retire_after=0.0)[3].retired


def test_the_layout_that_ran_last_is_never_retired_however_old() -> None:
    docs = docs_of({(1, 0): checkpoint(10.0), (2, 0): checkpoint(20.0)}, {})
    states = layout_states(docs, now=100 * DAY, retire_after=DAY)
    assert states[1].retired and not states[2].retired
    assert not any(s.current for s in states.values())  # nothing runs


def test_a_layout_whose_last_run_is_unknown_is_kept() -> None:
    docs = docs_of({(1, 0): {"since": 1}, (2, 0): checkpoint(NOW - 10)}, {})
    states = layout_states(docs, now=NOW, retire_after=1.0)
    assert states[1].last_ran is None and not states[1].retired


def test_the_current_layout_is_the_newest_running_one() -> None:
    docs = docs_of(
        {},
        {
            (2, 0): held("a", 1_000.0),
            (3, 0): held("b", 5_000.0),
            (4, 0): held("c", 9_000.0, expires_in=-5.0),  # newest, but it stopped renewing
        },
    )
    states = layout_states(docs, now=NOW, retire_after=DAY)
    assert [c for c, s in sorted(states.items()) if s.current] == [3]
    assert [c for c, s in sorted(states.items()) if s.running] == [2, 3]


def test_only_slot_ids_of_the_database_are_layouts() -> None:
    assert parse_slot("messages", "messages.worker-0-of-2") == ((2, 0), False)
    assert parse_slot("messages", "messages.worker-1-of-2.lease") == ((2, 1), True)
    for doc_id in (
        "messages.worker-2-of-2",
        "messages.worker-01-of-2",
        "messages.worker-0-of-0",
        "messages.worker-notes",
        "messagesx.worker-0-of-1",
        "messages.worker-0-of-1.lease.old",
    ):
        assert parse_slot("messages", doc_id) is None, doc_id


# -- LayoutWatch against the fake CouchDB -----------------------------------------------

CKDB = "workersequences"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def client() -> AsyncIterator[tuple[FakeCouch, CouchClient]]:
    fake = FakeCouch(databases=["messages"])
    async with CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch:
        yield fake, couch


async def take(couch: CouchClient, shard: Shard, clock: Clock, host: str) -> Lease:
    lease = Lease(
        couch,
        database=CKDB,
        source_database="messages",
        shard=shard,
        ttl=60.0,
        holder=Holder(run_id=f"{host}-{shard}", host=host, pid=1),
        clock=clock,
    )
    assert await lease.acquire(asyncio.Event())
    return lease


def watch_of(couch: CouchClient, lease: Lease, shard: Shard, clock: Clock) -> LayoutWatch:
    return LayoutWatch(
        couch,
        checkpoint_database=CKDB,
        database="messages",
        shard=shard,
        lease=lease,
        interval=3600.0,
        clock=clock,
    )


def layout_lines(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [
        r.getMessage() for r in caplog.records if r.name == "notifier.layout" and r.levelno == level
    ]


@pytest.mark.anyio
async def test_the_watch_warns_once_when_a_newer_layout_appears_and_says_when_it_is_gone(
    client: tuple[FakeCouch, CouchClient], caplog: pytest.LogCaptureFixture
) -> None:
    _, couch = client
    caplog.set_level(logging.INFO, logger="notifier.layout")
    clock = Clock(1_740_900_000.0)
    old = Shard(worker_id=0, worker_count=2)
    mine = await take(couch, old, clock, "host-old")
    watch = watch_of(couch, mine, old, clock)
    await watch.check()
    assert watch.newer == () and layout_lines(caplog, logging.WARNING) == []

    clock.now += 60
    new = [await take(couch, Shard(worker_id=i, worker_count=3), clock, f"new-{i}") for i in (0, 1)]
    for _ in range(3):
        await watch.check()
    (warning,) = layout_lines(caplog, logging.WARNING)
    assert warning.startswith(
        "worker 0/2: a newer layout is running (3 workers, since 2025-03-02 07:21:00 UTC, "
        "on new-0, new-1); this worker's layout is 2 workers. If you are resharding, stop this "
        "worker once the new layout has caught up (docs/operations.md, 'Reshard')"
    )
    assert watch.checks == 4 and [run.worker_count for run in watch.newer] == [3]

    # The new layout's own look-out sees nothing newer than itself.
    theirs = watch_of(couch, new[0], Shard(worker_id=0, worker_count=3), clock)
    await theirs.check()
    assert theirs.newer == () and len(layout_lines(caplog, logging.WARNING)) == 1

    for lease in new:
        await lease.release()
    await watch.check()
    await watch.check()
    assert layout_lines(caplog, logging.INFO) == [
        "worker 0/2: the newer layout (3 workers) is no longer running; this worker's layout "
        "(2 workers) is the newest running one"
    ]
    assert watch.newer == ()


@pytest.mark.anyio
async def test_a_couchdb_error_in_the_watch_is_logged_once_and_never_raised(
    client: tuple[FakeCouch, CouchClient], caplog: pytest.LogCaptureFixture
) -> None:
    fake, couch = client
    caplog.set_level(logging.INFO, logger="notifier.layout")
    clock = Clock(1_740_900_000.0)
    shard = Shard(worker_id=0, worker_count=2)
    watch = watch_of(couch, await take(couch, shard, clock, "host-a"), shard, clock)
    fake.fail_requests(status=500, path="_all_docs")
    for _ in range(3):
        await watch.check()  # does not raise
    (warning,) = layout_lines(caplog, logging.WARNING)
    assert warning.startswith("worker 0/2: could not check for a newer layout, will try again")
    assert "500" in warning
    assert watch.failures == 3 and watch.checks == 0
    fake.clear_faults()
    await take(couch, Shard(worker_id=0, worker_count=4), Clock(clock.now + 5), "host-n")
    await watch.check()
    assert watch.checks == 1 and [run.worker_count for run in watch.newer] == [4]


@pytest.mark.anyio
async def test_the_watch_first_looks_once_the_worker_holds_its_lease(
    client: tuple[FakeCouch, CouchClient],
) -> None:
    fake, couch = client
    clock = Clock(1_740_900_000.0)
    shard = Shard(worker_id=0, worker_count=2)
    lease = Lease(
        couch,
        database=CKDB,
        source_database="messages",
        shard=shard,
        holder=Holder(run_id="r", host="h", pid=1),
        clock=clock,
    )
    watch = watch_of(couch, lease, shard, clock)
    task = asyncio.create_task(watch.run())
    for _ in range(20):
        await asyncio.sleep(0)
    assert watch.checks == 0 and not any(r.path.endswith("_all_docs") for r in fake.requests)
    assert await lease.acquire(asyncio.Event())
    try:
        async with asyncio.timeout(5):
            while watch.checks == 0:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert watch.checks == 1
