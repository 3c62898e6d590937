"""What the benchmark's processes share: the message documents, the email, the selector."""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

#: The selector notifier sends (see notifier.worker.SELECTOR), copied so that
#: the baseline does not depend on notifier's code.
SELECTOR: dict[str, Any] = {
    "notifiedRecipient": {"$exists": False},
    "notificationFailed": {"$exists": False},
}

SENDER = "notify@example.com"


def message(n: int, **fields: Any) -> dict[str, Any]:
    """Message document number ``n``, shaped like the README's example."""
    doc: dict[str, Any] = {
        "_id": f"msg-{n:06d}",
        "from": "someone@example.com",
        "to": f"user{n}@example.com",
        "subject": f"Test {n}",
        "body": f"Test message body {n}",
        "createdAt": 1422870000000 + n,
    }
    doc.update(fields)
    return doc


def recipient_number(address: str) -> int:
    """``n`` back from ``user<n>@example.com``."""
    return int(address.partition("@")[0].removeprefix("user"))


def compose(doc: dict[str, Any]) -> EmailMessage:
    """A plain-text notification email of about the size notifier sends."""
    mail = EmailMessage()
    mail["From"] = f"Notifier <{SENDER}>"
    mail["To"] = doc["to"]
    mail["Subject"] = doc["subject"]
    mail["Reply-To"] = doc["from"]
    mail["Date"] = format_datetime(datetime.fromtimestamp(doc["createdAt"] / 1000, tz=UTC))
    mail["Message-ID"] = f"<bench.{doc['_id']}@example.com>"
    mail["Auto-Submitted"] = "auto-generated"
    mail.set_content(f"{doc['from']} wrote:\n\n{doc['subject']}\n\n{doc['body']}\n")
    return mail
