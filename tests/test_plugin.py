"""The pytest fixtures users get from notifier[testing], used the way the README shows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from notifier.testing.fake_couch import FakeCouch
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
    assert config.couch.url == couch_url
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
    assert "1 passed" in result.stdout
