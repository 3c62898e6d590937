"""Fixtures for the reliability scenarios; the reusable pieces live in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CheckpointWatch, NotifierCli, reporting

from notifier.testing.fake_couch import FakeCouch
from notifier.testing.remote import RemoteCouch
from notifier.testing.smtp import SmtpSink


@pytest.fixture
def notifier_cli(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    fake_couch: FakeCouch | RemoteCouch,
    couch_url: str,
    smtp_sink: SmtpSink,
) -> Iterator[NotifierCli]:
    """Starts ``notifier run`` against ``fake_couch`` (socket-served) and ``smtp_sink``.

    With COUCHDB_URL set, ``fake_couch`` is also that server (see
    notifier.testing.plugin), in databases of the test's own. At teardown
    it kills whatever is still running and, when the test failed, adds
    every process's log to the report.
    """
    cli = NotifierCli(tmp_path, couch_url=couch_url, sink=smtp_sink, couch=fake_couch)
    yield from reporting(request, cli)


@pytest.fixture
def checkpoint_watch(fake_couch: FakeCouch | RemoteCouch) -> Iterator[CheckpointWatch]:
    """Samples worker 0-of-1's checkpoint on ``fake_couch`` for the whole test.

    Tell it which docs to audit with ``checkpoint_watch.track(seeded)``.
    """
    with CheckpointWatch(fake_couch) as watch:
        yield watch
