"""pytest fixtures for testing a notifier setup; registered as the ``notifier`` plugin.

Installing ``notifier[testing]`` makes these fixtures available in every test
suite (through the ``pytest11`` entry point), with no import:

``fake_couch``
    a fresh in-memory :class:`~notifier.testing.fake_couch.FakeCouch` with an
    empty ``messages`` database.
``couch_url``
    the same fake served on a real loopback socket (a background thread), for
    code that opens its own connections, such as the ``notifier`` CLI.
``smtp_sink``
    an SMTP server on a free loopback port that records every message.
``notifier_config``
    a function returning a :class:`~notifier.config.Config` aimed at
    ``couch_url`` and ``smtp_sink``, with test-friendly timings; keyword
    arguments override sections, e.g. ``notifier_config(worker={"max_parallel": 2})``.
``run_notifier``
    an async function that runs one worker in process (against the
    in-process fake and the sink) until a condition holds, then stops it
    with the real shutdown sequence and returns it.

With ``COUCHDB_URL`` set (see :mod:`notifier.testing.remote`), every test
that uses these fixtures runs twice: against the fake, and against that
server, where ``fake_couch`` is a :class:`~notifier.testing.remote.RemoteCouch`
in databases of its own and the other fixtures point at the server. A test
that needs the fake's faults is marked ``@pytest.mark.fake_couch_only``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

import pytest

from notifier import config as config_module
from notifier.config import COUCH_PASSWORD_ENV, Config
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.remote import COUCHDB_URL_ENV, RemoteCouch, server_from_environment
from notifier.testing.server import FakeCouchServer
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import Condition, run_until
from notifier.worker import Worker

MakeConfig = Callable[..., Config]
#: The ``fake_couch`` parameters: the fake always, the real server when named.
FAKE = "fake"
COUCHDB = "couchdb"
FAKE_ONLY_MARK = "fake_couch_only"


class RunNotifier(Protocol):
    def __call__(
        self,
        until: Condition,
        *,
        timeout: float = ...,
        worker_id: int = ...,
        worker_count: int = ...,
        **sections: Mapping[str, Any],
    ) -> Awaitable[Worker]: ...


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{FAKE_ONLY_MARK}: the test needs the fake CouchDB (its faults or records), so "
        f"{COUCHDB_URL_ENV} adds no run against a real server",
    )


def pytest_report_header(config: pytest.Config) -> str:
    server = server_from_environment()
    if server is None:
        return f"notifier: fake_couch is the fake ({COUCHDB_URL_ENV} is not set)"
    who = f" as {server.username}" if server.username else ""
    return f"notifier: fake_couch is the fake and the CouchDB at {server.base}{who}"


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Without the variable nothing is parametrised, so test ids stay as they were.
    if "fake_couch" not in metafunc.fixturenames or server_from_environment() is None:
        return
    if metafunc.definition.get_closest_marker(FAKE_ONLY_MARK) is not None:
        return
    metafunc.parametrize("fake_couch", [FAKE, COUCHDB], indirect=True)


def config_for_tests(couch_url: str, sink: SmtpSink, **sections: Mapping[str, Any]) -> Config:
    """A config for tests: the given servers, short heartbeats and checkpoint intervals."""
    return _config({"url": couch_url, "database": "messages"}, sink, {}, sections)


def config_for(
    couch: FakeCouch | RemoteCouch, couch_url: str, sink: SmtpSink, **sections: Mapping[str, Any]
) -> Config:
    """:func:`config_for_tests` for the ``fake_couch`` fixture's server, whichever it is.

    On a real server the databases are the ones ``couch`` maps ``messages``
    and ``workersequences`` to, and the credentials come from ``COUCHDB_URL``.
    """
    if isinstance(couch, FakeCouch):
        return config_for_tests(couch_url, sink, **sections)
    server = couch.server
    settings: dict[str, Any] = {
        "url": server.base,
        "database": couch.real_name("messages"),
        "checkpoint_database": couch.real_name("workersequences"),
    }
    environ = {}
    if server.username is not None and server.password is not None:
        settings["username"] = server.username
        environ[COUCH_PASSWORD_ENV] = server.password
    return _config(settings, sink, environ, sections)


def _config(
    couch: Mapping[str, Any],
    sink: SmtpSink,
    environ: Mapping[str, str],
    sections: Mapping[str, Mapping[str, Any]],
) -> Config:
    data: dict[str, dict[str, Any]] = {
        "couch": {**couch, "heartbeat": 1.0},
        "smtp": {"host": sink.host, "port": sink.port, "timeout": 10.0},
        "email": {"sender": "notifications@example.com"},
        "worker": {"checkpoint_interval": 0.5, "drain_timeout": 5.0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_module.from_mapping(data, source="<test>", environ=environ)


@pytest.fixture
def fake_couch(request: pytest.FixtureRequest) -> Iterator[FakeCouch | RemoteCouch]:
    if getattr(request, "param", FAKE) == FAKE:
        yield FakeCouch(databases=["messages"])
        return
    server = server_from_environment()
    assert server is not None, f"{COUCHDB_URL_ENV} was unset during the run"
    with RemoteCouch(server=server, databases=["messages"], hint=request.node.name) as couch:
        yield couch


@pytest.fixture
def couch_url(fake_couch: FakeCouch | RemoteCouch) -> Iterator[str]:
    """The URL of ``fake_couch``'s server; a real server's carries its credentials."""
    if isinstance(fake_couch, RemoteCouch):
        yield fake_couch.server.url
        return
    with FakeCouchServer(fake_couch) as server:
        yield server.url


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def notifier_config(
    fake_couch: FakeCouch | RemoteCouch, couch_url: str, smtp_sink: SmtpSink
) -> MakeConfig:
    def make(**sections: Mapping[str, Any]) -> Config:
        return config_for(fake_couch, couch_url, smtp_sink, **sections)

    return make


@pytest.fixture
def run_notifier(fake_couch: FakeCouch | RemoteCouch, smtp_sink: SmtpSink) -> RunNotifier:
    async def run(
        until: Condition,
        *,
        timeout: float = 30.0,
        worker_id: int = 0,
        worker_count: int = 1,
        **sections: Mapping[str, Any],
    ) -> Worker:
        config = config_for(fake_couch, IN_PROCESS_URL, smtp_sink, **sections)
        return await run_until(
            config,
            until,
            timeout=timeout,
            worker_id=worker_id,
            worker_count=worker_count,
            transport=fake_couch.transport() if isinstance(fake_couch, FakeCouch) else None,
        )

    return run
