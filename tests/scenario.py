"""Building blocks for end-to-end tests: seeded messages and configs pointing at test servers."""

from __future__ import annotations

from collections.abc import Callable
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
