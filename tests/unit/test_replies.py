"""Which SMTP replies mean what (the table in notifier.replies)."""

from __future__ import annotations

import pytest

from notifier.replies import ReplyClass, classify, describe, enhanced_code

T, R, P = ReplyClass.THROTTLED, ReplyClass.TRANSIENT, ReplyClass.PERMANENT


@pytest.mark.parametrize(
    ("code", "text", "expected"),
    [
        # Throttling, by code.
        (421, "4.7.0 Error: too many connections", T),
        (421, "Service not available, closing transmission channel", T),
        (454, "Throttling failure: Maximum sending rate exceeded.", T),  # Amazon SES
        # By enhanced code 4.7.x.
        (451, "4.7.500 Server busy. Please try again later", T),  # Microsoft
        (450, "4.7.1 Client host rejected: slow down", T),
        # By words.
        (450, "Requested action not taken: rate limit exceeded", T),
        (452, "Too many recipients received this hour", T),
        (451, "Daily sending quota exceeded", T),
        # Greylisting is about one recipient, whatever its code says.
        (451, "4.7.1 Greylisting in action, please come back later", R),
        (450, "4.7.1 <a@b.c>: Recipient address rejected: greylisted", R),
        # A word that merely contains "rate", and a mailbox's own quota.
        (451, "4.3.0 Temporary failure: separate delivery generated", R),
        (452, "4.2.2 Mailbox over quota", R),
        # Other temporary refusals.
        (451, "4.3.5 Server configuration problem", R),  # Postfix
        (450, "4.2.0 Recipient address rejected: Greylisted", R),  # postgrey
        (452, "4.3.1 Insufficient system storage", R),
        (451, "Requested action aborted: local error in processing", R),
        # Permanent.
        (550, "5.1.1 No such user", P),
        (554, "5.7.1 Relay access denied", P),
        (552, "5.3.4 Message size exceeds fixed limit", P),
        # What fits no class is not a reason to give up.
        (250, "OK?", R),
        (999, "?", R),
    ],
)
def test_replies_are_classified(code: int, text: str, expected: ReplyClass) -> None:
    assert classify(code, text) is expected


def test_enhanced_codes_are_read_from_the_start_only() -> None:
    assert enhanced_code(" 4.7.1 later") == (4, 7, 1)
    assert enhanced_code("see 4.7.1") is None
    assert enhanced_code("4.7") is None


def test_a_reply_is_described_on_one_bounded_line() -> None:
    text = describe(451, "4.3.0 first\r\nsecond\tthird " + "x" * 1000)
    assert "\n" not in text and "\r" not in text and "\t" not in text
    assert text.startswith("451 4.3.0 first second third")
    assert len(text) <= 300
