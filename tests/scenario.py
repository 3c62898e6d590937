"""Building blocks for end-to-end tests: seeded messages and configs pointing at test servers."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from realservers import CouchTestDB, couch_settings, unique_db_name

from notifier.config import Config
from notifier.testing.smtp import SmtpSink

MakeConfig = Callable[..., Config]

#: The installed command line, next to this interpreter.
NOTIFIER = str(Path(sys.executable).with_name("notifier"))


class Watched(Protocol):
    """A process under test whose log can be shown."""

    proc: subprocess.Popen[bytes]

    def output(self) -> str: ...


def wait_until(
    condition: Callable[[], bool],
    timeout: float,
    what: str,
    process: Watched | None = None,
    *,
    interval: float = 0.01,
) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds, saying ``what``.

    With ``process``, fail at once (with its log) if it exits first: a dead
    process never makes the condition true, and waiting would only hide why.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if process is not None and process.proc.poll() is not None:
            raise AssertionError(
                f"notifier exited ({process.proc.returncode}) before {what}:\n{process.output()}"
            )
        if time.monotonic() > deadline:
            log = f":\n{process.output()}" if process is not None else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{log}")
        time.sleep(interval)


def message(n: int, **fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": f"msg-{n:05d}",
        "from": "someone@example.com",
        "to": f"user{n}@example.com",
        "subject": f"Test {n}",
        "body": f"Test message body {n}",
        "createdAt": 1422870000000 + n,
    }
    doc.update(fields)
    return doc


def seed(couch: CouchTestDB, count: int, start: int = 0) -> list[str]:
    """Write `count` message docs in one bulk request; return their recipients."""
    docs = [message(n) for n in range(start, start + count)]
    for row in couch.bulk(docs):
        assert row.get("ok"), row
    return [d["to"] for d in docs]


#: [delivery]: a mail queue's minutes and hours, scaled down to test time.
TEST_DELIVERY = {
    "retry_first": 0.5,
    "retry_max": 2.0,
    "max_age": 60.0,
    "scan_interval": 0.3,
    "throttle_hold": 2.0,
    "probe_first": 0.3,
    "probe_max": 1.0,
}


def config_data(
    couch: CouchTestDB, sink: SmtpSink, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A configuration as a TOML-shaped dict, with fast timings for tests."""
    data: dict[str, Any] = {
        "couch": {
            **couch_settings(couch.url),
            "database": couch.name,
            # Per test, so checkpoints of one test never leak into another.
            "checkpoint_database": unique_db_name("checkpoints"),
            "heartbeat": 1.0,
            "request_timeout": 10.0,
        },
        "smtp": {"host": sink.host, "port": sink.port, "timeout": 10.0},
        "email": {"sender": "notify@example.com"},
        "worker": {"max_parallel": 10, "checkpoint_interval": 0.3, "drain_timeout": 10.0},
        "delivery": dict(TEST_DELIVERY),
    }
    for section, values in overrides.items():
        data.setdefault(section, {}).update(values)
    return data


def to_toml(data: dict[str, Any]) -> str:
    lines: list[str] = []
    for section, values in data.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if isinstance(value, bool):
                rendered = "true" if value else "false"
            elif isinstance(value, str):
                rendered = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
            else:
                rendered = repr(value)
            lines.append(f"{key} = {rendered}")
    return "\n".join(lines) + "\n"


@dataclass
class ScenarioRecord:
    """The figures of one reliability scenario, for docs/reliability.md.

    A scenario test fills it in (through the `scenario_record` fixture) and
    asserts on the same numbers; scripts/reliability-report collects the
    records of a run into the table.
    """

    scenario: str
    messages: int = 0
    faults: str = ""
    lost: int = 0
    duplicates_bound: int = 0
    duplicates_seen: int = 0
    recovery_seconds: float | None = None
    notes: str = ""

    def count(self, sent: Counter[str], expected: Iterable[str]) -> None:
        """Fill in messages, lost and duplicates from what the SMTP sink received."""
        wanted = set(expected)
        self.messages = len(wanted)
        self.lost = sum(1 for r in wanted if sent[r] == 0)
        self.duplicates_seen = sum(n - 1 for r, n in sent.items() if n > 1)


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and its key, made with the openssl command."""
    openssl = shutil.which("openssl")
    # scripts/test installs Debian's openssl package when this is missing.
    assert openssl is not None, "the openssl command is missing: apt-get install openssl"
    cert, key = directory / "relay.crt", directory / "relay.key"
    request = ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    subprocess.run(
        [openssl, *request, "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
    )
    return cert, key
