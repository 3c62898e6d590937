"""Building blocks for end-to-end tests: seeded messages and configs pointing at test servers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from realservers import CouchTestDB, unique_db_name

from notifier.config import Config
from notifier.testing.smtp import SmtpSink

MakeConfig = Callable[..., Config]


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


def config_data(
    couch: CouchTestDB, sink: SmtpSink, overrides: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """A configuration as a TOML-shaped dict, with fast timings for tests."""
    data: dict[str, Any] = {
        "couch": {
            "url": couch.url,
            "database": couch.name,
            # Per test, so checkpoints of one test never leak into another.
            "checkpoint_database": unique_db_name("checkpoints"),
            "heartbeat": 1.0,
            "request_timeout": 10.0,
        },
        "smtp": {"host": sink.host, "port": sink.port, "timeout": 10.0},
        "email": {"sender": "notify@example.com"},
        "worker": {"max_parallel": 10, "checkpoint_interval": 0.3, "drain_timeout": 10.0},
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
