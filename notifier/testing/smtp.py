"""A real SMTP server on loopback that records what it accepts, with fault knobs.

`SmtpSink` wraps aiosmtpd's threaded `Controller`: the server runs its own
event loop in a background thread, so it serves the code under test whether
that code is synchronous, runs in the test's event loop, or is a separate
process (the notifier CLI) connecting over TCP.
"""

from __future__ import annotations

import asyncio
import collections
import email.policy
import errno
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.message import EmailMessage
from email.parser import BytesParser
from types import TracebackType
from typing import Generic, Literal, Self, TypeVar

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

__all__ = [
    "ReceivedEnvelopeInfo",
    "ReceivedMessage",
    "RefusedMessage",
    "SmtpSink",
]

_LOOPBACK = "127.0.0.1"
# Passed as the SMTP greeting name so that aiosmtpd does not call
# socket.getfqdn(), which can stall for seconds on a host without DNS.
_SERVER_NAME = "smtp-sink.localhost"
_BIND_ATTEMPTS = 5
_PARSER = BytesParser(policy=email.policy.default)


@dataclass(frozen=True)
class ReceivedEnvelopeInfo:
    """What the `reject` hook sees: the envelope and the raw message content."""

    mail_from: str
    rcpt_tos: list[str]
    raw: bytes


@dataclass(frozen=True)
class ReceivedMessage:
    """A message the sink accepted (answered 250 to DATA)."""

    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage
    raw: bytes
    received_at: float


@dataclass(frozen=True)
class RefusedMessage:
    """A refusal the sink sent because one of its `reject…` hooks asked for it.

    `stage` is "MAIL" for a sender refused by `reject_sender` (`rcpt_tos` is
    empty), "RCPT" for a recipient refused by `reject_recipient` (then
    `rcpt_tos` holds that one address and `raw` is empty, since no content was
    sent yet) and "DATA" for a message refused by `reject`.
    """

    stage: Literal["MAIL", "RCPT", "DATA"]
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    reply: str
    refused_at: float


RejectHook = Callable[[ReceivedEnvelopeInfo], str | None]
RejectRecipientHook = Callable[[str], str | None]
DropHook = Callable[[ReceivedEnvelopeInfo], bool]
RecipientPredicate = Callable[[str], bool]

#: What Amazon SES answers past its sending rate.
QUOTA_REPLY = "454 Throttling failure: Maximum sending rate exceeded."
CLOSING_REPLY = "421 4.7.0 Too many connections, closing transmission channel"


def free_port(host: str = _LOOPBACK) -> int:
    """A loopback port that was free a moment ago (another process may still take it).

    For servers that cannot bind port 0 themselves, as aiosmtpd's Controller.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class _State:
    """Everything shared between the test's thread(s) and the server's loop thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    arrived: threading.Condition = field(init=False)
    received: list[ReceivedMessage] = field(default_factory=list)
    refused: list[RefusedMessage] = field(default_factory=list)
    dropped: list[ReceivedEnvelopeInfo] = field(default_factory=list)
    delay: float = 0.0
    drop: DropHook | None = None
    reject: RejectHook | None = None
    reject_recipient: RejectRecipientHook | None = None
    reject_sender: RejectRecipientHook | None = None
    greylist: float = 0.0
    quota: float = 0.0
    outage_until: float = 0.0
    outage_reply: str = ""
    close_421: RecipientPredicate | None = None
    # recipient -> monotonic time it was first seen (greylisting)
    first_seen: dict[str, float] = field(default_factory=dict)
    # monotonic times of the messages accepted in the last second (quota)
    recent: collections.deque[float] = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        self.arrived = threading.Condition(self.lock)

    def relay_refusal(self, recipient: str, now: float) -> str | None:
        """A relay-wide refusal of ``recipient`` at RCPT, if a switch calls for one
        (called with the lock held)."""
        if now < self.outage_until:
            return self.outage_reply
        if self.greylist > 0:
            first = self.first_seen.setdefault(recipient, now)
            if now - first < self.greylist:
                return (
                    "450 4.2.0 Recipient address rejected: Greylisted, try again in "
                    f"{self.greylist - (now - first):.0f} seconds"
                )
        return None

    def over_quota(self, now: float) -> bool:
        """Whether accepting a message now would exceed ``quota`` messages in the
        last second (lock held)."""
        if self.quota <= 0:
            return False
        while self.recent and self.recent[0] <= now - 1.0:
            self.recent.popleft()
        return len(self.recent) >= self.quota


T = TypeVar("T")


class _Knob(Generic[T]):
    """A fault knob of :class:`SmtpSink`: kept in its :class:`_State`, read and
    set under the lock, since the server's loop thread reads it."""

    def __init__(self, check: Callable[[T], str | None] | None = None) -> None:
        self._check = check
        self._name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, sink: SmtpSink, owner: type | None = None) -> T:
        with sink._state.lock:
            value: T = getattr(sink._state, self._name)
            return value

    def __set__(self, sink: SmtpSink, value: T) -> None:
        problem = None if self._check is None else self._check(value)
        if problem is not None:
            raise ValueError(problem)
        with sink._state.lock:
            setattr(sink._state, self._name, value)


class _Handler:
    """aiosmtpd handler: every hook runs on the server's loop thread."""

    def __init__(self, state: _State, require_auth: bool) -> None:
        self._state = state
        self._require_auth = require_auth

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        # Enforced here rather than with aiosmtpd's auth_required, which warns
        # on every connection when TLS is not also required; a loopback test
        # server has no use for TLS.
        if self._require_auth and not session.authenticated:
            return "530 5.7.0 Authentication required"
        with self._state.lock:
            hook = self._state.reject_sender
        reply = hook(address) if hook is not None else None
        if reply is not None:
            with self._state.lock:
                self._state.refused.append(
                    RefusedMessage(
                        stage="MAIL",
                        mail_from=address,
                        rcpt_tos=[],
                        raw=b"",
                        reply=reply,
                        refused_at=time.monotonic(),
                    )
                )
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        with self._state.lock:
            hook = self._state.reject_recipient
            reply = self._state.relay_refusal(address, time.monotonic())
            close = self._state.close_421
        if reply is None and close is not None and close(address):
            # A relay that gives up on the session: the reply, then the
            # connection closes (aiosmtplib drops it on any 421 too).
            reply = CLOSING_REPLY
            transport = server.transport
            if transport is not None:
                asyncio.get_running_loop().call_soon(transport.close)
        if reply is None and hook is not None:
            reply = hook(address)
        if reply is not None:
            with self._state.lock:
                self._state.refused.append(
                    RefusedMessage(
                        stage="RCPT",
                        mail_from=envelope.mail_from or "",
                        rcpt_tos=[address],
                        raw=b"",
                        reply=reply,
                        refused_at=time.monotonic(),
                    )
                )
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self._state.lock:
            delay = self._state.delay
            drop = self._state.drop
            hook = self._state.reject
        if delay > 0:
            # The reply is what tells the client the message is safe; holding
            # it back is how a slow server looks from the client's side.
            await asyncio.sleep(delay)
        raw = envelope.original_content or b""
        info = ReceivedEnvelopeInfo(
            mail_from=envelope.mail_from or "",
            rcpt_tos=list(envelope.rcpt_tos),
            raw=raw,
        )
        if drop is not None and drop(info):
            with self._state.lock:
                self._state.dropped.append(info)
            # A crash or a network failure after the content arrived: the
            # client never learns whether the message was taken.
            transport = server.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            # Losing the connection cancels this session's task (aiosmtpd's
            # connection_lost); waiting here keeps any reply off the wire.
            await asyncio.get_running_loop().create_future()
        reply = hook(info) if hook is not None else None
        now = time.monotonic()
        with self._state.lock:
            if reply is None and self._state.over_quota(now):
                reply = QUOTA_REPLY
            if reply is not None:
                self._state.refused.append(
                    RefusedMessage(
                        stage="DATA",
                        mail_from=info.mail_from,
                        rcpt_tos=info.rcpt_tos,
                        raw=raw,
                        reply=reply,
                        refused_at=now,
                    )
                )
                return reply
            self._state.recent.append(now)
            self._state.received.append(
                ReceivedMessage(
                    mail_from=info.mail_from,
                    rcpt_tos=info.rcpt_tos,
                    message=_parse(raw),
                    raw=raw,
                    received_at=now,
                )
            )
            self._state.arrived.notify_all()
        return "250 Message accepted for delivery"


def _parse(raw: bytes) -> EmailMessage:
    parsed = _PARSER.parsebytes(raw)
    # email.policy.default always builds EmailMessage; the check keeps the
    # declared type honest for callers.
    assert isinstance(parsed, EmailMessage)
    return parsed


class SmtpSink:
    """An SMTP server on 127.0.0.1 that records accepted messages.

    Use it as a context manager (or `start()`/`stop()`), then point the code
    under test at `host`/`port`. Accepted messages are in `messages`; wait for
    them with `wait_for()` from synchronous code or `await_count()` from a
    coroutine (never call `wait_for()` in an event loop that also runs the
    sender: it would block the sender).

    Fault knobs, safe to change at any time from any thread:

    - `delay`: seconds the server waits before answering DATA.
    - `drop`: called with the envelope and content of each message; if it
      returns True the server closes the connection instead of answering
      DATA (a server that dies or a network that fails mid-DATA). Such
      messages are recorded in `dropped`, not in `messages`.
    - `reject`: called with the envelope and content of each message; a
      returned SMTP reply such as "451 4.3.0 try later" or "550 5.1.1 no such
      user" is sent instead of accepting it.
    - `reject_recipient`: called with each RCPT TO address; a returned reply
      refuses that recipient before any content is sent.
    - `reject_sender`: likewise for the MAIL FROM address.

    Switches that act like real relays, and scale down to test times:

    - `greylist`: seconds; each recipient's attempts are refused with
      "450 4.2.0 … Greylisted" until that long after the first one.
    - `quota`: messages per second; past it, DATA is answered with Amazon
      SES's "454 Throttling failure: Maximum sending rate exceeded."
    - `refuse_everyone(seconds, reply)`: every RCPT gets `reply` (default
      "451 4.3.5 Server configuration problem") for a while, as a relay
      with a configuration mistake, then it recovers.
    - `close_421`: called with each RCPT TO address; when it returns True
      the server answers "421 …" and closes the connection.

    Refusals are recorded in `refused`, not in `messages`. With `username`
    and `password`, the server requires AUTH (PLAIN or LOGIN) before MAIL.
    `smtputf8=True` offers SMTPUTF8 (RFC 6531).

    `port` 0 (the default) picks a free port at each `start()`. A fixed port
    lets a test `stop()` the sink and `start()` it again where its clients
    expect it, as a server that goes down and comes back; `stop()` closes
    open connections too. What was recorded is kept across a restart.
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        host: str = _LOOPBACK,
        port: int = 0,
        ready_timeout: float = 5.0,
        smtputf8: bool = False,
    ) -> None:
        if (username is None) != (password is None):
            raise ValueError("give both username and password, or neither")
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0 (any free port) or 1..65535, not {port}")
        self.host = host
        self._fixed_port = port
        self.port = port
        self.username = username
        self.password = password
        self._ready_timeout = ready_timeout
        self._smtputf8 = smtputf8
        self._state = _State()
        self._controller: Controller | None = None

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        if self._controller is not None:
            raise RuntimeError("SmtpSink is already running")
        if self._fixed_port:
            controller = self._make_controller(self._fixed_port)
            try:
                controller.start()
            except BaseException:
                _discard(controller)
                raise
            self._controller = controller
            return
        last_error: OSError | None = None
        # aiosmtpd cannot bind port 0 and report the port it got, so a free
        # port is chosen first; another process may take it in between.
        for _ in range(_BIND_ATTEMPTS):
            port = free_port(self.host)
            controller = self._make_controller(port)
            try:
                controller.start()
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                last_error = exc
                _discard(controller)
                continue
            self._controller = controller
            self.port = port
            return
        raise RuntimeError(
            f"SmtpSink could not bind a free port on {self.host} "
            f"after {_BIND_ATTEMPTS} attempts: {last_error}"
        )

    def stop(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _make_controller(self, port: int) -> Controller:
        require_auth = self.username is not None
        handler = _Handler(self._state, require_auth=require_auth)
        if not require_auth:
            return Controller(
                handler,
                hostname=self.host,
                port=port,
                ready_timeout=self._ready_timeout,
                server_hostname=_SERVER_NAME,
                enable_SMTPUTF8=self._smtputf8,
            )
        return Controller(
            handler,
            hostname=self.host,
            port=port,
            ready_timeout=self._ready_timeout,
            server_hostname=_SERVER_NAME,
            enable_SMTPUTF8=self._smtputf8,
            authenticator=self._authenticate,
            # Without this aiosmtpd does not even advertise AUTH on a plain
            # connection; handle_MAIL enforces it instead of auth_required.
            auth_require_tls=False,
        )

    def _authenticate(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        mechanism: str,
        auth_data: object,
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and self.username is not None
            and self.password is not None
            and auth_data.login == self.username.encode()
            and auth_data.password == self.password.encode()
        )
        # handled=False makes aiosmtpd send its own 535 reply on failure;
        # with the default it sends nothing and the client hangs.
        return AuthResult(success=ok, handled=False)

    # -- fault knobs (see the class docstring) ---------------------------------

    delay: _Knob[float] = _Knob(lambda seconds: "delay must be >= 0" if seconds < 0 else None)
    drop: _Knob[DropHook | None] = _Knob()
    reject: _Knob[RejectHook | None] = _Knob()
    reject_sender: _Knob[RejectRecipientHook | None] = _Knob()
    reject_recipient: _Knob[RejectRecipientHook | None] = _Knob()
    greylist: _Knob[float] = _Knob(lambda seconds: "greylist must be >= 0" if seconds < 0 else None)
    quota: _Knob[float] = _Knob(lambda rate: "quota must be >= 0" if rate < 0 else None)
    close_421: _Knob[RecipientPredicate | None] = _Knob()

    def refuse_everyone(
        self, seconds: float, reply: str = "451 4.3.5 Server configuration problem"
    ) -> None:
        """Answer every RCPT with ``reply`` for ``seconds`` from now, then recover."""
        with self._state.lock:
            self._state.outage_until = time.monotonic() + seconds
            self._state.outage_reply = reply

    # -- what arrived ------------------------------------------------------

    @property
    def messages(self) -> list[ReceivedMessage]:
        with self._state.lock:
            return list(self._state.received)

    @property
    def refused(self) -> list[RefusedMessage]:
        with self._state.lock:
            return list(self._state.refused)

    @property
    def dropped(self) -> list[ReceivedEnvelopeInfo]:
        """Messages whose connection the `drop` hook closed instead of answering DATA."""
        with self._state.lock:
            return list(self._state.dropped)

    def count_by_recipient(self) -> collections.Counter[str]:
        """How many accepted messages each envelope recipient got."""
        counts: collections.Counter[str] = collections.Counter()
        for received in self.messages:
            counts.update(received.rcpt_tos)
        return counts

    def clear(self) -> None:
        """Forget accepted, refused and dropped messages (the knobs are kept)."""
        with self._state.lock:
            self._state.received.clear()
            self._state.refused.clear()
            self._state.dropped.clear()

    def wait_for(self, n: int, timeout: float) -> list[ReceivedMessage]:
        """Block until at least `n` messages were accepted; return them all."""
        deadline = time.monotonic() + timeout
        with self._state.arrived:
            while len(self._state.received) < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(self._shortfall(n, timeout))
                self._state.arrived.wait(remaining)
            return list(self._state.received)

    async def await_count(
        self, n: int, timeout: float, *, poll_interval: float = 0.01
    ) -> list[ReceivedMessage]:
        """Like `wait_for`, without blocking the calling event loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._state.lock:
                if len(self._state.received) >= n:
                    return list(self._state.received)
                shortfall = self._shortfall(n, timeout)
            if time.monotonic() >= deadline:
                raise TimeoutError(shortfall)
            await asyncio.sleep(poll_interval)

    def _shortfall(self, n: int, timeout: float) -> str:
        # Called with the lock held.
        return (
            f"expected {n} message(s) within {timeout:g} s, "
            f"{len(self._state.received)} arrived "
            f"({len(self._state.refused)} refused, {len(self._state.dropped)} dropped)"
        )


def _discard(controller: Controller) -> None:
    # A controller whose bind failed leaves its thread finished but its
    # private event loop open; close it so the retry leaks nothing.
    controller.stop(no_assert=True)
    if not controller.loop.is_closed():
        controller.loop.close()
