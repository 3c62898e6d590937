"""The installed ``notifier`` command, run as a subprocess against real servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from realservers import CouchTestDB
from scenario import NOTIFIER, ScenarioRecord, seed, wait_until

from notifier.shard import Shard
from notifier.testing.smtp import SmtpSink
from notifier.worker import FAILED, NOTIFIED, RECORD

pytestmark = pytest.mark.e2e

ConfigFile = Callable[..., Path]


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"notifier did not exit in {timeout}s:\n{self.output()}") from None

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def daemon(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[Daemon]:
    log = tmp_path / f"notifier-{time.monotonic_ns()}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [NOTIFIER, *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    d = Daemon(proc, log)
    try:
        yield d
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOTIFIER, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def checkpoint(couch: CouchTestDB, path: Path, doc_id: str) -> dict[str, Any] | None:
    import tomllib

    db = tomllib.loads(path.read_text())["couch"]["checkpoint_database"]
    response = couch.client.get(f"/{db}/{doc_id}")
    return response.json() if response.status_code == 200 else None


def test_run_delivers_once_stops_on_sigint_and_restarts_without_resending(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    recipients = seed(couch, 300)
    cfg = config_file()
    with daemon(tmp_path, "run", "--worker-id", "0", "--config", str(cfg)) as d:
        wait_until(lambda: len(smtp_sink.messages) >= 300, 60, "300 emails", d)
        recipients += seed(couch, 20, start=1000)  # added while it runs
        wait_until(lambda: len(smtp_sink.messages) >= 320, 30, "320 emails", d)
        d.signal(signal.SIGINT)
        assert d.wait() == 0, d.output()
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    docs = couch.all_docs()
    assert len(docs) == 320 and all(doc[NOTIFIED] is True for doc in docs)
    first = checkpoint(couch, cfg, f"{couch.name}.worker-0-of-1")
    assert first is not None, "SIGINT must leave a checkpoint"

    with daemon(tmp_path, "run", "--worker-id", "0", "--config", str(cfg)) as d:
        wait_until(lambda: "resuming from checkpoint" in d.output(), 30, "start-up", d)
        recipients += seed(couch, 5, start=2000)
        wait_until(lambda: len(smtp_sink.messages) >= 325, 30, "5 more emails", d)
        time.sleep(1.0)  # room for any wrongful resend to show up
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    assert checkpoint(couch, cfg, f"{couch.name}.worker-0-of-1") != first


def test_two_workers_share_the_work_with_no_gap_and_no_overlap(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    recipients = seed(couch, 200)
    cfg = str(config_file())
    with (
        daemon(tmp_path, "run", "--worker-id", "0", "--worker-count", "2", "--config", cfg) as a,
        daemon(tmp_path, "run", "--worker-id", "1", "--worker-count", "2", "--config", cfg) as b,
    ):
        wait_until(lambda: len(smtp_sink.messages) >= 200, 60, "200 emails", a)
        time.sleep(1.0)
        for d in (a, b):
            d.signal(signal.SIGTERM)
        assert a.wait() == 0, a.output()
        assert b.wait() == 0, b.output()
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    workers = {doc[RECORD]["worker"] for doc in couch.all_docs()}
    assert workers == {"0/2", "1/2"}
    for worker_id in (0, 1):
        assert checkpoint(couch, Path(cfg), f"{couch.name}.worker-{worker_id}-of-2") is not None


def test_a_worker_named_n_of_m_is_worker_n_of_m(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    # As systemd's notifier@1-of-2 runs it: the config and the environment
    # say 1 worker, the instance name says 2.
    recipients = seed(couch, 20)
    cfg = str(config_file())
    mine = {f"user{n}@example.com" for n in range(20) if Shard(1, 2).owns(f"msg-{n:05d}")}
    env = {"NOTIFIER_WORKER_COUNT": "1"}
    with daemon(tmp_path, "run", "--worker-id", "1-of-2", "--config", cfg, env=env) as d:
        wait_until(lambda: len(smtp_sink.messages) >= len(mine), 30, "its share", d)
        time.sleep(0.5)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
    assert set(smtp_sink.count_by_recipient()) == mine != recipients
    assert checkpoint(couch, Path(cfg), f"{couch.name}.worker-1-of-2") is not None


def test_sigint_under_load_drains_and_a_restart_sends_no_duplicate(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    recipients = seed(couch, 60)
    smtp_sink.delay = 0.25
    cfg = str(config_file(worker={"max_parallel": 5, "drain_timeout": 20.0}))
    with daemon(tmp_path, "run", "--worker-id", "0", "--config", cfg) as d:
        wait_until(lambda: len(smtp_sink.messages) >= 10, 30, "10 emails", d)
        d.signal(signal.SIGINT)
        assert d.wait() == 0, d.output()
    sent = {m.rcpt_tos[0] for m in smtp_sink.messages}
    marked = {doc["to"] for doc in couch.all_docs() if NOTIFIED in doc}
    assert sent == marked, "every email that went out was marked, and nothing else"
    assert len(sent) < 60, "the stop came mid-run"

    smtp_sink.delay = 0
    with daemon(tmp_path, "run", "--worker-id", "0", "--config", cfg) as d:
        wait_until(lambda: len(smtp_sink.messages) >= 60, 60, "all emails", d)
        time.sleep(0.5)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0, d.output()
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}


def test_a_second_signal_exits_at_once(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    seed(couch, 20)
    smtp_sink.delay = 5.0
    cfg = str(config_file(worker={"max_parallel": 2, "drain_timeout": 60.0}))
    with daemon(tmp_path, "run", "--worker-id", "0", "--config", cfg) as d:
        wait_until(lambda: "starting from the beginning" in d.output(), 30, "start-up", d)
        time.sleep(0.5)  # let the first sends begin, so there is something to drain
        d.signal(signal.SIGTERM)
        wait_until(lambda: "draining" in d.output(), 10, "the drain to start", d)
        d.signal(signal.SIGTERM)
        assert d.wait(timeout=10) == 130, d.output()
    assert "exiting at once" in d.output()


@pytest.mark.parametrize(
    ("mistake", "overrides", "args", "status", "message"),
    [
        ("max_parallel < 1", {"worker": {"max_parallel": 0}}, [], 78, "[worker] max_parallel"),
        ("missing database", {"couch": {"database": "nope_missing"}}, [], 69, "does not exist"),
        (
            "worker id >= worker count",
            {},
            ["--worker-count", "2", "--worker-id", "2"],
            2,
            "worker_id 2 is out of range",
        ),
        ("unreachable CouchDB", {"couch": {"url": "http://127.0.0.1:9"}}, [], 69, "CouchDB"),
        (
            "worker id >= the config's worker count",
            {},
            ["--worker-id", "1"],
            78,
            "worker_id 1 is out of range for worker_count 1",
        ),
        (
            "unreadable password file",
            {"couch": {"username": "notifier", "password_file": "/nonexistent/couch-password"}},
            [],
            78,
            "[couch] password_file: cannot read /nonexistent/couch-password",
        ),
    ],
)
def test_start_up_errors_have_distinct_exit_statuses(
    couch: CouchTestDB,
    config_file: ConfigFile,
    smtp_sink: SmtpSink,
    scenario_record: ScenarioRecord,
    mistake: str,
    overrides: dict[str, Any],
    args: list[str],
    status: int,
    message: str,
) -> None:
    seed(couch, 2)
    cfg = str(config_file(**overrides))
    worker_args = args or ["--worker-id", "0"]
    result = run("run", *worker_args, "--config", cfg)
    assert result.returncode == status, result.stderr
    assert message in result.stderr
    assert smtp_sink.messages == []
    assert all(NOTIFIED not in doc and FAILED not in doc for doc in couch.all_docs())
    scenario_record.scenario = f"7. Configuration mistake: {mistake}"
    scenario_record.faults = f"exit {status} before any email: {message}"
    scenario_record.messages = 2
    scenario_record.notes = "nothing sent, marked or dead-lettered"


def test_smtp_login_failure_exits_77_without_leaking_the_password(
    couch: CouchTestDB, config_file: ConfigFile, tmp_path: Path
) -> None:
    seed(couch, 2)
    with SmtpSink(username="notifier", password="right-one") as sink:
        cfg = str(config_file(smtp={"port": sink.port, "username": "notifier"}))
        result = run(
            "run",
            "--worker-id",
            "0",
            "--config",
            cfg,
            env={"NOTIFIER_SMTP_PASSWORD": "wr0ng-s3cret"},
        )
        assert sink.messages == []
    assert result.returncode == 77, result.stderr
    assert "refused the login" in result.stderr
    assert "wr0ng-s3cret" not in result.stderr
    assert all(NOTIFIED not in doc for doc in couch.all_docs())


def test_worker_count_can_come_from_the_environment(
    couch: CouchTestDB, config_file: ConfigFile
) -> None:
    cfg = str(config_file())
    result = run("run", "--worker-id", "3", "--config", cfg, env={"NOTIFIER_WORKER_COUNT": "3"})
    assert result.returncode == 78
    assert "worker_id 3 is out of range for worker_count 3" in result.stderr
    bad = run("run", "--worker-id", "0", "--config", cfg, env={"NOTIFIER_WORKER_COUNT": "x"})
    assert bad.returncode == 78
    assert "NOTIFIER_WORKER_COUNT: expected an integer, got 'x'" in bad.stderr


def test_the_worker_id_can_name_its_layout_as_a_systemd_instance_does(
    couch: CouchTestDB, config_file: ConfigFile
) -> None:
    cfg = str(config_file())
    # N-of-M wins over the environment: the instance name says which layout.
    # A wrong worker id or count on the command line is a bad command line (2).
    named = run("run", "--worker-id", "3-of-3", "--config", cfg, env={"NOTIFIER_WORKER_COUNT": "9"})
    assert named.returncode == 2
    assert "worker_id 3 is out of range for worker_count 3" in named.stderr
    beyond = run("run", "--worker-id", "5", "--worker-count", "3", "--config", cfg)
    assert beyond.returncode == 2
    assert "worker_id 5 is out of range for worker_count 3" in beyond.stderr
    clash = run("run", "--worker-id", "0-of-3", "--worker-count", "2", "--config", cfg)
    assert clash.returncode == 2
    assert "--worker-id 0-of-3 and --worker-count 2 disagree" in clash.stderr
    garbage = run("run", "--worker-id", "0-3", "--config", cfg)
    assert garbage.returncode == 2
    assert "expected a worker id N or N-of-M" in garbage.stderr


def test_missing_config_file_exits_78() -> None:
    result = run("run", "--worker-id", "0", "--config", "/nonexistent/notifier.toml")
    assert result.returncode == 78
    assert "/nonexistent/notifier.toml: no such file" in result.stderr


def test_help_explains_every_option() -> None:
    top = run("--help")
    assert top.returncode == 0
    assert "run" in top.stdout and "exit statuses" in top.stdout
    sub = subprocess.run(
        [sys.executable, "-m", "notifier", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for option in ("--worker-id", "--worker-count", "--config", "--log-level"):
        assert option in sub.stdout


def test_a_second_process_for_the_same_worker_waits_and_takes_over(
    couch: CouchTestDB,
    smtp_sink: SmtpSink,
    config_file: ConfigFile,
    tmp_path: Path,
    scenario_record: ScenarioRecord,
) -> None:
    recipients = seed(couch, 80)
    smtp_sink.delay = 0.05
    cfg = str(config_file(worker={"max_parallel": 2}))
    args = ("run", "--worker-id", "0", "--worker-count", "1", "--config", cfg)
    with daemon(tmp_path, *args) as first:
        wait_until(lambda: len(smtp_sink.messages) >= 5, 30, "the first to send", first)
        with daemon(tmp_path, *args) as second:
            wait_until(lambda: "waiting as a standby" in second.output(), 30, "standby", second)
            assert "already running on" in second.output()
            first.signal(signal.SIGTERM)
            stopped_at = time.monotonic()
            assert first.wait() == 0, first.output()
            sent_before = len(smtp_sink.messages)
            wait_until(
                lambda: len(smtp_sink.messages) > sent_before, 30, "the standby to send", second
            )
            took_over = time.monotonic() - stopped_at
            wait_until(lambda: len(smtp_sink.messages) >= 80, 60, "all emails", second)
            second.signal(signal.SIGTERM)
            assert second.wait() == 0, second.output()
    assert "took the lease" in second.output()
    assert smtp_sink.count_by_recipient() == {r: 1 for r in recipients}
    workers_sent = {doc[RECORD]["worker"] for doc in couch.all_docs()}
    assert workers_sent == {"0/1"}
    scenario_record.scenario = "6a. Same worker id twice: the second waits, then takes over"
    scenario_record.count(smtp_sink.count_by_recipient(), recipients)
    scenario_record.faults = "a second process with the same id and count; the first stopped"
    scenario_record.recovery_seconds = took_over
    scenario_record.notes = "recovery = first's SIGTERM to the standby's first email"
    assert scenario_record.duplicates_seen == 0


def test_a_crashed_holder_on_this_host_is_replaced_without_waiting_out_the_lease(
    couch: CouchTestDB,
    smtp_sink: SmtpSink,
    config_file: ConfigFile,
    tmp_path: Path,
    scenario_record: ScenarioRecord,
) -> None:
    recipients = seed(couch, 40)
    smtp_sink.delay = 0.05
    # A lease far longer than the test: only the dead-pid check can free it.
    cfg = str(config_file(worker={"max_parallel": 2, "lease_ttl": 600.0}))
    args = ("run", "--worker-id", "0", "--config", cfg)
    with daemon(tmp_path, *args) as first:
        wait_until(lambda: len(smtp_sink.messages) >= 5, 30, "the first to send", first)
        first.proc.kill()
        first.proc.wait()
    with daemon(tmp_path, *args) as second:
        # Every recipient, not 40 emails: what was in flight at the kill may
        # come twice, and 40 emails could then leave one recipient out.
        wait_until(lambda: len(smtp_sink.count_by_recipient()) >= 40, 60, "all recipients", second)
        second.signal(signal.SIGTERM)
        assert second.wait() == 0, second.output()
    assert "is gone" in second.output()
    counts = smtp_sink.count_by_recipient()
    assert set(counts) == set(recipients)
    # A crash may resend what was in flight: at most max_parallel.
    scenario_record.scenario = "6b. Same worker: a SIGKILLed holder is replaced at once"
    scenario_record.count(counts, recipients)
    scenario_record.duplicates_bound = 2
    scenario_record.faults = "holder SIGKILLed with a 600 s lease; restarted on the same host"
    scenario_record.notes = "the dead pid frees the lease; no wait for its expiry"
    assert scenario_record.lost == 0
    assert scenario_record.duplicates_seen <= scenario_record.duplicates_bound


def test_check_passes_on_a_good_setup_and_names_what_fails(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile
) -> None:
    good = run("check", "--config", str(config_file()))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "checks passed" in good.stdout
    bad = run("check", "--config", str(config_file(couch={"database": "mesages"})))
    assert bad.returncode == 69
    assert "FAIL" in bad.stdout and "'mesages' does not exist" in bad.stdout
    assert smtp_sink.messages == [], "check sends no email"


def test_status_shows_the_workers_of_a_run_as_json(
    couch: CouchTestDB, smtp_sink: SmtpSink, config_file: ConfigFile, tmp_path: Path
) -> None:
    seed(couch, 10)
    cfg = str(config_file())
    with daemon(tmp_path, "run", "--worker-id", "0", "--config", cfg) as d:
        wait_until(lambda: len(smtp_sink.messages) >= 10, 30, "10 emails", d)
        running = run("status", "--config", cfg, "--json")
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
    assert running.returncode == 0, running.stdout + running.stderr
    report = json.loads(running.stdout)
    (layout,) = report["layouts"]
    (worker,) = layout["workers"]
    assert (worker["worker_id"], worker["worker_count"]) == (0, 1)
    assert worker["stale"] is False
    table = run("status", "--config", cfg)
    assert table.returncode == 0
    assert "0 of 1" in table.stdout


def test_render_prints_the_email_and_names_why_a_document_would_be_dead_lettered(
    tmp_path: Path,
) -> None:
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "page.html").write_text("<p>{{ subject }}</p>\n")
    cfg = tmp_path / "notifier.toml"
    cfg.write_text("[email]\nsender = 'n@example.com'\nhtml_template = 'mail/page.html'\n")
    doc = tmp_path / "doc.json"
    doc.write_text(json.dumps({"_id": "m1", "to": "ann@example.com", "subject": "<b>Hi & bye"}))
    out = run("render", "--config", str(cfg), str(doc))
    assert out.returncode == 0, out.stderr
    assert "To: ann@example.com\n" in out.stdout
    assert "Subject: <b>Hi & bye\n" in out.stdout
    assert "Content-Type: multipart/alternative;" in out.stdout
    assert "Subject: <b>Hi & bye\n\n" in out.stdout.split("text/plain", 1)[1]
    assert "<p>&lt;b&gt;Hi &amp; bye</p>" in out.stdout

    doc.write_text(json.dumps({"_id": "m2", "subject": "no recipient"}))
    bad = run("render", "--config", str(cfg), str(doc))
    assert bad.returncode == 65
    assert "no 'to' field" in bad.stderr
    assert bad.stdout == ""


def test_render_needs_no_password_and_shows_non_ascii_text_as_text(tmp_path: Path) -> None:
    cfg = tmp_path / "notifier.toml"
    # The production config: an SMTP login whose password only the service has.
    cfg.write_text(
        "[email]\nsender = 'n@example.com'\n"
        "[smtp]\nusername = 'notifier'\npassword_file = 'smtp-password'\n"
        "[couch]\nusername = 'notifier'\n"
    )
    doc = tmp_path / "doc.json"
    body = "Schöne Grüße aus Köln — 日本語"
    doc.write_text(
        json.dumps({"_id": "m1", "to": "ann@example.com", "subject": "Grüße", "body": body})
    )
    out = run("render", "--config", str(cfg), str(doc), env={"CREDENTIALS_DIRECTORY": ""})
    assert out.returncode == 0, out.stderr
    assert "Subject: Grüße\n" in out.stdout
    assert body in out.stdout
    assert "Content-Transfer-Encoding: base64" in out.stdout  # how it travels


def test_check_names_every_configuration_mistake_at_once(tmp_path: Path) -> None:
    cfg = tmp_path / "notifier.toml"
    cfg.write_text(
        "[email]\nsender = 'n@example.com'\n[smtp]\nport = 70000\n[worker]\nmax_parallel = 0\n"
    )
    result = run("check", "--config", str(cfg))
    assert result.returncode == 78
    assert "[smtp] port: expected 1 to 65535, got 70000" in result.stderr
    assert "[worker] max_parallel: expected a value greater than 0" in result.stderr
