"""The SMTP connection pool against aiosmtpd: reuse, and recovery from dropped connections."""

from __future__ import annotations

import pytest
from aiosmtpd.controller import Controller

from notifier.config import SmtpConfig
from notifier.errors import ChannelUnavailableError, PermanentDeliveryError
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.testing import free_port
from notifier.testing.smtp import SmtpSink

pytestmark = [pytest.mark.anyio, pytest.mark.e2e]

COMPOSER = Composer(sender="notify@example.com", database="messages")


def doc(n: int) -> dict[str, str]:
    return {"_id": f"m{n}", "to": f"user{n}@example.com", "subject": "s", "body": "b"}


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
    pool = SmtpPool(SmtpConfig(host=smtp_sink.host, port=smtp_sink.port), size=1)
    async with EmailHandler(composer=COMPOSER, pool=pool) as handler:
        with pytest.raises(PermanentDeliveryError, match=r"refused the recipient: 550 5\.1\.1"):
            await handler.deliver(doc(1))
