"""The Prometheus alerting rules in monitoring/: valid, unit-tested, and about
metrics the daemon exports."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
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


def held_by_another_process(fake: FakeCouch) -> None:
    """Worker slot 0/1's lease, held for ten minutes by a process elsewhere."""
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


@asynccontextmanager
async def a_worker(fake: FakeCouch, **settings: Any) -> AsyncIterator[Worker]:
    """A worker on the fake CouchDB that takes its slot's lease when it runs; not started."""
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
        yield Worker(
            couch=couch,
            handler=handler,
            checkpoints=CheckpointStore(couch, **common),
            settings=WorkerSettings(database="messages", shard=SHARD, **settings),
            lease=Lease(couch, **common),
        )


@pytest.mark.anyio
async def test_a_standby_exports_every_metric_the_rules_use_and_is_healthy() -> None:
    fake = FakeCouch(databases=["messages", "workersequences"])
    held_by_another_process(fake)
    async with a_worker(fake) as worker:
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


@pytest.mark.anyio
async def test_each_delivery_counter_is_exported_under_its_own_name() -> None:
    fake = FakeCouch(databases=["messages", "workersequences"])
    # A configured share of [smtp] max_rate is the rate paced at.
    async with a_worker(fake, max_rate=2.5) as worker:
        # Distinct values, so that two counters swapped or summed wrongly show.
        worker.stats.deferred = 3
        worker.stats.scheduled = 5
        worker.stats.dead_lettered = 11
        worker.delivery.throttled = 7
        worker.delivery.crashes = 13
        worker.delivery.breaker.opened = 17
        registry = Observability(worker, host="127.0.0.1", port=0).registry
        exported = {
            name: registry.get_sample_value(name, {"worker": "0/1"})
            for name in (
                "notifier_emails_deferred_total",
                "notifier_emails_scheduled_total",
                "notifier_emails_dead_lettered_total",
                "notifier_delivery_failures_total",
                "notifier_throttled_total",
                "notifier_unexpected_errors_total",
                "notifier_relay_outages_total",
                "notifier_send_rate_limit",
            )
        }
    assert exported == {
        "notifier_emails_deferred_total": 3.0,
        "notifier_emails_scheduled_total": 5.0,
        "notifier_emails_dead_lettered_total": 11.0,
        # Deferred and dead-lettered; a scheduled message did not fail.
        "notifier_delivery_failures_total": 3.0 + 11.0,
        "notifier_throttled_total": 7.0,
        "notifier_unexpected_errors_total": 13.0,
        "notifier_relay_outages_total": 17.0,
        "notifier_send_rate_limit": 2.5,
    }


@pytest.mark.anyio
async def test_an_unlimited_worker_exports_a_send_rate_limit_of_zero() -> None:
    fake = FakeCouch(databases=["messages", "workersequences"])
    async with a_worker(fake) as worker:
        registry = Observability(worker, host="127.0.0.1", port=0).registry
        limit = registry.get_sample_value("notifier_send_rate_limit", {"worker": "0/1"})
    assert limit == 0.0


@pytest.mark.anyio
async def test_a_standby_answers_healthz_over_http_as_a_standby() -> None:
    fake = FakeCouch(databases=["messages", "workersequences"])
    held_by_another_process(fake)
    async with (
        a_worker(fake) as worker,
        Observability(worker, host="127.0.0.1", port=0) as observability,
    ):
        running = asyncio.create_task(worker.run())
        try:
            await wait_for(lambda: worker.standing_by is not None, timeout=10)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{observability.port}", timeout=5
            ) as http:
                answer = await http.get("/healthz")
        finally:
            worker.stop()
            await asyncio.wait_for(running, timeout=10)
    assert (answer.status_code, answer.json()) == (200, {"status": "standby"})
    assert answer.headers["content-type"] == "application/json"
