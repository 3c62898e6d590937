"""The SMTP connection pool against aiosmtpd: reuse, and recovery from dropped connections."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ssl
import subprocess
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller

from notifier.config import SmtpConfig
from notifier.errors import (
    ChannelUnavailableError,
    DeliveryFatalError,
    PermanentDeliveryError,
    ThrottledDeliveryError,
    TransientDeliveryError,
)
from notifier.mailer import EmailHandler, SmtpPool, tls_context
from notifier.message import Composer
from notifier.testing import free_port
from notifier.testing.smtp import SmtpSink

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

COMPOSER = Composer(sender="notify@example.com", database="messages")


def doc(n: int) -> dict[str, str]:
    return {"_id": f"m{n}", "to": f"user{n}@example.com", "subject": "s", "body": "b"}


def handler_on(sink: SmtpSink) -> EmailHandler:
    """A handler with a pool of one connection to ``sink``."""
    pool = SmtpPool(SmtpConfig(host=sink.host, port=sink.port), size=1)
    return EmailHandler(composer=COMPOSER, pool=pool)


class Accept:
    def __init__(self) -> None:
        self.count = 0

    async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
        self.count += 1
        return "250 OK"


async def test_connections_are_reused_not_opened_per_message(smtp_sink: SmtpSink) -> None:
    pool = SmtpPool(SmtpConfig(host=smtp_sink.host, port=smtp_sink.port), size=2)
    async with EmailHandler(composer=COMPOSER, pool=pool) as handler:
        for n in range(10):
            await handler.deliver(doc(n))
    assert pool.connects == 1
    assert len(smtp_sink.messages) == 10


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    port = free_port()
    first = Accept()
    server = Controller(first, hostname="127.0.0.1", port=port)
    server.start()
    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=port), size=1)
    pool.PROBE_AFTER = 0.0  # probe every reused connection
    try:
        async with EmailHandler(composer=COMPOSER, pool=pool) as handler:
            await handler.deliver(doc(1))
            server.stop()  # drops the pooled connection
            second = Accept()
            server = Controller(second, hostname="127.0.0.1", port=port)
            server.start()
            await handler.deliver(doc(2))
    finally:
        server.stop()
    assert (first.count, second.count) == (1, 1)
    assert pool.connects == 2


async def test_an_unreachable_server_is_a_channel_outage_not_a_bad_message() -> None:
    pool = SmtpPool(SmtpConfig(host="127.0.0.1", port=free_port(), timeout=2.0), size=1)
    async with EmailHandler(composer=COMPOSER, pool=pool) as handler:
        with pytest.raises(ChannelUnavailableError, match="cannot connect"):
            await handler.deliver(doc(1))


async def test_a_refused_recipient_is_permanent(smtp_sink: SmtpSink) -> None:
    smtp_sink.reject_recipient = lambda address: "550 5.1.1 no such user"
    async with handler_on(smtp_sink) as handler:
        with pytest.raises(PermanentDeliveryError, match=r"refused the recipient: 550 5\.1\.1"):
            await handler.deliver(doc(1))


async def test_a_quota_reply_is_throttling_not_a_failure_of_the_message(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.quota = 2
    async with handler_on(smtp_sink) as handler:
        await handler.deliver(doc(1))
        await handler.deliver(doc(2))
        with pytest.raises(ThrottledDeliveryError, match="454 Throttling failure"):
            await handler.deliver(doc(3))
    assert len(smtp_sink.messages) == 2
    assert [r.stage for r in smtp_sink.refused] == ["DATA"]


async def test_greylisting_refuses_a_recipient_for_now_then_accepts_it(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.greylist = 0.3
    async with handler_on(smtp_sink) as handler:
        with pytest.raises(TransientDeliveryError, match=r"450 4\.2\.0") as refused:
            await handler.deliver(doc(1))
        assert not isinstance(refused.value, ThrottledDeliveryError)
        await asyncio.sleep(0.35)
        await handler.deliver(doc(1))
    assert smtp_sink.count_by_recipient() == {"user1@example.com": 1}


async def test_a_relay_refusing_everyone_recovers_after_its_time(smtp_sink: SmtpSink) -> None:
    smtp_sink.refuse_everyone(0.3)
    async with handler_on(smtp_sink) as handler:
        for n in range(3):
            with pytest.raises(TransientDeliveryError, match=r"451 4\.3\.5"):
                await handler.deliver(doc(n))
        await asyncio.sleep(0.35)
        await handler.deliver(doc(9))
    assert len(smtp_sink.messages) == 1


async def test_a_421_that_closes_the_connection_is_throttling_and_the_pool_recovers(
    smtp_sink: SmtpSink,
) -> None:
    smtp_sink.close_421 = lambda address: address == "user1@example.com"
    async with handler_on(smtp_sink) as handler:
        with pytest.raises(ThrottledDeliveryError, match="421"):
            await handler.deliver(doc(1))
        await handler.deliver(doc(2))  # on a new connection
    assert handler.pool.connects == 2
    assert smtp_sink.count_by_recipient() == {"user2@example.com": 1}


async def test_a_utf8_recipient_goes_with_smtputf8_when_the_server_offers_it() -> None:
    with SmtpSink(smtputf8=True) as sink:
        async with handler_on(sink) as handler:
            await handler.deliver({**doc(1), "to": "jörg@example.com"})
        (received,) = sink.messages
    assert received.rcpt_tos == ["jörg@example.com"]
    assert received.message["To"] == "jörg@example.com"


async def test_a_utf8_recipient_without_smtputf8_is_a_dead_letter_with_the_reason(
    smtp_sink: SmtpSink,
) -> None:
    async with handler_on(smtp_sink) as handler:
        with pytest.raises(PermanentDeliveryError, match="needs SMTPUTF8"):
            await handler.deliver({**doc(1), "to": "jörg@example.com"})
        await handler.deliver(doc(2))  # the session is still good
    assert smtp_sink.count_by_recipient() == {"user2@example.com": 1}


def test_an_unusable_ca_file_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    config = SmtpConfig(host="127.0.0.1", port=465, security="tls", ca_file=str(bad))
    with pytest.raises(DeliveryFatalError, match="ca_file, client_cert or client_key"):
        tls_context(config)


def make_ca_and_server_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A private CA and a certificate it signed for 127.0.0.1, with openssl."""
    run = functools.partial(subprocess.run, check=True, capture_output=True, cwd=tmp)
    run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-keyout", "ca.key", "-out", "ca.pem", "-subj", "/CN=Test private CA"])  # fmt: skip
    run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
         "-out", "server.csr", "-subj", "/CN=127.0.0.1"])  # fmt: skip
    (tmp / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run(["openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
         "-CAcreateserial", "-days", "2", "-out", "server.pem", "-extfile", "ext.cnf"])  # fmt: skip
    return tmp / "ca.pem", tmp / "server.pem", tmp / "server.key"


async def test_a_relay_with_a_private_ca_is_trusted_through_ca_file(tmp_path: Path) -> None:
    ca, cert, key = make_ca_and_server_cert(tmp_path)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(cert, key)
    accept = Accept()
    port = free_port()
    server = Controller(accept, hostname="127.0.0.1", port=port, ssl_context=server_tls)
    server.start()
    try:
        plain = SmtpConfig(host="127.0.0.1", port=port, security="tls", timeout=5.0)
        async with EmailHandler(composer=COMPOSER, pool=SmtpPool(plain, size=1)) as handler:
            # Verification is on by default: an unknown CA is refused, and
            # the error points at ca_file, not at turning verification off.
            with pytest.raises(DeliveryFatalError, match="ca_file"):
                await handler.deliver(doc(1))
        trusted = dataclasses.replace(plain, ca_file=str(ca))
        async with EmailHandler(composer=COMPOSER, pool=SmtpPool(trusted, size=1)) as handler:
            await handler.deliver(doc(2))
    finally:
        server.stop()
    assert accept.count == 1
