"""The email handler: compose a message document into an email and send it over SMTP.

This is the one delivery channel the product ships, behind the small
:class:`~notifier.handler.Handler` interface. It keeps a pool of SMTP
connections (aiosmtplib), sized to the worker's concurrency, so a busy worker
pays for a connect, TLS handshake and login once per connection, not once per
email. A connection the server closed is replaced on the next send.

SMTP outcomes are turned into exceptions here; which reply means what is
decided by :func:`notifier.replies.classify`:

=================================  ==========================================
5xx reply to RCPT or DATA          PermanentDeliveryError (dead letter)
421, 454, 4.7.x, "rate" replies    ThrottledDeliveryError (slow down; the
                                   message uses up no attempt)
other 4xx reply, connection lost   TransientDeliveryError (deferred and
mid-send, read timeout             retried on the schedule)
cannot connect at all, 454 login   ChannelUnavailableError (the relay is down:
                                   pause and probe)
login refused, TLS fails, 5xx to   DeliveryFatalError (the worker stops: every
MAIL FROM, 530/535                 message would fail the same way)
a non-ASCII local part, and a      PermanentDeliveryError (dead letter)
server without SMTPUTF8
=================================  ==========================================
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self

import aiosmtplib

from notifier.config import SmtpConfig
from notifier.errors import (
    ChannelUnavailableError,
    DeliveryError,
    DeliveryFatalError,
    InvalidMessageError,
    PermanentDeliveryError,
    SmtpLoginRefused,
    ThrottledDeliveryError,
    TransientDeliveryError,
)
from notifier.handler import Receipt
from notifier.message import Composer, Email
from notifier.replies import ReplyClass, classify, describe

log = logging.getLogger(__name__)


class SmtpPool:
    """Up to ``size`` reusable SMTP connections to one server.

    Use :meth:`connection` to borrow one; an exception while it is borrowed
    closes it instead of returning it, since its state is then unknown. A
    connection that sat idle for a while is probed with NOOP before reuse,
    because servers close idle sessions and a send on a dead connection would
    otherwise count as a failed attempt of an innocent message.
    """

    #: Idle seconds after which a pooled connection is probed before reuse.
    PROBE_AFTER = 10.0

    def __init__(self, config: SmtpConfig, *, size: int) -> None:
        if size < 1:
            raise ValueError(f"pool size must be at least 1, got {size}")
        self.config = config
        #: How errors name the server.
        self.where = f"SMTP server {config.host}:{config.port}"
        self._tls = None if config.security == "none" else tls_context(config)
        self._idle: list[tuple[aiosmtplib.SMTP, float]] = []
        self._slots = asyncio.Semaphore(size)
        self.size = size
        self.connects = 0

    def __repr__(self) -> str:
        return (
            f"<SmtpPool {self.config.host}:{self.config.port} size={self.size} "
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
        # In parallel: shutdown must fit in systemd's stop timeout.
        await asyncio.gather(*(_quit(client) for client, _ in idle))

    async def check(self) -> None:
        """Connect (and log in, and start TLS) once now, so a bad setup fails at start-up."""
        async with self.connection():
            pass

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[aiosmtplib.SMTP]:
        async with self._slots:
            client = await self._reusable() or await self._connect()
            try:
                yield client
            except BaseException:
                # Its state is unknown (and after a cancellation there is no
                # time to spare): close it, without a QUIT round trip.
                client.close()
                raise
            if client.is_connected:
                self._idle.append((client, time.monotonic()))

    async def _reusable(self) -> aiosmtplib.SMTP | None:
        while self._idle:
            client, since = self._idle.pop()
            if not client.is_connected:
                continue
            if time.monotonic() - since < self.PROBE_AFTER:
                return client
            try:
                await client.noop()
            except (aiosmtplib.SMTPException, OSError):
                client.close()
                continue
            return client
        return None

    async def _connect(self) -> aiosmtplib.SMTP:
        c = self.config
        client = aiosmtplib.SMTP(
            hostname=c.host,
            port=c.port,
            use_tls=c.security == "tls",
            # Explicit False: aiosmtplib would otherwise upgrade whenever the
            # server offers STARTTLS, which is not what "none" promises.
            start_tls=c.security == "starttls",
            validate_certs=c.tls_verify,
            tls_context=self._tls,
            timeout=c.timeout,
            username=c.username,
            password=c.password.reveal() if c.password else None,
        )
        where = self.where
        try:
            if c.security == "starttls":
                await self._connect_expecting_a_greeting(client)
            else:
                await client.connect()
            # Greet now (connect() does only when it needs STARTTLS or a
            # login): messages are sent with bare MAIL/RCPT/DATA commands.
            if client.is_ehlo_or_helo_needed:
                try:
                    await client.ehlo()
                except aiosmtplib.SMTPHeloError:
                    await client.helo()
        except aiosmtplib.SMTPAuthenticationError as e:
            if 400 <= e.code < 500:  # 454: temporary authentication failure
                raise ChannelUnavailableError(f"{where}: login failed for now: {e.code}") from None
            raise SmtpLoginRefused(
                f"{where} refused the login for [smtp] username {c.username!r}: "
                f"{e.code} {e.message}"
            ) from None
        except aiosmtplib.SMTPNotSupported as e:
            raise DeliveryFatalError(f"{where}: {e} (check [smtp] security)") from None
        except aiosmtplib.SMTPResponseException as e:
            if e.code >= 500:
                raise DeliveryFatalError(
                    f"{where} refused the session: {e.code} {e.message}"
                ) from None
            if classify(e.code, e.message) is ReplyClass.THROTTLED:
                # "421 too many connections": the relay is up, we are too fast.
                raise ThrottledDeliveryError(
                    f"{where} refused the session for now: {describe(e.code, e.message)}"
                ) from None
            raise ChannelUnavailableError(f"{where}: {describe(e.code, e.message)}") from None
        except aiosmtplib.SMTPException as e:
            # aiosmtplib has no class of its own for a server without STARTTLS.
            if c.security == "starttls" and "STARTTLS" in str(e):
                raise DeliveryFatalError(
                    f"{where}: {e} (check [smtp] security; nothing is sent in clear text)"
                ) from None
            if isinstance(e.__cause__, ssl.SSLError):
                raise DeliveryFatalError(f"{where}: TLS failed: {e.__cause__}{_TLS_HINT}") from None
            raise ChannelUnavailableError(f"cannot connect to {where}: {e}") from None
        except OSError as e:
            # aiosmtplib wraps TLS failures in SMTPConnectError; a certificate
            # that does not verify needs a person, not retries.
            if isinstance(e, ssl.SSLError) or isinstance(e.__cause__, ssl.SSLError):
                raise DeliveryFatalError(
                    f"{where}: TLS failed: {e.__cause__ or e}{_TLS_HINT}"
                ) from None
            raise ChannelUnavailableError(f"cannot connect to {where}: {e}") from None
        self.connects += 1
        return client

    async def _connect_expecting_a_greeting(self, client: aiosmtplib.SMTP) -> None:
        """``connect()`` for STARTTLS, which waits for a plain-text greeting.

        A port that speaks TLS from the first byte (implicit TLS, as 465
        does) never sends one, and the wait would last the whole timeout.
        So after a few seconds without a greeting, a second connection tries
        a TLS handshake; if the port answers it, the mistake is named at once.
        """
        connecting = asyncio.ensure_future(client.connect())
        done, _ = await asyncio.wait({connecting}, timeout=GREETING_PROBE_AFTER)
        if not done and await _speaks_tls(self.config.host, self.config.port):
            connecting.cancel()
            await asyncio.gather(connecting, return_exceptions=True)
            client.close()
            raise DeliveryFatalError(
                f"{self.where} speaks TLS from the first byte (implicit TLS, as on port 465) "
                'and sends no plain-text greeting: set [smtp] security = "tls", not "starttls"'
            )
        await connecting


#: Seconds without a greeting before a STARTTLS connection looks for implicit TLS.
GREETING_PROBE_AFTER = 2.0


async def _speaks_tls(host: str, port: int) -> bool:
    """Whether ``host:port`` completes a TLS handshake (nothing else is sent)."""
    # Only whether TLS answers is asked here: no certificate is trusted and
    # no data is sent, so verification would only hide the answer.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        async with asyncio.timeout(GREETING_PROBE_AFTER):
            _, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


_TLS_HINT = (
    " (check [smtp] security; for a private CA set [smtp] ca_file to its certificate, "
    "and client_cert/client_key if the relay asks for a client certificate)"
)


def tls_context(config: SmtpConfig) -> ssl.SSLContext:
    """The TLS settings of every connection, built once: the system's CAs plus
    ``ca_file``, and the client certificate if one is configured.

    Verification is on unless ``tls_verify = false``.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not config.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    try:
        if config.ca_file is not None:
            context.load_verify_locations(cafile=config.ca_file)
        if config.client_cert is not None:
            context.load_cert_chain(config.client_cert, keyfile=config.client_key)
    except (ssl.SSLError, OSError) as e:
        raise DeliveryFatalError(
            "[smtp] ca_file, client_cert or client_key cannot be used: "
            f"{getattr(e, 'strerror', None) or e}"
        ) from None
    return context


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
        try:
            email = self.composer.compose(doc)
        except PermanentDeliveryError as e:
            raise InvalidMessageError(str(e)) from None
        where = self.pool.where
        try:
            async with self.pool.connection() as client:
                if email.smtputf8 and not client.supports_extension("smtputf8"):
                    raise PermanentDeliveryError(
                        f"the recipient {email.recipient!r} has a non-ASCII local part, which "
                        f"needs SMTPUTF8, and the {where} does not offer it"
                    )
                await _transact(client, self.composer.sender, email)
        except DeliveryError:
            # Already classified by the pool (some are OSErrors by mixin, so
            # this must come before the catch-all below).
            raise
        except aiosmtplib.SMTPRecipientsRefused as e:
            refused = e.recipients[0]
            raise _reply_error(refused.code, refused.message, "refused the recipient") from None
        except aiosmtplib.SMTPSenderRefused as e:
            if 400 <= e.code < 500:
                raise _reply_error(e.code, e.message, "refused the sender for now") from None
            # A permanent refusal of *our* sender says nothing about this
            # message: every message would fail the same way, so stop rather
            # than dead-letter the whole backlog.
            raise DeliveryFatalError(
                f"{where} refused the sender {self.composer.sender!r} ([email] sender): "
                f"{e.code} {e.message}"
            ) from None
        except aiosmtplib.SMTPResponseException as e:
            if e.code in (530, 535):  # authentication required or refused
                raise SmtpLoginRefused(
                    f"{where} requires authentication ([smtp] username): {e.code} {e.message}"
                ) from None
            raise _reply_error(e.code, e.message, "refused the message") from None
        except aiosmtplib.SMTPNotSupported as e:
            raise PermanentDeliveryError(f"{where} cannot take this message: {e}") from None
        except (aiosmtplib.SMTPException, OSError) as e:
            # A lost connection, a timeout: the message may or may not have
            # arrived; it is retried (with backoff) like any temporary failure.
            raise TransientDeliveryError(f"SMTP send failed: {type(e).__name__}: {e}") from None
        except ValueError as e:
            # aiosmtplib refuses addresses it cannot put on the wire.
            raise PermanentDeliveryError(f"cannot be sent: {e}") from None
        self.sent += 1
        return {"messageId": email.message_id}


async def _transact(client: aiosmtplib.SMTP, sender: str, email: Email) -> None:
    """MAIL, RCPT and DATA for one message, as aiosmtplib's ``sendmail`` does.

    ``sendmail`` re-parses both addresses with ``email.utils`` for every
    message, a tenth of the daemon's CPU at load; both addresses were
    validated once (the sender at start-up, the recipient by the composer),
    so the commands are written directly. A UTF-8 recipient goes with the
    SMTPUTF8 parameter (RFC 6531), which the caller checked is offered.
    """
    options = b" SMTPUTF8" if email.smtputf8 else b""
    try:
        response = await client.execute_command(
            b"MAIL", b"FROM:<%s>%s" % (sender.encode("ascii"), options)
        )
        if response.code != 250:
            raise aiosmtplib.SMTPSenderRefused(response.code, response.message, sender)
        response = await client.execute_command(
            b"RCPT", b"TO:<%s>" % email.recipient.encode("utf-8")
        )
        if response.code not in (250, 251):
            refused = aiosmtplib.SMTPRecipientRefused(
                response.code, response.message, email.recipient
            )
            raise aiosmtplib.SMTPRecipientsRefused([refused])
        await client.data(email.data)
    except (aiosmtplib.SMTPResponseException, aiosmtplib.SMTPRecipientsRefused):
        # Leave the session clean for the next message on this connection.
        with contextlib.suppress(ConnectionError, aiosmtplib.SMTPResponseException):
            if client.is_connected:
                await client.rset()
        raise


def _reply_error(code: int, text: str, what: str) -> Exception:
    detail = f"SMTP server {what}: {describe(code, text)}"
    kind = classify(code, text)
    if kind is ReplyClass.PERMANENT:
        return PermanentDeliveryError(detail)
    if kind is ReplyClass.THROTTLED:
        return ThrottledDeliveryError(detail)
    return TransientDeliveryError(detail)
