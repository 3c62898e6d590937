"""The shipped unit under a real systemd: PID 1 of a systemd-nspawn container.

Each test drives notifier@.service with systemctl inside the container, as an
operator would, against PouchDB Server and an SMTP sink on the host. The
container and its cached root file system are in tests/container.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from container import Container, require_host, rootfs
from realservers import CouchTestDB
from scenario import config_data, seed, to_toml, wait_until

from notifier.testing.smtp import SmtpSink

REPO = Path(__file__).resolve().parents[2]
#: Start timeout for the tests (the shipped default is 90 s): a standby held
#: for longer than this would have been killed and restarted before the fix.
START_TIMEOUT = 10

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Container]:
    require_host()
    log = tmp_path_factory.mktemp("systemd") / "container.log"
    box = Container(rootfs(REPO, log), REPO, log)
    box.run(
        "cp",
        "/src/systemd/notifier@.service",
        "/src/systemd/notifier.target",
        "/etc/systemd/system/",
    )
    box.write(
        "/etc/systemd/system/notifier@.service.d/10-test.conf",
        f"[Service]\nEnvironment=NOTIFIER_CONFIG=/etc/notifier/test.toml\n"
        f"TimeoutStartSec={START_TIMEOUT}\n",
    )
    # The unit loads both as credentials; the tests' configs need no password.
    box.write("/etc/notifier/couch-password", "", mode="0600")
    box.write("/etc/notifier/smtp-password", "", mode="0600")
    box.systemctl("daemon-reload")
    try:
        yield box
    finally:
        box.close()


@pytest.fixture
def configure(box: Container, couch: CouchTestDB, smtp_sink: SmtpSink) -> Iterator[Any]:
    """Write /etc/notifier/test.toml for this test's database; stop every worker after it."""

    def write(**overrides: dict[str, Any]) -> dict[str, Any]:
        data = config_data(couch, smtp_sink, overrides)
        box.write("/etc/notifier/test.toml", to_toml(data))
        return data

    yield write
    box.systemctl("stop", "notifier@*", check=False)
    box.systemctl("reset-failed", check=False)


def active(box: Container, unit: str) -> dict[str, str]:
    return box.show(unit, "ActiveState", "SubState", "Result", "NRestarts", "MainPID", "StatusText")


def restarted_once(box: Container, unit: str, what: str) -> None:
    def running_again() -> bool:
        state = active(box, unit)
        return state["NRestarts"] == "1" and state["SubState"] == "running"

    wait_until(running_again, 30, what)


def checkpoint(couch: CouchTestDB, data: dict[str, Any]) -> dict[str, Any] | None:
    db = data["couch"]["checkpoint_database"]
    response = couch.client.get(f"/{db}/{couch.name}.worker-0-of-1")
    return response.json() if response.status_code == 200 else None


def test_ready_status_and_a_clean_stop_with_a_final_checkpoint(
    box: Container, configure: Any, couch: CouchTestDB, smtp_sink: SmtpSink
) -> None:
    # A checkpoint timer longer than the test: only the stop writes one.
    data = configure(worker={"checkpoint_interval": 600.0})
    # Type=notify: systemctl start returns once the worker sent READY=1.
    box.systemctl("start", "notifier@0")
    state = active(box, "notifier@0")
    assert (state["ActiveState"], state["SubState"]) == ("active", "running"), state
    assert state["StatusText"].startswith("running: 0 sent"), state

    recipients = seed(couch, 5)
    wait_until(lambda: len(smtp_sink.messages) == 5, 30, "5 emails")
    wait_until(
        lambda: "running: 5 sent" in active(box, "notifier@0")["StatusText"], 5, "STATUS= counts"
    )
    assert checkpoint(couch, data) is None

    box.systemctl("stop", "notifier@0")
    stopped = box.show("notifier@0", "ActiveState", "Result", "ExecMainStatus")
    assert stopped == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}
    journal = box.journal("notifier@0")
    assert "received SIGTERM: stopping" in journal
    assert "worker 0/1 stopped: sent 5" in journal
    saved = checkpoint(couch, data)
    assert saved is not None and saved.get("since") is not None, "no final checkpoint"
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}


def test_a_standby_is_started_never_restarted_and_takes_over(
    box: Container, configure: Any, couch: CouchTestDB, smtp_sink: SmtpSink
) -> None:
    configure()
    box.systemctl("start", "notifier@0")
    # The same worker slot (0 of 1) under another instance name.
    started = time.monotonic()
    box.systemctl("start", "notifier@0-of-1")
    assert time.monotonic() - started < START_TIMEOUT
    standby = active(box, "notifier@0-of-1")
    assert (standby["ActiveState"], standby["SubState"]) == ("active", "running"), standby
    assert standby["StatusText"].startswith("standby: worker 0/1 runs on "), standby

    time.sleep(START_TIMEOUT + 5)  # longer than the start timeout
    held = active(box, "notifier@0-of-1")
    assert held["ActiveState"] == "active" and held["NRestarts"] == "0", held
    assert held["MainPID"] == standby["MainPID"], "the standby was restarted"
    assert "standby: " in held["StatusText"]

    box.systemctl("stop", "notifier@0")
    wait_until(
        lambda: active(box, "notifier@0-of-1")["StatusText"].startswith("running"),
        10,
        "the standby to take over",
    )
    recipients = seed(couch, 3)
    wait_until(lambda: len(smtp_sink.messages) == 3, 30, "3 emails from the new holder")
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    assert "took the lease (it was released)" in box.journal("notifier@0-of-1")


def test_kill_9_is_restarted_and_takes_its_lease_back_at_once(
    box: Container, configure: Any, couch: CouchTestDB, smtp_sink: SmtpSink
) -> None:
    # A lease far longer than the test: only knowing the holder is gone frees it.
    configure(worker={"lease_ttl": 600.0})
    box.systemctl("start", "notifier@0")
    first = active(box, "notifier@0")
    box.systemctl("kill", "--signal=SIGKILL", "--kill-whom=main", "notifier@0")
    restarted_once(box, "notifier@0", "systemd to restart it")
    after = active(box, "notifier@0")
    assert after["MainPID"] != first["MainPID"]
    journal = box.journal("notifier@0")
    assert (
        "took the lease (its holder (" in journal and f"pid {first['MainPID']}) is gone)" in journal
    )
    recipients = seed(couch, 3)
    wait_until(lambda: len(smtp_sink.messages) == 3, 30, "3 emails after the restart")
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}


def test_configuration_and_credential_errors_are_not_restarted(
    box: Container, configure: Any, couch: CouchTestDB
) -> None:
    data = configure()
    box.write("/etc/notifier/bad.toml", to_toml({**data, "smtp": {**data["smtp"], "port": 0}}))
    with SmtpSink(username="notifier", password="right-one") as guarded:
        refused = {**data, "smtp": {**data["smtp"], "port": guarded.port}}
        refused["smtp"].update(username="notifier", password_file="smtp-password")
        box.write("/etc/notifier/refused.toml", to_toml(refused))
        box.write("/etc/notifier/smtp-password", "wrong-one\n", mode="0600")
        for instance, config in (("1-of-2", "bad.toml"), ("0-of-2", "refused.toml")):
            box.write(
                f"/etc/systemd/system/notifier@{instance}.service.d/20-config.conf",
                f"[Service]\nEnvironment=NOTIFIER_CONFIG=/etc/notifier/{config}\n",
            )
        box.systemctl("daemon-reload")
        for instance in ("1-of-2", "0-of-2"):
            box.systemctl("start", f"notifier@{instance}", check=False)
        time.sleep(7)  # longer than RestartSec=5
        assert guarded.messages == []
    box.write("/etc/notifier/smtp-password", "", mode="0600")
    for instance, status in (("1-of-2", "78"), ("0-of-2", "77")):
        state = box.show(f"notifier@{instance}", "ActiveState", "ExecMainStatus", "NRestarts")
        assert state == {"ActiveState": "failed", "ExecMainStatus": status, "NRestarts": "0"}
    assert "configuration error" in box.journal("notifier@1-of-2")
    assert "refused the login" in box.journal("notifier@0-of-2")


def test_the_watchdog_restarts_a_stopped_process(
    box: Container, configure: Any, couch: CouchTestDB, smtp_sink: SmtpSink
) -> None:
    configure()
    box.write(
        "/etc/systemd/system/notifier@0.service.d/20-watchdog.conf",
        "[Service]\nWatchdogSec=3\nTimeoutAbortSec=2\n",
    )
    box.systemctl("daemon-reload")
    try:
        box.systemctl("start", "notifier@0")
        first = active(box, "notifier@0")
        time.sleep(4)  # pings keep a live process alive past WatchdogSec
        assert active(box, "notifier@0")["NRestarts"] == "0"
        assert active(box, "notifier@0")["MainPID"] == first["MainPID"]
        box.systemctl("kill", "--signal=SIGSTOP", "--kill-whom=main", "notifier@0")
        restarted_once(box, "notifier@0", "the watchdog to restart it")
        assert "Watchdog timeout" in box.run("journalctl", "--no-pager", "-u", "notifier@0").stdout
        assert active(box, "notifier@0")["MainPID"] != first["MainPID"]
        recipients = seed(couch, 2)
        wait_until(lambda: len(smtp_sink.messages) == 2, 30, "2 emails after the restart")
        assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    finally:
        box.run("rm", "-r", "/etc/systemd/system/notifier@0.service.d")
        box.systemctl("daemon-reload")
