"""CPU per 1,000 emails: notifier's composer against the email package's EmailMessage.

    .venv/bin/python benchmarks/compose.py

Both build the same email (the same headers, a plain-text body, the bytes to
send) for 2,000 documents, five times over, in this one process; the figure
is the median, in CPU seconds per 1,000 emails (``time.process_time``). The
daemon's budget for everything it does per email is 0.5 s per 1,000. A
benchmark: it prints figures and judges nothing.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy
from email.message import EmailMessage
from email.utils import format_datetime

from notifier.message import Composer

COMPOSER = Composer(sender="notifications@example.com", database="messages")
DOCS = [
    {
        "_id": f"msg-{n:05d}",
        "to": f"user{n}@example.com",
        "from": "someone@example.com",
        "subject": f"Test {n}",
        "body": f"Test message body {n}\nSecond line.\n",
        "createdAt": 1422870000000 + n,
    }
    for n in range(2000)
]


def notifier_composer() -> None:
    for doc in DOCS:
        COMPOSER.compose(doc)


def email_message() -> None:
    for doc in DOCS:
        message = EmailMessage(policy=policy.SMTP)
        message["From"] = COMPOSER.from_header
        message["To"] = doc["to"]
        message["Reply-To"] = doc["from"]
        message["Subject"] = doc["subject"]
        message["Date"] = format_datetime(datetime.fromtimestamp(doc["createdAt"] / 1000, UTC))
        message["Message-ID"] = COMPOSER.message_id(doc["_id"])
        message["Auto-Submitted"] = "auto-generated"
        message.set_content(doc["body"])
        message.as_bytes()


def per_thousand(build: Callable[[], None], rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        started = time.process_time()
        build()
        times.append(time.process_time() - started)
    return statistics.median(times) / len(DOCS) * 1000


def main() -> None:
    ours = per_thousand(notifier_composer)
    theirs = per_thousand(email_message)
    print("| composer | CPU s / 1,000 emails | x notifier's |")
    print("|---|---:|---:|")
    print(f"| notifier.message.Composer | {ours:.3f} | 1.0x |")
    print(f"| email.message.EmailMessage, policy.SMTP | {theirs:.3f} | {theirs / ours:.1f}x |")


if __name__ == "__main__":
    main()
