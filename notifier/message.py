"""Turning a message document into an email, or into a reason it cannot be one.

Pure: no I/O. Every field of the document is untrusted. A value that could
smuggle a header or a recipient (a CR or LF anywhere, an address that is not
one address) makes the document undeliverable with a reason that names the
field, rather than being "cleaned" into something the sender did not write.

The recipient is taken only from ``to`` and handed to SMTP as the envelope
recipient; nothing in the headers ever adds one.

The email is written as bytes directly rather than through ``email``'s
``EmailMessage``: with ``policy.SMTP`` that cost 1.26 s of CPU per 1,000
emails against 0.07 s for this code (``benchmarks/compose.py``), more than
the daemon's whole budget. Header encoding uses the ``email`` package where
it matters: RFC 2047 encoded words for non-ASCII text, for text that merely
looks like an encoded word (else a mail client would decode what the user
wrote), and for anything long, so that no header line exceeds 998 octets. A
recipient whose local part is not ASCII is written in UTF-8 and marks the
email as needing SMTPUTF8 (RFC 6531, 6532).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.header import Header
from email.utils import format_datetime
from typing import Any

from notifier.errors import PermanentDeliveryError
from notifier.templates import Rendered, Templates

# One address, no display name, no comments, no lists: local@domain.with.dot.
# White space, control characters and the characters that separate or quote
# addresses are refused at once; the parts are then checked one by one.
_ADDRESS = re.compile(r"[^\s@<>(),;:\\\"\[\]]+@[^\s@<>(),;:\\\"\[\]]+\.[^\s@<>(),;:\\\"\[\].]+")
# RFC 5321 dot-atom local part (quoted local parts are not accepted); RFC
# 6531 adds any non-ASCII character (white space was refused before this).
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\u0080-\U0010ffff-"
_LOCAL_PART = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z0-9-]{2,63}")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # everything but TAB and LF
_LINE_BREAK = re.compile(r"[\r\n\u2028\u2029\x85\x0b\x0c]")
# SMTP's line limit is 998 octets; longer lines (or any non-ASCII) go base64.
_MAX_PLAIN_LINE = 900
# RFC 5322: a header line, CRLF excluded, is at most 998 octets.
MAX_LINE_OCTETS = 998
# Characters that make a display name need quoting (RFC 5322 specials).
_SPECIALS = re.compile(r'[()<>\[\]:;@\\,."]')


@dataclass(frozen=True, slots=True)
class Email:
    """A composed email: the bytes to send, and the one envelope recipient."""

    recipient: str
    message_id: str
    headers: tuple[tuple[str, str], ...]
    data: bytes = field(repr=False)
    #: The recipient (and so the To header) is not ASCII: send with SMTPUTF8.
    smtputf8: bool = False

    def header(self, name: str) -> str | None:
        """The (encoded) value of the first header called ``name``."""
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)


@dataclass(frozen=True, slots=True)
class Composer:
    """Builds notification emails for one sender.

    >>> c = Composer(sender="n@example.com", database="messages")
    >>> m = c.compose({"_id": "m1", "to": "ann@example.com", "from": "bob@example.com",
    ...                "subject": "Hi", "body": "Hello"})
    >>> m.recipient, m.header("Subject"), m.header("Reply-To")
    ('ann@example.com', 'Hi', 'bob@example.com')
    >>> c.compose({"_id": "m2", "to": "ann@example.com\\r\\nBcc: eve@example.com"})
    Traceback (most recent call last):
    ...
    notifier.errors.PermanentDeliveryError: 'to' contains a line break

    The message is built as bytes directly, from values that were each
    checked to be one line, because the ``email`` package's header parsing
    cost more CPU than everything else per message together.
    """

    sender: str
    database: str
    sender_name: str = "Notifier"
    max_body_bytes: int = 1_000_000
    # Compiled once (at start-up); the shipped defaults say what notifier
    # always said, in plain text only.
    templates: Templates = field(default_factory=Templates.default)
    # The same for every message: encoded once, not per email.
    from_header: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "from_header", _mailbox(self.sender_name, self.sender))

    def message_id(self, doc_id: str) -> str:
        """A Message-ID that depends only on the database and the document.

        A resend of the same document carries the same id, so a mail client
        that got the first copy can recognise the second.
        """
        digest = hashlib.sha256(f"{self.database}\x00{doc_id}".encode()).hexdigest()[:32]
        domain = self.sender.rpartition("@")[2]
        return f"<notifier.{digest}@{domain}>"

    def compose(self, doc: Mapping[str, Any]) -> Email:
        """The email for ``doc``; raises PermanentDeliveryError naming what is wrong."""
        doc_id = doc.get("_id")
        if not isinstance(doc_id, str):
            raise PermanentDeliveryError("document has no string '_id'")
        to = address_field(doc, "to")
        author = text_field(doc, "from", single_line=True)
        subject = text_field(doc, "subject", single_line=True)
        body = text_field(doc, "body", single_line=False) or ""
        encoded_body = body.encode("utf-8")
        if len(encoded_body) > self.max_body_bytes:
            raise PermanentDeliveryError(
                f"'body' is {len(encoded_body)} bytes, over the limit of {self.max_body_bytes} "
                "([email] max_body_bytes)"
            )
        created_at = _created_at(doc)
        rendered = self.templates.render(
            {
                "doc": doc,
                "id": doc_id,
                "to": to,
                "from_": author,
                "subject": subject,
                "body": body.replace("\r\n", "\n"),
                "created_at": created_at,
                "sender": self.sender,
                "sender_name": self.sender_name,
            }
        )
        title = _checked_subject(rendered.subject)

        message_id = self.message_id(doc_id)
        headers: list[tuple[str, str]] = [
            ("From", self.from_header),
            ("To", to),
        ]
        reply_to = _plain_address(author)
        # A UTF-8 Reply-To needs SMTPUTF8, which only a UTF-8 recipient asks for.
        if reply_to is not None and (reply_to.isascii() or not to.isascii()):
            headers.append(("Reply-To", reply_to))
        headers += [
            ("Subject", _encode_header(title, "Subject")),
            ("Date", format_datetime(created_at)),
            ("Message-ID", message_id),
            # RFC 3834: tells autoresponders not to answer a notification.
            ("Auto-Submitted", "auto-generated"),
            ("MIME-Version", "1.0"),
        ]
        content_headers, payload = _body(rendered)
        headers += content_headers
        for name, value in headers:
            # Every value was validated or encoded above; this is the last
            # line of defence against a header that could add another.
            unfolded = value.replace("\r\n ", " ")
            if "\r" in unfolded or "\n" in unfolded:
                raise PermanentDeliveryError(f"refusing a {name} header with a line break")
        utf8 = not to.isascii()
        head = "".join(f"{name}: {value}\r\n" for name, value in headers).encode(
            "utf-8" if utf8 else "ascii"
        )
        _check_line_lengths(head)
        return Email(
            recipient=to,
            message_id=message_id,
            headers=tuple(headers),
            data=head + b"\r\n" + payload,
            smtputf8=utf8,
        )


def _check_line_lengths(head: bytes) -> None:
    """Refuse a header block with a line over 998 octets (RFC 5322 2.1.1).

    The encoding above keeps lines short; this makes that a certainty
    rather than a hope, for every header at once.
    """
    if len(head) <= MAX_LINE_OCTETS:
        return
    for line in head.split(b"\r\n"):
        if len(line) > MAX_LINE_OCTETS:
            name = line.split(b":", 1)[0].decode("ascii", "replace")[:40]
            raise PermanentDeliveryError(
                f"the {name} header would be {len(line)} octets on one line (the limit is 998)"
            )


def _mailbox(name: str, address: str) -> str:
    """``Display Name <address>``, with the name quoted or encoded as RFC 5322 and 2047 want.

    >>> _mailbox("Notifier", "n@example.com"), _mailbox("ACME, Inc.", "n@example.com")
    ('Notifier <n@example.com>', '"ACME, Inc." <n@example.com>')
    >>> _mailbox("=?utf-8?q?x?=", "n@example.com")
    '=?utf-8?b?PT91dGYtOD9xP3g/PQ==?= <n@example.com>'
    """
    if not name:
        return address
    if _plain_header_text(name):
        if _SPECIALS.search(name):
            name = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{name} <{address}>"
    return f"{_encode_words(name, 'From')} <{address}>"


def _checked_subject(rendered: str) -> str:
    """The rendered subject, if it can be one header line.

    The fields were checked, but a template can still put a line break in
    (``{{ body }}``, or a literal one): that makes the message undeliverable
    rather than letting a field start a header of its own.
    """
    # Editors end files with a newline; white space at either end means nothing.
    title = rendered.strip()
    if _LINE_BREAK.search(title):
        raise PermanentDeliveryError(f"the subject template produced a line break: {title[:100]!r}")
    if _CONTROL.search(title) or "\t" in title:
        raise PermanentDeliveryError(
            f"the subject template produced control characters: {title[:100]!r}"
        )
    _check_unicode("rendered subject", title)
    return title


def _checked_part(rendered: str, what: str) -> str:
    """A rendered part with LF line ends and a final newline, or a reason it cannot be sent."""
    text = rendered.replace("\r\n", "\n")
    if _CONTROL.search(text):
        # A field read through ``doc`` was not checked like body and subject.
        raise PermanentDeliveryError(f"the {what} template produced control characters")
    _check_unicode(f"rendered {what}", text)
    return text if text.endswith("\n") else text + "\n"


def _body(rendered: Rendered) -> tuple[list[tuple[str, str]], bytes]:
    """The content headers and the body: text only, or multipart/alternative with HTML."""
    text, text_transfer = _encode_body(_checked_part(rendered.text, "text"))
    if rendered.html is None:
        # The common case stays a single part, built with no MIME machinery.
        return [
            ("Content-Type", 'text/plain; charset="utf-8"'),
            ("Content-Transfer-Encoding", text_transfer),
        ], text
    html, html_transfer = _encode_body(_checked_part(rendered.html, "html"))
    boundary = _boundary(text, html)
    delimiter = b"--" + boundary.encode("ascii")
    # Text first: RFC 2046 puts the preferred (richest) alternative last.
    payload = b"".join(
        [
            delimiter + b"\r\n",
            b'Content-Type: text/plain; charset="utf-8"\r\n',
            b"Content-Transfer-Encoding: " + text_transfer.encode("ascii") + b"\r\n\r\n",
            text,
            # The CRLF before a delimiter belongs to the delimiter, so each
            # part keeps its own final line end.
            b"\r\n" + delimiter + b"\r\n",
            b'Content-Type: text/html; charset="utf-8"\r\n',
            b"Content-Transfer-Encoding: " + html_transfer.encode("ascii") + b"\r\n\r\n",
            html,
            b"\r\n" + delimiter + b"--\r\n",
        ]
    )
    return [("Content-Type", f'multipart/alternative; boundary="{boundary}"')], payload


def _boundary(*parts: bytes) -> str:
    """A MIME boundary that occurs in none of ``parts``.

    Derived from the parts, not random, so the same document always gives the
    same bytes (a resend, or ``notifier render``, shows exactly what is sent).
    """
    digest = hashlib.sha256(b"\x00".join(parts)).hexdigest()
    for n in range(100):
        # "=_" cannot occur in base64, and a text part would have to contain
        # its own hash; the loop is only there to make that a certainty.
        boundary = f"=_notifier_{digest[:32]}_{n}"
        if not any(boundary.encode("ascii") in part for part in parts):
            return boundary
    raise PermanentDeliveryError("no MIME boundary avoids the message's text")  # pragma: no cover


def address_field(doc: Mapping[str, Any], name: str) -> str:
    """A single email address from ``doc[name]``, validated."""
    if name not in doc or doc[name] is None:
        raise PermanentDeliveryError(f"no '{name}' field: no recipient to notify")
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
    normal, problem = _normalise_address(value)
    if normal is None:
        raise PermanentDeliveryError(
            f"'{name}' is not a valid email address: {value[:100]!r} ({problem})"
        )
    return normal


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
    if value.isascii():  # the common case, and it cannot hold a surrogate
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PermanentDeliveryError(
            f"'{name}' is not valid Unicode text (a lone surrogate at position {e.start})"
        ) from None


def _normalise_address(value: str) -> tuple[str | None, str]:
    """``local@domain`` with the domain in IDNA ASCII form, or ``(None, why not)``.

    An internationalised domain travels as IDNA ("xn--…") in headers and in
    the SMTP envelope alike; a non-ASCII local part is kept as it is, and the
    email then needs SMTPUTF8.
    """
    local, _, domain = value.rpartition("@")
    if not _LOCAL_PART.fullmatch(local):
        return None, "the part before @ is not a plain dot-atom"
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        return None, "the domain is not a valid host name"
    if not _DOMAIN.fullmatch(ascii_domain):
        return None, "the domain is not a valid host name"
    return f"{local}@{ascii_domain}", ""


def _plain_address(value: str | None) -> str | None:
    """``value`` if it is exactly one plain address (normalised), else ``None``.

    ``from`` is informative only (it is shown in the text), so an odd value is
    not a reason to refuse the message; it just gives no Reply-To.
    """
    if not value or not _ADDRESS.fullmatch(value):
        return None
    return _normalise_address(value)[0]


def _plain_header_text(value: str) -> bool:
    """Whether ``value`` can go into a header as it is: short ASCII that no mail
    client would take for an RFC 2047 encoded word."""
    return value.isascii() and len(value) < 900 and "=?" not in value


def _encode_header(value: str, name: str) -> str:
    """A header value as 7-bit text, in lines well under 998 octets.

    >>> _encode_header("Hello", "Subject")
    'Hello'
    >>> _encode_header("=?utf-8?q?Urgent?=", "Subject")
    '=?utf-8?b?PT91dGYtOD9xP1VyZ2VudD89?='
    >>> max(len(line) for line in _encode_header("x" * 2000, "Subject").split("\\r\\n")) < 80
    True
    """
    if _plain_header_text(value):
        return value
    return _encode_words(value, name)


def _encode_words(value: str, name: str) -> str:
    """RFC 2047 encoded words (UTF-8), folded: for non-ASCII, long, or lookalike text."""
    return Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _encode_body(text: str) -> tuple[bytes, str]:
    """The body with CRLF line ends, and its Content-Transfer-Encoding."""
    lines = text.split("\n")
    if text.isascii() and all(len(line) <= _MAX_PLAIN_LINE for line in lines):
        # A line of a lone "." would end DATA early; SMTP clients dot-stuff,
        # and aiosmtplib does, so the text can go as it is.
        return "\r\n".join(lines).encode("ascii"), "7bit"
    return base64.encodebytes(text.encode("utf-8")).replace(b"\n", b"\r\n"), "base64"


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
