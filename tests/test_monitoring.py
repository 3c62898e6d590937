"""The Prometheus alerting rules in monitoring/: valid, unit-tested, and about
metrics the daemon exports."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from notifier.checkpoint import CheckpointStore
from notifier.config import SmtpConfig
from notifier.couch import CouchClient
from notifier.lease import Lease
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.metrics import Observability
from notifier.shard import Shard
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.worker import wait_for
from notifier.worker import Worker, WorkerSettings

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
RULES = MONITORING / "notifier.rules.yml"
SHARD = Shard(worker_id=0, worker_count=1)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    # scripts/test installs Debian's prometheus package when this is missing.
    assert path is not None, "promtool is missing: apt-get install prometheus"
    return subprocess.run([path, *args], capture_output=True, text=True, cwd=MONITORING)


def test_the_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_the_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", "notifier.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_has_a_summary_and_is_unit_tested() -> None:
    rules = RULES.read_text()
    names = re.findall(r"- alert: (\w+)", rules)
    assert len(names) == 9
    assert rules.count("summary:") == len(names)
    tests = (MONITORING / "notifier.test.yml").read_text()
    for name in names:
        assert f"alertname: {name}" in tests, f"{name} has no unit test"


@pytest.mark.anyio
async def test_a_standby_exports_every_metric_the_rules_use_and_is_healthy() -> None:
    fake = FakeCouch(databases=["messages", "workersequences"])
    fake.put(
        "workersequences",
        {
            "_id": "messages.worker-0-of-1.lease",
            "run_id": "theirs",
            "host": "mail-2",
            "pid": 1,
            "expires_at": time.time() + 600,
        },
    )
    async with (
        CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch,
        EmailHandler(
            composer=Composer(sender="n@example.com", database="messages"),
            pool=SmtpPool(SmtpConfig(), size=1),
        ) as handler,
    ):
        common: dict[str, Any] = {
            "database": "workersequences",
            "source_database": "messages",
            "shard": SHARD,
        }
        worker = Worker(
            couch=couch,
            handler=handler,
            checkpoints=CheckpointStore(couch, **common),
            settings=WorkerSettings(database="messages", shard=SHARD),
            lease=Lease(couch, **common),
        )
        observability = Observability(worker, host="127.0.0.1", port=0)
        running = asyncio.create_task(worker.run())
        await wait_for(lambda: worker.standing_by is not None, timeout=10)
        exported = {
            metric.name for metric in observability.registry.collect() for _ in metric.samples
        }
        value = observability.registry.get_sample_value
        standby = value("notifier_standby", {"worker": "0/1"})
        held = value("notifier_lease_held", {"worker": "0/1"})
        health = observability.health()
        worker.stop()
        await asyncio.wait_for(running, timeout=10)
    used = set(re.findall(r"\b(notifier_[a-z_]+?)(?:_total)?\b", RULES.read_text()))
    assert used, "the rules use notifier metrics"
    missing = used - exported
    assert missing == set(), f"rules use metrics the daemon does not export: {missing}"
    assert (standby, held) == (1.0, 0.0)
    assert health == (True, []), "a standby is healthy"
