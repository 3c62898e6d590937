"""``notifier check`` and ``notifier status`` against PouchDB Server and the fake.

Each test runs against a real PouchDB Server (the ``couch`` fixture) and/or
the fake CouchDB (in process through its httpx transport, or on a loopback
socket), with a real SMTP server (``SmtpSink``) on loopback.

PouchDB Server does not report ``pending`` on ``_changes``; the fake does, as
CouchDB 2+ does. So the pending estimate is a number on the fake and
"unknown" on PouchDB Server, and the tests say which they expect where.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from realservers import couch_settings, unique_db_name
from scenario import message

from notifier import config as config_module
from notifier import process
from notifier.check import CheckReport, run_checks
from notifier.checkpoint import CheckpointStore
from notifier.config import Config
from notifier.couch import CouchClient
from notifier.errors import CouchError, DeliveryError, SmtpLoginRefused
from notifier.lease import Holder, Lease
from notifier.retries import INDEX as RETRY_INDEX
from notifier.schedule import iso as iso_ms
from notifier.shard import Shard
from notifier.status import StatusReport, WorkerStatus, gather_status
from notifier.testing import free_port
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.server import FakeCouchServer
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import run_until

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

CHECKS = [
    "configuration",
    "CouchDB server",
    "CouchDB credentials",
    "messages database",
    "checkpoint database",
    "_selector filter",
    "settled flags",
    "deferred messages",
    "SMTP connection",
    "SMTP sender",
]
COUCH_AFTER_SERVER = CHECKS[2:8]


@dataclass
class Backend:
    """A CouchDB to test against: where it is, how to reach it, what it reports."""

    kind: str
    url: str
    database: str
    transport_of: FakeCouch | None = None
    #: Whether _changes answers carry CouchDB 2+'s `pending` field.
    reports_pending: bool = False

    @property
    def transport(self) -> httpx.AsyncBaseTransport | None:
        return None if self.transport_of is None else self.transport_of.transport()

    def client(self) -> CouchClient:
        return CouchClient(url=self.url, transport=self.transport)

    def config(
        self,
        sink: SmtpSink,
        *,
        environ: dict[str, str] | None = None,
        **sections: dict[str, Any],
    ) -> Config:
        data: dict[str, dict[str, Any]] = {
            "couch": {
                **couch_settings(self.url),
                "database": self.database,
                "checkpoint_database": unique_db_name("checkpoints"),
                "request_timeout": 5.0,
            },
            "smtp": {"host": sink.host, "port": sink.port, "timeout": 5.0},
            "email": {"sender": "notify@example.com"},
            "worker": {"checkpoint_interval": 0.2, "drain_timeout": 5.0},
        }
        for name, values in sections.items():
            data.setdefault(name, {}).update(values)
        return config_module.from_mapping(data, source="<test>", environ=environ or {})


@contextmanager
def backend_for(kind: str, request: pytest.FixtureRequest) -> Iterator[Backend]:
    if kind == "pouchdb":
        couch = request.getfixturevalue("couch")
        yield Backend(kind, couch.url, couch.name)
    elif kind == "fake":
        fake = FakeCouch(databases=["messages"])
        yield Backend(kind, IN_PROCESS_URL, "messages", fake, reports_pending=True)
    else:
        fake = FakeCouch(databases=["messages"])
        with FakeCouchServer(fake) as server:
            yield Backend(kind, server.url, "messages", reports_pending=True)


@pytest.fixture(params=["pouchdb", "fake", "fake-socket"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    with backend_for(request.param, request) as b:
        yield b


@pytest.fixture(params=["pouchdb", "fake"])
def store(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """A backend for status tests: PouchDB Server and the in-process fake."""
    with backend_for(request.param, request) as b:
        yield b


def by_name(report: CheckReport) -> dict[str, Any]:
    return {r.name: r for r in report.results}


def assert_marks(report: CheckReport, expected: dict[str, str]) -> None:
    marks = {r.name: r.mark for r in report.results}
    assert [r.name for r in report.results] == CHECKS, report.render()
    assert marks == {name: expected.get(name, "ok") for name in CHECKS}, report.render()


# -- check --------------------------------------------------------------------------


async def test_check_passes_on_a_good_setup_and_sends_nothing(
    backend: Backend, smtp_sink: SmtpSink
) -> None:
    config = backend.config(smtp_sink)
    report = await run_checks(config, transport=backend.transport)

    assert report.ok and report.first_error is None, report.render()
    assert_marks(report, {})
    text = report.render()
    assert text.endswith("all 10 checks passed\n")
    assert f"{backend.database!r} exists: 0 documents" in text
    # Not created by check: a worker creates it.
    assert "does not exist yet: the first worker creates it" in text
    assert smtp_sink.messages == [] and smtp_sink.refused == []
    if backend.transport_of is not None:
        # Selector in the query string too (PouchDB Server reads it there and
        # dies without it); the fake, like CouchDB, only takes it from the
        # body, so the check's success shows that the body had it as well.
        feed, _ = [r for r in backend.transport_of.requests if r.path.endswith("/_changes")]
        assert "filter=_selector" in feed.query and "selector=" in feed.query.replace(
            "filter=_selector", ""
        )
        assert feed.status == 200


async def test_check_reports_an_existing_checkpoint_database(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    async with store.client() as couch:
        await couch.create_database(config.couch.checkpoint_database)
        await couch.put_doc(store.database, message(1))
    report = await run_checks(config, transport=store.transport)
    results = by_name(report)
    assert report.ok, report.render()
    assert results["checkpoint database"].detail.endswith("exists: 0 documents")
    assert "exists: 1 documents" in results["messages database"].detail


@pytest.mark.parametrize("username", ["admin", None])
async def test_check_names_refused_couch_credentials_and_still_checks_smtp(
    smtp_sink: SmtpSink, username: str | None
) -> None:
    fake = FakeCouch(databases=["messages"], users={"admin": "the-right-one"})
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    environ = {"NOTIFIER_COUCH_PASSWORD": "s3cret-but-wrong"} if username else {}
    couch_section: dict[str, Any] = {"username": username} if username else {}
    config = backend.config(smtp_sink, environ=environ, couch=couch_section)

    report = await run_checks(config, transport=backend.transport)

    assert not report.ok
    assert_marks(
        report, {"CouchDB credentials": "FAIL", **dict.fromkeys(COUCH_AFTER_SERVER[1:], "skip")}
    )
    failed = by_name(report)["CouchDB credentials"]
    assert "401" in failed.detail
    if username:
        assert "refused the login of user 'admin'" in failed.detail
    else:
        assert "[couch] username is not set" in failed.detail
    assert "[couch] username" in failed.fix and "NOTIFIER_COUCH_PASSWORD" in failed.fix
    assert isinstance(report.first_error, CouchError)
    assert isinstance(report.first_error, PermissionError)
    text = report.render()
    assert "fix: " in text and "1 of 10 checks failed" in text
    assert "s3cret-but-wrong" not in text and "the-right-one" not in text


async def test_check_passes_with_the_right_couch_password(smtp_sink: SmtpSink) -> None:
    fake = FakeCouch(databases=["messages"], users={"admin": "the-right-one"})
    with FakeCouchServer(fake) as server:
        backend = Backend("fake-socket", server.url, "messages")
        config = backend.config(
            smtp_sink,
            environ={"NOTIFIER_COUCH_PASSWORD": "the-right-one"},
            couch={"username": "admin"},
        )
        report = await run_checks(config)
    assert report.ok, report.render()
    assert by_name(report)["CouchDB credentials"].detail == "accepted for user 'admin'"
    assert "the-right-one" not in report.render()


async def test_check_names_a_missing_database(store: Backend, smtp_sink: SmtpSink) -> None:
    config = store.config(smtp_sink, couch={"database": "no_such_db_here"})
    report = await run_checks(config, transport=store.transport)

    assert_marks(
        report,
        {
            "messages database": "FAIL",
            "_selector filter": "skip",
            "settled flags": "skip",
            "deferred messages": "skip",
        },
    )
    failed = by_name(report)["messages database"]
    assert failed.detail == f"'no_such_db_here' does not exist on {store.url}"
    assert "[couch] database" in failed.fix and "PUT" in failed.fix
    assert isinstance(report.first_error, CouchError)
    assert not isinstance(report.first_error, PermissionError)


async def test_check_names_an_unreachable_couchdb_and_still_checks_smtp(
    smtp_sink: SmtpSink,
) -> None:
    port = free_port()  # nothing listens there
    backend = Backend("nothing", f"http://127.0.0.1:{port}", "messages")
    report = await run_checks(backend.config(smtp_sink))

    assert_marks(report, {"CouchDB server": "FAIL", **dict.fromkeys(COUCH_AFTER_SERVER, "skip")})
    failed = by_name(report)["CouchDB server"]
    assert failed.detail.startswith(f"http://127.0.0.1:{port}: ")
    assert "ConnectError" in failed.detail
    assert "[couch] url" in failed.fix
    assert isinstance(report.first_error, CouchError)


async def test_check_names_an_unreachable_smtp_server(store: Backend, smtp_sink: SmtpSink) -> None:
    port = free_port()
    config = store.config(smtp_sink, smtp={"port": port})
    report = await run_checks(config, transport=store.transport)

    assert_marks(report, {"SMTP connection": "FAIL", "SMTP sender": "skip"})
    failed = by_name(report)["SMTP connection"]
    assert f"127.0.0.1:{port}" in failed.detail
    assert "[smtp] host and port" in failed.fix
    assert isinstance(report.first_error, DeliveryError)
    assert not isinstance(report.first_error, PermissionError)


@pytest.mark.parametrize("password", ["right-pw", "wrong-pw"])
async def test_check_logs_in_to_smtp_or_names_the_refused_login(password: str) -> None:
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    with SmtpSink(username="mailer", password="right-pw") as sink:
        config = backend.config(
            sink, environ={"NOTIFIER_SMTP_PASSWORD": password}, smtp={"username": "mailer"}
        )
        report = await run_checks(config, transport=backend.transport)

    if password == "right-pw":
        assert report.ok, report.render()
        assert "logged in as 'mailer'" in by_name(report)["SMTP connection"].detail
        return
    assert_marks(report, {"SMTP connection": "FAIL", "SMTP sender": "skip"})
    failed = by_name(report)["SMTP connection"]
    assert "refused the login for [smtp] username 'mailer'" in failed.detail
    assert "535" in failed.detail
    assert "NOTIFIER_SMTP_PASSWORD" in failed.fix
    assert isinstance(report.first_error, SmtpLoginRefused)
    assert "wrong-pw" not in report.render() and "right-pw" not in report.render()


async def test_check_finds_an_smtp_server_that_needs_a_login_nobody_configured() -> None:
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    with SmtpSink(username="mailer", password="pw") as sink:
        report = await run_checks(backend.config(sink), transport=backend.transport)
        assert sink.messages == []

    assert_marks(report, {"SMTP sender": "FAIL"})
    failed = by_name(report)["SMTP sender"]
    assert "530" in failed.detail
    assert "requires a login: set [smtp] username" in failed.fix
    assert isinstance(report.first_error, PermissionError)


# -- status -------------------------------------------------------------------------


def iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, tz=UTC).isoformat(timespec="seconds")


def find(report: StatusReport, worker_id: int, count: int) -> WorkerStatus:
    (found,) = [w for w in report.workers if (w.worker_id, w.worker_count) == (worker_id, count)]
    return found


def assert_aligned(text: str) -> None:
    """Every row of every table starts each column where its header does."""
    lines = text.splitlines()
    headers = [i for i, line in enumerate(lines) if line.lstrip().startswith("WORKER ")]
    assert headers
    for h in headers:
        header = lines[h]
        starts = [header.index(name) for name in ("SINCE", "CHECKPOINTED", "AGE", "PENDING")]
        starts += [header.index("STALE"), header.index("LEASE")]
        rows = []
        for line in lines[h + 1 :]:
            if not line.startswith("  ") or line.startswith("  no checkpoint"):
                break
            rows.append(line)
        assert rows
        for row in rows:
            for start in starts:
                assert row[start - 1] == " " and row[start] != " ", (row, start, text)


@asynccontextmanager
async def seeded(backend: Backend, count: int) -> AsyncIterator[tuple[CouchClient, list[Any]]]:
    """A client, after writing `count` messages; yields it and their seqs, in feed order."""
    async with backend.client() as couch:
        for n in range(count):
            await couch.put_doc(backend.database, message(n))
        feed = await couch.request("GET", f"/{backend.database}/_changes")
        yield couch, [row["seq"] for row in feed["results"]]


async def test_status_shows_every_layout_its_leases_and_stale_workers(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    ckdb, db = config.couch.checkpoint_database, store.database
    now = time.time()
    async with seeded(store, 6) as (couch, seqs):
        assert len(seqs) == 6
        # Layout of 1: caught up, written by the worker's own checkpoint store,
        # with a live lease (as a running worker holds it).
        one = Shard(worker_id=0, worker_count=1)
        checkpoints = CheckpointStore(couch, database=ckdb, source_database=db, shard=one)
        await checkpoints.load()  # creates the checkpoint database, as a worker does
        await checkpoints.save(seqs[-1])
        live = Lease(
            couch,
            database=ckdb,
            source_database=db,
            shard=one,
            ttl=60.0,
            holder=Holder(run_id="r1", host="host-a", pid=4242),
        )
        assert await live.acquire(asyncio.Event())
        # Layout of 2: worker 0 four changes behind, last checkpoint an hour
        # ago, no lease (stale: its layout still runs); worker 1 caught up,
        # running.
        await couch.put_doc(
            ckdb,
            {
                "_id": f"{db}.worker-0-of-2",
                "since": seqs[1],
                "database": db,
                "worker_id": 0,
                "worker_count": 2,
                "updated_at": iso(now - 3600),
                "host": "host-b",
                "pid": 77,
            },
        )
        two = CheckpointStore(
            couch, database=ckdb, source_database=db, shard=Shard(worker_id=1, worker_count=2)
        )
        await two.save(seqs[-1])
        running_two = Lease(
            couch,
            database=ckdb,
            source_database=db,
            shard=Shard(worker_id=1, worker_count=2),
            ttl=60.0,
            holder=Holder(run_id="r2", host="host-b", pid=78),
        )
        assert await running_two.acquire(asyncio.Event())
        # Layout of 3: only worker 2, behind but checkpointed just now, whose
        # lease expired 30 s ago (its holder stopped renewing).
        three = Shard(worker_id=2, worker_count=3)
        await CheckpointStore(couch, database=ckdb, source_database=db, shard=three).save(seqs[2])
        expired = Lease(
            couch,
            database=ckdb,
            source_database=db,
            shard=three,
            ttl=30.0,
            holder=Holder(run_id="r3", host="host-c", pid=99),
            clock=lambda: now - 60,
        )
        assert await expired.acquire(asyncio.Event())
        # Not a worker slot of this database: ignored.
        await couch.put_doc(ckdb, {"_id": f"{db}.worker-notes", "since": 1})
        await couch.put_doc(ckdb, {"_id": f"{db}x.worker-0-of-1", "since": 1})

    report = await gather_status(config, now=now, transport=store.transport)

    assert report.checkpoint_database_exists
    assert [layout.worker_count for layout in report.layouts] == [1, 2, 3]
    assert [len(layout.workers) for layout in report.layouts] == [1, 2, 1]
    assert [layout.missing_workers for layout in report.layouts] == [(), (), (0, 1)]

    caught_up = find(report, 0, 1)
    assert caught_up.since == seqs[-1]
    assert caught_up.behind is False and caught_up.pending_estimate == 0
    assert caught_up.lease is not None and caught_up.lease.live
    assert (caught_up.lease.host, caught_up.lease.pid) == ("host-a", 4242)
    assert 55 < (caught_up.lease.expires_in or 0) <= 70
    assert caught_up.state == "running" and not caught_up.stale
    assert caught_up.age is not None and abs(caught_up.age) < 10

    lagging = find(report, 0, 2)
    assert lagging.since == seqs[1] and lagging.updated_at == iso(now - 3600)
    assert lagging.age == pytest.approx(3600, abs=1)
    assert lagging.behind is True
    if store.reports_pending:
        assert lagging.pending_estimate == 4
        assert lagging.pending_text == "~4"
    else:
        # PouchDB Server has no `pending`: only "at least one" is known.
        assert lagging.pending_estimate is None
        assert lagging.pending_text == "unknown (>=1)"
    assert lagging.lease is None and lagging.state == "stopped"
    assert lagging.stale

    running = find(report, 1, 2)
    assert running.behind is False and running.state == "running" and not running.stale

    fresh = find(report, 2, 3)
    assert fresh.behind is True and not fresh.stale  # behind, but it just checkpointed
    assert fresh.pending_estimate == (3 if store.reports_pending else None)
    assert fresh.lease is not None and not fresh.lease.live
    assert fresh.state == "lease expired"
    assert fresh.lease.expires_in == pytest.approx(-30, abs=1)

    assert [w.checkpoint_id for w in report.stale_workers] == [f"{db}.worker-0-of-2"]

    text = report.render()
    assert_aligned(text)
    for title in ("layout: 1 worker (", "layout: 2 workers (", "layout: 3 workers ("):
        assert title in text
    assert "host-a pid 4242, expires in" in text
    assert "expired 30s ago (host-c pid 99)" in text
    assert "no checkpoint and no lease for worker 0, 1 of 3" in text
    assert f"1 stale: {db}.worker-0-of-2" in text
    assert "PENDING is an estimate" in text
    assert ("~4" in text) == store.reports_pending
    assert ("unknown (>=1)" in text) != store.reports_pending
    assert "worker-notes" not in text and f"{db}x" not in text

    # An hour later, every lease expired: the layout of 2 ran last (its lease
    # was taken last), so its lagging worker is stale. The layout of 3
    # stopped before the others last ran: replaced, it is not stale.
    later = await gather_status(config, now=now + 3600, transport=store.transport)
    assert {w.checkpoint_id for w in later.stale_workers} == {f"{db}.worker-0-of-2"}
    assert find(later, 2, 3).behind is True and not find(later, 2, 3).stale
    assert find(later, 0, 1).state == "lease expired" and not find(later, 0, 1).stale


DAY = 86_400.0


async def hold(
    couch: CouchClient,
    config: Config,
    shard: Shard,
    host: str,
    *,
    started: float,
    ttl: float = 60.0,
    released: float | None = None,
) -> Lease:
    """A worker's lease, taken at ``started``; released at ``released`` if given."""
    clock = [started]
    lease = Lease(
        couch,
        database=config.couch.checkpoint_database,
        source_database=config.couch.database,
        shard=shard,
        ttl=ttl,
        holder=Holder(run_id=f"{host}-{shard}", host=host, pid=1000 + shard.worker_count),
        clock=lambda: clock[0],
    )
    assert await lease.acquire(asyncio.Event())
    if released is not None:
        clock[0] = released
        await lease.release()
    return lease


async def put_checkpoint(
    couch: CouchClient, config: Config, shard: Shard, since: Any, updated: float
) -> None:
    db = config.couch.database
    await couch.put_doc(
        config.couch.checkpoint_database,
        {
            "_id": f"{db}.worker-{shard.worker_id}-of-{shard.worker_count}",
            "since": since,
            "database": db,
            "worker_id": shard.worker_id,
            "worker_count": shard.worker_count,
            "updated_at": iso(updated),
            "host": "host-x",
            "pid": 1,
        },
    )


async def four_layouts(store: Backend, config: Config, now: float) -> None:
    """Layout 1 retired 10 days ago; 2 running since 2 h; 3 running since 1 min (current);
    4 stopped an hour ago. Layouts 1 and 4 are behind, with old checkpoints."""
    async with seeded(store, 4) as (couch, seqs):
        await couch.create_database(config.couch.checkpoint_database)
        await put_checkpoint(
            couch, config, Shard(worker_id=0, worker_count=1), seqs[1], now - 11 * DAY
        )
        await hold(
            couch,
            config,
            Shard(worker_id=0, worker_count=1),
            "host-a",
            started=now - 40 * DAY,
            released=now - 10 * DAY,
        )
        for worker_id in (0, 1):
            shard = Shard(worker_id=worker_id, worker_count=2)
            await put_checkpoint(couch, config, shard, seqs[-1], now - 5)
            await hold(
                couch,
                config,
                shard,
                f"host-b{worker_id}",
                started=now - 7200 + worker_id,
                ttl=3 * 3600,
            )
        three = Shard(worker_id=2, worker_count=3)
        await put_checkpoint(couch, config, three, seqs[-1], now - 1)
        await hold(couch, config, three, "host-c", started=now - 60, ttl=3600)
        four = Shard(worker_id=0, worker_count=4)
        await put_checkpoint(couch, config, four, seqs[0], now - 3 * 3600)
        await hold(couch, config, four, "host-d", started=now - 4 * 3600, released=now - 3600)


async def test_status_marks_the_current_layout_and_a_retired_one_which_is_never_stale(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    db = store.database
    now = time.time()
    await four_layouts(store, config, now)

    report = await gather_status(config, now=now, transport=store.transport)

    one, two, three, four = report.layouts
    assert [layout.state for layout in report.layouts] == [
        "retired",
        "running",
        "running",
        "stopped",
    ]
    assert [layout.current for layout in report.layouts] == [False, False, True, False]
    assert report.current_layout is three and report.retired_layouts == [one]
    assert one.last_ran == pytest.approx(now - 10 * DAY)
    assert find(report, 0, 1).behind is True and not find(report, 0, 1).stale
    assert two.run is not None and two.run.started_at == pytest.approx(now - 7200)
    assert two.run.hosts == ("host-b0", "host-b1") and two.last_ran == now
    assert four.last_ran == pytest.approx(now - 3600) and not four.retired
    # Not retired, but replaced: layouts 2 and 3 ran since, so it is not stale.
    assert four.superseded and find(report, 0, 4).behind is True
    assert report.stale_workers == []

    text = report.render()
    assert_aligned(text)
    assert (
        f"layout: 1 worker ({db}.worker-N-of-1): retired, last ran {iso(now - 10 * DAY)} "
        "(10d00h ago)\n" in text
    )
    assert (
        f"layout: 2 workers ({db}.worker-N-of-2): running since {iso(now - 7200)} on host-b0, "
        "host-b1; a newer layout is running\n" in text
    )
    assert (
        f"layout: 3 workers ({db}.worker-N-of-3): current, running since {iso(now - 60)} "
        "on host-c\n" in text
    )
    assert (
        f"layout: 4 workers ({db}.worker-N-of-4): stopped, last ran {iso(now - 3600)} "
        "(1h00m ago); another layout has run since, so it is not stale\n" in text
    )
    assert "released 10d00h ago (host-a pid 1001)" in text
    assert "retired layouts: 1 worker. No worker of a retired layout has run for 7d00h" in text
    assert "no stale worker" in text

    data = report.to_json()
    assert data["current_layout"] == 3 and data["retired_layouts"] == [1]
    assert [layout["state"] for layout in data["layouts"]] == [
        "retired",
        "running",
        "running",
        "stopped",
    ]
    assert data["layouts"][1]["started_at"] == iso(now - 7200)
    assert data["layouts"][0]["last_ran_at"] == iso(now - 10 * DAY)
    assert data["layouts"][0]["workers"][0]["stale"] is False
    lease = data["layouts"][0]["workers"][0]["lease"]
    assert lease["released_at"] == pytest.approx(now - 10 * DAY)
    assert lease["started_at"] == pytest.approx(now - 40 * DAY) and lease["live"] is False

    # With a shorter retire_after the layout stopped an hour ago retires too,
    # and nothing is stale; the running ones never retire.
    short = await gather_status(config, now=now, retire_after=600, transport=store.transport)
    assert [layout.state for layout in short.layouts] == [
        "retired",
        "running",
        "running",
        "retired",
    ]
    assert not short.any_stale


async def test_status_json_keeps_opaque_seqs_and_round_trips(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    ckdb, db = config.couch.checkpoint_database, store.database
    async with seeded(store, 3) as (couch, seqs):
        for count in (1, 2):
            shard = Shard(worker_id=0, worker_count=count)
            checkpoints = CheckpointStore(couch, database=ckdb, source_database=db, shard=shard)
            await checkpoints.load()
            await checkpoints.save(seqs[count - 1])

    data = (await gather_status(config, transport=store.transport)).to_json()

    assert json.loads(json.dumps(data)) == data
    assert list(data) == [
        "couch_url",
        "database",
        "checkpoint_database",
        "checkpoint_database_exists",
        "generated_at",
        "stale_after_seconds",
        "retire_after_seconds",
        "layouts",
        "stale_workers",
        "current_layout",
        "retired_layouts",
        "looks_settled",
        "looks_settled_note",
        "deferred",
        "deferred_note",
    ]
    assert data["looks_settled"] == {"count": 0, "more": False, "examples": []}
    assert data["deferred"] == {
        "deferred": 0,
        "due": 0,
        "odd": 0,
        "capped": False,
        "indexed": False,
        "overdue_seconds": None,
        "failing_since": None,
    }
    assert data["retire_after_seconds"] == config.worker.retire_after == 604_800.0
    assert [layout["worker_count"] for layout in data["layouts"]] == [1, 2]
    assert list(data["layouts"][0]) == [
        "worker_count",
        "state",
        "running",
        "current",
        "superseded",
        "retired",
        "started_at",
        "last_ran_at",
        "running_hosts",
        "workers",
        "missing_workers",
    ]
    # Checkpoints written just now, no lease: both stopped, neither retired.
    assert [layout["state"] for layout in data["layouts"]] == ["stopped", "stopped"]
    assert data["current_layout"] is None and data["retired_layouts"] == []
    worker = data["layouts"][0]["workers"][0]
    assert list(worker) == [
        "worker_id",
        "worker_count",
        "checkpoint_id",
        "has_checkpoint",
        "since",
        "updated_at",
        "age_seconds",
        "checkpoint_host",
        "checkpoint_pid",
        "behind",
        "pending_estimate",
        "pending_note",
        "lease",
        "last_ran_at",
        "state",
        "stale",
    ]
    assert worker["last_ran_at"] == worker["updated_at"]
    # Exactly as CouchDB gave it: an opaque string on the fake, an int on PouchDB.
    assert [layout["workers"][0]["since"] for layout in data["layouts"]] == seqs[:2]
    assert type(worker["since"]) is type(seqs[0])
    assert worker["checkpoint_host"] == socket.gethostname()
    assert worker["pending_estimate"] == (2 if store.reports_pending else None)
    assert worker["pending_note"] == (
        None if store.reports_pending else "the server does not report pending changes"
    )
    assert data["layouts"][1]["workers"][0]["pending_estimate"] == (
        1 if store.reports_pending else None
    )
    assert data["stale_workers"] == []


async def test_status_of_a_missing_checkpoint_database_is_a_message(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    report = await gather_status(config, transport=store.transport)
    assert not report.checkpoint_database_exists and report.layouts == ()
    text = report.render()
    assert f"The checkpoint database {config.couch.checkpoint_database!r} does not exist" in text
    assert "no worker has run yet" in text
    assert report.to_json()["checkpoint_database_exists"] is False


async def test_status_with_no_checkpoint_yet(store: Backend, smtp_sink: SmtpSink) -> None:
    config = store.config(smtp_sink)
    async with store.client() as couch:
        await couch.create_database(config.couch.checkpoint_database)
    report = await gather_status(config, transport=store.transport)
    assert report.checkpoint_database_exists and report.layouts == ()
    assert "no worker has checkpointed yet" in report.render()


async def test_status_sees_a_crashed_holder_on_this_host(smtp_sink: SmtpSink) -> None:
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    config = backend.config(smtp_sink)
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    dead_pid = int(done.stdout)
    async with backend.client() as couch:
        lease = Lease(
            couch,
            database=config.couch.checkpoint_database,
            source_database="messages",
            shard=Shard(worker_id=0, worker_count=1),
            holder=Holder(
                run_id="gone", host=socket.gethostname(), pid=dead_pid, scope=process.SCOPE
            ),
        )
        assert await lease.acquire(asyncio.Event())
    report = await gather_status(config, transport=backend.transport)
    (worker,) = report.workers
    assert not worker.has_checkpoint and worker.pending_text == "-"
    assert worker.state == "holder gone" and worker.lease is not None
    assert not worker.lease.live
    assert f"pid {dead_pid} is gone" in report.render()


async def test_status_reads_what_real_workers_of_two_layouts_wrote(smtp_sink: SmtpSink) -> None:
    fake = FakeCouch(databases=["messages"])
    backend = Backend("fake", IN_PROCESS_URL, "messages", fake)
    config = backend.config(smtp_sink)
    for n in range(6):
        fake.put("messages", message(n))
    await run_until(
        config, lambda: len(smtp_sink.messages) == 6, transport=backend.transport, timeout=10
    )
    for n in range(6, 10):
        fake.put("messages", message(n))
    # Worker 1 of a new layout of 2, starting from 0 (the marks keep it from
    # sending again what was sent); it owns some of the new messages.
    owner = Shard(worker_id=1, worker_count=2)
    owned = sum(owner.owns(f"msg-{n:05d}") for n in range(6, 10))
    assert owned > 0
    await run_until(
        config,
        lambda: len(smtp_sink.messages) == 6 + owned,
        transport=backend.transport,
        worker_id=1,
        worker_count=2,
        timeout=10,
    )

    report = await gather_status(config, transport=backend.transport)

    assert [layout.worker_count for layout in report.layouts] == [1, 2]
    assert report.layouts[1].missing_workers == (0,)
    for worker in report.workers:
        doc = fake.get(config.couch.checkpoint_database, worker.checkpoint_id)
        assert doc is not None and worker.since == doc["since"]
        assert worker.updated_at == doc["updated_at"]
        # Released at a clean stop: the lease stays, saying when the slot ran.
        lease = worker.lease
        assert lease is not None and lease.released_at is not None and not lease.live
        assert worker.state == "stopped"
        assert lease.started_at is not None and lease.started_at <= lease.released_at
        assert worker.last_ran == lease.released_at
        assert not worker.stale
        assert worker.pending_estimate is not None
    assert [layout.state for layout in report.layouts] == ["stopped", "stopped"]
    assert report.layouts[1].last_ran == find(report, 1, 2).last_ran
    assert report.current_layout is None and report.retired_layouts == []
    text = report.render()
    assert "released " in text and " ago (" in text
    # The first layout never saw the last four messages.
    assert find(report, 0, 1).behind is True
    estimate = find(report, 0, 1).pending_estimate
    assert estimate is not None and estimate >= 4


async def test_check_and_status_count_documents_that_look_settled_but_never_were(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    docs = [
        {"_id": "m-false", "to": "a@example.com", "notifiedRecipient": False},
        {"_id": "m-no", "to": "b@example.com", "notifiedRecipient": "no"},
        {"_id": "m-zero", "to": "c@example.com", "notifiedRecipient": 0},
        {"_id": "m-sent", "to": "d@example.com", "notifiedRecipient": True},
        {"_id": "m-dead", "to": "e", "notifiedRecipient": False, "notificationFailed": {}},
        {"_id": "m-new", "to": "f@example.com"},
    ]
    async with store.client() as couch:
        for doc in docs:
            await couch.put_doc(store.database, doc)

    report = await run_checks(config, transport=store.transport)
    settled = by_name(report)["settled flags"]
    assert report.ok and settled.mark == "warn", report.render()
    assert settled.detail.startswith("3 documents with notifiedRecipient other than true")
    assert "remove notifiedRecipient from them" in report.render()

    status = await gather_status(config, transport=store.transport)
    assert status.looks_settled is not None
    assert status.looks_settled.count == 3 and not status.looks_settled.more
    assert set(status.looks_settled.examples) == {"m-false", "m-no", "m-zero"}
    text = status.render()
    assert "3 documents with notifiedRecipient other than true" in text
    assert "hint: the feed's selector skips every document that has notifiedRecipient" in text
    assert status.to_json()["looks_settled"]["count"] == 3


async def test_check_and_status_count_deferred_messages_and_check_says_when_their_index_is_missing(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    now_ms = int(time.time() * 1000)
    since_ms = now_ms - 3_600_000
    retry = {"due": now_ms - 600_000, "since": since_ms}
    docs = [
        {"_id": "d-due", "to": "a@example.com", "notificationRetry": retry},
        {"_id": "d-later", "to": "b@example.com", "notificationRetry": {"due": now_ms + 60_000}},
        {"_id": "d-sent", "notifiedRecipient": True, "notificationRetry": {"due": 1}},
        {"_id": "m-new", "to": "c@example.com"},
    ]
    async with store.client() as couch:
        for doc in docs:
            await couch.put_doc(store.database, doc)

    report = await run_checks(config, transport=store.transport)
    deferred = by_name(report)["deferred messages"]
    assert report.ok, report.render()
    described = (
        "2 deferred or scheduled, 1 of them due now (the longest for 10m), "
        f"the oldest failing since {iso_ms(since_ms / 1000)}"
    )
    assert deferred.detail.startswith(f"{described}; no retry index yet: the first worker")
    assert "/_index with" in deferred.detail and '"name":"retry-due"' in deferred.detail

    async with store.client() as couch:
        await couch.request("POST", f"/{store.database}/_index", json_body=dict(RETRY_INDEX))
    report = await run_checks(config, transport=store.transport)
    deferred = by_name(report)["deferred messages"]
    assert deferred.detail == f"{described}; the retry index is there"

    status = await gather_status(config, transport=store.transport)
    assert f"Deferred messages: {described}; the retry index is there." in status.render()
    summary = status.to_json()["deferred"]
    assert (summary["deferred"], summary["due"], summary["odd"]) == (2, 1, 0)
    assert 600 <= summary["overdue_seconds"] < 660
    assert summary["failing_since"] == iso_ms(since_ms / 1000)


async def test_check_warns_of_deferred_messages_with_no_due_time(
    store: Backend, smtp_sink: SmtpSink
) -> None:
    config = store.config(smtp_sink)
    async with store.client() as couch:
        await couch.put_doc(store.database, {"_id": "odd", "notificationRetry": {"due": "soon"}})
        due = int(time.time() * 1000) - 7_200_000
        await couch.put_doc(store.database, {"_id": "ok", "notificationRetry": {"due": due}})
    report = await run_checks(config, transport=store.transport)
    deferred = by_name(report)["deferred messages"]
    assert deferred.mark == "warn", report.render()
    assert (
        "2 deferred or scheduled, 1 of them due now (the longest for 2h), "
        "1 with no numeric due time"
    ) in deferred.detail
    assert "remove notificationRetry" in report.render()
