"""The systemd units (verified by systemd-analyze) and the sd_notify protocol."""

from __future__ import annotations

import asyncio
import configparser
import contextlib
import itertools
import re
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from scenario import NOTIFIER

from notifier import cli
from notifier.config import WorkerConfig
from notifier.runner import run_worker
from notifier.shard import Shard
from notifier.systemd import SystemdNotifier
from notifier.testing.fake_couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.plugin import config_for_tests
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import wait_for
from notifier.worker import Worker, stop_timeout

UNITS = Path(__file__).resolve().parents[1] / "systemd"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    # scripts/test installs Debian's systemd package when this is missing.
    assert path is not None, "systemd-analyze is missing: apt-get install systemd"
    return path


@pytest.fixture
def units(tmp_path: Path) -> Path:
    """The units as shipped, with ExecStart pointing at this installation's notifier."""
    for unit in UNITS.iterdir():
        text = unit.read_text().replace("/opt/notifier/bin/notifier", NOTIFIER)
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def service_section() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / "notifier@.service").read_text())
    return parser["Service"]


def test_units_verify(units: Path) -> None:
    result = subprocess.run(
        [
            systemd_analyze(),
            "verify",
            str(units / "notifier@.service"),
            str(units / "notifier.target"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_service_exposure_is_at_most_2(units: Path) -> None:
    result = subprocess.run(
        [systemd_analyze(), "security", "--offline=true", str(units / "notifier@.service")],
        capture_output=True,
        text=True,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout + result.stderr
    assert float(match.group(1)) <= 2.0, result.stdout


def test_the_stop_timeout_covers_the_longest_stop_of_the_default_configuration() -> None:
    stop = float(service_section()["TimeoutStopSec"])
    assert stop >= stop_timeout(WorkerConfig().drain_timeout)


def test_configuration_and_credential_errors_are_not_restarted_in_a_loop() -> None:
    prevented = service_section()["RestartPreventExitStatus"].split()
    assert str(cli.EXIT_CONFIG) in prevented
    assert str(cli.EXIT_ACCESS) in prevented
    assert service_section()["Restart"] == "on-failure"


def test_no_secret_is_passed_on_the_command_line() -> None:
    exec_start = service_section()["ExecStart"]
    assert "password" not in exec_start.lower()
    assert "LoadCredential" in (UNITS / "notifier@.service").read_text()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(5)
    yield sock
    sock.close()


def test_notify_sends_datagrams_to_the_socket(notify_socket: socket.socket) -> None:
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": notify_socket.getsockname()})
    assert notifier.notify(READY="1", STATUS="running: 3 sent")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=running: 3 sent"


def test_notify_reaches_an_abstract_socket() -> None:
    name = f"notifier-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        assert SystemdNotifier(environ={"NOTIFY_SOCKET": "@" + name}).notify(STOPPING="1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_a_missing_socket_is_survived(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    notifier = SystemdNotifier(environ={"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier.notify(READY="1") is False
    assert notifier.notify(READY="1") is False
    assert len([r for r in caplog.records if "cannot notify systemd" in r.message]) == 1


def test_the_watchdog_is_pinged_at_half_its_deadline_and_only_for_this_pid() -> None:
    assert SystemdNotifier(environ={"WATCHDOG_USEC": "10000000"}).watchdog_interval == 5.0
    other = SystemdNotifier(environ={"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None


class Notifications:
    """What the worker told "systemd": every datagram on NOTIFY_SOCKET, with its time."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self.received: list[tuple[float, dict[str, str]]] = []
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.sock_recv(self._sock, 65536)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            self.received.append((time.monotonic(), fields))

    async def first(self, key: str, *, containing: str = "", timeout: float = 10.0) -> float:
        """When a datagram with ``key`` (its value containing ``containing``) arrived."""

        def found() -> float | None:
            return next((at for at, f in self.received if key in f and containing in f[key]), None)

        await wait_for(lambda: found() is not None, timeout=timeout, interval=0.01)
        at = found()
        assert at is not None
        return at

    def statuses(self) -> list[str]:
        return [f["STATUS"] for _, f in self.received if "STATUS" in f]

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def notifications(
    notify_socket: socket.socket, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Notifications]:
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.getsockname())
    watched = Notifications(notify_socket)
    yield watched
    await watched.aclose()


@contextlib.asynccontextmanager
async def running_worker(
    fake_couch: FakeCouch, smtp_sink: SmtpSink
) -> AsyncIterator[asyncio.Task[Worker]]:
    config = config_for_tests(IN_PROCESS_URL, smtp_sink)
    stop: list[Worker] = []
    task = asyncio.create_task(
        run_worker(
            config,
            Shard(worker_id=0, worker_count=1),
            handle_signals=False,
            transport=fake_couch.transport(),
            on_start=stop.append,
        )
    )
    try:
        yield task
    finally:
        for worker in stop:
            worker.stop()
        await asyncio.wait_for(task, timeout=30)


@pytest.mark.anyio
async def test_a_standby_is_a_started_service_that_says_so_and_takes_over(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, notifications: Notifications
) -> None:
    fake_couch.create_database("workersequences")
    fake_couch.put(
        "workersequences",
        {
            "_id": "messages.worker-0-of-1.lease",
            "run_id": "theirs",
            "host": "mail-2",
            "pid": 4242,
            "expires_at": time.time() + 600,
        },
    )
    fake_couch.put("messages", {"_id": "m1", "to": "ann@example.com", "subject": "s", "body": "b"})
    async with running_worker(fake_couch, smtp_sink):
        # READY=1 while it stands by: systemd must count it as started, or
        # it kills it at the start timeout and restarts it, forever.
        await notifications.first("READY")
        (ready,) = [f for _, f in notifications.received if "READY" in f]
        assert ready["STATUS"].startswith("standby: worker 0/1 runs on mail-2 pid 4242")
        assert smtp_sink.messages == []
        lease = fake_couch.get("workersequences", "messages.worker-0-of-1.lease")
        assert lease is not None
        fake_couch.put("workersequences", {**lease, "expires_at": time.time() - 1})
        await notifications.first("STATUS", containing="running: 1 sent")
    assert [f for _, f in notifications.received if "READY" in f] == [ready]


@pytest.mark.anyio
async def test_status_tells_systemd_of_a_change_at_once(
    fake_couch: FakeCouch, smtp_sink: SmtpSink, notifications: Notifications
) -> None:
    async with running_worker(fake_couch, smtp_sink):
        ready_at = await notifications.first("READY")
        fake_couch.put(
            "messages", {"_id": "m1", "to": "ann@example.com", "subject": "s", "body": "b"}
        )
        await smtp_sink.await_count(1, timeout=10)
        sent_at = time.monotonic()
        status_at = await notifications.first("STATUS", containing="1 sent")
    assert status_at - sent_at < 1.0, (status_at - ready_at, notifications.statuses())
    # Sent when it changes, not again and again unchanged.
    statuses = notifications.statuses()
    assert all(a != b for a, b in itertools.pairwise(statuses)), statuses
