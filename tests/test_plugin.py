"""The pytest fixtures users get from notifier[testing], used the way the README shows.

With COUCHDB_URL set, the tests that use ``fake_couch`` also run against that
server (``[couchdb]``), as a user's own tests do.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from realservers import PouchDBServer

from notifier.testing.fake_couch import FakeCouch, FakeCouchError
from notifier.testing.remote import RemoteCouch, ServerURL, server_from_environment
from notifier.testing.smtp import SmtpSink

pytestmark = pytest.mark.anyio


async def test_run_notifier_delivers_a_message_from_the_fake(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, run_notifier: object
) -> None:
    fake_couch.put("messages", {"_id": "m1", "to": "ann@example.com", "subject": "Hi"})
    worker = await run_notifier(lambda: len(smtp_sink.messages) == 1)  # type: ignore[operator]
    assert smtp_sink.messages[0].message["Subject"] == "Hi"
    assert worker.stats.sent == 1
    assert fake_couch.get("messages", "m1")["notifiedRecipient"] is True  # type: ignore[index]


@pytest.mark.fake_couch_only
async def test_couch_url_serves_the_same_fake_over_a_socket(
    fake_couch: FakeCouch, couch_url: str
) -> None:
    fake_couch.put("messages", {"_id": "m1", "to": "ann@example.com"})
    async with httpx.AsyncClient(base_url=couch_url) as client:
        response = await client.get("/messages/m1")
    assert response.status_code == 200
    assert response.json()["to"] == "ann@example.com"


def test_notifier_config_points_at_the_fixtures(
    notifier_config: object, couch_url: str, smtp_sink: SmtpSink
) -> None:
    config = notifier_config(worker={"max_parallel": 3})  # type: ignore[operator]
    # A real server's URL carries its credentials; the config keeps them apart.
    assert config.couch.url == ServerURL.parse(couch_url).base
    assert config.smtp.port == smtp_sink.port
    assert config.worker.max_parallel == 3


def readme_example() -> str:
    """The test shown in README.md's "Testing your setup" section."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Testing your setup", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_passes_in_a_project_without_conftest(tmp_path: Path) -> None:
    """A user's project gets the fixtures from the entry point, with no import."""
    example = readme_example()
    assert len(example.strip().splitlines()) <= 15
    (tmp_path / "test_user.py").write_text(example)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    # With COUCHDB_URL set, the same test also runs against that server.
    runs = 1 if server_from_environment() is None else 2
    assert f"{runs} passed" in result.stdout


def test_a_real_server_keeps_its_databases_apart_and_deletes_them(pouchdb: PouchDBServer) -> None:
    with RemoteCouch(server=pouchdb.server, databases=["messages"], hint="plugin") as couch:
        rev = couch.put("messages", {"_id": "m1", "to": "ann@example.com"})
        with pytest.raises(FakeCouchError) as conflict:
            couch.put("messages", {"_id": "m1"})
        real = couch.real_name("messages")
        # Another client (the code under test) creates a database the test named.
        checkpoints = couch.real_name("workersequences")
        httpx.put(f"{pouchdb.url}/{checkpoints}", trust_env=False).raise_for_status()
        named = couch.database_names()
        doc = couch.get("messages", "m1")
        couch.delete("messages", "m1", rev)

    assert conflict.value.status == 409
    assert real != "messages" and real.startswith("plugin_") and real.endswith("_messages")
    assert named == ["messages", "workersequences"]
    assert doc is not None and doc["to"] == "ann@example.com"
    left = httpx.get(f"{pouchdb.url}/_all_dbs", trust_env=False).json()
    assert real not in left and checkpoints not in left


def test_a_fault_switch_on_a_real_server_says_how_to_keep_the_test_on_the_fake(
    pouchdb: PouchDBServer,
) -> None:
    with RemoteCouch(server=pouchdb.server) as couch:
        with pytest.raises(AttributeError, match=r"fail_next.*fake_couch_only"):
            couch.fail_next(2)
        with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
            couch.nonsense  # noqa: B018


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"COUCHDB_URL": "http://127.0.0.1:5984"}, ServerURL(base="http://127.0.0.1:5984")),
        (
            {"COUCHDB_URL": "http://admin:p%40ss@db.example:5984/"},
            ServerURL(base="http://db.example:5984", username="admin", password="p@ss"),
        ),
        (
            {"COUCHDB_URL": "http://db.example", "COUCHDB_USER": "u", "COUCHDB_PASSWORD": "p"},
            ServerURL(base="http://db.example", username="u", password="p"),
        ),
    ],
)
def test_the_server_url_and_its_credentials_come_from_the_environment(
    environ: dict[str, str], expected: ServerURL | None
) -> None:
    server = server_from_environment(environ)
    assert server == expected
    if server is not None and server.password is not None:
        assert "password" not in repr(server)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"COUCHDB_URL": "db.example:5984"}, "http:// or https://"),
        ({"COUCHDB_URL": "http://db.example", "COUCHDB_USER": "u"}, "needs a password"),
        (
            {"COUCHDB_URL": "http://a:b@db.example", "COUCHDB_USER": "c", "COUCHDB_PASSWORD": "d"},
            "in one place",
        ),
    ],
)
def test_a_bad_server_url_is_an_error_not_a_quiet_fallback_to_the_fake(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match="COUCHDB_URL") as caught:
        server_from_environment(environ)
    assert message in str(caught.value)
