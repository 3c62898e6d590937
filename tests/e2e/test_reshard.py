"""Rolling reshard: a new layout (worker count) starts while the old one runs.

While two layouts overlap, two workers own each document, one per layout.
Per-document claims (``[worker] claims``) let CouchDB's ``_rev`` pick exactly
one of them to send. These tests run the real ``notifier run`` processes,
one per worker, against a real SMTP server (aiosmtpd) while messages keep
arriving at a steady rate, change the worker count the way an operator does
(start the new layout's workers, then stop the old layout's), and count what
every recipient received.

* :func:`test_rolling_reshard_under_load_sends_each_message_once` runs on
  PouchDB Server (integer seqs) through 2 -> 3 -> 1 -> 2 workers, the last
  reshard with a crash;
* :func:`test_overlapping_layouts_on_opaque_seqs_send_each_message_once` is a
  smaller 2 -> 3 overlap on the socket-served fake CouchDB, whose seqs are
  CouchDB 3's opaque strings.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from realservers import CouchTestDB, unique_db_name
from reliability.harness import NotifierCli, NotifierProcess, reporting, wait_until
from scenario import ScenarioRecord, message

from notifier.claim import CLAIM
from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.worker import FAILED, NOTIFIED, is_settled

pytestmark = pytest.mark.e2e

MAX_PARALLEL = 10
SMTP_TIMEOUT = 2.0
CLAIM_TTL = 4.0  # a frozen worker's claims are taken over after this long
#: Seconds both layouts run side by side once the new one is following.
OVERLAP = 3.0

RUNNING = "changes feed connected; running"
_STOPPED = re.compile(r"worker (\d+/\d+) stopped: sent (\d+)")


def worker_settings(**overrides: Any) -> dict[str, Any]:
    """The ``[worker]`` section: small timings so a reshard takes seconds."""
    return {
        "max_parallel": MAX_PARALLEL,
        "claims": True,
        "claim_ttl": CLAIM_TTL,
        "lease_ttl": 3.0,
        "checkpoint_interval": 0.5,
        "drain_timeout": 5.0,
        **overrides,
    }


# -- the steady writer ---------------------------------------------------------------


@dataclass
class SteadyWriter:
    """Writes ``total`` messages (``message(n)``, one recipient each) in a thread,
    ``batch`` at a time, at ``rate`` messages a second on a fixed schedule.

    The last ``hold_back`` messages wait until :attr:`gate` is set, so that
    the last step of a scenario always happens while messages still arrive,
    however slow the machine is; on a machine that keeps up the gate is open
    before the writer gets there and it never pauses.
    """

    write: Callable[[list[dict[str, Any]]], None]
    total: int
    rate: float
    batch: int = 10
    hold_back: int = 0
    gate: threading.Event = field(default_factory=threading.Event)
    written: int = 0
    error: BaseException | None = None
    _thread: threading.Thread | None = None

    @property
    def recipients(self) -> list[str]:
        return [message(n)["to"] for n in range(self.total)]

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="steady-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.batch / self.rate
        schedule = time.monotonic()
        try:
            n = 0
            while n < self.total:
                if n >= self.total - self.hold_back and not self.gate.is_set():
                    self.gate.wait(120.0)
                    schedule = time.monotonic()
                count = min(self.batch, self.total - n)
                self.write([message(i) for i in range(n, n + count)])
                n += count
                self.written = n
                schedule += interval
                time.sleep(max(0.0, schedule - time.monotonic()))
        except BaseException as e:  # reported by wait_written / join
            self.error = e

    def wait_written(self, count: int, timeout: float = 120.0) -> None:
        wait_until(
            lambda: self.written >= count or self.error is not None,
            timeout,
            f"{count} messages written",
            interval=0.02,
        )
        self.check()

    def join(self, timeout: float = 120.0) -> None:
        assert self._thread is not None
        self.gate.set()
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the writer is stuck at {self.written} messages"
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise AssertionError(f"writing messages failed: {self.error!r}") from self.error


def pouchdb_bulk(db: CouchTestDB) -> Callable[[list[dict[str, Any]]], None]:
    def write(docs: list[dict[str, Any]]) -> None:
        for row in db.bulk(docs):
            assert row.get("ok"), row

    return write


def fake_puts(fake: FakeCouch, database: str) -> Callable[[list[dict[str, Any]]], None]:
    def write(docs: list[dict[str, Any]]) -> None:
        for doc in docs:
            fake.put(database, doc)

    return write


# -- layouts -------------------------------------------------------------------------


def start_layout(cli: NotifierCli, config: Path, count: int) -> list[NotifierProcess]:
    """Start workers 0..count-1 of a layout and wait until each follows its feed."""
    workers = [cli.start(config, worker_id=i, worker_count=count) for i in range(count)]
    for worker in workers:
        wait_until(lambda w=worker: RUNNING in w.output(), 30.0, "the worker to run", worker)
    return workers


def stop_layout(workers: Sequence[NotifierProcess]) -> list[int]:
    """SIGTERM every worker at once, as ``systemctl stop`` of several units does;
    return their exit statuses."""
    for worker in workers:
        worker.send(signal.SIGTERM)
    return [worker.wait(timeout=20.0) for worker in workers]


def sent_by(worker: NotifierProcess) -> tuple[str, int]:
    """The worker's slot ("0/2") and how many emails its stop line says it sent."""
    found = _STOPPED.search(worker.output())
    assert found is not None, f"no stop line in the log:\n{worker.output()}"
    return found.group(1), int(found.group(2))


def slot(worker: NotifierProcess) -> str:
    """The worker's slot as the daemon writes it: "0/2"."""
    args = worker.args
    return f"{args[args.index('--worker-id') + 1]}/{args[args.index('--worker-count') + 1]}"


def claim_holder(doc: dict[str, Any]) -> str | None:
    claim = doc.get(CLAIM)
    return claim.get("worker") if isinstance(claim, dict) else None


def expires_at(doc: dict[str, Any]) -> float:
    return float(doc[CLAIM]["expires_at"])


def sent_at(doc: dict[str, Any]) -> float:
    """When the email of a marked doc was accepted (epoch seconds)."""
    return datetime.fromisoformat(doc["notification"]["sentAt"]).timestamp()


def few(items: Any, limit: int = 10) -> str:
    items = sorted(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return f"{items[:limit]}{more}"


def wait_caught_up(
    sink: SmtpSink, writer: SteadyWriter, worker: NotifierProcess, timeout: float = 60.0
) -> None:
    """Wait until every message written so far has had its email.

    Call it once the old layout has stopped: what it left is the new one's
    to send, and the new one has worked through its backlog when it has.
    """
    wanted = {message(n)["to"] for n in range(writer.written)}
    wait_until(
        lambda: wanted <= set(sink.count_by_recipient()),
        timeout,
        f"the new layout to send all of the first {len(wanted)} messages",
        worker,
        interval=0.1,
    )


def freeze_one_holding_claims(
    workers: Sequence[NotifierProcess], couch: CouchTestDB, attempts: int = 10
) -> tuple[NotifierProcess, float, dict[str, dict[str, Any]]]:
    """SIGSTOP one of ``workers`` at a moment it holds claims on unsettled messages.

    Returns the frozen worker, when it froze (epoch seconds) and the
    messages it holds, by id. A frozen process looks to the other workers
    exactly like one that crashed on another machine: its claims stay, and
    since its pid still exists the shortcut for a dead process on this host
    does not apply, so they must expire first. (A SIGKILL would let this
    host's workers take them over at once.)

    While two layouts overlap, the one that claims a message first sends
    it, and the other waits; which one keeps winning is a race. So every
    worker is frozen for a moment, the first in ``workers`` that holds a
    claim stays frozen and the others go on. If none holds one, all go on
    and it is tried again; after ``attempts`` the first stays frozen,
    holding none (the test then fails, after its other checks).
    """
    for attempt in range(attempts):
        for worker in workers:
            worker.send(signal.SIGSTOP)
        frozen_at = time.time()
        time.sleep(0.3)  # requests they had already sent finish
        docs = [d for d in couch.all_docs() if not is_settled(d)]
        held = {slot(w): {d["_id"]: d for d in docs if claim_holder(d) == slot(w)} for w in workers}
        victim = next((w for w in workers if held[slot(w)]), None)
        if victim is not None or attempt == attempts - 1:
            victim = victim or workers[0]
            for worker in workers:
                if worker is not victim:
                    worker.send(signal.SIGCONT)
            return victim, frozen_at, held[slot(victim)]
        for worker in workers:
            worker.send(signal.SIGCONT)
        time.sleep(0.3)
    raise AssertionError("unreachable")


def duplicates(counts: Counter[str]) -> int:
    return sum(n - 1 for n in counts.values() if n > 1)


def unsettled(docs: list[dict[str, Any]]) -> list[str]:
    return [d["_id"] for d in docs if not is_settled(d)]


def check_docs(docs: list[dict[str, Any]], total: int) -> None:
    """Every message is marked notified, none dead-lettered, and no claim is left."""
    docs = [d for d in docs if not d["_id"].startswith("_design/")]  # the retry index
    assert len(docs) == total
    not_marked = [d["_id"] for d in docs if d.get(NOTIFIED) is not True]
    assert not_marked == [], f"{len(not_marked)} messages not marked, e.g. {not_marked[:5]}"
    failed = [(d["_id"], d[FAILED]) for d in docs if FAILED in d]
    assert failed == [], f"dead letters: {failed[:5]}"
    claimed = [(d["_id"], d[CLAIM]) for d in docs if CLAIM in d]
    assert claimed == [], f"{len(claimed)} docs keep a claim after their mark, e.g. {claimed[:3]}"


# -- PouchDB Server: 2 -> 3 -> 1 -> 2 with a crash -----------------------------------

MESSAGES = 3000
RATE = 120.0  # messages a second: the writer runs for about 25 s


@pytest.fixture
def cli(
    request: pytest.FixtureRequest, tmp_path: Path, couch: CouchTestDB, smtp_sink: SmtpSink
) -> Iterator[NotifierCli]:
    """``notifier run`` processes against the test's PouchDB database."""
    yield from reporting(
        request, NotifierCli(tmp_path, couch_url=couch.url, sink=smtp_sink, database=couch.name)
    )


def test_rolling_reshard_under_load_sends_each_message_once(
    couch: CouchTestDB,
    smtp_sink: SmtpSink,
    cli: NotifierCli,
    scenario_record: ScenarioRecord,
) -> None:
    """3,000 messages arrive at 120/s while the fleet goes 2 -> 3 -> 1 -> 2 workers.

    Each reshard starts the new layout's workers, lets both layouts run for
    a few seconds, then stops the old layout's with SIGTERM (each must exit
    0). The next reshard begins once the new layout has caught up with the
    writer, as an operator would check before changing the fleet again. A
    new layout has no checkpoint and starts from the beginning of the
    filtered feed, except in the last step: layout 2 comes back and resumes
    from the checkpoints it left in phase 2, far behind.

    In the last reshard (1 -> 2) a worker crashes mid-overlap, at a moment
    it holds claims, as a worker on another machine would: it freezes
    (SIGSTOP), stays frozen until the other layout has taken its claims
    over, and is then SIGKILLed. Its claims are never released, and since
    its pid still exists while it is frozen, the shortcut for a dead process
    on this host does not apply: each message it had claimed may be sent by
    the other layout only once the claim has expired (``claim_ttl``), and
    then must be. Those whose emails the relay had already accepted are
    sent twice: only they may be, at most ``max_parallel``.

    The harder case is preferred: the old layout's worker crashes and is not
    restarted, as an operator would do, since it was about to be stopped
    anyway. (Restarting the same slot would take its own claims back at
    once.) But while layouts overlap, whichever claims a message first
    sends it and the other waits, and which layout keeps winning is a race;
    when the old worker holds no claim, a new layout's worker that does
    crashes instead, and is restarted, as systemd does, before the old
    layout is stopped as planned. The summary line says which. The writer
    keeps its last 600 messages for the last reshard, and waits for it if it
    gets there first, so the crash always happens under load.
    """
    smtp_sink.delay = 0.01  # a relay that takes a moment keeps sends in flight
    config = cli.config(
        couch={"checkpoint_database": unique_db_name("checkpoints"), "heartbeat": 1.0},
        smtp={"timeout": SMTP_TIMEOUT},
        worker=worker_settings(),
    )
    writer_db = CouchTestDB(couch.url, couch.name)  # its own connection, for its thread
    writer = SteadyWriter(pouchdb_bulk(writer_db), MESSAGES, RATE, hold_back=600)
    phases: list[str] = []  # "2 -> 3 6.1s (+2.0s to catch up)", for the summary
    stops: list[tuple[str, int]] = []  # (slot, exit status) of every graceful stop
    graceful: list[NotifierProcess] = []
    restarted: list[NotifierProcess] = []

    def stop_old(workers: list[NotifierProcess]) -> None:
        for worker, status in zip(workers, stop_layout(workers), strict=True):
            stops.append((slot(worker), status))
        graceful.extend(workers)

    started = time.monotonic()
    writer.start()
    old = start_layout(cli, config, 2)
    phases.append(f"start 2 {time.monotonic() - started:.1f}s")

    for count, written in ((3, 400), (1, 1100)):
        writer.wait_written(written)
        begun = time.monotonic()
        new = start_layout(cli, config, count)
        time.sleep(OVERLAP)
        stop_old(old)
        stopped = time.monotonic()
        wait_caught_up(smtp_sink, writer, new[0])
        phases.append(
            f"{len(old)} -> {count} {stopped - begun:.1f}s "
            f"(+{time.monotonic() - stopped:.1f}s to catch up)"
        )
        old = new

    # 1 -> 2, and a worker crashes mid-overlap.
    writer.wait_written(1800)
    writer.gate.set()
    begun = time.monotonic()
    (retiring,) = old
    new = start_layout(cli, config, 2)
    written_at_crash = writer.written
    victim, frozen_at, orphans = freeze_one_holding_claims([retiring, *new], couch)
    survivors = new if victim is retiring else [retiring]
    # Nobody may send them before their claims expire; then the other layout must.
    wait_until(
        lambda: not unsettled([d for d in couch.all_docs() if d["_id"] in orphans]),
        CLAIM_TTL + 30.0,
        f"the other layout to take over {sorted(orphans)}",
        survivors[0],
        interval=0.2,
    )
    victim.kill()
    if victim is not retiring:
        # systemd restarts a failed unit of the new layout; the operator
        # then retires the old one as planned.
        index = new.index(victim)
        new[index] = cli.start(config, worker_id=index, worker_count=2)
        restarted.append(new[index])
        wait_until(lambda: RUNNING in new[index].output(), 30.0, "the restart", new[index])
        stop_old([retiring])
    phases.append(f"1 -> 2 with a crash {time.monotonic() - begun:.1f}s")

    writer.join()
    writer_db.close()
    wait_until(
        lambda: len(smtp_sink.count_by_recipient()) >= MESSAGES,
        120.0,
        "an email to every recipient",
        new[0],
    )
    deadline = time.monotonic() + 60.0
    while unsettled(docs := couch.all_docs()) and time.monotonic() < deadline:
        time.sleep(0.5)
    stop_old(new)
    total = time.monotonic() - started

    counts = smtp_sink.count_by_recipient()
    scenario_record.count(counts, writer.recipients)
    doubled = sorted(r for r, n in counts.items() if n > 1)
    by_id = {d["_id"]: d for d in docs}
    takeover = max(
        (sent_at(by_id[i]) - frozen_at for i in orphans if NOTIFIED in by_id[i]), default=0.0
    )
    per_worker = " ".join(f"{s}={n}" for s, n in map(sent_by, graceful))
    # Every layout took part: each worker stopped gracefully sent something
    # (a restarted one may have had nothing left to do).
    idle = [slot(w) for w in graceful if sent_by(w)[1] == 0 and w not in restarted]
    print(
        f"\nreshard 2->3->1->2 on PouchDB: {MESSAGES} messages at {RATE:g}/s, "
        f"{len(smtp_sink.messages)} emails, {duplicates(counts)} duplicates "
        f"(bound {MAX_PARALLEL}), {scenario_record.lost} lost; {'; '.join(phases)}; "
        f"{slot(victim)} crashed at {written_at_crash} written with {len(orphans)} claims "
        f"left, sent by the other layout {takeover:.1f}s after; total {total:.1f}s; "
        f"sent per worker: {per_worker}"
    )

    assert [s for s in stops if s[1] != 0] == [], "every graceful stop exits 0"
    assert scenario_record.lost == 0, f"lost: {few(set(writer.recipients) - set(counts))}"
    assert set(counts) == set(writer.recipients), "no email to anyone else"
    assert duplicates(counts) <= MAX_PARALLEL, f"{len(doubled)} resent: {few(doubled)}"
    # A resend can only be a message the dead worker had claimed and not marked.
    assert set(doubled) <= {d["to"] for d in orphans.values()}, "duplicates not due to the crash"
    check_docs(docs, MESSAGES)
    assert {by_id[i]["notification"]["worker"] for i in orphans} <= set(map(slot, survivors)), (
        "the other layout sent and marked what the dead worker had claimed"
    )
    assert orphans, f"worker {slot(victim)} held no claim when it froze: the crash tested nothing"
    # Sent (sentAt: when the relay accepted it) only once the dead worker's claim expired.
    early = [
        (i, sent_at(by_id[i]) - expires_at(d))
        for i, d in orphans.items()
        if sent_at(by_id[i]) < expires_at(d) - 0.01
    ]
    assert early == [], "sent while the dead worker's claim was live: (id, seconds early)"
    assert idle == [], "workers that sent nothing"

    scenario_record.scenario = "8a. Rolling reshard: 2 -> 3 -> 1 -> 2 workers under load"
    scenario_record.faults = (
        f"{MESSAGES} messages at {RATE:g}/s throughout; layouts overlap {OVERLAP:g} s; "
        "in 1 -> 2 the old layout's worker freezes mid-overlap (SIGSTOP), then SIGKILL, "
        "not restarted"
    )
    scenario_record.duplicates_bound = MAX_PARALLEL
    scenario_record.recovery_seconds = takeover
    scenario_record.notes = (
        f"PouchDB Server; claim_ttl {CLAIM_TTL:g} s, max_parallel {MAX_PARALLEL}; "
        f"the dead worker left {len(orphans)} claims; recovery = crash to the last of "
        "them sent by the new layout (after the claim expired)"
    )


# -- the fake CouchDB on a socket: opaque seqs, 2 -> 3 -------------------------------

SMALL = 600
SMALL_RATE = 100.0


@pytest.fixture
def fake_cli(
    request: pytest.FixtureRequest, tmp_path: Path, couch_url: str, smtp_sink: SmtpSink
) -> Iterator[NotifierCli]:
    """``notifier run`` processes against the socket-served ``fake_couch``."""
    yield from reporting(request, NotifierCli(tmp_path, couch_url=couch_url, sink=smtp_sink))


@pytest.mark.fake_couch_only  # about the fake's CouchDB-3 seqs, next to PouchDB Server's
def test_overlapping_layouts_on_opaque_seqs_send_each_message_once(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, fake_cli: NotifierCli
) -> None:
    """600 messages arrive at 100/s while 2 workers become 3, with an overlap.

    The new layout starts from the beginning of the feed while the old one
    follows it live; with CouchDB 3's opaque seqs each email goes out once,
    and every stop is graceful, so no duplicate at all is allowed.
    """
    smtp_sink.delay = 0.01
    config = fake_cli.config(smtp={"timeout": SMTP_TIMEOUT}, worker=worker_settings())
    writer = SteadyWriter(fake_puts(fake_couch, fake_cli.database), SMALL, SMALL_RATE)

    started = time.monotonic()
    writer.start()
    old = start_layout(fake_cli, config, 2)
    writer.wait_written(150)
    new = start_layout(fake_cli, config, 3)
    time.sleep(OVERLAP)
    statuses = stop_layout(old)
    writer.join()
    wait_until(
        lambda: len(smtp_sink.count_by_recipient()) >= SMALL, 60.0, "every recipient", new[0]
    )
    deadline = time.monotonic() + 30.0
    while unsettled(docs := fake_couch.docs(fake_cli.database)) and time.monotonic() < deadline:
        time.sleep(0.2)
    statuses += stop_layout(new)

    counts = smtp_sink.count_by_recipient()
    print(
        f"\nreshard 2->3 on the fake (opaque seqs): {SMALL} messages, "
        f"{len(smtp_sink.messages)} emails, {duplicates(counts)} duplicates, "
        f"{time.monotonic() - started:.1f}s; sent per worker: "
        + " ".join(f"{s}={n}" for s, n in map(sent_by, old + new))
    )
    assert statuses == [0] * 5, "every graceful stop exits 0"
    missing = set(writer.recipients) - set(counts)
    assert not missing, f"{len(missing)} lost: {few(missing)}"
    doubled = [r for r, n in counts.items() if n > 1]
    assert not doubled, f"{duplicates(counts)} duplicates: {few(doubled)}"
    assert set(counts) == set(writer.recipients), "no email to anyone else"
    check_docs(docs, SMALL)
