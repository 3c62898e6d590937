"""COUCHDB_URL, proven: the suites run against a second, admin-protected server.

The test starts a second PouchDB Server with an admin (so anonymous requests
to the test databases get 401, as on a CouchDB 3 with admin-only databases),
points COUCHDB_URL at it, and runs a representative subset of the suites in a
nested pytest, keeping only the runs on that server (``-k couchdb``) and the
README example's (which itself runs the example on the fake and the server). It
checks that every selected test ran there and passed, that nothing was
skipped, that the server saw authenticated traffic, and that the tests left
no database behind.

A subset, not everything: the contract suite whole (every CouchDB call the
fake is held to), ``notifier check``/``status``/``run`` through the CLI, the
in-process worker, the reliability scenarios on real servers, and the
README's plugin example: about 80 tests, some 40 s on top of the suite.
The rest of e2e and reliability goes through the same fixtures, so running
it all again would add minutes and prove nothing new. docs/testing.md says
how to run everything against a server of your own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import httpx
from realservers import (
    REPO_ROOT,
    PouchDBServer,
    create_database,
    delete_database,
    unique_db_name,
)

from notifier.testing.remote import COUCHDB_PASSWORD_ENV, COUCHDB_URL_ENV, COUCHDB_USER_ENV

ADMIN = ("admin", "not-a-real-secret")
SUBSET = [
    "tests/contract",
    "tests/e2e/test_cli.py::test_check_passes_on_a_good_setup_and_names_what_fails",
    "tests/e2e/test_cli.py::test_status_shows_the_workers_of_a_run_as_json",
    "tests/e2e/test_cli.py::test_run_delivers_once_stops_on_sigint_and_restarts_without_resending",
    "tests/e2e/test_checkpoint.py",
    "tests/e2e/test_worker.py",
    "tests/reliability/test_bad_documents.py",
    "tests/test_plugin.py",
]


def test_couchdb_url_runs_the_suites_against_that_server(tmp_path: Path) -> None:
    report = tmp_path / "report.xml"
    with PouchDBServer(admin=ADMIN) as second:
        probe = unique_db_name("probe")
        create_database(second.url, probe, admin_only=True)
        anonymous = httpx.get(f"{second.base_url}/{probe}", trust_env=False)
        delete_database(second.url, probe)
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in (COUCHDB_URL_ENV, COUCHDB_USER_ENV, COUCHDB_PASSWORD_ENV)
        }
        # The credentials come from the URL here; their other source, the
        # two variables, is covered in test_plugin.py.
        env[COUCHDB_URL_ENV] = second.url
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-p",
                "no:cacheprovider",
                "-q",
                "-rs",
                "-k",
                # The README example's own run (test_plugin) runs it on both.
                "couchdb or readme",
                f"--junitxml={report}",
                *SUBSET,
            ],
            cwd=REPO_ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        output = result.stdout + result.stderr
        left = httpx.get(f"{second.url}/_all_dbs", trust_env=False).json()
        log = second.log_tail(100_000)

    assert anonymous.status_code == 401, "the server must refuse anonymous requests"
    assert result.returncode == 0, output
    cases = ET.parse(report).getroot().iter("testcase")  # noqa: S314 (our own report)
    outcomes = {
        f"{case.get('classname')}::{case.get('name')}": [child.tag for child in case]
        for case in cases
    }
    for entry in SUBSET:
        path, _, name = entry.partition("::")
        module = path.removesuffix(".py").replace("/", ".")
        ran = [n for n in outcomes if n.startswith(module) and f"::{name}" in n]
        assert ran, f"nothing of {entry} ran:\n{output}"
    assert all("[couchdb" in name or "readme" in name for name in outcomes), sorted(outcomes)
    failed_or_skipped = {name: tags for name, tags in outcomes.items() if tags}
    assert failed_or_skipped == {}, output
    # The tests' requests reached this server, with credentials.
    assert log.count(" 201 - ") >= 100
    assert log.count(" 401 - ") == 1, "only the probe may go out without the credentials"
    assert [name for name in left if not name.startswith("_")] == [], "databases left behind"
