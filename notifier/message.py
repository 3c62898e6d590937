"""Turning a message document into an email, or into a reason it cannot be one.

Pure: no I/O. Every field of the document is untrusted. A value that could
smuggle a header or a recipient (a CR or LF anywhere, an address that is not
one address) makes the document undeliverable with a reason that names the
field, rather than being "cleaned" into something the sender did not write.

The recipient is taken only from ``to`` and handed to SMTP as the envelope
recipient; nothing in the headers ever adds one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import Address
from email.message import EmailMessage
from email.utils import format_datetime
from typing import Any

from notifier.errors import PermanentDeliveryError

# One address, no display name, no comments, no lists: local@domain.with.dot.
# Non-ASCII is allowed (SMTPUTF8); white space, control characters and the
# characters that separate or quote addresses are not.
_ADDRESS = re.compile(r"[^\s@<>(),;:\\\"\[\]]+@[^\s@<>(),;:\\\"\[\]]+\.[^\s@<>(),;:\\\"\[\].]+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything but TAB and LF
_LINE_BREAK = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]")


@dataclass(frozen=True, slots=True)
class Composer:
    """Builds notification emails for one sender.

    >>> c = Composer(sender="n@example.com", database="messages")
    >>> m = c.compose({"_id": "m1", "to": "ann@example.com", "from": "bob@example.com",
    ...                "subject": "Hi", "body": "Hello"})
    >>> m["To"], m["Subject"], m["Reply-To"]
    ('ann@example.com', 'Hi', 'bob@example.com')
    >>> c.compose({"_id": "m2", "to": "ann@example.com\\r\\nBcc: eve@example.com"})
    Traceback (most recent call last):
    ...
    notifier.errors.PermanentDeliveryError: 'to' contains a line break
    """

    sender: str
    database: str
    sender_name: str = "Notifier"
    max_body_bytes: int = 1_000_000

    def message_id(self, doc_id: str) -> str:
        """A Message-ID that depends only on the database and the document.

        A resend of the same document carries the same id, so a mail client
        that got the first copy can recognise the second.
        """
        digest = hashlib.sha256(f"{self.database}\x00{doc_id}".encode()).hexdigest()[:32]
        domain = self.sender.rpartition("@")[2]
        return f"<notifier.{digest}@{domain}>"

    def compose(self, doc: Mapping[str, Any]) -> EmailMessage:
        """The email for ``doc``; raises PermanentDeliveryError naming what is wrong."""
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            raise PermanentDeliveryError("document has no string '_id'")
        to = address_field(doc, "to", required=True)
        assert to is not None
        author = text_field(doc, "from", single_line=True)
        subject = text_field(doc, "subject", single_line=True)
        body = text_field(doc, "body", single_line=False) or ""
        size = len(body.encode("utf-8"))
        if size > self.max_body_bytes:
            raise PermanentDeliveryError(
                f"'body' is {size} bytes, over the limit of {self.max_body_bytes} "
                "([email] max_body_bytes)"
            )

        msg = EmailMessage()
        msg["From"] = Address(display_name=self.sender_name, addr_spec=self.sender)
        msg["To"] = Address(addr_spec=to)
        reply_to = _plain_address(author)
        if reply_to is not None:
            msg["Reply-To"] = reply_to
        msg["Subject"] = subject or (f"New message from {author}" if author else "New message")
        msg["Date"] = format_datetime(_created_at(doc))
        msg["Message-ID"] = self.message_id(doc_id)
        # RFC 3834: tells autoresponders not to answer a notification.
        msg["Auto-Submitted"] = "auto-generated"
        intro = f"{author} wrote to you" if author else "You have a new message"
        heading = f"{intro}:\n\nSubject: {subject}\n\n" if subject else f"{intro}:\n\n"
        msg.set_content(heading + body + ("\n" if not body.endswith("\n") else ""))
        return msg


def address_field(doc: Mapping[str, Any], name: str, *, required: bool) -> str | None:
    """A single email address from ``doc[name]``, validated."""
    if name not in doc or doc[name] is None:
        if required:
            raise PermanentDeliveryError(f"no '{name}' field: no recipient to notify")
        return None
    value = doc[name]
    if not isinstance(value, str):
        raise PermanentDeliveryError(
            f"'{name}' is {_json_type(value)}, expected one email address as a string"
        )
    _check_unicode(name, value)
    if _LINE_BREAK.search(value):
        raise PermanentDeliveryError(f"'{name}' contains a line break")
    if not value.strip():
        raise PermanentDeliveryError(f"'{name}' is empty")
    if _CONTROL.search(value) or not _ADDRESS.fullmatch(value):
        raise PermanentDeliveryError(f"'{name}' is not a valid email address: {value[:100]!r}")
    local, _, domain = value.rpartition("@")
    try:
        # An internationalised domain travels as IDNA ("xn--…") in headers and
        # in the SMTP envelope alike.
        value = f"{local}@{domain.encode('idna').decode('ascii')}"
        Address(addr_spec=value)
    except Exception as e:  # the parser raises assorted defect classes
        raise PermanentDeliveryError(
            f"'{name}' is not a valid email address: {value[:100]!r} ({e})"
        ) from None
    return value


def text_field(doc: Mapping[str, Any], name: str, *, single_line: bool) -> str | None:
    """An optional string field; headers-bound ones must be a single line."""
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise PermanentDeliveryError(f"'{name}' is {_json_type(value)}, expected a string")
    if single_line and _LINE_BREAK.search(value):
        raise PermanentDeliveryError(f"'{name}' contains a line break")
    if _CONTROL.search(value.replace("\r\n", "\n")):
        raise PermanentDeliveryError(f"'{name}' contains control characters")
    _check_unicode(name, value)
    return value


def _check_unicode(name: str, value: str) -> None:
    """Refuse text that cannot be encoded, such as a lone UTF-16 surrogate.

    JSON allows "\\ud83d" on its own (a JavaScript client that cut an emoji
    in half writes one), but no email can carry it.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PermanentDeliveryError(
            f"'{name}' is not valid Unicode text (a lone surrogate at position {e.start})"
        ) from None


def _plain_address(value: str | None) -> Address | None:
    """``value`` as an Address if it is exactly one plain address, else ``None``.

    ``from`` is informative only (it is shown in the text), so an odd value is
    not a reason to refuse the message; it just gives no Reply-To.
    """
    if not value or not _ADDRESS.fullmatch(value):
        return None
    try:
        return Address(addr_spec=value)
    except Exception:  # the parser raises assorted defect classes
        return None


def _created_at(doc: Mapping[str, Any]) -> datetime:
    """``createdAt`` (milliseconds since the epoch) as the Date header, else now."""
    value = doc.get("createdAt")
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value / 1000, tz=UTC)
        except (OverflowError, OSError, ValueError):
            pass
    return datetime.now(tz=UTC)


def _json_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__
