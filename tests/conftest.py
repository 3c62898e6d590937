"""Fixtures backed by a real PouchDB Server (CouchDB API).

The SMTP sink, the fake CouchDB and the in-process worker runner come from
notifier's own pytest plugin (notifier.testing.plugin), as users get them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import pytest
from realservers import CouchTestDB, PouchDBServer, create_database, delete_database, unique_db_name
from scenario import ScenarioRecord

# test_harness.py checks these fixtures' own failure reports in a nested session.
pytest_plugins = ["pytester"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def pouchdb() -> Iterator[PouchDBServer]:
    """One PouchDB Server for the whole session; tests isolate by database.

    Read `pouchdb.url` inside the test, not at import or in a session-wide
    fixture: the server gets a new port if it has to be restarted.
    """
    with PouchDBServer() as server:
        yield server


@pytest.fixture
def couch(pouchdb: PouchDBServer, request: pytest.FixtureRequest) -> Iterator[CouchTestDB]:
    """A fresh, empty database on the session's PouchDB Server.

    PouchDB Server exits as a whole on a filter it cannot evaluate, so the
    server is checked before and after each test. A death during the test
    fails it with the server's log, because it means the code under test sent
    a request a real CouchDB would have answered with an error (or treated
    differently).
    """
    if pouchdb.ensure_alive():
        # A previous test killed it; that test has already failed. Say so in
        # this test's report too, so the restart is not a mystery.
        request.node.add_report_section(
            "setup", "pouchdb", f"PouchDB Server was restarted on {pouchdb.url}"
        )
    name = unique_db_name(request.node.name)
    create_database(pouchdb.url, name)
    db = CouchTestDB(pouchdb.url, name)
    try:
        yield db
    finally:
        db.close()
    if not pouchdb.ping():
        log = pouchdb.log_tail()
        pouchdb.ensure_alive()
        pytest.fail(
            "PouchDB Server died during this test: the code under test sent it "
            "something it could not evaluate (for example a filter or selector).\n"
            f"--- server log tail ---\n{log}",
            pytrace=False,
        )
    delete_database(pouchdb.url, name)


#: Where scenario tests append their figures (one JSON object a line); set by
#: scripts/reliability-report, unset in a plain test run.
REPORT_ENV = "NOTIFIER_SCENARIO_REPORT"


@pytest.fixture
def scenario_record(request: pytest.FixtureRequest) -> Iterator[ScenarioRecord]:
    """A record of a reliability scenario's figures, saved when the test passes."""
    record = ScenarioRecord(scenario=request.node.name)
    yield record
    path = os.environ.get(REPORT_ENV)
    report = getattr(request.node, "rep_call", None)
    if path and report is not None and report.passed:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(dataclasses.asdict(record)) + "\n")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    # Lets a fixture see, at teardown, whether its test passed.
    report = yield
    if call.when == "call":
        item.rep_call = report  # type: ignore[attr-defined]
    return report
