"""Scenario 5, bad documents: the real ``notifier`` process against hostile input.

The daemon runs as a subprocess against PouchDB Server (a real CouchDB API)
and an aiosmtpd sink. Every field of a message document is untrusted: a
document that cannot be one email to one recipient is dead-lettered with a
reason that names the problem, nothing in a document can add a recipient or
a header, and the good documents around the bad ones go out exactly once.

:data:`CATALOGUE` is the specification: each entry is a document and the
exact ``notificationFailed.reason`` it must get.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from harness import NotifierCli, wait_until
from realservers import CouchTestDB
from scenario import ScenarioRecord, message

from notifier.checkpoint import checkpoint_id
from notifier.couch import seq_param
from notifier.shard import Shard
from notifier.testing.smtp import SmtpSink
from notifier.worker import FAILED, NOTIFIED, RECORD

EVIL = "evil@example.com"
# The recipient of every bad doc that does not set its own: were any of them
# sent, the envelope check would see it.
NEVER = "never@example.com"
INJECTED = f"\r\nBcc: {EVIL}"
REFUSED_BY_RELAY = "nobody@example.com"
MAX_BODY = 1_000_000
SETTLE_TIMEOUT = 30.0


@dataclass(frozen=True)
class BadDoc:
    """A document that must be dead-lettered, and the exact reason it must get."""

    id: str
    doc: dict[str, Any]
    reason: str


def not_an_address(value: str) -> str:
    return f"'to' is not a valid email address: {value!r}"


#: What every bad doc changes: a valid message to a recipient who must never
#: get mail (were a bad doc sent, the envelope check would see it).
VALID = {"to": NEVER, "from": "someone@example.com", "subject": "Hello", "body": "Hello there"}

#: Hostile and malformed documents, each with the reason that names its problem.
CATALOGUE = [
    # -- the recipient ----------------------------------------------------------
    BadDoc("no-fields-at-all", {}, "no 'to' field: no recipient to notify"),
    BadDoc(
        "no-to",
        {"from": "someone@example.com", "subject": "Hello", "body": "to no one"},
        "no 'to' field: no recipient to notify",
    ),
    BadDoc("to-null", {**VALID, "to": None}, "no 'to' field: no recipient to notify"),
    BadDoc(
        "to-number",
        {**VALID, "to": 42},
        "'to' is a number, expected one email address as a string",
    ),
    BadDoc(
        "to-list",
        {**VALID, "to": ["a@example.com", EVIL]},
        "'to' is a list, expected one email address as a string",
    ),
    BadDoc(
        "to-object",
        {**VALID, "to": {"address": "a@example.com"}},
        "'to' is an object, expected one email address as a string",
    ),
    BadDoc(
        "to-boolean",
        {**VALID, "to": True},
        "'to' is a boolean, expected one email address as a string",
    ),
    BadDoc("to-empty", {**VALID, "to": ""}, "'to' is empty"),
    BadDoc("to-blank", {**VALID, "to": "   "}, "'to' is empty"),
    BadDoc("to-invalid", {**VALID, "to": "not-an-address"}, not_an_address("not-an-address")),
    BadDoc(
        "to-two",
        {**VALID, "to": f"a@example.com, {EVIL}"},
        not_an_address(f"a@example.com, {EVIL}"),
    ),
    BadDoc("to-display-name", {**VALID, "to": f"Eve <{EVIL}>"}, not_an_address(f"Eve <{EVIL}>")),
    BadDoc(
        "to-control-char", {**VALID, "to": "a\x00@example.com"}, not_an_address("a\x00@example.com")
    ),
    # -- header injection: a CR or LF to smuggle in a Bcc -----------------------------
    BadDoc(
        "to-crlf-bcc",
        {**VALID, "to": "victim@example.com" + INJECTED},
        "'to' contains a line break",
    ),
    BadDoc(
        "to-lf-bcc",
        {**VALID, "to": f"victim@example.com\nBcc: {EVIL}"},
        "'to' contains a line break",
    ),
    BadDoc(
        "from-crlf-bcc",
        {**VALID, "from": "a@example.com" + INJECTED},
        "'from' contains a line break",
    ),
    BadDoc(
        "subject-crlf-bcc", {**VALID, "subject": "Hi" + INJECTED}, "'subject' contains a line break"
    ),
    BadDoc(
        "subject-cr-bcc",
        {**VALID, "subject": f"Hi\rBcc: {EVIL}"},
        "'subject' contains a line break",
    ),
    # -- wrong types, sizes and characters ----------------------------------------
    BadDoc("subject-number", {**VALID, "subject": 5}, "'subject' is a number, expected a string"),
    BadDoc(
        "subject-object",
        {**VALID, "subject": {"en": "Hi"}},
        "'subject' is an object, expected a string",
    ),
    BadDoc("body-list", {**VALID, "body": ["a", "b"]}, "'body' is a list, expected a string"),
    BadDoc("body-number", {**VALID, "body": 3.14}, "'body' is a number, expected a string"),
    BadDoc("from-number", {**VALID, "from": 7}, "'from' is a number, expected a string"),
    BadDoc(
        "body-10-mb",
        {**VALID, "body": "x" * 10_000_000},
        f"'body' is 10000000 bytes, over the limit of {MAX_BODY} ([email] max_body_bytes)",
    ),
    BadDoc("body-nul", {**VALID, "body": "null\x00byte"}, "'body' contains control characters"),
    BadDoc(
        "subject-escape",
        {**VALID, "subject": "\x1b[2Jcleared"},
        "'subject' contains control characters",
    ),
    BadDoc(
        "subject-lone-surrogate",
        {**VALID, "subject": "cut emoji \ud83d"},
        "'subject' is not valid Unicode text (a lone surrogate at position 10)",
    ),
    # -- a valid document the relay refuses for good --------------------------------
    BadDoc(
        "relay-550",
        {**VALID, "to": REFUSED_BY_RELAY},
        "SMTP server refused the recipient: 550 5.1.1 no such user",
    ),
]

#: Valid in every field, in many scripts: it must be sent, its headers encoded.
UNICODE_DOC: dict[str, Any] = {
    "_id": "unicode-ünïcødé-🎉",
    "to": "ann@exämple.com",
    "from": "zoë@exämple.com",
    "subject": "Grüße ☃ — 你好 🎉 שלום",
    "body": "Ça marche: 日本語, émoji 🎉, עברית, ελληνικά.\nSecond line.",
    "createdAt": 1422870000000,
}
UNICODE_ENVELOPE = "ann@xn--exmple-cua.com"  # the domain as IDNA, as SMTP carries it

#: A body that ends the DATA early and starts a second message to EVIL, were
#: it not dot-stuffed on the wire (SMTP smuggling). Line breaks are fine in a body.
SMUGGLING = (
    "Hi\r\n.\r\nMAIL FROM:<someone@example.com>\r\nRCPT TO:<evil@example.com>\r\nDATA\r\n"
    "Subject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    "and bare:\n.\nRCPT TO:<evil@example.com>\n"
)

#: Hostile but valid: each is sent once, to its own `to` and to no one else.
SENT_ANYWAY: list[dict[str, Any]] = [
    UNICODE_DOC,
    {**VALID, "_id": "smuggling-body", "to": "smuggle-target@example.com", "body": SMUGGLING},
    {
        **VALID,
        "_id": "from-with-more-addresses",
        "to": "reader@example.com",
        "from": f"Eve <{EVIL}>, victim@example.com",
        "body": f"Bcc: {EVIL}\r\nCc: {EVIL}\r\n",
    },
]


def bad_doc(bad: BadDoc) -> dict[str, Any]:
    return {**bad.doc, "_id": f"bad-{bad.id}"}


def interleaved() -> Iterator[dict[str, Any]]:
    """Good messages between the bad ones, so a bad doc never stalls its neighbours."""
    for n, bad in enumerate(CATALOGUE):
        if n % 3 == 0:
            yield message(n, _id=f"good-{n:02d}")
        yield bad_doc(bad)
    yield from SENT_ANYWAY
    yield message(999, _id="good-last")


def write_raw(couch: CouchTestDB, docs: list[dict[str, Any]]) -> None:
    """_bulk_docs with ASCII JSON, which carries a lone surrogate as JSON allows."""
    response = couch.client.post(
        f"/{quote(couch.name, safe='')}/_bulk_docs",
        content=json.dumps({"docs": docs}),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 201, response.text
    assert all(row.get("ok") for row in response.json()), response.text


def settled_ids(couch: CouchTestDB) -> set[str]:
    return {d["_id"] for d in couch.all_docs() if NOTIFIED in d or FAILED in d}


@pytest.fixture
def cli(tmp_path: Path, couch: CouchTestDB, smtp_sink: SmtpSink) -> Iterator[NotifierCli]:
    cli = NotifierCli(
        tmp_path,
        couch_url=couch.url,
        sink=smtp_sink,
        database=couch.name,
        checkpoint_database=checkpoints_of(couch),
    )
    try:
        yield cli
    finally:
        cli.close()


def envelope_of(doc: dict[str, Any]) -> str:
    """The envelope recipient a good doc is sent to."""
    return UNICODE_ENVELOPE if doc is UNICODE_DOC else str(doc["to"])


def smtp_sink_headers(sink: SmtpSink, recipient: str) -> bytes:
    """The raw header block of the message the sink accepted for ``recipient``."""
    [raw] = [m.raw for m in sink.messages if m.rcpt_tos == [recipient]]
    return raw.split(b"\r\n\r\n", 1)[0]


def plain_text(message: EmailMessage) -> str:
    part = message.get_body(("plain",))
    assert part is not None, "the email has a text/plain part"
    text = part.get_content()
    assert isinstance(text, str)
    return text.replace("\r\n", "\n")


def test_bad_documents_are_dead_lettered_with_their_reason_and_good_ones_go_out_once(
    couch: CouchTestDB, smtp_sink: SmtpSink, cli: NotifierCli, scenario_record: ScenarioRecord
) -> None:
    docs = list(interleaved())
    to_send = {d["_id"]: envelope_of(d) for d in docs if not d["_id"].startswith("bad-")}
    write_raw(couch, docs)
    smtp_sink.reject_recipient = lambda rcpt: (
        "550 5.1.1 no such user" if rcpt == REFUSED_BY_RELAY else None
    )
    config = cli.config(
        smtp={"timeout": 5.0}, email={"max_body_bytes": MAX_BODY}, worker={"max_parallel": 5}
    )
    process = cli.start(config)
    everything = {d["_id"] for d in docs}
    wait_until(
        lambda: settled_ids(couch) == everything, SETTLE_TIMEOUT, "every doc to be settled", process
    )
    # A graceful stop drains what is in flight, so a late second copy would show.
    assert process.stop() == 0, process.output()

    stored = {d["_id"]: d for d in couch.all_docs()}
    reasons = {f"bad-{bad.id}": bad.reason for bad in CATALOGUE}
    assert {i: d[FAILED]["reason"] for i, d in stored.items() if FAILED in d} == reasons
    assert [i for i in reasons if NOTIFIED in stored[i]] == []
    assert [i for i in to_send if stored[i].get(NOTIFIED) is not True] == []

    sent = smtp_sink.count_by_recipient()
    assert sent == {r: 1 for r in to_send.values()}
    # No document added a recipient: not in any envelope the relay saw (sent
    # or refused), nor in any address header of what it accepted.
    envelopes = {r for m in smtp_sink.messages for r in m.rcpt_tos}
    envelopes |= {r for m in smtp_sink.refused for r in m.rcpt_tos}
    envelopes |= {r for m in smtp_sink.dropped for r in m.rcpt_tos}
    assert envelopes == {*to_send.values(), REFUSED_BY_RELAY}
    for received in smtp_sink.messages:
        headers = received.raw.split(b"\r\n\r\n", 1)[0]
        assert EVIL.encode() not in headers
        assert received.message.get_all("To") == received.rcpt_tos
        assert received.message.get_all("Cc") is None
        assert received.message.get_all("Bcc") is None
    mail = {m.rcpt_tos[0]: m.message for m in smtp_sink.messages}

    # Unicode everywhere: sent, headers RFC 2047-encoded, decoded intact.
    unicode_mail = mail[UNICODE_ENVELOPE]
    assert smtp_sink_headers(smtp_sink, UNICODE_ENVELOPE).isascii()
    assert unicode_mail["Subject"] == UNICODE_DOC["subject"]
    assert UNICODE_DOC["body"] in plain_text(unicode_mail)
    assert stored[UNICODE_DOC["_id"]][RECORD]["messageId"] == unicode_mail["Message-ID"]
    # The smuggled commands arrived as text of the one message, not as commands.
    assert "RCPT TO:<evil@example.com>\nDATA" in plain_text(mail["smuggle-target@example.com"])

    scenario_record.scenario = "5a. Bad documents: a catalogue of hostile docs"
    scenario_record.faults = (
        f"{len(CATALOGUE)} malformed or hostile docs dead-lettered, "
        f"{len(SENT_ANYWAY)} hostile but valid ones sent"
    )
    scenario_record.count(sent, to_send.values())
    scenario_record.notes = "each dead-lettered with its exact reason; no injected recipient"
    assert scenario_record.lost == 0
    assert scenario_record.duplicates_seen == 0


def checkpoints_of(couch: CouchTestDB) -> str:
    """The test's own checkpoint database: named after its database, so it is deleted with it."""
    return f"{couch.name}_checkpoints"


def checkpoint_passed(couch: CouchTestDB, doc_id: str) -> bool:
    """Whether the worker's checkpoint lies after ``doc_id``'s latest change.

    The server says so (the doc is not among the changes after the
    checkpoint); the seqs themselves are never compared.
    """
    ckpt = couch.client.get(
        f"/{checkpoints_of(couch)}/{checkpoint_id(couch.name, Shard(worker_id=0, worker_count=1))}"
    )
    if ckpt.status_code != 200:
        return False
    changes = couch.client.get(
        f"/{quote(couch.name, safe='')}/_changes", params={"since": seq_param(ckpt.json()["since"])}
    )
    return doc_id not in {row["id"] for row in changes.json()["results"]}


def test_a_doc_edited_or_deleted_while_its_email_is_in_flight_is_sent_once(
    couch: CouchTestDB, smtp_sink: SmtpSink, cli: NotifierCli, scenario_record: ScenarioRecord
) -> None:
    couch.bulk([message(1, _id="edited"), message(2, _id="deleted")])
    at_rcpt: dict[str, float] = {}

    def note_rcpt(address: str) -> str | None:
        at_rcpt.setdefault(address, time.monotonic())
        return None  # accepted

    # The relay holds its answer to DATA: both emails are in flight, their
    # content already sent, while the user changes the documents.
    smtp_sink.delay = 2.0
    smtp_sink.reject_recipient = note_rcpt
    process = cli.start(cli.config(smtp={"timeout": 10.0}, worker={"max_parallel": 4}))
    wait_until(lambda: len(at_rcpt) == 2, SETTLE_TIMEOUT, "both emails to be in flight", process)
    edited = couch.get("edited")
    edited["subject"] = "edited by the user"
    couch.put(edited)
    couch.delete("deleted", couch.get("deleted")["_rev"])
    changed_at = time.monotonic()
    # A tombstone after the user's changes: once the checkpoint passes it,
    # the worker has handled the rows of the edit and of the deletion too.
    couch.bulk([{"_id": "fence", "_deleted": True}])  # born deleted: never a message
    wait_until(lambda: len(smtp_sink.messages) == 2, SETTLE_TIMEOUT, "both emails", process)
    wait_until(lambda: checkpoint_passed(couch, "fence"), SETTLE_TIMEOUT, "the checkpoint", process)
    assert process.stop() == 0, process.output()

    # The changes landed while the emails were in flight, not after.
    assert all(m.received_at > changed_at for m in smtp_sink.messages)
    sent = smtp_sink.count_by_recipient()
    assert sent == {"user1@example.com": 1, "user2@example.com": 1}
    doc = couch.get("edited")
    assert doc["subject"] == "edited by the user", "the user's edit is kept"
    assert doc[NOTIFIED] is True
    assert couch.client.get(f"/{couch.name}/deleted").status_code == 404, "not resurrected"
    assert process.count("deleted while in flight") == 1

    scenario_record.scenario = "5b. Bad documents: edited or deleted while in flight"
    scenario_record.faults = "1 doc edited, 1 deleted while the relay held DATA for 2 s"
    scenario_record.count(sent, ["user1@example.com", "user2@example.com"])
    scenario_record.notes = "no second email; the edit kept; the deleted doc stays deleted"
    assert scenario_record.lost == 0
    assert scenario_record.duplicates_seen == 0


def test_unicode_line_separators_in_a_doc_do_not_stall_the_feed(
    couch: CouchTestDB, smtp_sink: SmtpSink, cli: NotifierCli, scenario_record: ScenarioRecord
) -> None:
    # Valid JSON, valid text: a body may hold any of them (pasted from an
    # editor, written by JavaScript); a header field may not.
    docs = [
        message(1, _id="before"),
        message(2, _id="body-line-separator", body="one\u2028two\u2029three\x85four"),
        message(3, _id="subject-line-separator", subject=f"Hi\u2028Bcc: {EVIL}"),
        message(4, _id="subject-next-line", subject=f"Hi\x85Bcc: {EVIL}"),
        message(5, _id="after"),
    ]
    couch.bulk(docs)
    process = cli.start(cli.config(worker={"max_parallel": 5}))
    everything = {d["_id"] for d in docs}
    # A stalled feed says so in the log at once; no need to wait it out.
    wait_until(
        lambda: settled_ids(couch) == everything or "is not JSON" in process.output(),
        SETTLE_TIMEOUT,
        "every doc to be settled",
        process,
    )
    assert "is not JSON" not in process.output()
    assert process.stop() == 0, process.output()

    stored = {d["_id"]: d for d in couch.all_docs()}
    assert {i: d[FAILED]["reason"] for i, d in stored.items() if FAILED in d} == {
        "subject-line-separator": "'subject' contains a line break",
        "subject-next-line": "'subject' contains a line break",
    }
    sent = smtp_sink.count_by_recipient()
    expected = ["user1@example.com", "user2@example.com", "user5@example.com"]
    assert sent == {r: 1 for r in expected}
    [separated] = [m for m in smtp_sink.messages if m.rcpt_tos == ["user2@example.com"]]
    assert "one\u2028two\u2029three\x85four" in plain_text(separated.message)

    scenario_record.scenario = "5c. Bad documents: Unicode line separators"
    scenario_record.faults = "U+2028, U+2029, U+0085 in a body and in subjects"
    scenario_record.count(sent, expected)
    assert scenario_record.lost == 0
