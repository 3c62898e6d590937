"""``notifier requeue`` against PouchDB Server: selection, history, safety, output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from realservers import CouchTestDB
from scenario import NOTIFIER, message

from notifier.claim import CLAIM
from notifier.config import Config
from notifier.requeue import Selection, requeue, selection_from
from notifier.testing.smtp import SmtpSink
from notifier.testing.worker import run_until
from notifier.worker import FAILED, HISTORY, NOTIFIED, RETRY

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

MakeConfig = Callable[..., Config]
NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def dead_letter(n: int, reason: str, *, failed_ago: timedelta, **fields: Any) -> dict[str, Any]:
    failed_at = (NOW - failed_ago).isoformat(timespec="milliseconds")
    record = {"reason": reason, "failedAt": failed_at, "worker": "0/1", "attempts": 7}
    return message(n, **{FAILED: record}, **fields)


def seed_dead_letters(couch: CouchTestDB) -> None:
    couch.bulk(
        [
            dead_letter(1, "gave up after 7 attempts over 5d; last reply: 451 4.3.5 "
                        "Server configuration problem", failed_ago=timedelta(days=1)),
            dead_letter(2, "gave up after 7 attempts over 5d; last reply: 451 4.3.5 "
                        "Server configuration problem", failed_ago=timedelta(hours=1)),
            dead_letter(3, "SMTP server refused the recipient: 550 5.1.1 no such user",
                        failed_ago=timedelta(days=1)),
            dead_letter(4, "no 'to' field: no recipient to notify",
                        failed_ago=timedelta(days=3), to=None),
            message(5, **{NOTIFIED: True}),
            message(6),
        ]
    )  # fmt: skip


async def test_a_dry_run_shows_what_would_be_requeued_and_writes_nothing(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    before = {d["_id"]: d["_rev"] for d in couch.all_docs()}
    report = await requeue(
        make_config(), selection_from(reason="451 4\\.3\\.5"), dry_run=True, now=NOW.timestamp()
    )
    assert [(m.id, m.action) for m in report.messages] == [
        ("msg-00001", "would requeue"),
        ("msg-00002", "would requeue"),
    ]
    assert report.examined == 4, "every dead letter, and nothing else"
    assert {d["_id"]: d["_rev"] for d in couch.all_docs()} == before
    assert "(dry run: nothing is written)" in report.render()


async def test_requeue_by_reason_and_age_keeps_the_failure_as_history(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    selection = selection_from(reason="451", older_than="12h")
    report = await requeue(make_config(), selection, now=NOW.timestamp())
    assert [(m.id, m.action) for m in report.messages] == [("msg-00001", "requeued")]
    doc = couch.get("msg-00001")
    assert FAILED not in doc and RETRY not in doc
    (history,) = doc[HISTORY]
    assert history["reason"].endswith("451 4.3.5 Server configuration problem")
    assert history["requeuedAt"] == NOW.isoformat(timespec="milliseconds")
    assert FAILED in couch.get("msg-00002"), "too recent"
    assert FAILED in couch.get("msg-00003"), "another reason"


async def test_requeue_by_id_says_why_it_skips_what_it_skips(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    selection = selection_from(ids=["msg-00003", "msg-00005", "msg-00006", "nope", "msg-00004"],
                               newer_than="2d")  # fmt: skip
    report = await requeue(make_config(), selection, now=NOW.timestamp())
    outcome = {m.id: (m.action, m.why) for m in report.messages}
    assert outcome == {
        "msg-00003": ("requeued", ""),
        "msg-00004": ("skipped", "it failed too long ago"),
        "msg-00005": ("skipped", "not a dead letter"),
        "msg-00006": ("skipped", "not a dead letter"),
        "nope": ("skipped", "no such document"),
    }


async def test_an_id_given_twice_is_requeued_once(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    selection = selection_from(ids=["msg-00003", "msg-00003"])
    report = await requeue(make_config(), selection, now=NOW.timestamp())
    assert [(m.id, m.action) for m in report.messages] == [("msg-00003", "requeued")]
    assert report.examined == 1
    assert len(couch.get("msg-00003")[HISTORY]) == 1


async def test_requeued_messages_are_sent_once_by_a_running_worker_with_the_same_id(
    couch: CouchTestDB, smtp_sink: SmtpSink, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    config = make_config()
    await run_until(config, lambda: len(smtp_sink.messages) >= 1)  # msg-00006
    await requeue(config, selection_from(reason="451"), now=NOW.timestamp())
    await run_until(config, lambda: len(smtp_sink.messages) >= 3)
    assert smtp_sink.count_by_recipient() == {
        "user1@example.com": 1,
        "user2@example.com": 1,
        "user6@example.com": 1,
    }
    for doc_id in ("msg-00001", "msg-00002"):
        doc = couch.get(doc_id)
        assert doc[NOTIFIED] is True and len(doc[HISTORY]) == 1


async def test_requeue_drops_the_retry_state_and_the_claim_and_appends_to_the_history(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    earlier = {
        "reason": "SMTP server refused the recipient: 550 5.1.1 no such user",
        "failedAt": (NOW - timedelta(days=30)).isoformat(timespec="milliseconds"),
        "requeuedAt": (NOW - timedelta(days=29)).isoformat(timespec="milliseconds"),
    }
    couch.bulk(
        [
            dead_letter(
                7,
                "gave up after 7 attempts over 5d; last reply: 451 4.3.5 try later",
                failed_ago=timedelta(days=1),
                **{
                    RETRY: {"attempts": 7, "due": 1, "since": 0},
                    CLAIM: {"worker": "0/1", "run": "r-old", "host": "mail-1", "pid": 1},
                    HISTORY: [earlier],
                },
            )
        ]
    )
    report = await requeue(make_config(), Selection(ids=("msg-00007",)), now=NOW.timestamp())
    assert [(m.id, m.action) for m in report.messages] == [("msg-00007", "requeued")]
    doc = couch.get("msg-00007")
    assert {FAILED, RETRY, CLAIM} & set(doc) == set()
    assert len(doc[HISTORY]) == 2
    old, new = doc[HISTORY]
    assert old == earlier, "the earlier dead letter comes first, as it was"
    assert new["reason"].endswith("451 4.3.5 try later")
    assert new["requeuedAt"] == NOW.isoformat(timespec="milliseconds")


async def test_requeue_by_id_and_age_says_why_it_skips_dead_letters_it_cannot_judge(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    couch.bulk(
        [
            message(1, **{FAILED: {"reason": "550 5.1.1 no such user", "worker": "0/1"}}),
            message(2, **{FAILED: "550 5.1.1 no such user"}),
            dead_letter(3, "550 5.1.1 no such user", failed_ago=timedelta(hours=1)),
            dead_letter(4, "550 5.1.1 no such user", failed_ago=timedelta(days=1)),
        ]
    )
    before = {d["_id"]: d["_rev"] for d in couch.all_docs()}
    ids = ["msg-00001", "msg-00002", "msg-00003", "msg-00004"]
    selection = selection_from(ids=ids, older_than="12h")
    report = await requeue(make_config(), selection, now=NOW.timestamp())
    assert {m.id: (m.action, m.why) for m in report.messages} == {
        "msg-00001": ("skipped", "it has no failedAt time to judge its age by"),
        "msg-00002": ("skipped", "its notificationFailed is not an object"),
        "msg-00003": ("skipped", "it failed too recently"),
        "msg-00004": ("requeued", ""),
    }
    after = {d["_id"]: d["_rev"] for d in couch.all_docs()}
    assert {i for i in ids if after[i] != before[i]} == {"msg-00004"}, "skipped: not written"


class EditsBeforeTheFirstWrite(httpx.AsyncBaseTransport):
    """Real HTTP; just before the first _bulk_docs, a person edits one document."""

    def __init__(self, couch: CouchTestDB, doc_id: str) -> None:
        self._inner = httpx.AsyncHTTPTransport()
        self._couch, self._doc_id = couch, doc_id
        self.edited = False

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/_bulk_docs") and not self.edited:
            self.edited = True
            doc = self._couch.get(self._doc_id)
            self._couch.put({**doc, "to": "fixed@example.com"})
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()


async def test_a_document_edited_meanwhile_is_read_again_and_the_edit_kept(
    couch: CouchTestDB, make_config: MakeConfig
) -> None:
    seed_dead_letters(couch)
    transport = EditsBeforeTheFirstWrite(couch, "msg-00004")
    selection = Selection(ids=("msg-00004",))
    report = await requeue(make_config(), selection, transport=transport, now=NOW.timestamp())
    assert transport.edited
    assert [(m.id, m.action) for m in report.messages] == [("msg-00004", "requeued")]
    doc = couch.get("msg-00004")
    assert doc["to"] == "fixed@example.com" and FAILED not in doc


def test_the_command_prints_json_and_refuses_a_bad_regex(
    couch: CouchTestDB, config_file: Callable[..., Path]
) -> None:
    seed_dead_letters(couch)
    path = config_file()
    run = [NOTIFIER, "requeue", "--config", str(path), "--json", "--dry-run", "--reason", "550"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["would_requeue"] == 1
    assert report["messages"][0]["id"] == "msg-00003"
    assert report["dry_run"] is True
    bad = subprocess.run(
        [NOTIFIER, "requeue", "--config", str(path), "--reason", "(unclosed"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert "--reason: not a regular expression" in bad.stderr


def test_the_command_refuses_an_age_it_cannot_read(
    couch: CouchTestDB, config_file: Callable[..., Path]
) -> None:
    seed_dead_letters(couch)
    before = {d["_id"]: d["_rev"] for d in couch.all_docs()}
    path = config_file()
    bad = subprocess.run(
        [NOTIFIER, "requeue", "--config", str(path), "--older-than", "nonsense"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2, bad.stderr
    assert "expected a duration such as 90s, 30m, 12h or 7d, got 'nonsense'" in bad.stderr
    assert {d["_id"]: d["_rev"] for d in couch.all_docs()} == before
