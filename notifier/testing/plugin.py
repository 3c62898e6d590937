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
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

import pytest

from notifier import config as config_module
from notifier.config import Config
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.server import FakeCouchServer
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import Condition, run_until
from notifier.worker import Worker

MakeConfig = Callable[..., Config]


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


def config_for_tests(couch_url: str, sink: SmtpSink, **sections: Mapping[str, Any]) -> Config:
    """A config for tests: the given servers, short heartbeats and checkpoint intervals."""
    data: dict[str, dict[str, Any]] = {
        "couch": {"url": couch_url, "database": "messages", "heartbeat": 1.0},
        "smtp": {"host": sink.host, "port": sink.port, "timeout": 10.0},
        "email": {"sender": "notifications@example.com"},
        "worker": {"checkpoint_interval": 0.5, "drain_timeout": 5.0},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return config_module.from_mapping(data, source="<test>", environ={})


@pytest.fixture
def fake_couch() -> FakeCouch:
    return FakeCouch(databases=["messages"])


@pytest.fixture
def couch_url(fake_couch: FakeCouch) -> Iterator[str]:
    with FakeCouchServer(fake_couch) as server:
        yield server.url


@pytest.fixture
def smtp_sink() -> Iterator[SmtpSink]:
    with SmtpSink() as sink:
        yield sink


@pytest.fixture
def notifier_config(couch_url: str, smtp_sink: SmtpSink) -> MakeConfig:
    def make(**sections: Mapping[str, Any]) -> Config:
        return config_for_tests(couch_url, smtp_sink, **sections)

    return make


@pytest.fixture
def run_notifier(fake_couch: FakeCouch, smtp_sink: SmtpSink) -> RunNotifier:
    async def run(
        until: Condition,
        *,
        timeout: float = 30.0,
        worker_id: int = 0,
        worker_count: int = 1,
        **sections: Mapping[str, Any],
    ) -> Worker:
        config = config_for_tests(IN_PROCESS_URL, smtp_sink, **sections)
        return await run_until(
            config,
            until,
            timeout=timeout,
            worker_id=worker_id,
            worker_count=worker_count,
            transport=fake_couch.transport(),
        )

    return run
