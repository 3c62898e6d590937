"""``notifier demo`` run as a user would: a subprocess, stopped with Ctrl-C (SIGINT)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import httpx
import pytest

from notifier.demo import MALFORMED_COUNT, malformed_messages, sample_messages

pytestmark = pytest.mark.e2e

SEEDED = 10
# Generous bounds: they only keep a broken demo from hanging the suite.
WAIT = 60.0


def demo(out: Path, log: Path, *extra: str) -> subprocess.Popen[bytes]:
    # Output goes to a file, not a pipe: a pipe nobody reads would fill up
    # and block the demo's redraws.
    with log.open("wb") as sink:
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "notifier.demo",
                "--messages",
                str(SEEDED),
                "--out",
                str(out),
                *extra,
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_until(condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the demo exited ({proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def emails(out: Path) -> list[EmailMessage]:
    parsed = []
    for path in sorted(out.glob("*.eml")):
        message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
        assert isinstance(message, EmailMessage)
        parsed.append(message)
    return parsed


def expected_recipients() -> list[str]:
    # The demo's own sample list: which ids it used does not matter here.
    return sorted(doc["to"] for doc in sample_messages(SEEDED))


def test_demo_delivers_dead_letters_follows_and_drains_on_ctrl_c(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    out, log = tmp_path / "mail", tmp_path / "demo.log"
    proc = demo(out, log)
    processes.append(proc)
    wait_until(lambda: "press Ctrl-C" in log.read_text(), "the seed settled", proc)
    wait_until(lambda: len(list(out.glob("*.eml"))) >= SEEDED, f"{SEEDED} .eml files", proc)

    # The printed curl command, sent as written (with a fixed id for its
    # $(date +%s)), is delivered while the demo follows the feed.
    command = next(line for line in log.read_text().splitlines() if "curl " in line)
    argv = shlex.split(command.strip().replace("$(date +%s)", "from-test"))
    url = argv[argv.index("-X") + 2]
    body = json.loads(argv[argv.index("-d") + 1])
    assert argv[argv.index("-X") + 1] == "PUT"
    assert httpx.put(url, json=body).status_code == 201
    wait_until(lambda: len(list(out.glob("*.eml"))) >= SEEDED + 1, "the curl message", proc)

    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=WAIT) == 0
    output = log.read_text()

    received = emails(out)
    assert sorted(str(m["To"]) for m in received) == sorted([*expected_recipients(), body["to"]])
    assert all(m["From"] is not None and m.get_content().strip() for m in received)
    assert str(out) in output
    # Every malformed message is reported by id suffix, with its reason.
    dead = [line for line in output.splitlines() if line.startswith("dead-lettered ")]
    assert len(dead) == MALFORMED_COUNT
    for doc in malformed_messages(prefix=""):
        assert any(doc["_id"] in line for line in dead), doc["_id"]
    assert "received SIGINT" in output
    assert re.search(r"worker 0/2 stopped: \d+ sent", output)
    assert re.search(r"worker 1/2 stopped: \d+ sent", output)
    assert "Traceback" not in output


def test_demo_no_follow_exits_by_itself_once_settled(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    out, log = tmp_path / "mail", tmp_path / "demo.log"
    proc = demo(out, log, "--no-follow")
    processes.append(proc)
    assert proc.wait(timeout=WAIT) == 0
    output = log.read_text()
    assert "curl " not in output
    assert f"all {SEEDED + MALFORMED_COUNT} seeded messages settled" in output
    assert sorted(str(m["To"]) for m in emails(out)) == (expected_recipients())
