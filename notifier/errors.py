"""The one exception root of notifier, and what each branch means.

Every error the daemon raises on purpose derives from :class:`NotifierError`.
The tree says what failed, and the branch says whether trying the same thing
again later can help: callers retry ``CouchTransientError`` and
``TransientDeliveryError`` and nothing else::

    NotifierError
    ├── UsageError                  a wrong command line (exit 2)
    ├── ConfigError                 bad or unreadable configuration (never retried)
    ├── CouchError                  a CouchDB request failed
    │   ├── CouchFatalError         404/400/413…: a person has to act
    │   │   └── CouchAccessDenied   401/403 (also a PermissionError)
    │   ├── DocumentConflict        409: someone else wrote the doc first (MVCC)
    │   ├── DocumentRefused         a validation function refused one document's write
    │   └── CouchTransientError     429, 5xx, network trouble: retried with backoff
    │       └── CouchTimeoutError   no answer in time
    ├── LeaseLost                   another process took over this worker's slot
    ├── HandlerCrashing             unexpected errors hit many messages in a row (a bug)
    └── DeliveryError               the handler could not deliver a message
        ├── PermanentDeliveryError  the message can never go: dead-letter it
        │   └── InvalidMessageError  the document cannot become a message (no relay asked)
        ├── TransientDeliveryError  try again later (SMTP 4xx, dropped connection)
        │   ├── ThrottledDeliveryError   the relay asks the sender to slow down
        │   └── ChannelUnavailableError  the SMTP server cannot be reached at all
        └── DeliveryFatalError      the channel itself is unusable (TLS, sender refused)
            └── SmtpLoginRefused    the SMTP server refused the login (a PermissionError)

Builtin mixins are used where the meaning matches, so ``except TimeoutError``
still catches a CouchDB request that timed out.
"""

from __future__ import annotations


class NotifierError(Exception):
    """Root of every error notifier raises on purpose."""


class UsageError(NotifierError, ValueError):
    """The command line is wrong (a worker id outside its layout, counts that disagree)."""


class ConfigError(NotifierError, ValueError):
    """The configuration is missing, malformed or inconsistent."""


class CouchError(NotifierError):
    """A CouchDB request failed.

    ``status`` is the HTTP status, or ``None`` when no response arrived.
    ``error`` and ``reason`` are CouchDB's own words from the response body.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error: str | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.error = error
        self.reason = reason


class CouchFatalError(CouchError):
    """CouchDB refused in a way that retrying cannot fix (auth, missing database)."""


class CouchAccessDenied(CouchFatalError, PermissionError):
    """CouchDB refused the credentials (401) or the user's permissions (403)."""


class DocumentConflict(CouchError):
    """A write lost the race for a document revision (HTTP 409).

    Not an error to report: the caller re-reads the document and decides again.
    """


class DocumentRefused(CouchError):
    """CouchDB refused to write one document (``forbidden`` or ``unauthorized`` for
    that document in a ``_bulk_docs`` answer): a validation function said no.

    Not an access problem of the daemon's: it concerns that document only.
    """


class CouchTransientError(CouchError):
    """CouchDB is overloaded, restarting or unreachable; the request may succeed later."""


class CouchTimeoutError(CouchTransientError, TimeoutError):
    """No answer from CouchDB within the configured time."""


class LeaseLost(NotifierError):
    """This process no longer holds its worker's lease; it must stop sending."""


class HandlerCrashing(NotifierError):
    """Unexpected errors (a bug, a template that raises) hit many messages in a
    row; the worker stops rather than defer or dead-letter the backlog for them."""


class DeliveryError(NotifierError):
    """The handler could not deliver one message."""


class PermanentDeliveryError(DeliveryError):
    """The message cannot be delivered, ever; ``str(error)`` is the dead-letter reason."""


class InvalidMessageError(PermanentDeliveryError):
    """The document cannot become a message at all (no recipient, a bad field).

    Found before any relay was asked, so it says nothing about the relay.
    """


class TransientDeliveryError(DeliveryError):
    """The message could not be delivered now; it may be later."""


class ThrottledDeliveryError(TransientDeliveryError):
    """The relay refused for now because of the sender's pace (a quota, a rate limit).

    The sender slows down; the message does not use up an attempt.
    """


class ChannelUnavailableError(TransientDeliveryError, ConnectionError):
    """The delivery channel (the SMTP server) could not be reached at all.

    Unlike a per-message refusal this says nothing about the message, so it
    does not count towards the message's attempts: the daemon keeps trying
    until the server is back instead of dead-lettering mail during an outage.
    """


class DeliveryFatalError(DeliveryError):
    """The delivery channel is misconfigured (authentication, TLS); stop the worker."""


class SmtpLoginRefused(DeliveryFatalError, PermissionError):
    """The SMTP server refused the configured username and password."""
