"""Scenario 3: CouchDB goes away, and the real ``notifier`` process rides it out.

Each test runs the CLI against the fake CouchDB served on a loopback socket
(CouchDB-3 shaped, opaque seqs) and a real SMTP server, injects one incident,
and checks:

* nothing is lost and nothing is sent twice (counted per recipient);
* the worker resumes from the last seq it saw: the ``since`` of the feed
  requests the fake recorded is the seq of the last row before the incident,
  never 0 and never an older checkpoint;
* it retried with backoff rather than in a tight loop;
* the log tells the story once per incident ("changes feed interrupted" when
  it starts, "back after" when it ends), not once per retry;
* the checkpoint never passed an unsettled message and never moved back.

Time to recover is from the end of the fault to the next email delivered.
"""

from __future__ import annotations

import re
import time

import pytest
from harness import (
    DB,
    CheckpointWatch,
    NotifierCli,
    NotifierProcess,
    Seeded,
    all_settled,
    feed_requests,
    first_arrival,
    read_checkpoint,
    seed_messages,
    wait_until,
)
from scenario import ScenarioRecord

from notifier.retries import INDEX
from notifier.testing.fake_couch import FakeCouch
from notifier.testing.fake_couch import find as fake_find
from notifier.testing.smtp import SmtpSink

# Its CouchDB faults are the fake's: COUCHDB_URL adds no run on a real server.
pytestmark = pytest.mark.fake_couch_only

INTERRUPTED = "changes feed interrupted"
BACK = "changes feed is back after"
CHECKPOINT_NOT_WRITTEN = "checkpoint not written"
CHECKPOINT_BACK = "checkpoint written again"
# How long a whole batch may take to go out; far above what it needs (a few
# seconds), so only a worker that is stuck fails it.
SETTLE_TIMEOUT = 40.0


def create_retry_index(fake: FakeCouch) -> None:
    """The index the worker creates at its first start (notifier.retries), made now."""
    _, _, index = fake_find.parse_index_request(dict(INDEX), new_id=lambda: "unused")
    design = fake_find.index_design_doc(None, index)
    assert design is not None
    fake.put(DB, design)


def check_outcome(
    fake: FakeCouch,
    sink: SmtpSink,
    process: NotifierProcess,
    seeded: Seeded,
    watch: CheckpointWatch,
    record: ScenarioRecord,
) -> None:
    """What every incident must leave behind, and the figures for the record."""
    assert process.stop() == 0, process.output()
    watch.stop()
    counts = sink.count_by_recipient()
    record.count(counts, seeded.recipients)
    assert record.lost == 0, "every message was delivered"
    assert counts == {r: 1 for r in seeded.recipients}, "each recipient got exactly one email"
    assert all_settled(fake, seeded.ids)
    assert watch.violations == []
    assert watch.backwards == [], "the checkpoint only moves forward"
    assert watch.samples, "the worker checkpointed"
    # Once per incident: one warning when it starts, one line when it ends.
    assert process.count(INTERRUPTED) == 1, process.lines(INTERRUPTED)
    assert process.count(BACK) == 1, process.lines(BACK)
    # And no other warning repeats either (the checkpoint's, the lease's...).
    repeated = {kind: n for kind, n in process.warnings().items() if n > 1}
    assert repeated == {}, process.output()


def retries_logged(process: NotifierProcess) -> int:
    """The attempts the "back after" line reports."""
    (line,) = process.lines(BACK)
    found = re.search(r"and (\d+) attempts", line)
    assert found is not None, line
    return int(found.group(1))


def recovery(sink: SmtpSink, recipients: list[str], fault_end: float) -> float:
    arrived = first_arrival(sink, recipients, after=fault_end)
    assert arrived is not None, "an email went out after the fault"
    return arrived - fault_end


def test_a_feed_cut_mid_stream_resumes_from_the_last_row(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    checkpoint_watch: CheckpointWatch,
    scenario_record: ScenarioRecord,
) -> None:
    seeded = seed_messages(fake_couch, 100, markers=True)
    checkpoint_watch.track(seeded)
    fake_couch.cut_feed_after(40)
    process = notifier_cli.start()
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "all messages", process)

    (cut,) = fake_couch.events_of("cut")
    feeds = feed_requests(fake_couch)
    # The 40th row was the last one through; the worker asks again from it.
    assert [f.since for f in feeds] == ["0", seeded.seqs["msg-00039"]]
    check_outcome(fake_couch, smtp_sink, process, seeded, checkpoint_watch, scenario_record)

    scenario_record.scenario = "3a. CouchDB: feed connection cut mid-stream"
    scenario_record.faults = "1 cut after 40 of 100 rows"
    scenario_record.recovery_seconds = recovery(smtp_sink, seeded.recipients[40:], cut.at)
    scenario_record.notes = (
        "recovery includes finishing the 40 rows read before the cut, then reconnecting"
    )


@pytest.mark.parametrize("kind", ["503", "down"])
def test_an_outage_while_idle_resumes_from_the_last_row(
    kind: str,
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    checkpoint_watch: CheckpointWatch,
    scenario_record: ScenarioRecord,
) -> None:
    # The retry index exists beforehand, as after a first start, so that the
    # last row before the outage is a message's.
    create_retry_index(fake_couch)
    before = seed_messages(fake_couch, 40, markers=True)
    checkpoint_watch.track(before)
    # Claims off: with them, the last row before the outage is the echo of
    # the worker's last claim, a seq the test cannot name. What is tested
    # here is where the feed resumes.
    process = notifier_cli.start(notifier_cli.config(worker={"claims": False}))
    wait_until(
        lambda: all_settled(fake_couch, before.ids), SETTLE_TIMEOUT, "the first batch", process
    )
    first_feeds = len(feed_requests(fake_couch))

    if kind == "503":
        # A proxy in front of a failing node: open connections drop, and
        # every request gets 503 until the node is back.
        fake_couch.fail_requests(status=503)
        fake_couch.drop_connections()
        fault_start = time.monotonic()
    else:
        fake_couch.refuse_connections(seconds=10.0)
        (refusing,) = fake_couch.events_of("refusing")
        fault_start = refusing.at
    # Written while the server cannot serve them; they go out after it is back.
    during = seed_messages(fake_couch, 40, start=1000, markers=True)
    checkpoint_watch.track(during)
    seeded = before + during

    if kind == "503":
        # "A while": long enough for several retries, each answered 503 (a
        # reconnect first asks feed=normal&since=now, so count both kinds).
        wait_until(
            lambda: (
                sum(
                    f.status == 503
                    for kind in ("continuous", "normal")
                    for f in feed_requests(fake_couch, feed=kind)
                )
                >= 3
            ),
            20.0,
            "three feed requests answered 503",
            process,
        )
        fake_couch.clear_faults()
        fault_end = time.monotonic()
    else:
        fault_end = fault_start + 10.0
        wait_until(lambda: not fake_couch.refusing_connections, 15.0, "the server to be back")
    wait_until(
        lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "the second batch", process
    )

    retries = feed_requests(fake_couch)[first_feeds:]
    assert retries, "the worker reconnected"
    # Nothing came through between the last row of the first batch and the
    # outage, so every reconnect asks from that row's seq.
    assert {f.since for f in retries} == {before.seqs["msg-00039"]}
    attempts = retries_logged(process)
    assert attempts >= 2, "several attempts, so 'once per incident' means something"
    # Backoff, not a tight loop: a loop would make thousands of attempts.
    assert attempts <= 30, f"{attempts} attempts in {fault_end - fault_start:.1f}s"
    check_outcome(fake_couch, smtp_sink, process, seeded, checkpoint_watch, scenario_record)

    seconds = fault_end - fault_start
    if kind == "503":
        scenario_record.scenario = "3b. CouchDB: answers 503 for a while"
        scenario_record.faults = (
            f"every request 503 for {seconds:.1f}s ({attempts} feed attempts), connections dropped"
        )
    else:
        scenario_record.scenario = "3c. CouchDB: server down for 10 s"
        scenario_record.faults = f"connections refused for 10 s ({attempts} feed attempts)"
    scenario_record.recovery_seconds = recovery(smtp_sink, during.recipients, fault_end)
    scenario_record.notes = "40 messages before, 40 written during the outage"


def test_a_stalled_feed_is_noticed_and_resumed_from_the_last_row(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    checkpoint_watch: CheckpointWatch,
    scenario_record: ScenarioRecord,
) -> None:
    seeded = seed_messages(fake_couch, 60, markers=True)
    checkpoint_watch.track(seeded)
    # After 20 rows the connection stays open but sends nothing at all, not
    # even heartbeats: only the worker's idle timeout can notice.
    fake_couch.stall_feed_after(20)
    process = notifier_cli.start()
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "all messages", process)

    (stall,) = fake_couch.events_of("stall")
    feeds = feed_requests(fake_couch)
    assert [f.since for f in feeds] == ["0", seeded.seqs["msg-00019"]]
    assert "no data in time" in process.lines(INTERRUPTED)[0]
    check_outcome(fake_couch, smtp_sink, process, seeded, checkpoint_watch, scenario_record)

    scenario_record.scenario = "3d. CouchDB: feed stalls, no heartbeat"
    scenario_record.faults = "1 stall after 20 of 60 rows"
    scenario_record.recovery_seconds = recovery(smtp_sink, seeded.recipients[20:], stall.at)
    scenario_record.notes = (
        "recovery counted from the stall's start: the idle timeout "
        "(heartbeat 1 s + 2 s) is what notices it"
    )


def test_a_checkpoint_that_cannot_be_written_is_logged_once_per_outage(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, notifier_cli: NotifierCli
) -> None:
    # Only the checkpoint doc's writes fail, so the worker keeps sending and
    # its checkpoint keeps moving: every tick has something to write.
    fake_couch.fail_requests(
        status=503, method="PUT", path=r"^/workersequences/messages\.worker-0-of-1$"
    )
    seeded = seed_messages(fake_couch, 20)
    process = notifier_cli.start(notifier_cli.config(worker={"checkpoint_interval": 0.2}))
    wait_until(lambda: all_settled(fake_couch, seeded.ids), SETTLE_TIMEOUT, "all messages", process)
    wait_until(
        lambda: sum(e.kind == "status" for e in fake_couch.events) >= 5,
        10.0,
        "five checkpoint writes refused",
        process,
    )
    fake_couch.clear_faults()
    # Wait for the worker to know its write went through, not just for the
    # doc to exist: a stop in between would cancel the write's answer.
    process.wait_for_log(CHECKPOINT_BACK, timeout=10.0)
    assert read_checkpoint(fake_couch) is not None
    assert process.stop() == 0, process.output()

    assert smtp_sink.count_by_recipient() == {r: 1 for r in seeded.recipients}
    # The timer tried at every tick; the log tells the story once, and once
    # more when it is over.
    assert process.count(CHECKPOINT_NOT_WRITTEN) == 1, process.lines(CHECKPOINT_NOT_WRITTEN)
    assert process.count(CHECKPOINT_BACK) == 1, process.output()
