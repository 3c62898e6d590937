"""Scenario 4, SMTP goes away: the real ``notifier`` process against a faulty relay.

The daemon runs as a subprocess against the fake CouchDB served on a loopback
socket and an aiosmtpd sink that goes down, refuses messages for now, drops
connections mid-DATA and refuses the login. What must hold (DESIGN.md, 6):

* transient faults are deferred and retried on the schedule until
  ``[delivery] max_age``, and then dead-lettered with the last reply;
* an unreachable relay is an outage: sending pauses, the relay is probed,
  and no message uses up an attempt;
* a relay that refuses our login or our TLS stops the worker with a clear
  message and its documented exit status, before any email, and without
  dead-lettering anything: once fixed, every message goes out once;
* one message that always fails never holds the checkpoint back.

* a relay that withdraws STARTTLS while the worker runs stops it, as any
  other TLS failure does: nothing goes out in clear text.

Time to recover is from the end of the fault to the next email delivered.
"""

from __future__ import annotations

import re
import ssl
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import Envelope
from harness import (
    DB,
    NotifierCli,
    all_settled,
    docs_by_recipient,
    first_arrival,
    messages,
    read_checkpoint,
    wait_until,
)
from scenario import ScenarioRecord, message, self_signed_certificate

from notifier.testing import free_port
from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import ReceivedEnvelopeInfo, SmtpSink
from notifier.worker import FAILED, NOTIFIED, RECORD

# Its scenarios aim their own NotifierCli at the fake's database names, so
# COUCHDB_URL adds no run on a real server (test_graceful_stop and test_crash have one).
pytestmark = pytest.mark.fake_couch_only

SMTP_USER = "notifier"
SMTP_PASSWORD = "right-password"
# Far above what a batch needs (a few seconds): only a stuck worker fails it.
SETTLE_TIMEOUT = 30.0
# A short SMTP timeout keeps the retries of a test in seconds.
SMTP = {"timeout": 3.0}
WORKER = {"max_parallel": 4, "checkpoint_interval": 0.2}


@contextmanager
def notifier_for(tmp_path: Path, couch_url: str, sink: SmtpSink) -> Iterator[NotifierCli]:
    """A NotifierCli aimed at a sink of the test's own (a fixed port, or one with a login)."""
    cli = NotifierCli(tmp_path, couch_url=couch_url, sink=sink)
    try:
        yield cli
    finally:
        cli.close()


def seed(fake: FakeCouch, numbers: range) -> list[str]:
    """Write one message per number, in order; return their recipients."""
    docs = [message(n) for n in numbers]
    for doc in docs:
        fake.put(DB, doc)
    return [doc["to"] for doc in docs]


class FlakyRelay:
    """Sink hooks: every Nth new message fails once (a 451, or a connection dropped
    mid-DATA); two recipients fail at every attempt.

    Counting new messages rather than attempts keeps the test deterministic:
    a retry never lands on a fault by chance. The hooks run on the sink's
    one thread, and it asks ``drop`` before ``reject`` at every DATA.
    """

    def __init__(
        self, *, refuse_every: int, drop_every: int, always_refused: str, always_dropped: str
    ) -> None:
        self.refuse_every = refuse_every
        self.drop_every = drop_every
        self.always_refused = always_refused
        self.always_dropped = always_dropped
        self.tries: Counter[str] = Counter()
        self.order: dict[str, int] = {}
        self.failed_once: set[str] = set()

    def drop(self, info: ReceivedEnvelopeInfo) -> bool:
        [to] = info.rcpt_tos
        self.tries[to] += 1
        nth = self.order.setdefault(to, len(self.order) + 1)
        if to == self.always_dropped:
            return True
        if self.tries[to] == 1 and nth % self.drop_every == 0:
            self.failed_once.add(to)
            return True
        return False

    def reject(self, info: ReceivedEnvelopeInfo) -> str | None:
        [to] = info.rcpt_tos
        if to == self.always_refused:
            return "451 4.3.0 try again later"
        if self.tries[to] == 1 and self.order[to] % self.refuse_every == 0:
            self.failed_once.add(to)
            return "451 4.3.0 try again later"
        return None


def test_an_unreachable_relay_holds_messages_without_using_up_their_attempts(
    fake_couch: FakeCouch, couch_url: str, tmp_path: Path, scenario_record: ScenarioRecord
) -> None:
    # Down for longer than max_age: were the outage counted against the
    # messages, every queued one would be dead-lettered.
    outage = 3.0
    recipients = seed(fake_couch, range(5))
    with SmtpSink(port=free_port()) as sink, notifier_for(tmp_path, couch_url, sink) as cli:
        process = cli.start(cli.config(smtp=SMTP, worker=WORKER, delivery={"max_age": outage / 2}))
        wait_until(lambda: len(sink.messages) >= 5, SETTLE_TIMEOUT, "the first emails", process)
        sink.stop()
        queued = seed(fake_couch, range(5, 15))
        process.wait_for_log("cannot connect to SMTP server")
        time.sleep(outage)
        sink.start()
        back = time.monotonic()
        wait_until(lambda: len(sink.messages) >= 15, SETTLE_TIMEOUT, "the queued emails", process)
        assert process.stop() == 0, process.output()
        sent = sink.count_by_recipient()
        arrived = first_arrival(sink, queued, after=back)

    recipients += queued
    scenario_record.scenario = "4a. SMTP: relay down for a while"
    scenario_record.faults = (
        f"no listener for {outage:g} s after the first warning, 10 messages queued"
    )
    scenario_record.count(sent, recipients)
    assert arrived is not None
    scenario_record.recovery_seconds = round(arrived - back, 2)
    scenario_record.notes = (
        "max_age 1.5 s < the outage; sending paused and probed; no attempt used; "
        "one warning per outage"
    )
    assert scenario_record.lost == 0
    assert scenario_record.duplicates_seen == 0
    assert sent == {r: 1 for r in recipients}
    docs = docs_by_recipient(fake_couch)
    assert [doc["_id"] for doc in docs.values() if FAILED in doc] == []
    assert all(doc[NOTIFIED] is True for doc in docs.values())
    assert {r: docs[r][RECORD]["attempts"] for r in queued} == {r: 1 for r in queued}, (
        "waiting for an unreachable relay must not count as an attempt"
    )
    assert process.count("the relay looks down: cannot connect") == 1, "one warning per outage"
    assert process.count("the relay accepts mail again") == 1


def test_transient_faults_are_deferred_and_a_poison_message_is_dead_lettered_at_max_age(
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
    notifier_cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    stuck_451 = "always-451@example.com"
    stuck_drop = "always-dropped@example.com"
    recipients = seed(fake_couch, range(12))
    fake_couch.put(DB, message(100, _id="poison-451", to=stuck_451))
    fake_couch.put(DB, message(101, _id="poison-drop", to=stuck_drop))
    recipients += seed(fake_couch, range(12, 24))
    # A tombstone after everything: the worker skips it, but its row moves the
    # checkpoint, which may pass it only once both poison messages are settled.
    fake_couch.put(DB, {"_id": "fence", "_deleted": True})  # born deleted: never a message
    relay = FlakyRelay(
        refuse_every=4, drop_every=5, always_refused=stuck_451, always_dropped=stuck_drop
    )
    smtp_sink.drop = relay.drop
    smtp_sink.reject = relay.reject

    def checkpoint_passed_the_fence() -> bool:
        doc = read_checkpoint(fake_couch)
        return doc is not None and "fence" not in fake_couch.changed_since(DB, doc["since"])

    delivery = {"retry_first": 0.3, "retry_max": 0.6, "max_age": 3.0}
    process = notifier_cli.start(notifier_cli.config(smtp=SMTP, worker=WORKER, delivery=delivery))
    ids = [f"msg-{n:05d}" for n in range(24)] + ["poison-451", "poison-drop"]
    wait_until(lambda: all_settled(fake_couch, ids), SETTLE_TIMEOUT, "every message", process)
    # While it runs, not only at shutdown: one bad message must not hold back
    # the checkpoint of the messages after it.
    wait_until(checkpoint_passed_the_fence, 10.0, "the checkpoint to pass the poison", process)
    assert process.stop() == 0, process.output()
    sent = smtp_sink.count_by_recipient()

    scenario_record.scenario = "4b. SMTP: 451s and connections dropped mid-DATA"
    scenario_record.faults = (
        "451 once for every 4th message, connection dropped mid-DATA once for every 5th; "
        "one message always 451, one always dropped"
    )
    scenario_record.count(sent, recipients)
    scenario_record.notes = (
        f"{len(relay.failed_once)} deferred once; 2 dead-lettered at max_age (3 s here); "
        "the checkpoint moved past them"
    )
    assert scenario_record.lost == 0
    assert scenario_record.duplicates_seen == 0
    assert sent == {r: 1 for r in recipients}
    # 26 messages reach the relay: 10 are a 4th or a 5th, at most 2 of those poison.
    assert len(relay.failed_once) >= 8
    docs = docs_by_recipient(fake_couch)
    attempts = {r: docs[r][RECORD]["attempts"] for r in recipients}
    assert attempts == {r: 2 if r in relay.failed_once else 1 for r in recipients}

    # Tried on the schedule (0.3 s doubling to 0.6 s) until max_age, not fewer.
    assert relay.tries[stuck_451] >= 4 and relay.tries[stuck_drop] >= 4
    assert NOTIFIED not in docs[stuck_451] and NOTIFIED not in docs[stuck_drop]
    assert re.fullmatch(
        r"gave up after \d+ attempts over 3\.\ds; last reply: SMTP server refused the "
        r"message: 451 4\.3\.0 try again later",
        docs[stuck_451][FAILED]["reason"],
    ), docs[stuck_451][FAILED]["reason"]
    # The client only sees the connection end: the reason says so.
    assert docs[stuck_drop][FAILED]["reason"].endswith(
        "last reply: SMTP send failed: SMTPServerDisconnected: Unexpected EOF received"
    )
    assert docs[stuck_451][FAILED]["attempts"] == relay.tries[stuck_451]


NO_LISTENER = "a free port nothing listens on"

# Each case: what is wrong, the [smtp] keys and the password that make it so,
# the exit status README documents for it, and what the message must say.
START_UP_FAILURES = [
    ("login refused", {}, "wrong-password", 77, "refused the login for [smtp] username"),
    ("TLS handshake fails", {"security": "tls"}, SMTP_PASSWORD, 76, "TLS failed: "),
    ("STARTTLS not offered", {"security": "starttls"}, SMTP_PASSWORD, 76, "STARTTLS extension"),
    ("relay unreachable", {"port": NO_LISTENER}, SMTP_PASSWORD, 76, "cannot connect to SMTP"),
]


@pytest.mark.parametrize(
    ("case", "smtp", "password", "status", "says"),
    START_UP_FAILURES,
    ids=[case[0].replace(" ", "-") for case in START_UP_FAILURES],
)
def test_a_relay_that_refuses_us_at_start_up_stops_the_worker_before_any_email(
    fake_couch: FakeCouch,
    couch_url: str,
    tmp_path: Path,
    scenario_record: ScenarioRecord,
    case: str,
    smtp: dict[str, Any],
    password: str,
    status: int,
    says: str,
) -> None:
    recipients = seed(fake_couch, range(3))
    with (
        SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD) as sink,
        notifier_for(tmp_path, couch_url, sink) as cli,
    ):
        smtp = {k: free_port() if v is NO_LISTENER else v for k, v in smtp.items()}
        base = {**SMTP, "username": SMTP_USER}
        failing = cli.start(
            cli.config(smtp={**base, **smtp}, worker=WORKER),
            env={"NOTIFIER_SMTP_PASSWORD": password},
        )
        assert failing.wait(timeout=30) == status, failing.output()
        assert says in failing.output()
        assert password not in failing.output(), "a password never reaches the log"
        assert sink.messages == []
        assert [d["_id"] for d in messages(fake_couch) if NOTIFIED in d or FAILED in d] == [], (
            "a relay that refuses us says nothing about the messages: none is dead-lettered"
        )

        # Fixed: the same messages all go out, once.
        fixed = cli.start(
            cli.config(smtp=base, worker=WORKER), env={"NOTIFIER_SMTP_PASSWORD": SMTP_PASSWORD}
        )
        wait_until(lambda: len(sink.messages) >= 3, SETTLE_TIMEOUT, "the emails", fixed)
        assert fixed.stop() == 0, fixed.output()
        sent = sink.count_by_recipient()

    scenario_record.scenario = f"4c. SMTP: {case} at start-up"
    scenario_record.faults = f"exit {status} before any email"
    scenario_record.count(sent, recipients)
    scenario_record.notes = "nothing dead-lettered; all sent once after the fix"
    assert scenario_record.lost == 0
    assert sent == {r: 1 for r in recipients}


def test_a_login_refused_while_running_stops_the_worker_and_dead_letters_nothing(
    fake_couch: FakeCouch, couch_url: str, tmp_path: Path, scenario_record: ScenarioRecord
) -> None:
    recipients = seed(fake_couch, range(3))
    smtp = {**SMTP, "username": SMTP_USER}
    with (
        SmtpSink(username=SMTP_USER, password=SMTP_PASSWORD, port=free_port()) as sink,
        notifier_for(tmp_path, couch_url, sink) as cli,
    ):
        config = cli.config(smtp=smtp, worker=WORKER)
        process = cli.start(config, env={"NOTIFIER_SMTP_PASSWORD": SMTP_PASSWORD})
        wait_until(lambda: len(sink.messages) >= 3, SETTLE_TIMEOUT, "the first emails", process)
        # The relay's password is changed and it restarts, closing our
        # connections: the next send has to log in again, and is refused.
        sink.stop()
        sink.password = "rotated-password"
        sink.start()
        later = seed(fake_couch, range(3, 6))
        assert process.wait(timeout=SETTLE_TIMEOUT) == 77, process.output()
        assert "refused the login" in process.output()
        undelivered = [d["_id"] for d in messages(fake_couch) if NOTIFIED not in d]
        assert undelivered == ["msg-00003", "msg-00004", "msg-00005"]
        assert [d["_id"] for d in messages(fake_couch) if FAILED in d] == []

        fixed = cli.start(config, env={"NOTIFIER_SMTP_PASSWORD": "rotated-password"})
        wait_until(lambda: len(sink.messages) >= 6, SETTLE_TIMEOUT, "the later emails", fixed)
        assert fixed.stop() == 0, fixed.output()
        sent = sink.count_by_recipient()

    recipients += later
    scenario_record.scenario = "4d. SMTP: login refused while running"
    scenario_record.faults = "relay password rotated mid-run: exit 77"
    scenario_record.count(sent, recipients)
    scenario_record.notes = "nothing dead-lettered; the rest sent once after the fix"
    assert scenario_record.lost == 0
    assert sent == {r: 1 for r in recipients}


class TlsRelay:
    """An aiosmtpd relay that offers STARTTLS (self-signed), counting what it accepts."""

    def __init__(self, tmp_path: Path, port: int) -> None:
        cert, key = self_signed_certificate(tmp_path)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        self.recipients: Counter[str] = Counter()
        self.controller = Controller(
            self, hostname="127.0.0.1", port=port, tls_context=context, server_hostname="relay"
        )

    async def handle_DATA(self, server: object, session: object, envelope: Envelope) -> str:
        self.recipients.update(envelope.rcpt_tos)
        return "250 OK"


def test_a_relay_that_stops_offering_starttls_while_running_stops_the_worker(
    fake_couch: FakeCouch, couch_url: str, tmp_path: Path, scenario_record: ScenarioRecord
) -> None:
    port = free_port()
    relay = TlsRelay(tmp_path, port)
    recipients = seed(fake_couch, range(2))
    # Same port, no STARTTLS: a relay reconfigured, or a man in the middle
    # stripping the capability. Nothing may go out in clear text.
    plain = SmtpSink(port=port)
    with notifier_for(tmp_path, couch_url, plain) as cli:
        relay.controller.start()
        try:
            process = cli.start(
                cli.config(smtp={**SMTP, "security": "starttls", "tls_verify": False})
            )
            wait_until(lambda: sum(relay.recipients.values()) >= 2, 20.0, "2 emails", process)
        finally:
            relay.controller.stop()
        with plain:
            seed(fake_couch, range(2, 4))
            # The worker either stops, or says it waits for the relay: no need
            # to wait the outage out to tell which.
            wait_until(
                lambda: not process.running or process.count("STARTTLS") > 0,
                SETTLE_TIMEOUT,
                "the worker to meet the relay without STARTTLS",
            )
            waits = [line for line in process.lines("STARTTLS") if "retrying" in line]
            assert waits == [], "the worker waits for the relay instead of stopping"
            assert process.wait(timeout=15) == 76, process.output()
            assert "STARTTLS" in process.output()
            assert plain.messages == [], "nothing in clear text"
    assert [d["_id"] for d in fake_couch.docs(DB) if FAILED in d] == []
    scenario_record.scenario = "4e. SMTP: STARTTLS withdrawn while running"
    scenario_record.faults = "relay restarted without STARTTLS: exit 76"
    scenario_record.count(relay.recipients, recipients)
    scenario_record.notes = "2 sent over TLS before; 2 kept for later, none in clear text"
    assert scenario_record.lost == 0
