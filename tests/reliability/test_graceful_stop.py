"""Scenario 2: a graceful stop (SIGINT or SIGTERM) under load, then a restart.

The real ``notifier`` process runs against the socket-served fake CouchDB and
an SMTP server that takes 250 ms per message, with max_parallel 5, so that a
signal always finds sends in flight. DESIGN.md, semantics 2 and 10: stop
reading, let in-flight sends finish within the drain deadline, write the
final checkpoint, exit 0; a graceful stop sends no duplicate.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from harness import (
    CheckpointWatch,
    NotifierCli,
    Seeded,
    all_settled,
    first_arrival,
    recipients_delivered,
    seed_messages,
    wait_until,
)
from scenario import ScenarioRecord

from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.worker import NOTIFIED

MAX_PARALLEL = 5


class RecipientLog:
    """Notes each recipient the relay accepts (RCPT), without refusing any.

    A recipient accepted whose email has not arrived yet is a send in
    flight: its DATA is on its way or in the relay's pause.
    """

    def __init__(self, sink: SmtpSink) -> None:
        self.sink = sink
        self._seen: set[str] = set()
        self._lock = threading.Lock()
        sink.reject_recipient = self._note

    def _note(self, address: str) -> str | None:
        with self._lock:  # called from the relay's thread
            self._seen.add(address)
        return None

    def in_flight(self) -> set[str]:
        with self._lock:
            seen = set(self._seen)
        return seen - recipients_delivered(self.sink)


def marked_recipients(fake: FakeCouch, seeded: Seeded) -> set[str]:
    recipient = seeded.recipient_by_id()
    return {
        recipient[d["_id"]]
        for d in fake.docs("messages")
        if d["_id"] in recipient and d.get(NOTIFIED) is True
    }


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_under_load_drains_in_time_and_a_restart_sends_no_duplicate(
    sig: signal.Signals,
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    checkpoint_watch: CheckpointWatch,
    scenario_record: ScenarioRecord,
) -> None:
    seeded = seed_messages(fake_couch, 60, markers=True)
    checkpoint_watch.track(seeded)
    smtp_sink.delay = 0.25
    drain_timeout = 5.0
    config = notifier_cli.config(
        worker={"max_parallel": MAX_PARALLEL, "drain_timeout": drain_timeout}
    )
    rcpt = RecipientLog(smtp_sink)
    process = notifier_cli.start(config)
    # Signal while a full set of sends sits in the relay's 250 ms DATA
    # pause: after 10 emails, once every slot holds an accepted recipient
    # whose email has not arrived. Timing it on arrivals alone could land in
    # the instant between two waves, with nothing in flight to drain.
    wait_until(
        lambda: len(smtp_sink.messages) >= 10 and len(rcpt.in_flight()) == MAX_PARALLEL,
        30.0,
        f"10 emails, then {MAX_PARALLEL} sends in flight",
        process,
    )
    in_flight = rcpt.in_flight()
    at_signal = len(smtp_sink.messages)
    process.send(sig)
    signalled = time.monotonic()
    # The promise is an exit within drain_timeout; this wait is that bound.
    assert process.wait(timeout=drain_timeout) == 0, process.output()
    stop_seconds = time.monotonic() - signalled
    # The drain line, once (the periodic status line also says "draining").
    assert process.count("in-flight messages (deadline") == 1, process.output()
    assert "drain deadline" not in process.output()
    sent = recipients_delivered(smtp_sink)
    assert in_flight <= sent, "the sends in flight at the signal were finished"
    # Every email that went out was marked, and no mark lacks its email.
    assert sent == marked_recipients(fake_couch, seeded)
    assert len(sent) < len(seeded.ids), "the stop came mid-run"
    stopped_with = len(sent)
    smtp_sink.reject_recipient = None

    smtp_sink.delay = 0
    restarted = notifier_cli.start(config)
    wait_until(
        lambda: all_settled(fake_couch, seeded.ids), 30.0, "every message settled", restarted
    )
    assert restarted.stop() == 0, restarted.output()
    checkpoint_watch.stop()

    counts = smtp_sink.count_by_recipient()
    scenario_record.count(counts, seeded.recipients)
    assert counts == {r: 1 for r in seeded.recipients}, "everyone got exactly one email"
    assert checkpoint_watch.violations == []
    assert checkpoint_watch.backwards == []

    arrived = first_arrival(smtp_sink, seeded.recipients, after=restarted.started_at)
    assert arrived is not None
    scenario_record.scenario = f"2{'a' if sig == signal.SIGINT else 'b'}. Graceful stop: {sig.name}"
    scenario_record.faults = (
        f"{sig.name} after {at_signal} of 60 emails (SMTP 250 ms/message, max_parallel 5)"
    )
    scenario_record.recovery_seconds = arrived - restarted.started_at
    scenario_record.notes = (
        f"{stopped_with - at_signal} in-flight sends finished during the drain; exit 0 "
        f"{stop_seconds:.2f}s after the signal (drain_timeout {drain_timeout:g} s); "
        "recovery = restart to next email"
    )


def test_a_drain_deadline_that_expires_is_logged_and_the_interrupted_are_resent(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    checkpoint_watch: CheckpointWatch,
    scenario_record: ScenarioRecord,
) -> None:
    seeded = seed_messages(fake_couch, 20, markers=True)
    checkpoint_watch.track(seeded)
    # The relay holds every DATA for 3 s; the drain deadline is 0.5 s, so the
    # sends in flight at the signal cannot finish in time.
    smtp_sink.delay = 3.0
    rcpt = RecipientLog(smtp_sink)
    drain_timeout = 0.5
    config = notifier_cli.config(
        worker={"max_parallel": MAX_PARALLEL, "drain_timeout": drain_timeout}
    )
    process = notifier_cli.start(config)
    wait_until(
        lambda: len(rcpt.in_flight()) == MAX_PARALLEL,
        20.0,
        f"{MAX_PARALLEL} sends in flight",
        process,
    )
    interrupted = rcpt.in_flight()

    process.send(signal.SIGINT)
    # Deadline, then the final checkpoint; a few seconds bound both here.
    assert process.wait(timeout=drain_timeout + 5.0) == 0, process.output()
    assert process.count("drain deadline") == 1, process.output()
    # None finished: none may be marked (the checkpoint stays before them).
    assert marked_recipients(fake_couch, seeded) == set()

    smtp_sink.reject_recipient = None
    smtp_sink.delay = 0
    restarted = notifier_cli.start(config)
    wait_until(
        lambda: all_settled(fake_couch, seeded.ids), 30.0, "every message settled", restarted
    )
    assert restarted.stop() == 0, restarted.output()
    checkpoint_watch.stop()

    counts = smtp_sink.count_by_recipient()
    scenario_record.count(counts, seeded.recipients)
    assert set(counts) == set(seeded.recipients)
    assert scenario_record.lost == 0, "the interrupted messages went out after the restart"
    # A relay may complete a message whose sender gave up on it; only the
    # interrupted ones can come twice, and at most max_parallel of them.
    duplicated = {r for r, n in counts.items() if n > 1}
    assert duplicated <= interrupted
    assert scenario_record.duplicates_seen <= MAX_PARALLEL
    assert checkpoint_watch.violations == []
    assert checkpoint_watch.backwards == []

    arrived = first_arrival(smtp_sink, interrupted, after=restarted.started_at)
    assert arrived is not None
    scenario_record.scenario = "2c. Graceful stop: drain deadline expires"
    scenario_record.faults = (
        f"SIGINT with {MAX_PARALLEL} sends in flight, SMTP 3 s/message, drain_timeout 0.5 s"
    )
    scenario_record.duplicates_bound = MAX_PARALLEL
    scenario_record.recovery_seconds = arrived - restarted.started_at
    scenario_record.notes = (
        "deadline logged, exit 0; the interrupted sends were never marked and went out "
        "after the restart (a relay that completed them anyway would make them duplicates, "
        "bounded by max_parallel); recovery = restart to next email"
    )


def test_after_an_expired_drain_deadline_the_worker_does_not_wait_on_the_relay(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, notifier_cli: NotifierCli
) -> None:
    seed_messages(fake_couch, MAX_PARALLEL)
    smtp_sink.delay = 10.0  # a relay that does not answer DATA in time
    rcpt = RecipientLog(smtp_sink)
    config = notifier_cli.config(worker={"max_parallel": MAX_PARALLEL, "drain_timeout": 0.5})
    process = notifier_cli.start(config)
    wait_until(
        lambda: len(rcpt.in_flight()) == MAX_PARALLEL,
        20.0,
        f"{MAX_PARALLEL} sends in flight",
        process,
    )
    process.send(signal.SIGTERM)
    process.wait_for_log("drain deadline")
    # What is left after the deadline is the final checkpoint (nothing moved,
    # so nothing to write) and closing connections: well under a second.
    assert process.wait(timeout=1.5) == 0
