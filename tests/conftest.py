"""Fixtures backed by a real PouchDB Server (CouchDB API), and by COUCHDB_URL's server.

With COUCHDB_URL set, every test that uses ``couch`` runs against PouchDB
Server and against that server (test ids ``[pouchdb]`` and ``[couchdb]``).

The SMTP sink, the fake CouchDB and the in-process worker runner come from
notifier's own pytest plugin (notifier.testing.plugin), as users get them.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import pytest
from realservers import CouchTestDB, PouchDBServer, scratch_database
from scenario import ScenarioRecord

from notifier.testing.remote import COUCHDB_URL_ENV, ServerURL, server_from_environment

# test_harness.py checks these fixtures' own failure reports in a nested session.
pytest_plugins = ["pytester"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


#: The ``couch`` fixture's servers: PouchDB Server always, and the CouchDB
#: named by COUCHDB_URL when it is set.
POUCHDB = "pouchdb"
COUCHDB = "couchdb"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Without COUCHDB_URL nothing is parametrised, so test ids stay as they were.
    if "couch" in metafunc.fixturenames and server_from_environment() is not None:
        metafunc.parametrize("couch_server", [POUCHDB, COUCHDB], indirect=True)


@pytest.fixture(scope="session")
def pouchdb() -> Iterator[PouchDBServer]:
    """One PouchDB Server for the whole session; tests isolate by database.

    Read `pouchdb.url` inside the test, not at import or in a session-wide
    fixture: the server gets a new port if it has to be restarted.
    """
    with PouchDBServer() as server:
        yield server


@pytest.fixture(scope="session")
def couchdb_url() -> ServerURL:
    """The CouchDB that COUCHDB_URL names (only requested when it is set)."""
    server = server_from_environment()
    assert server is not None, f"{COUCHDB_URL_ENV} was unset during the run"
    return server


@pytest.fixture
def couch_server(request: pytest.FixtureRequest) -> PouchDBServer | ServerURL:
    """The server the ``couch`` fixture uses: PouchDB Server, or COUCHDB_URL's."""
    if getattr(request, "param", POUCHDB) == COUCHDB:
        server: ServerURL = request.getfixturevalue("couchdb_url")
        return server
    pouchdb: PouchDBServer = request.getfixturevalue("pouchdb")
    return pouchdb


@pytest.fixture
def couch(
    couch_server: PouchDBServer | ServerURL, request: pytest.FixtureRequest
) -> Iterator[CouchTestDB]:
    """A fresh, empty database on PouchDB Server, or on COUCHDB_URL's server.

    The database has a unique name and is deleted afterwards, with every
    database the test named with ``unique_db_name``, so a shared server is
    safe (see ``realservers.scratch_database``).

    PouchDB Server exits as a whole on a filter it cannot evaluate, so the
    server is checked before and after each test. A death during the test
    fails it with the server's log, because it means the code under test sent
    a request a real CouchDB would have answered with an error (or treated
    differently).
    """
    pouchdb = couch_server if isinstance(couch_server, PouchDBServer) else None
    if pouchdb is not None and pouchdb.ensure_alive():
        # A previous test killed it; that test has already failed. Say so in
        # this test's report too, so the restart is not a mystery.
        request.node.add_report_section(
            "setup", "pouchdb", f"PouchDB Server was restarted on {pouchdb.url}"
        )
    with scratch_database(couch_server.url, request.node.name) as db:
        yield db
        if pouchdb is not None and not pouchdb.ping():
            log = pouchdb.log_tail()
            pouchdb.ensure_alive()
            pytest.fail(
                "PouchDB Server died during this test: the code under test sent it "
                "something it could not evaluate (for example a filter or selector).\n"
                f"--- server log tail ---\n{log}",
                pytrace=False,
            )


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
