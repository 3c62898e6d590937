"""Composing emails from untrusted documents: no header injection, proper encoding."""

from __future__ import annotations

import email
import email.header
import email.policy
from typing import Any

import pytest

from notifier.errors import PermanentDeliveryError
from notifier.message import Composer

COMPOSER = Composer(sender="notify@example.com", database="messages", max_body_bytes=1000)


def good(**fields: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "_id": "m1",
        "_rev": "1-abc",
        "from": "someone@example.com",
        "to": "whaa@example.com",
        "subject": "Test 123",
        "body": "Test message body",
        "createdAt": 1422870000000,
    }
    doc.update(fields)
    return doc


def wire(doc: dict[str, Any]) -> email.message.EmailMessage:
    """What the SMTP server would receive, parsed back."""
    raw = COMPOSER.compose(doc).data
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    return parsed


def test_email_says_who_wrote_the_subject_and_the_body() -> None:
    msg = wire(good())
    assert msg["To"] == "whaa@example.com"
    assert msg["From"] == "Notifier <notify@example.com>"
    assert msg["Reply-To"] == "someone@example.com"
    assert msg["Subject"] == "Test 123"
    assert msg["Date"] == "Mon, 02 Feb 2015 09:40:00 +0000"
    text = msg.get_content()
    assert "someone@example.com wrote" in text
    assert "Test 123" in text
    assert "Test message body" in text


def test_message_id_is_derived_from_the_document() -> None:
    first = wire(good())["Message-ID"]
    again = wire(good(_rev="2-def", body="edited"))["Message-ID"]
    other = wire(good(_id="m2"))["Message-ID"]
    assert first == again
    assert first != other
    assert first.endswith("@example.com>")


def test_unicode_headers_are_encoded_and_round_trip() -> None:
    doc = good(subject="Grüße ☃ — 你好", body="héllo wörld", **{"from": "zoë@example.com"})
    raw = COMPOSER.compose(doc).data
    headers = raw.split(b"\r\n\r\n", 1)[0]
    assert headers.isascii(), "non-ASCII headers must be RFC 2047 encoded"
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["Subject"] == "Grüße ☃ — 你好"
    assert "héllo wörld" in msg.get_content()  # type: ignore[attr-defined]


def test_international_domain_is_sent_as_idna() -> None:
    assert wire(good(to="user@exämple.com"))["To"] == "user@xn--exmple-cua.com"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"to": None}, "no 'to' field"),
        ({"to": 42}, "'to' is a number"),
        ({"to": ["a@example.com"]}, "'to' is a list"),
        ({"to": {"a": 1}}, "'to' is an object"),
        ({"to": True}, "'to' is a boolean"),
        ({"to": ""}, "'to' is empty"),
        ({"to": "   "}, "'to' is empty"),
        ({"to": "not-an-address"}, "'to' is not a valid email address"),
        ({"to": "a@b.com, c@d.com"}, "'to' is not a valid email address"),
        ({"to": "Ann <a@b.com>"}, "'to' is not a valid email address"),
        ({"to": "a@example.com\r\nBcc: evil@example.com"}, "'to' contains a line break"),
        ({"to": "a@example.com\nBcc: evil@example.com"}, "'to' contains a line break"),
        ({"subject": "Hi\r\nBcc: evil@example.com"}, "'subject' contains a line break"),
        ({"subject": "Hi\u2028Bcc: evil@example.com"}, "'subject' contains a line break"),
        ({"from": "x@example.com\r\nBcc: evil@example.com"}, "'from' contains a line break"),
        ({"subject": 5}, "'subject' is a number"),
        ({"body": ["a"]}, "'body' is a list"),
        ({"body": "x" * 1001}, "'body' is 1001 bytes, over the limit of 1000"),
        ({"body": "null\x00byte"}, "'body' contains control characters"),
        ({"_id": None}, "no string '_id'"),
    ],
)
def test_undeliverable_documents_get_a_reason_naming_the_problem(
    fields: dict[str, Any], reason: str
) -> None:
    doc = good(**fields)
    if fields.get("to", "") is None:
        del doc["to"]
    with pytest.raises(PermanentDeliveryError) as info:
        COMPOSER.compose(doc)
    assert reason in str(info.value)


def test_a_doc_with_no_fields_at_all_is_refused() -> None:
    with pytest.raises(PermanentDeliveryError, match="no 'to' field"):
        COMPOSER.compose({"_id": "empty", "_rev": "1-x"})


def test_optional_fields_may_be_missing() -> None:
    msg = wire({"_id": "m9", "to": "ann@example.com"})
    assert msg["Subject"] == "New message"
    assert msg["Reply-To"] is None
    assert msg["Date"] is not None


def test_a_display_name_in_from_is_shown_but_not_used_as_reply_to() -> None:
    msg = wire(good(**{"from": "Bob <bob@example.com>"}))
    assert msg["Reply-To"] is None
    assert "Bob <bob@example.com> wrote" in msg.get_content()


def test_crlf_in_the_body_stays_in_the_body() -> None:
    msg = wire(good(body="line one\r\nBcc: evil@example.com\r\n"))
    assert msg["Bcc"] is None
    assert "Bcc: evil@example.com" in msg.get_content()


def test_a_long_subject_is_folded_and_round_trips() -> None:
    subject = "word " * 150 + "é"
    raw = COMPOSER.compose(good(subject=subject)).data
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    assert wire(good(subject=subject))["Subject"] == subject


def test_a_body_with_long_lines_or_unicode_travels_as_base64_and_round_trips() -> None:
    for body in ("x" * 950, "héllo\n.\nthe line above is a lone dot"):
        msg = wire(good(body=body))
        assert msg["Content-Transfer-Encoding"] in ("base64", "7bit")
        assert body in msg.get_content()
        raw = COMPOSER.compose(good(body=body)).data
        assert all(len(line) <= 998 for line in raw.split(b"\r\n"))


def test_a_non_ascii_local_part_is_written_in_utf8_and_needs_smtputf8() -> None:
    composed = COMPOSER.compose(good(to="jörg@exämple.com"))
    assert composed.smtputf8
    assert composed.recipient == "jörg@xn--exmple-cua.com"
    head = composed.data.split(b"\r\n\r\n", 1)[0]
    assert "To: jörg@xn--exmple-cua.com\r\n".encode() in head
    # Everything else stays ASCII (encoded words), as without SMTPUTF8.
    assert all(line.isascii() for line in head.split(b"\r\n") if not line.startswith(b"To:"))


def test_an_ascii_recipient_needs_no_smtputf8_and_a_utf8_reply_to_is_left_out() -> None:
    composed = COMPOSER.compose(good(**{"from": "zoë@example.com"}))
    assert not composed.smtputf8
    assert composed.header("Reply-To") is None
    assert composed.data.isascii()


@pytest.mark.parametrize(
    "subject",
    [
        "=?utf-8?q?Your_account_is_locked?=",
        "Re: =?iso-8859-1?q?caf=E9?= tomorrow",
        "=?UTF-8?B?SGk=?=",
    ],
)
def test_a_subject_that_looks_like_an_encoded_word_is_itself_encoded(subject: str) -> None:
    # Sent as it is, a mail client would decode it and show something the
    # sender never wrote; encoded, the reader sees exactly the text.
    header = COMPOSER.compose(good(subject=subject)).header("Subject")
    assert header is not None and header != subject
    assert wire(good(subject=subject))["Subject"] == subject


@pytest.mark.parametrize(
    "fields",
    [
        {"subject": "x" * 3000},
        {"subject": "word " * 600},
        {"subject": "ü" * 1500},
        {"to": ("a" * 64) + "@" + ".".join(["b" * 60] * 4) + ".com"},
    ],
    ids=["one long word", "many words", "long non-ASCII", "longest address"],
)
def test_no_header_line_exceeds_998_octets(fields: dict[str, str]) -> None:
    raw = COMPOSER.compose(good(**fields)).data
    head = raw.split(b"\r\n\r\n", 1)[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 998
    if "subject" in fields:
        assert wire(good(**fields))["Subject"] == fields["subject"].strip()


def test_a_long_or_odd_sender_name_is_encoded_and_folded() -> None:
    for name in ("Nötifier " * 40, "=?utf-8?q?admin?=", "x" * 1200, 'ACME "Support", Inc.'):
        composer = Composer(sender="n@example.com", database="messages", sender_name=name)
        raw = composer.compose(good()).data
        head = raw.split(b"\r\n\r\n", 1)[0]
        assert max(len(line) for line in head.split(b"\r\n")) <= 998
        parsed = email.message_from_bytes(raw, policy=email.policy.compat32)
        phrase, _, address = str(parsed["From"]).rpartition(" <")
        # decode_header follows RFC 2047 6.2 (white space between encoded
        # words is not text); the default policy's address parser does not.
        decoded = str(email.header.make_header(email.header.decode_header(phrase)))
        if decoded.startswith('"'):
            decoded = decoded[1:-1].replace('\\"', '"')
        assert decoded == name
        assert address == "n@example.com>"


def test_the_recipient_is_the_envelope_recipient() -> None:
    composed = COMPOSER.compose(good(to="Ann.Lee+tag@Example.COM"))
    assert composed.recipient == "Ann.Lee+tag@Example.COM"
    assert composed.header("To") == "Ann.Lee+tag@Example.COM"
