"""The systemd units (verified by systemd-analyze) and the sd_notify protocol."""

from __future__ import annotations

import configparser
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from scenario import NOTIFIER

from notifier import cli
from notifier.config import WorkerConfig
from notifier.systemd import SystemdNotifier
from notifier.worker import FINAL_CHECKPOINT_TIMEOUT

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


def test_stop_timeout_exceeds_the_drain_deadline_and_final_checkpoint() -> None:
    stop = float(service_section()["TimeoutStopSec"])
    assert stop > WorkerConfig().drain_timeout + FINAL_CHECKPOINT_TIMEOUT


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
