"""Run the real ``notifier`` CLI as a subprocess in reliability scenarios.

A scenario starts the installed ``notifier`` command against a CouchDB (the
socket-served fake, PouchDB Server, or the CouchDB that COUCHDB_URL names,
reached through a :class:`~notifier.testing.remote.RemoteCouch`) and an SMTP
sink, breaks something, and then counts what arrived. This module holds the pieces every scenario
needs; ``conftest.py`` only wires them into fixtures. It is a plain module so
that any test file here can import it (``from harness import ...``): this
directory has no ``__init__.py``, so pytest puts it on the import path.

* :class:`NotifierCli` writes configs and starts processes for one test.
* :class:`NotifierProcess` is one running ``notifier run``: signal it, kill
  it, wait for it, read and count its log lines.
* :func:`wait_until` is the one bounded wait: it fails with what it waited
  for, and with the process log when a process is given.
* :func:`seed_messages` writes message docs into a :class:`FakeCouch` and
  remembers the seq of each write, which is how a test can tell where the
  worker resumed without ever ordering the opaque seqs.
* :class:`CheckpointWatch` samples a worker's checkpoint doc in a thread and
  checks, at every new value, that it never passes an unsettled message and
  never moves backwards.
* :func:`feed_requests` lists the ``_changes`` requests the fake answered,
  with their ``since``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest
from realservers import couch_settings
from scenario import NOTIFIER, TEST_DELIVERY, message, to_toml, wait_until

from notifier.checkpoint import checkpoint_id
from notifier.couch import seq_param
from notifier.shard import Shard
from notifier.testing.fake_couch import FakeCouch, FakeCouchError
from notifier.testing.remote import RemoteCouch
from notifier.testing.smtp import SmtpSink
from notifier.tracker import Seq
from notifier.worker import is_settled

#: The installed CLI, next to the interpreter running the tests (the venv's).
DB = "messages"
CHECKPOINTS = "workersequences"

# Variables the CLI reads that must not leak from the developer's shell into
# a scenario: each test says exactly how its worker is configured.
_CLEAN_ENV = (
    "NOTIFIER_CONFIG",
    "NOTIFIER_LOG_LEVEL",
    "NOTIFIER_LOG_FORMAT",  # the log lines are parsed as text
    "NOTIFIER_WORKER_COUNT",
    "NOTIFIER_COUCH_PASSWORD",
    "NOTIFIER_SMTP_PASSWORD",
    "JOURNAL_STREAM",  # would switch the log format to journald's
)


# The CLI's log format off the journal: "<date> <time> <LEVEL> <logger>: <message>".
_LOG_LINE = re.compile(r"^\S+ \S+ (?:WARNING|ERROR)\s+(\S+): (.*)$")
_WORKER_PREFIX = re.compile(r"^worker \d+/\d+: ")
_DIGITS = re.compile(r"\d+")


# -- configs -------------------------------------------------------------------------


def config_data(
    *,
    couch_url: str,
    sink: SmtpSink,
    database: str = DB,
    checkpoint_database: str = CHECKPOINTS,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, dict[str, Any]]:
    """A config as a TOML-shaped dict, with timings short enough for tests.

    ``overrides`` replace keys per section, e.g. ``{"worker": {"max_parallel": 5}}``.
    A heartbeat of 1 s gives an idle timeout of 3 s, so a stalled feed is
    noticed quickly; the checkpoint is written often so that a crash test sees
    it move.
    """
    data: dict[str, dict[str, Any]] = {
        "couch": {
            **couch_settings(couch_url),
            "database": database,
            "checkpoint_database": checkpoint_database,
            "heartbeat": 1.0,
            "request_timeout": 5.0,
        },
        "smtp": {"host": sink.host, "port": sink.port, "timeout": 10.0},
        "email": {"sender": "notify@example.com"},
        "worker": {"max_parallel": 10, "checkpoint_interval": 0.3, "drain_timeout": 5.0},
        "delivery": dict(TEST_DELIVERY),
    }
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return data


def write_config(path: Path, data: Mapping[str, Mapping[str, Any]]) -> Path:
    path.write_text(to_toml({k: dict(v) for k, v in data.items()}), encoding="utf-8")
    return path


# -- processes -----------------------------------------------------------------------


class NotifierProcess:
    """One ``notifier run`` subprocess; its stdout and stderr go to ``log_path``."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path, args: list[str]) -> None:
        self.proc = proc
        self.log_path = log_path
        self.args = args
        self.started_at = time.monotonic()

    def __repr__(self) -> str:
        state = "running" if self.running else f"exited {self.proc.returncode}"
        return f"<NotifierProcess pid={self.proc.pid} {state} log={self.log_path}>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def lines(self, containing: str) -> list[str]:
        """The log lines that contain ``containing``."""
        return [line for line in self.output().splitlines() if containing in line]

    def count(self, containing: str) -> int:
        return len(self.lines(containing))

    def warnings(self) -> Counter[str]:
        """WARNING and ERROR lines counted by kind: what they say, minus the details.

        The kind is the logger and the message up to its first colon, with
        the worker prefix dropped and digits masked, so that "changes feed
        interrupted: <error>" counts as one kind whatever the error. A kind
        seen more than once per incident is logged per retry.
        """
        kinds: Counter[str] = Counter()
        for line in self.output().splitlines():
            found = _LOG_LINE.match(line)
            if found is None:
                continue
            logger, text = found.group(1), _WORKER_PREFIX.sub("", found.group(2))
            kinds[_DIGITS.sub("#", f"{logger}: {text.split(':', 1)[0]}")] += 1
        return kinds

    def send(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would, and reap the process."""
        self.proc.kill()
        self.proc.wait()

    def wait(self, timeout: float) -> int:
        """The exit status; fails with the log if it does not exit within ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"notifier did not exit within {timeout:g}s:\n{self.output()}"
            ) from None

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Ask for a graceful stop and wait for the exit status."""
        self.send(sig)
        return self.wait(timeout)

    def wait_for_log(self, text: str, timeout: float = 15.0) -> None:
        wait_until(lambda: text in self.output(), timeout, f"the log to say {text!r}", self)


class NotifierCli:
    """Configs and ``notifier run`` processes for one test, all in ``workdir``.

    Every process it started is killed by :meth:`close` if it is still
    running, so a failing test never leaves a worker behind.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        couch_url: str,
        sink: SmtpSink,
        database: str = DB,
        checkpoint_database: str | None = None,
        couch: FakeCouch | RemoteCouch | None = None,
    ) -> None:
        self.workdir = workdir
        self.couch_url = couch_url
        self.sink = sink
        self.database = database
        #: On a real server (``couch`` a RemoteCouch) the logical database
        #: names become the unique ones ``couch`` maps them to.
        self.couch = couch
        self.checkpoint_database = checkpoint_database or real_name(couch, CHECKPOINTS)
        self.processes: list[NotifierProcess] = []
        self._configs = 0

    def config(self, **sections: Mapping[str, Any]) -> Path:
        """Write a config aimed at this test's servers (see :func:`config_data`).

        ``sections`` replace keys per section: ``config(worker={"max_parallel": 5})``.
        """
        self._configs += 1
        data = config_data(
            couch_url=self.couch_url,
            sink=self.sink,
            database=real_name(self.couch, self.database),
            checkpoint_database=self.checkpoint_database,
            overrides=sections,
        )
        return write_config(self.workdir / f"notifier-{self._configs}.toml", data)

    def start(
        self,
        config: Path | None = None,
        *,
        worker_id: int = 0,
        worker_count: int = 1,
        log_level: str = "INFO",
        env: Mapping[str, str] | None = None,
    ) -> NotifierProcess:
        """Start ``notifier run``; returns at once (see :meth:`start_ready`)."""
        config = config or self.config()
        args = [
            NOTIFIER,
            "run",
            "--worker-id",
            str(worker_id),
            "--worker-count",
            str(worker_count),
            "--config",
            str(config),
            "--log-level",
            log_level,
        ]
        environ = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
        environ.update(env or {})
        log_path = self.workdir / f"notifier-{len(self.processes) + 1}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=environ)
        process = NotifierProcess(proc, log_path, args)
        self.processes.append(process)
        return process

    def start_ready(self, config: Path | None = None, timeout: float = 20.0) -> NotifierProcess:
        """Start a worker and wait until it has read its checkpoint (it is about to follow)."""
        process = self.start(config)
        wait_until(
            lambda: (
                "starting from the beginning" in process.output()
                or "resuming from checkpoint" in process.output()
            ),
            timeout,
            "the worker to start",
            process,
        )
        return process

    def close(self) -> None:
        for process in self.processes:
            if process.running:
                process.kill()

    def logs(self) -> str:
        """Every process's log, one after the other, for a failure report."""
        return "\n".join(
            f"--- {' '.join(p.args[1:])} (pid {p.pid}, {p.log_path.name}) ---\n{p.output()}"
            for p in self.processes
        )


def reporting(request: pytest.FixtureRequest, cli: NotifierCli) -> Iterator[NotifierCli]:
    """For a fixture: ``yield from reporting(request, cli)``.

    Yields ``cli``; then kills whatever still runs and, when the test
    failed, adds every process's log to the report.
    """
    try:
        yield cli
    finally:
        cli.close()
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed and cli.processes:
            request.node.add_report_section("call", "notifier logs", cli.logs())


# -- the fake CouchDB ----------------------------------------------------------------


@dataclass
class Seeded:
    """Docs written by :func:`seed_messages`, in write order."""

    ids: list[str] = field(default_factory=list)
    recipients: list[str] = field(default_factory=list)
    #: The seq of each doc's write, exactly as the fake issued it (opaque).
    seqs: dict[str, str] = field(default_factory=dict)
    #: Already-settled docs written between the messages (see seed_messages).
    markers: list[str] = field(default_factory=list)

    def __add__(self, other: Seeded) -> Seeded:
        return Seeded(
            ids=self.ids + other.ids,
            recipients=self.recipients + other.recipients,
            seqs={**self.seqs, **other.seqs},
            markers=self.markers + other.markers,
        )

    def recipient_by_id(self) -> dict[str, str]:
        return dict(zip(self.ids, self.recipients, strict=True))


def seed_messages(
    fake: FakeCouch | RemoteCouch,
    count: int,
    start: int = 0,
    *,
    markers: bool = False,
    database: str = DB,
) -> Seeded:
    """Write ``count`` messages (``msg-NNNNN`` to ``userN@example.com``), one doc at a time.

    The seq of each write is read back with ``update_seq`` right after it,
    so call this only while nothing else writes to ``database`` (before the
    worker starts, or while the feed cannot deliver).

    With ``markers``, an already-notified doc (``old-NNNNN``) follows every
    message. The daemon never sees or touches them (the server-side filter
    drops them), so they never change: how many of them a seq has after it
    is a position that stays put while messages are marked, which lets a
    test order checkpoint seqs without reading them (see CheckpointWatch).
    """
    seeded = Seeded()
    for n in range(start, start + count):
        doc = message(n)
        fake.put(database, doc)
        seeded.ids.append(doc["_id"])
        seeded.recipients.append(doc["to"])
        seeded.seqs[doc["_id"]] = fake.update_seq(database)
        if markers:
            marker = f"old-{n:05d}"
            fake.put(database, message(n, _id=marker, notifiedRecipient=True))
            seeded.markers.append(marker)
    return seeded


@dataclass(frozen=True)
class FeedRequest:
    """A ``_changes`` request the fake answered."""

    feed: str
    since: str
    status: int


def feed_requests(
    fake: FakeCouch, *, database: str = DB, feed: str = "continuous"
) -> list[FeedRequest]:
    """The ``_changes`` requests of one feed type, in the order the fake answered them."""
    found = []
    for record in list(fake.requests):
        if record.path != f"/{database}/_changes":
            continue
        params = parse_qs(record.query)
        kind = params.get("feed", ["normal"])[0]
        if kind == feed:
            found.append(FeedRequest(kind, params.get("since", ["0"])[0], record.status))
    return found


ONE_WORKER = Shard(worker_id=0, worker_count=1)


def real_name(couch: FakeCouch | RemoteCouch | None, database: str) -> str:
    """The name a server knows ``database`` by: itself on the fake, a unique one on a real one."""
    return couch.real_name(database) if isinstance(couch, RemoteCouch) else database


def read_checkpoint(
    fake: FakeCouch | RemoteCouch, shard: Shard = ONE_WORKER, *, database: str = DB
) -> dict[str, Any] | None:
    """A worker's checkpoint doc, or None before its first write."""
    try:
        # The id names the database as the worker's config does.
        return fake.get(CHECKPOINTS, checkpoint_id(real_name(fake, database), shard))
    except FakeCouchError as e:
        if e.status == 404:  # the checkpoint database does not exist yet
            return None
        raise


@dataclass(frozen=True)
class CheckpointSample:
    since: Seq
    #: How many never-changing marker docs lie after ``since`` (its position).
    markers_after: int
    at: float


class CheckpointWatch:
    """Samples one worker's checkpoint doc from a thread, and audits every new value.

    Two properties are checked at each new checkpoint ``since``:

    * it never passes an unsettled message: every message doc whose latest
      change is at or before it is notified or dead-lettered (otherwise a
      restart from it would skip that message);
    * it never moves backwards: the number of marker docs after it (see
      :func:`seed_messages`) never grows. Seqs are opaque and the fake's are
      CouchDB-3 shaped, so the test orders them by what the server says lies
      after them, not by reading them.

    Sampling every few milliseconds catches each write in practice (the
    worker writes every ``checkpoint_interval``, 0.3 s by default here); a
    write that was missed cannot hide a regression in the values that were
    seen.
    """

    def __init__(
        self,
        fake: FakeCouch | RemoteCouch,
        *,
        shard: Shard = ONE_WORKER,
        database: str = DB,
        interval: float = 0.005,
    ) -> None:
        self.fake = fake
        self.seeded = Seeded()
        self.shard = shard
        self.database = database
        self.interval = interval
        self.samples: list[CheckpointSample] = []
        self.violations: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="checkpoint-watch", daemon=True)
        self._last_rev: str | None = None

    def track(self, seeded: Seeded) -> None:
        """Audit these docs too (call it as soon as they are written)."""
        self.seeded = self.seeded + seeded

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling, after one last sample (the checkpoint written at shutdown)."""
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5.0)
        self.sample()

    def __enter__(self) -> CheckpointWatch:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def backwards(self) -> list[tuple[CheckpointSample, CheckpointSample]]:
        """Consecutive samples where the checkpoint moved back."""
        pairs = zip(self.samples, self.samples[1:], strict=False)
        return [(a, b) for a, b in pairs if b.markers_after > a.markers_after]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as e:
                # A watch that died quietly would pass every test it guards.
                self.violations.append(f"the checkpoint watch failed: {e!r}")
                return

    def sample(self) -> None:
        """Read the checkpoint now, and audit it if it is a new write.

        Only the watch thread calls this until :meth:`stop` has joined it.
        """
        seeded = self.seeded  # one consistent view, whatever track() does meanwhile
        doc = read_checkpoint(self.fake, self.shard, database=self.database)
        if doc is None or doc["_rev"] == self._last_rev:
            return
        self._last_rev = doc["_rev"]
        since = doc["since"]
        after = set(self.fake.changed_since(self.database, seq_param(since)))
        # Settling only ever happens, and a doc's latest change only ever
        # moves later, so reading the docs after the checkpoint cannot make
        # a valid checkpoint look invalid.
        suspects = {d["_id"] for d in self._unsettled(seeded) if d["_id"] not in after}
        for doc_id in self._confirmed(since, suspects):
            self.violations.append(f"checkpoint {since!r} passed unsettled {doc_id}")
        markers = set(seeded.markers)
        self.samples.append(
            CheckpointSample(since, sum(1 for d in after if d in markers), time.monotonic())
        )

    def _unsettled(self, seeded: Seeded) -> Iterable[dict[str, Any]]:
        ids = set(seeded.ids)
        for doc in self.fake.docs(self.database):
            if doc["_id"] in ids and self.shard.owns(doc["_id"]) and not is_settled(doc):
                yield doc

    def _confirmed(self, since: Any, suspects: set[str]) -> list[str]:
        """The suspects that still lie at or before ``since`` when asked again.

        PouchDB Server can leave a document out of a ``_changes`` answer while
        it writes that document (the fake cannot: one lock), so a document
        being claimed or marked just then looked passed. Asked again after
        the documents were read, such a document lies after ``since``; one the
        checkpoint really passed still does not, unless it changed in those
        few milliseconds, and the next samples catch it then.
        """
        if not suspects:
            return []
        after = set(self.fake.changed_since(self.database, seq_param(since)))
        return sorted(suspects - after)


def first_arrival(sink: SmtpSink, recipients: Iterable[str], after: float = 0.0) -> float | None:
    """When the first email to any of ``recipients`` arrived after ``after`` (monotonic)."""
    wanted = set(recipients)
    times = [
        m.received_at
        for m in sink.messages
        if m.received_at >= after and any(r in wanted for r in m.rcpt_tos)
    ]
    return min(times, default=None)


def recipients_delivered(sink: SmtpSink) -> set[str]:
    return set(sink.count_by_recipient())


def messages(fake: FakeCouch) -> list[dict[str, Any]]:
    """The message documents (the retry index's design document left out)."""
    return [doc for doc in fake.docs(DB) if not doc["_id"].startswith("_design/")]


def docs_by_recipient(fake: FakeCouch) -> dict[str, dict[str, Any]]:
    """The message documents by their ``to``."""
    return {doc["to"]: doc for doc in fake.docs(DB) if "to" in doc}


def all_settled(fake: FakeCouch | RemoteCouch, ids: Iterable[str], *, database: str = DB) -> bool:
    wanted = set(ids)
    docs = [d for d in fake.docs(database) if d["_id"] in wanted]
    return len(docs) == len(wanted) and all(is_settled(d) for d in docs)
