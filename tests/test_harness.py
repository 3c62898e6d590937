"""The test harness itself: real servers start, record, and fail the way tests need."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import textwrap
import time
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import httpx
import pytest
from realservers import (
    INSTALL_COMMAND,
    CouchError,
    CouchTestDB,
    PouchDBServer,
    unique_db_name,
)

from notifier.testing import ReceivedEnvelopeInfo, SmtpSink, free_port


def _email(to: str = "whaa@example.com", subject: str = "Test 123") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "notifier@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Test message body")
    return msg


# -- PouchDB Server ------------------------------------------------------------


def test_pouchdb_stores_and_returns_docs(couch: CouchTestDB) -> None:
    created = couch.put({"_id": "m1", "to": "whaa@example.com", "subject": "Test 123"})
    assert created["ok"] is True
    assert created["rev"].startswith("1-")
    couch.put({"_id": "_design/app", "views": {}})
    rows = couch.bulk([{"_id": "m2", "to": "a@example.com"}, {"to": "b@example.com"}])
    assert [row.get("ok") for row in rows] == [True, True]

    assert couch.get("m1")["subject"] == "Test 123"
    docs = couch.all_docs()
    assert len(docs) == 3
    assert {doc["to"] for doc in docs} == {"whaa@example.com", "a@example.com", "b@example.com"}
    assert not any(doc["_id"].startswith("_design/") for doc in docs)


def test_pouchdb_reports_conflicts(couch: CouchTestDB) -> None:
    couch.put({"_id": "m1", "n": 1})
    with pytest.raises(CouchError) as caught:
        couch.put({"_id": "m1", "n": 2})
    assert caught.value.status == 409


def test_each_test_gets_its_own_empty_database(couch: CouchTestDB) -> None:
    assert couch.all_docs() == []
    info = httpx.get(couch.db_url, headers={"Accept": "application/json"}, trust_env=False)
    assert info.json()["db_name"] == couch.name


def test_couch_fixture_fails_loudly_when_the_server_dies(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Runs our own conftest in a separate pytest session, so that the failure
    # it must report is not this session's.
    tests_dir = Path(__file__).parent
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(tests_dir), os.environ.get("PYTHONPATH")]))
    )
    pytester.makeconftest((tests_dir / "conftest.py").read_text(encoding="utf-8"))
    pytester.makepyfile(
        test_inner="""
        import httpx

        def test_sends_an_unevaluable_filter(couch):
            couch.put({"_id": "m1"})
            try:
                couch.client.get(f"/{couch.name}/_changes", params={"filter": "_selector"})
            except httpx.TransportError:
                pass

        def test_next_test_gets_a_working_server(couch):
            couch.put({"_id": "m2"})
            assert [d["_id"] for d in couch.all_docs()] == ["m2"]
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_sends_an_unevaluable_filter*",
            "*PouchDB Server died during this test*",
            "*_design/_selector*",
        ]
    )


def test_unique_db_names_are_valid_couchdb_names() -> None:
    names = {unique_db_name(hint) for hint in ["test_x[param-1]", "9lives", "", "Ünïcode"]}
    assert len(names) == 4
    for name in names:
        assert name[0].isascii() and name[0].islower()
        assert all(c.isascii() and (c.islower() or c.isdigit() or c in "_$()+-/") for c in name)


def test_pouchdb_restarts_after_a_crash_on_the_same_port(pouchdb: PouchDBServer) -> None:
    # A filter PouchDB Server cannot evaluate ends its process (CouchDB would
    # answer 400); this is the failure ensure_alive() exists for.
    port = pouchdb.port
    db = unique_db_name("crash")
    with httpx.Client(base_url=pouchdb.url, trust_env=False) as client:
        client.put(f"/{db}").raise_for_status()
        client.post(f"/{db}", json={"a": 1}).raise_for_status()
        with contextlib.suppress(httpx.TransportError):
            client.get(f"/{db}/_changes", params={"filter": "_selector"})
    assert not pouchdb.ping()
    assert "_design/_selector" in pouchdb.log_tail()

    assert pouchdb.ensure_alive() is True
    assert pouchdb.port == port
    assert pouchdb.ping()
    assert pouchdb.ensure_alive() is False


def test_pouchdb_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    server = PouchDBServer(tmp_path / "node_modules" / ".bin" / "pouchdb-server")
    with pytest.raises(RuntimeError) as caught, server:
        pass
    assert INSTALL_COMMAND in str(caught.value)
    assert str(tmp_path) in str(caught.value)


def test_pouchdb_that_exits_at_startup_reports_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "pouchdb-server"
    fake.write_text("#!/bin/sh\necho 'cannot start: boom' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(RuntimeError) as caught, PouchDBServer(fake, ready_timeout=10):
        pass
    assert "status 3" in str(caught.value)
    assert "cannot start: boom" in str(caught.value)


def test_pouchdb_that_never_answers_times_out_with_its_output(tmp_path: Path) -> None:
    fake = tmp_path / "pouchdb-server"
    fake.write_text("#!/bin/sh\necho 'still thinking'\nexec sleep 60\n")
    fake.chmod(0o755)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as caught, PouchDBServer(fake, ready_timeout=1):
        pass
    assert time.monotonic() - started < 15
    assert "did not answer" in str(caught.value)
    assert "still thinking" in str(caught.value)


def test_pouchdb_is_not_fooled_by_another_server_on_its_port(pouchdb: PouchDBServer) -> None:
    # Our process fails to bind and exits; the foreign server's GET / answer
    # must not count as ready, and a free port is used instead.
    pouchdb.ensure_alive()
    with PouchDBServer(port=pouchdb.port) as second:
        assert second.port != pouchdb.port
        assert second.ping()
    assert pouchdb.ping()


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# -- SMTP sink ---------------------------------------------------------------


@pytest.mark.anyio
async def test_smtp_sink_records_message_and_envelope(smtp_sink: SmtpSink) -> None:
    await aiosmtplib.send(
        _email(subject="Grüße"),
        sender="bounce@example.com",
        recipients=["whaa@example.com", "cc@example.com"],
        hostname=smtp_sink.host,
        port=smtp_sink.port,
    )
    [received] = await smtp_sink.await_count(1, timeout=5)
    assert received.mail_from == "bounce@example.com"
    assert received.rcpt_tos == ["whaa@example.com", "cc@example.com"]
    assert received.message["Subject"] == "Grüße"
    assert received.message["To"] == "whaa@example.com"
    assert received.message.get_content().strip() == "Test message body"
    assert b"Subject: =?utf-8?" in received.raw
    assert smtp_sink.count_by_recipient() == {"whaa@example.com": 1, "cc@example.com": 1}
    assert smtp_sink.refused == []


def test_smtp_sink_accepts_a_separate_process(smtp_sink: SmtpSink) -> None:
    script = textwrap.dedent(
        """
        import smtplib, sys
        with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10) as smtp:
            smtp.sendmail("a@example.com", ["b@example.com"], b"Subject: hi\\r\\n\\r\\nbody\\r\\n")
        """
    )
    subprocess.run([sys.executable, "-c", script, str(smtp_sink.port)], check=True, timeout=30)
    [received] = smtp_sink.wait_for(1, timeout=5)
    assert received.message["Subject"] == "hi"
    assert received.rcpt_tos == ["b@example.com"]


def test_smtp_sink_wait_for_names_the_shortfall(smtp_sink: SmtpSink) -> None:
    with pytest.raises(TimeoutError, match=r"expected 1 message.*0 arrived"):
        smtp_sink.wait_for(1, timeout=0.2)


@pytest.mark.anyio
async def test_smtp_sink_await_count_names_the_shortfall(smtp_sink: SmtpSink) -> None:
    await aiosmtplib.send(_email(), hostname=smtp_sink.host, port=smtp_sink.port)
    with pytest.raises(TimeoutError, match=r"expected 2 message.*1 arrived"):
        await smtp_sink.await_count(2, timeout=0.2)


@pytest.mark.anyio
async def test_smtp_sink_delay_still_accepts(smtp_sink: SmtpSink) -> None:
    smtp_sink.delay = 0.3
    started = time.monotonic()
    await aiosmtplib.send(_email(), hostname=smtp_sink.host, port=smtp_sink.port)
    assert time.monotonic() - started >= 0.3
    assert len(smtp_sink.messages) == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("reply", "code"), [("451 4.3.0 try later", 451), ("550 5.1.1 no such user", 550)]
)
async def test_smtp_sink_reject_returns_the_given_reply(
    smtp_sink: SmtpSink, reply: str, code: int
) -> None:
    seen: list[ReceivedEnvelopeInfo] = []

    def refuse_whaa(info: ReceivedEnvelopeInfo) -> str | None:
        seen.append(info)
        return reply if "whaa@example.com" in info.rcpt_tos else None

    smtp_sink.reject = refuse_whaa
    with pytest.raises(aiosmtplib.SMTPResponseException) as caught:
        await aiosmtplib.send(_email(), hostname=smtp_sink.host, port=smtp_sink.port)
    assert caught.value.code == code
    assert caught.value.message == reply.split(" ", 1)[1]
    await aiosmtplib.send(
        _email(to="other@example.com"), hostname=smtp_sink.host, port=smtp_sink.port
    )

    assert [m.rcpt_tos for m in smtp_sink.messages] == [["other@example.com"]]
    [refusal] = smtp_sink.refused
    assert (refusal.stage, refusal.reply, refusal.rcpt_tos) == ("DATA", reply, ["whaa@example.com"])
    assert b"Subject: Test 123" in seen[0].raw

    smtp_sink.reject = None
    await aiosmtplib.send(_email(), hostname=smtp_sink.host, port=smtp_sink.port)
    assert smtp_sink.count_by_recipient() == {"other@example.com": 1, "whaa@example.com": 1}


@pytest.mark.anyio
async def test_smtp_sink_reject_recipient_refuses_at_rcpt(smtp_sink: SmtpSink) -> None:
    smtp_sink.reject_recipient = lambda rcpt: "550 5.1.1 no such user" if rcpt == "x@y.z" else None
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as caught:
        await aiosmtplib.send(_email(to="x@y.z"), hostname=smtp_sink.host, port=smtp_sink.port)
    [refused_rcpt] = caught.value.recipients
    assert (refused_rcpt.code, refused_rcpt.recipient) == (550, "x@y.z")
    assert smtp_sink.messages == []
    assert [(r.stage, r.rcpt_tos) for r in smtp_sink.refused] == [("RCPT", ["x@y.z"])]


@pytest.mark.anyio
async def test_smtp_sink_requires_auth_when_configured() -> None:
    with SmtpSink(username="notifier", password="s3cret") as sink:
        with pytest.raises(aiosmtplib.SMTPSenderRefused) as no_auth:
            await aiosmtplib.send(_email(), hostname=sink.host, port=sink.port)
        assert no_auth.value.code == 530

        with pytest.raises(aiosmtplib.SMTPAuthenticationError):
            await aiosmtplib.send(
                _email(), hostname=sink.host, port=sink.port, username="notifier", password="nope"
            )

        await aiosmtplib.send(
            _email(), hostname=sink.host, port=sink.port, username="notifier", password="s3cret"
        )
        assert len(sink.messages) == 1


def test_smtp_sink_knobs_validate_and_ports_differ() -> None:
    with pytest.raises(ValueError):
        SmtpSink(username="only-user")
    with SmtpSink() as first, SmtpSink() as second:
        assert first.port != second.port
        with pytest.raises(ValueError):
            first.delay = -1


@pytest.mark.anyio
async def test_smtp_sink_drop_closes_the_connection_mid_data(smtp_sink: SmtpSink) -> None:
    smtp_sink.drop = lambda info: "whaa@example.com" in info.rcpt_tos
    with pytest.raises(aiosmtplib.SMTPServerDisconnected):
        await aiosmtplib.send(_email(), hostname=smtp_sink.host, port=smtp_sink.port, timeout=5)
    assert smtp_sink.messages == []
    assert smtp_sink.refused == []
    [dropped] = smtp_sink.dropped
    assert dropped.rcpt_tos == ["whaa@example.com"]
    assert b"Subject: Test 123" in dropped.raw, "the content had arrived when it was dropped"

    await aiosmtplib.send(
        _email(to="other@example.com"), hostname=smtp_sink.host, port=smtp_sink.port
    )
    assert smtp_sink.count_by_recipient() == {"other@example.com": 1}
    smtp_sink.clear()
    assert smtp_sink.dropped == []


@pytest.mark.anyio
async def test_smtp_sink_on_a_fixed_port_goes_down_and_comes_back() -> None:
    port = free_port()
    with SmtpSink(port=port) as sink:
        assert sink.port == port
        client = aiosmtplib.SMTP(hostname=sink.host, port=port, timeout=5)
        await client.connect()
        await client.send_message(_email())

        sink.stop()
        # A stopped sink is a dead server: open connections are gone and new
        # ones are refused, not left hanging.
        with pytest.raises(aiosmtplib.SMTPServerDisconnected):
            await client.noop()
        with pytest.raises(aiosmtplib.SMTPConnectError):
            await aiosmtplib.send(_email(), hostname=sink.host, port=port, timeout=5)

        sink.start()
        assert sink.port == port
        await aiosmtplib.send(_email(to="other@example.com"), hostname=sink.host, port=port)
        assert sink.count_by_recipient() == {"whaa@example.com": 1, "other@example.com": 1}
    with pytest.raises(ValueError, match="port must be"):
        SmtpSink(port=70000)
