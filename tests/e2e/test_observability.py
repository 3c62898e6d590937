"""What an operator watches, over real sockets: sd_notify, /metrics, /healthz, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from scenario import NOTIFIER, MakeConfig, to_toml, wait_until

from notifier.checkpoint import CheckpointStore
from notifier.config import SmtpConfig
from notifier.couch import CouchClient
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.metrics import Observability
from notifier.shard import Shard
from notifier.testing import free_port
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import worker_running
from notifier.worker import Worker, WorkerSettings

# Its outage is the fake's refuse_connections(): COUCHDB_URL adds no run on a real server.
pytestmark = [pytest.mark.e2e, pytest.mark.fake_couch_only]


class Datagrams:
    """A systemd-style notify socket that collects what the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.received: list[dict[str, str]] = []

    def poll(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536).decode()
            except BlockingIOError:
                return self.received
            self.received.append(dict(line.split("=", 1) for line in data.splitlines()))

    def seen(self, key: str, value: str | None = None) -> bool:
        return any(key in d and (value is None or d[key] == value) for d in self.poll())


@pytest.fixture
def daemon(
    fake_couch: FakeCouch, couch_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> Iterator[tuple[subprocess.Popen[bytes], Datagrams, str, Path]]:
    notify = Datagrams(tmp_path / "notify")
    port = free_port()
    config = tmp_path / "notifier.toml"
    config.write_text(
        to_toml(
            {
                "couch": {"url": couch_url, "database": "messages", "heartbeat": 0.5},
                "smtp": {"host": smtp_sink.host, "port": smtp_sink.port},
                "email": {"sender": "notify@example.com"},
                "worker": {"checkpoint_interval": 0.3},
                "metrics": {"listen": f"127.0.0.1:{port}"},
            }
        )
    )
    log = tmp_path / "notifier.log"
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "WATCHDOG_USEC": "1000000",
        "NOTIFIER_SMTP_PASSWORD": "not-used-here",
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [NOTIFIER, "run", "--worker-id", "0", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        yield proc, notify, f"http://127.0.0.1:{port}", log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.sock.close()


def test_systemd_hears_ready_status_watchdog_and_stopping(
    daemon: tuple[subprocess.Popen[bytes], Datagrams, str, Path],
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
) -> None:
    proc, notify, _, log = daemon
    wait_until(lambda: notify.seen("READY", "1"), 20.0, "READY=1")
    fake_couch.put("messages", {"_id": "m1", "to": "ann@example.com"})
    smtp_sink.wait_for(1, timeout=20)
    wait_until(
        lambda: any("1 sent" in d.get("STATUS", "") for d in notify.poll()), 20.0, "a STATUS count"
    )
    wait_until(lambda: notify.seen("WATCHDOG", "1"), 20.0, "a watchdog ping")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()
    assert notify.seen("STOPPING", "1")


def test_metrics_and_health_over_http(
    daemon: tuple[subprocess.Popen[bytes], Datagrams, str, Path],
    fake_couch: FakeCouch,
    smtp_sink: SmtpSink,
) -> None:
    proc, notify, base, log = daemon
    wait_until(lambda: notify.seen("READY", "1"), 20.0, "READY=1")
    for n in range(3):
        fake_couch.put("messages", {"_id": f"m{n}", "to": f"user{n}@example.com"})
    fake_couch.put("messages", {"_id": "bad", "to": 5})
    smtp_sink.wait_for(3, timeout=20)

    def metrics() -> str:
        return httpx.get(f"{base}/metrics", timeout=5).text

    # Counted when decided, before the mark is written: wait for the mark too.
    wait_until(
        lambda: all(
            line in metrics()
            for line in (
                'notifier_emails_dead_lettered_total{worker="0/1"} 1.0',
                'notifier_in_flight{worker="0/1"} 0.0',
            )
        ),
        20.0,
        "metrics",
    )
    text = metrics()
    assert 'notifier_emails_sent_total{worker="0/1"} 3.0' in text
    assert 'notifier_send_seconds_count{worker="0/1"} 3.0' in text
    assert 'notifier_feed_connected{worker="0/1"} 1.0' in text
    assert 'notifier_in_flight{worker="0/1"} 0.0' in text
    # One worker alone: no claim was contested.
    assert 'notifier_claim_conflicts_total{worker="0/1"} 0.0' in text
    assert 'notifier_claim_takeovers_total{worker="0/1"} 0.0' in text
    assert "notifier_checkpoint_age_seconds" in text
    healthy = httpx.get(f"{base}/healthz", timeout=5)
    assert (healthy.status_code, healthy.json()) == (200, {"status": "ok"})

    fake_couch.refuse_connections()
    wait_until(
        lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 503, 20.0, "unhealthy"
    )
    sick = httpx.get(f"{base}/healthz", timeout=5).json()
    assert sick["status"] == "unhealthy"
    assert "the changes feed is not connected" in sick["reasons"]
    fake_couch.accept_connections()
    wait_until(
        lambda: httpx.get(f"{base}/healthz", timeout=5).status_code == 200, 20.0, "healthy again"
    )
    assert httpx.get(f"{base}/nope", timeout=5).status_code == 404

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0, log.read_text()
    lines = log.read_text().splitlines()
    # One line per lifecycle event, with counts; no per-message lines at INFO.
    assert any("changes feed connected; running" in line for line in lines)
    assert any(": checkpoint " in line and "sent" in line for line in lines if " INFO " in line)
    assert any(
        "stopped: sent 3, deferred 0, scheduled 0, dead-lettered 1" in line for line in lines
    )
    assert not any("m1" in line for line in lines if " INFO " in line)


def test_json_logs_for_log_shippers(
    fake_couch: FakeCouch, couch_url: str, smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    config = tmp_path / "notifier.toml"
    config.write_text(
        to_toml(
            {
                "couch": {"url": couch_url, "database": "nope"},
                "smtp": {"host": smtp_sink.host, "port": smtp_sink.port},
                "email": {"sender": "notify@example.com"},
            }
        )
    )
    result = subprocess.run(
        [NOTIFIER, "run", "--worker-id", "0", "--config", str(config), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 69
    records = [json.loads(line) for line in result.stderr.splitlines()]
    assert records[-1]["level"] == "ERROR"
    assert "does not exist" in records[-1]["message"]
    assert {"time", "level", "logger", "message"} <= set(records[-1])


def test_no_secret_reaches_the_logs_even_in_connection_tracebacks(
    smtp_sink: SmtpSink, tmp_path: Path
) -> None:
    secret = "s3cr3t-Pa55"
    dead_port = free_port()
    config = tmp_path / "notifier.toml"
    config.write_text(
        to_toml(
            {
                "couch": {"url": f"http://127.0.0.1:{dead_port}", "username": "admin"},
                "smtp": {"host": smtp_sink.host, "port": smtp_sink.port, "username": "mailer"},
                "email": {"sender": "notify@example.com"},
            }
        )
    )
    env = {
        **os.environ,
        "NOTIFIER_COUCH_PASSWORD": secret,
        "NOTIFIER_SMTP_PASSWORD": secret,
    }
    for level in ("DEBUG", "INFO"):
        result = subprocess.run(
            [NOTIFIER, "run", "--worker-id", "0", "--config", str(config), "--log-level", level],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )
        assert result.returncode == 69, result.stderr
        output = result.stdout + result.stderr
        assert "127.0.0.1" in output, "the error names where it tried to connect"
        assert secret not in output
        assert "admin:" not in output


def test_ready_on_an_idle_pouchdb_database_before_its_first_heartbeat(
    make_config: MakeConfig,
) -> None:
    # PouchDB Server (like CouchDB) sends a continuous feed's headers only
    # with its first line: here, a heartbeat 20 s away.
    config = make_config(couch={"heartbeat": 20.0})

    async def time_to_ready() -> float:
        started = time.monotonic()
        async with worker_running(config) as worker:
            assert worker.feed.connected
            return time.monotonic() - started

    assert asyncio.run(time_to_ready()) < 10.0


def test_the_status_line_and_the_metric_say_connected_through_quiet_resyncs(
    smtp_sink: SmtpSink,
) -> None:
    fake = FakeCouch(databases=["messages"])

    async def sample() -> list[tuple[str, float | None]]:
        async with (
            CouchClient(url=IN_PROCESS_URL, transport=fake.transport()) as couch,
            EmailHandler(
                composer=Composer(sender="n@example.com", database="messages"),
                pool=SmtpPool(SmtpConfig(host=smtp_sink.host, port=smtp_sink.port), size=1),
            ) as handler,
        ):
            shard = Shard(worker_id=0, worker_count=1)
            worker = Worker(
                couch=couch,
                handler=handler,
                checkpoints=CheckpointStore(
                    couch, database="workersequences", source_database="messages", shard=shard
                ),
                # A quiet feed resyncs and reconnects every 0.3 s here.
                settings=WorkerSettings(
                    database="messages", shard=shard, heartbeat=0.1, resync_after=0.3
                ),
            )
            registry = Observability(worker, host="127.0.0.1", port=0).registry
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(worker.ready.wait(), timeout=10)
            samples = []
            for _ in range(150):  # 3 s: several resyncs and reconnects
                metric = registry.get_sample_value("notifier_feed_connected", {"worker": "0/1"})
                samples.append((worker.status_line(), metric))
                await asyncio.sleep(0.02)
            reconnects = worker.feed.reconnects
            worker.stop()
            await task
        assert reconnects >= 3
        return samples

    samples = asyncio.run(sample())
    disconnected = [s for s in samples if s != (samples[0][0], 1.0) or "feed connected" not in s[0]]
    assert disconnected == [], f"{len(disconnected)} of {len(samples)}: {disconnected[:3]}"
