"""The email handler: compose a message document into an email and send it over SMTP.

This is the one delivery channel the product ships, behind the small
:class:`~notifier.handler.Handler` interface. It keeps a pool of SMTP
connections (aiosmtplib), sized to the worker's concurrency, so a busy worker
pays for a connect, TLS handshake and login once per connection, not once per
email. A connection the server closed is replaced on the next send.

SMTP outcomes are classified here and nowhere else:

=================================  ==========================================
5xx reply to MAIL, RCPT or DATA    PermanentDeliveryError (dead letter)
4xx reply, connection lost mid-    TransientDeliveryError (retried, bounded)
send, read timeout
cannot connect at all              ChannelUnavailableError (retried, unbounded)
authentication refused, TLS fails  DeliveryFatalError (the worker stops)
=================================  ==========================================
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import aiosmtplib

from notifier.config import SmtpConfig
from notifier.errors import (
    ChannelUnavailableError,
    DeliveryFatalError,
    PermanentDeliveryError,
    TransientDeliveryError,
)
from notifier.handler import Receipt
from notifier.message import Composer

log = logging.getLogger(__name__)


class SmtpPool:
    """Up to ``size`` reusable SMTP connections to one server.

    Use :meth:`connection` to borrow one; an exception while it is borrowed
    closes it instead of returning it, since its state is then unknown.
    """

    def __init__(self, config: SmtpConfig, *, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, got {size}")
        self._config = config
        self._idle: list[aiosmtplib.SMTP] = []
        self._slots = asyncio.Semaphore(size)
        self.size = size
        self.connects = 0

    def __repr__(self) -> str:
        return (
            f"<SmtpPool {self._config.host}:{self._config.port} size={self.size} "
            f"idle={len(self._idle)} connects={self.connects}>"
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for client in idle:
            await _quit(client)

    async def check(self) -> None:
        """Connect (and log in, and start TLS) once now, so a bad setup fails at start-up."""
        async with self.connection():
            pass

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[tuple[aiosmtplib.SMTP, bool]]:
        """Borrow a connection; yields it and whether it was reused from the pool."""
        async with self._slots:
            reused = bool(self._idle)
            client = self._idle.pop() if reused else await self._connect()
            try:
                yield client, reused
            except BaseException:
                await _quit(client)
                raise
            if client.is_connected:
                self._idle.append(client)

    async def _connect(self) -> aiosmtplib.SMTP:
        c = self._config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=c.security == "tls",
            # Explicit False: aiosmtplib would otherwise upgrade whenever the
            # server offers STARTTLS, which is not what "none" promises.
            start_tls=c.security == "starttls",
            validate_certs=c.tls_verify,
            timeout=c.timeout,
            username=c.username,
            password=c.password.reveal() if c.password else None,
        )
        where = f"SMTP server {c.host}:{c.port}"
        try:
            await client.connect()
        except aiosmtplib.SMTPAuthenticationError as e:
            raise DeliveryFatalError(
                f"{where} refused the login for [smtp] username {c.username!r}: "
                f"{e.code} {e.message}"
            ) from None
        except ssl.SSLError as e:
            raise DeliveryFatalError(f"{where}: TLS failed ([smtp] security): {e}") from None
        except aiosmtplib.SMTPNotSupported as e:
            raise DeliveryFatalError(f"{where}: {e} (check [smtp] security)") from None
        except aiosmtplib.SMTPResponseException as e:
            if e.code >= 500:
                raise DeliveryFatalError(
                    f"{where} refused the session: {e.code} {e.message}"
                ) from None
            raise ChannelUnavailableError(f"{where}: {e.code} {e.message}") from None
        except (aiosmtplib.SMTPException, OSError) as e:
            raise ChannelUnavailableError(f"cannot connect to {where}: {e}") from None
        self.connects += 1
        return client


async def _quit(client: aiosmtplib.SMTP) -> None:
    if not client.is_connected:
        return
    try:
        await asyncio.wait_for(client.quit(), timeout=2.0)
    except (aiosmtplib.SMTPException, OSError, TimeoutError):
        client.close()


class EmailHandler:
    """Delivers a message document as an email. See :class:`notifier.handler.Handler`."""

    def __init__(self, *, composer: Composer, pool: SmtpPool) -> None:
        self.composer = composer
        self.pool = pool
        self.sent = 0

    def __repr__(self) -> str:
        return f"<EmailHandler sent={self.sent} {self.pool!r}>"

    async def __aenter__(self) -> Self:
        await self.pool.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.pool.__aexit__(exc_type, exc, tb)

    async def check(self) -> None:
        await self.pool.check()

    async def deliver(self, doc: Mapping[str, Any]) -> Receipt:
        message = self.composer.compose(doc)
        recipient = message["To"].addresses[0].addr_spec
        sender = self.composer.sender
        # One retry on a fresh connection when a pooled one turns out to have
        # been closed by the server while idle: that says nothing about this
        # message, so it does not count as a failed attempt.
        for first_try in (True, False):
            reused = False
            try:
                async with self.pool.connection() as (client, reused):
                    await client.send_message(message, sender=sender, recipients=[recipient])
            except aiosmtplib.SMTPServerDisconnected as e:
                if reused and first_try:
                    continue
                raise TransientDeliveryError(f"SMTP connection lost while sending: {e}") from None
            except aiosmtplib.SMTPRecipientsRefused as e:
                refused = e.recipients[0]
                raise _reply_error(refused.code, refused.message, "refused the recipient") from None
            except aiosmtplib.SMTPSenderRefused as e:
                raise _reply_error(e.code, e.message, "refused the sender") from None
            except aiosmtplib.SMTPResponseException as e:
                raise _reply_error(e.code, e.message, "refused the message") from None
            except (aiosmtplib.SMTPException, OSError) as e:
                raise TransientDeliveryError(f"SMTP send failed: {type(e).__name__}: {e}") from None
            self.sent += 1
            return {"messageId": message["Message-ID"]}
        raise AssertionError("unreachable")


def _reply_error(code: int, text: str, what: str) -> Exception:
    detail = f"SMTP server {what}: {code} {text}".strip()
    if 400 <= code < 500:
        return TransientDeliveryError(detail)
    return PermanentDeliveryError(detail)
