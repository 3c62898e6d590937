"""[smtp] security that does not match the port: named at once, not after the timeout."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from scenario import self_signed_certificate

from notifier.config import SmtpConfig
from notifier.errors import DeliveryFatalError
from notifier.mailer import SmtpPool

pytestmark = pytest.mark.anyio


@pytest.fixture
async def implicit_tls_port(tmp_path: Path) -> AsyncIterator[int]:
    """A port that speaks TLS from the first byte, as SMTP on 465 does."""
    cert, key = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 relay ESMTP\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0, ssl=context)
    async with server:
        yield server.sockets[0].getsockname()[1]


async def test_starttls_against_an_implicit_tls_port_says_to_use_tls_at_once(
    implicit_tls_port: int,
) -> None:
    config = SmtpConfig(host="127.0.0.1", port=implicit_tls_port, security="starttls", timeout=30)
    pool = SmtpPool(config, size=1)
    started = time.monotonic()
    with pytest.raises(DeliveryFatalError, match='security = "tls", not "starttls"'):
        await asyncio.wait_for(pool.check(), timeout=20)
    assert time.monotonic() - started < 10, "the hint must not wait out the 30 s timeout"
    await pool.aclose()
