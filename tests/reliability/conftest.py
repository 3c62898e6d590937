"""Fixtures for the reliability scenarios; the reusable pieces live in harness.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import CheckpointWatch, NotifierCli, reporting

from notifier.testing.fake_couch import FakeCouch
from notifier.testing.smtp import SmtpSink


@pytest.fixture
def notifier_cli(
    request: pytest.FixtureRequest, tmp_path: Path, couch_url: str, smtp_sink: SmtpSink
) -> Iterator[NotifierCli]:
    """Starts ``notifier run`` against the socket-served ``fake_couch`` and ``smtp_sink``.

    At teardown it kills whatever is still running and, when the test
    failed, adds every process's log to the report.
    """
    yield from reporting(request, NotifierCli(tmp_path, couch_url=couch_url, sink=smtp_sink))


@pytest.fixture
def checkpoint_watch(fake_couch: FakeCouch) -> Iterator[CheckpointWatch]:
    """Samples worker 0-of-1's checkpoint on ``fake_couch`` for the whole test.

    Tell it which docs to audit with ``checkpoint_watch.track(seeded)``.
    """
    with CheckpointWatch(fake_couch) as watch:
        yield watch
