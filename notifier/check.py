"""``notifier check``: can a worker run with this configuration?

:func:`run_checks` connects to CouchDB and the SMTP server the way a worker
would, without writing or sending anything, and says for each step whether it
works and, if not, what to change.

It only reads. It never prints a password: the configuration keeps them in
:class:`~notifier.config.Secret`, and the messages here name the setting to
fix (``NOTIFIER_COUCH_PASSWORD``, ``[smtp] password_file``…), never its value.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import aiosmtplib
import httpx

from notifier.config import COUCH_PASSWORD_ENV, SMTP_PASSWORD_ENV, Config
from notifier.couch import CouchClient, Doc, is_missing_database, short_reason
from notifier.errors import (
    ChannelUnavailableError,
    CouchAccessDenied,
    CouchError,
    CouchTransientError,
    DeliveryError,
    DeliveryFatalError,
    NotifierError,
    SmtpLoginRefused,
    TransientDeliveryError,
)
from notifier.mailer import SmtpPool
from notifier.retries import INDEX as RETRY_INDEX
from notifier.retries import summarise
from notifier.worker import FAILED, NOTIFIED, SELECTOR, stop_timeout

__all__ = ["CheckReport", "CheckResult", "LooksSettled", "count_looks_settled", "run_checks"]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One step of :func:`run_checks`.

    ``ok`` is true when the step worked. A step that could not run because an
    earlier one failed has ``skipped`` set (and ``ok`` false); it is not a
    failure of its own. ``fix`` says what to change when the step failed.
    ``error`` is the classified error behind a failure, for choosing an exit
    status; it is never printed as a whole.
    """

    name: str
    ok: bool
    detail: str
    fix: str | None = None
    skipped: bool = False
    error: NotifierError | None = field(default=None, repr=False, compare=False)
    #: Works, but something needs a look (shown with its fix; not a failure).
    warning: bool = False

    @property
    def failed(self) -> bool:
        return not self.ok and not self.skipped

    @property
    def mark(self) -> str:
        if self.ok:
            return "warn" if self.warning else "ok"
        return "skip" if self.skipped else "FAIL"


@dataclass(frozen=True, slots=True)
class CheckReport:
    """The outcome of :func:`run_checks`, in the order the steps ran."""

    source: str
    results: tuple[CheckResult, ...]

    @property
    def ok(self) -> bool:
        return not self.failures

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.failed]

    @property
    def first_error(self) -> NotifierError | None:
        """The error of the first failed step (``None`` when every step passed).

        Its class says what kind of problem it is: a ``PermissionError``
        (credentials refused), a :class:`~notifier.errors.CouchError` or a
        :class:`~notifier.errors.DeliveryError`.
        """
        return next((r.error for r in self.results if r.failed and r.error), None)

    def render(self) -> str:
        """A report for a terminal: one line per step, then the fix under each failure."""
        width = max(len(r.name) for r in self.results)
        lines = [f"notifier check: {self.source}"]
        for r in self.results:
            lines.append(f"  {r.mark:<4}  {r.name:<{width}}  {r.detail}")
            if r.fix and (not r.ok or r.warning):
                lines.append(f"  {'':<4}  {'':<{width}}  fix: {r.fix}")
        failed = len(self.failures)
        if failed:
            lines.append(f"{failed} of {len(self.results)} checks failed")
        else:
            lines.append(f"all {len(self.results)} checks passed")
        return "\n".join(lines) + "\n"


class _Checks:
    """Collects results; a failed step can turn the steps that need it into skips."""

    def __init__(self) -> None:
        self.results: list[CheckResult] = []

    def ok(self, name: str, detail: str) -> None:
        self.results.append(CheckResult(name, True, detail))

    def fail(self, name: str, error: NotifierError, detail: str, fix: str) -> None:
        self.results.append(CheckResult(name, False, detail, fix, error=error))

    def skip(self, name: str, why: str) -> None:
        self.results.append(CheckResult(name, False, f"not checked: {why}", skipped=True))

    def warn(self, name: str, detail: str, fix: str) -> None:
        self.results.append(CheckResult(name, True, detail, fix, warning=True))


COUCH_SERVER = "CouchDB server"
COUCH_LOGIN = "CouchDB credentials"
DATABASE = "messages database"
CHECKPOINT_DATABASE = "checkpoint database"
SELECTOR_FILTER = "_selector filter"
SETTLED_FLAGS = "settled flags"
DEFERRED = "deferred messages"
SMTP_CONNECTION = "SMTP connection"
SMTP_SENDER = "SMTP sender"


async def run_checks(
    config: Config, *, transport: httpx.AsyncBaseTransport | None = None
) -> CheckReport:
    """Connect to CouchDB and the SMTP server as a worker would; write and send nothing.

    The steps, in order: the CouchDB server answers, it accepts the
    credentials, the messages database exists, the checkpoint database exists
    (or a worker will create it), CouchDB accepts the ``_selector`` filter the
    worker uses, no document looks settled without having been, ``_find``
    finds the deferred messages (and whether their index exists), the SMTP
    server takes a connection (with TLS and login as
    configured), and it accepts ``[email] sender`` in a ``MAIL FROM`` (which is
    then reset: no message is sent). A failure skips only the steps that
    cannot run without it: with CouchDB unreachable, SMTP is still checked.

    Only a :class:`~notifier.errors.NotifierError` counts as a failed step;
    anything else is a bug and propagates.
    """
    checks = _Checks()
    worker_count = config.worker.worker_count
    checks.ok(
        "configuration",
        f"{config.source}: read; database {config.couch.database!r}, "
        f"{worker_count} worker{'s' if worker_count != 1 else ''} by default; a stop takes "
        f"up to {stop_timeout(config.worker.drain_timeout):g}s (systemd's TimeoutStopSec "
        "must be at least that)",
    )
    async with CouchClient.from_config(config.couch, transport=transport) as couch:
        await _check_couch(config, couch, checks)
    await _check_smtp(config, checks)
    return CheckReport(source=config.source, results=tuple(checks.results))


async def _attempt(awaitable: Awaitable[T]) -> T | CouchError:
    try:
        return await awaitable
    except CouchError as e:
        return e


async def _check_couch(config: Config, couch: CouchClient, checks: _Checks) -> None:
    c = config.couch
    url = couch.url
    later = [COUCH_LOGIN, DATABASE, CHECKPOINT_DATABASE, SELECTOR_FILTER, SETTLED_FLAGS, DEFERRED]

    # 1. Anything answering at all. CouchDB answers GET / without credentials,
    # but refuses wrong ones even there (401): that is the next step's failure.
    welcome = await _attempt(couch.request("GET", "/"))
    refused_at_root: CouchError | None = None
    if isinstance(welcome, CouchAccessDenied) and welcome.status == 401:
        refused_at_root = welcome
        checks.ok(COUCH_SERVER, f"{url} answered")
    elif isinstance(welcome, CouchError):
        checks.fail(
            COUCH_SERVER, welcome, f"{url}: {short_reason(welcome)}", _unreachable_fix(welcome)
        )
        for name in later:
            checks.skip(name, "CouchDB did not answer")
        return
    else:
        checks.ok(COUCH_SERVER, f"{url} answered: {_server_name(welcome)}")

    # 2. Credentials, seen on the first request that needs them.
    info: Doc | CouchError = (
        refused_at_root
        if refused_at_root is not None
        else await _attempt(couch.database_info(c.database))
    )
    if isinstance(info, CouchError) and info.status == 401:
        if c.username is None:
            detail = f"{url} requires a login (401) and [couch] username is not set"
            fix = (
                f"set [couch] username, and its password in {COUCH_PASSWORD_ENV} "
                "or [couch] password_file"
            )
        else:
            detail = f"{url} refused the login of user {c.username!r} (401)"
            fix = (
                f"check [couch] username and its password ({COUCH_PASSWORD_ENV} "
                "or [couch] password_file)"
            )
        checks.fail(COUCH_LOGIN, info, detail, fix)
        for name in later[1:]:
            checks.skip(name, "CouchDB refused the credentials")
        return
    if c.username is None:
        checks.ok(COUCH_LOGIN, "none configured; the server allows anonymous requests")
    else:
        checks.ok(COUCH_LOGIN, f"accepted for user {c.username!r}")

    # 3. The database the worker follows.
    db_exists = False
    if isinstance(info, CouchError):
        if is_missing_database(info):
            checks.fail(
                DATABASE,
                info,
                f"{c.database!r} does not exist on {url}",
                f"check [couch] database, or create the database (PUT {url}/{_q(c.database)})",
            )
        else:
            checks.fail(
                DATABASE,
                info,
                f"{c.database!r}: {short_reason(info)}",
                _access_fix(info, c.database),
            )
    else:
        db_exists = True
        checks.ok(
            DATABASE,
            f"{c.database!r} exists: {_count(info.get('doc_count'))} documents"
            + (
                f", {deleted} deleted"
                if isinstance(deleted := info.get("doc_del_count"), int)
                else ""
            ),
        )

    # 4. The checkpoint database: missing is fine, a worker creates it.
    ckinfo = await _attempt(couch.database_info(c.checkpoint_database))
    if isinstance(ckinfo, CouchError):
        if is_missing_database(ckinfo):
            checks.ok(
                CHECKPOINT_DATABASE,
                f"{c.checkpoint_database!r} does not exist yet: the first worker creates it "
                f"(that needs a server admin; otherwise create it: PUT {url}/"
                f"{_q(c.checkpoint_database)})",
            )
        else:
            checks.fail(
                CHECKPOINT_DATABASE,
                ckinfo,
                f"{c.checkpoint_database!r}: {short_reason(ckinfo)}",
                _access_fix(ckinfo, c.checkpoint_database),
            )
    else:
        checks.ok(
            CHECKPOINT_DATABASE,
            f"{c.checkpoint_database!r} exists: {_count(ckinfo.get('doc_count'))} documents",
        )

    # 5. The server-side filter the worker's feed uses. The selector goes in
    # the body (where CouchDB reads it) and in the query string (where PouchDB
    # Server reads it; without it, its process dies). since=now: the filter is
    # parsed at once, and no history is scanned on a big database.
    if not db_exists:
        checks.skip(SELECTOR_FILTER, f"needs the database {c.database!r}")
        checks.skip(SETTLED_FLAGS, f"needs the database {c.database!r}")
        checks.skip(DEFERRED, f"needs the database {c.database!r}")
        return
    try:
        answer = await couch.request(
            "POST",
            f"/{_q(c.database)}/_changes",
            params={
                "feed": "normal",
                "since": "now",
                "limit": "1",
                "filter": "_selector",
                "selector": json.dumps(SELECTOR, separators=(",", ":")),
            },
            json_body={"selector": SELECTOR},
        )
    except CouchError as e:
        if e.status == 400:
            fix = (
                "the server does not accept filter=_selector on _changes; notifier needs "
                "Apache CouchDB 2.0 or later (or a compatible server)"
            )
        else:
            fix = _access_fix(e, c.database)
        checks.fail(SELECTOR_FILTER, e, short_reason(e), fix)
        checks.skip(SETTLED_FLAGS, "the _selector filter failed")
        checks.skip(DEFERRED, "the _selector filter failed")
        return
    if not isinstance(answer, dict) or not isinstance(answer.get("results"), list):
        checks.fail(
            SELECTOR_FILTER,
            CouchTransientError(f"CouchDB POST /{c.database}/_changes: no results"),
            "the _changes answer has no results",
            "check that [couch] url points at CouchDB itself, not at a proxy or another server",
        )
        checks.skip(SETTLED_FLAGS, "the _selector filter failed")
        checks.skip(DEFERRED, "the _selector filter failed")
        return
    checks.ok(SELECTOR_FILTER, f"accepted on _changes of {c.database!r}")

    # 6. Documents the selector passes over although nobody settled them.
    looks = await _attempt(count_looks_settled(couch, c.database))
    if isinstance(looks, CouchError):
        checks.fail(SETTLED_FLAGS, looks, short_reason(looks), _access_fix(looks, c.database))
    elif looks.count:
        checks.warn(SETTLED_FLAGS, looks.describe(), LooksSettled.FIX)
    else:
        checks.ok(SETTLED_FLAGS, f"no document in {c.database!r} has {NOTIFIED} other than true")

    # 7. Deferred messages are found again with _find; its index keeps that cheap.
    summary = await _attempt(summarise(couch, c.database, now=time.time()))
    if isinstance(summary, CouchError):
        fix = (
            "notifier finds deferred and scheduled messages with _find: it needs Apache "
            "CouchDB 2.0 or later, or PouchDB Server"
            if summary.status in (400, 404, 501)
            else _access_fix(summary, c.database)
        )
        checks.fail(DEFERRED, summary, short_reason(summary), fix)
    elif summary.odd:
        checks.warn(
            DEFERRED,
            summary.describe(),
            "a notificationRetry without a numeric due keeps a message out of the feed and of "
            "the look for due messages (a hand edit?); workers take such messages as due when "
            "they start and every hour; to have them sent now, remove notificationRetry from "
            "them",
        )
    elif not summary.indexed:
        # As for the checkpoint database: the first worker makes it, if it may.
        checks.ok(
            DEFERRED,
            f"{summary.describe()} yet: the first worker creates it (that needs a database "
            "admin; otherwise each look for due messages scans the database, until an admin "
            f"runs POST /{c.database}/_index with "
            f"{json.dumps(RETRY_INDEX, separators=(',', ':'))})",
        )
    else:
        checks.ok(DEFERRED, summary.describe())


#: Documents that look settled to the selector but were never sent:
#: ``notifiedRecipient`` present with any value but ``true``, and no dead letter.
LOOKS_SETTLED_SELECTOR: dict[str, Any] = {
    NOTIFIED: {"$exists": True, "$ne": True},
    FAILED: {"$exists": False},
}


@dataclass(frozen=True, slots=True)
class LooksSettled:
    """How many documents carry a ``notifiedRecipient`` that is not ``true``."""

    count: int
    #: ``True`` when there are at least ``count`` (the scan stopped there).
    more: bool
    examples: tuple[str, ...]

    FIX = (
        f"the feed's selector skips every document that has {NOTIFIED}, whatever its value, "
        f"so these were never sent: remove {NOTIFIED} from them (and make applications leave "
        "it out of new messages) to have them sent"
    )

    def describe(self) -> str:
        some = ", ".join(self.examples)
        return (
            f"{'at least ' if self.more else ''}{self.count} document"
            f"{'s' if self.count != 1 else ''} with {NOTIFIED} other than true and no "
            f"{FAILED} (e.g. {some}): they look settled but were never sent"
        )

    def to_json(self) -> dict[str, Any]:
        return {"count": self.count, "more": self.more, "examples": list(self.examples)}


async def count_looks_settled(
    couch: CouchClient, database: str, *, limit: int = 1000
) -> LooksSettled:
    """Count (up to ``limit``) the documents :data:`LOOKS_SETTLED_SELECTOR` finds.

    One filtered ``_changes`` request: the fake CouchDB, PouchDB Server and
    CouchDB all evaluate a ``_selector`` there. CouchDB reads every
    document's latest revision to answer it, as the workers' feed does once.
    """
    answer = await couch.request(
        "POST",
        f"/{_q(database)}/_changes",
        params={
            "feed": "normal",
            "limit": str(limit),
            "filter": "_selector",
            "selector": json.dumps(LOOKS_SETTLED_SELECTOR, separators=(",", ":")),
        },
        json_body={"selector": LOOKS_SETTLED_SELECTOR},
    )
    rows = answer.get("results") if isinstance(answer, dict) else None
    ids = [r["id"] for r in rows or [] if isinstance(r, dict) and isinstance(r.get("id"), str)]
    return LooksSettled(count=len(ids), more=len(ids) >= limit, examples=tuple(ids[:3]))


async def _check_smtp(config: Config, checks: _Checks) -> None:
    s = config.smtp
    where = f"{s.host}:{s.port}"
    pool = SmtpPool(s, size=1)
    try:
        try:
            async with pool.connection() as client:
                checks.ok(SMTP_CONNECTION, f"{where}: {_smtp_session(config)}")
                await _check_sender(config, client, checks)
        except SmtpLoginRefused as e:
            checks.fail(
                SMTP_CONNECTION,
                e,
                str(e),
                f"check [smtp] username and its password ({SMTP_PASSWORD_ENV} or "
                "[smtp] password_file)",
            )
            checks.skip(SMTP_SENDER, "no SMTP session")
        except DeliveryFatalError as e:
            checks.fail(
                SMTP_CONNECTION,
                e,
                str(e),
                'check [smtp] security ("tls" for port 465, "starttls" for 587, '
                '"none" for a local relay); for a relay whose certificate a private CA '
                "signed, set [smtp] ca_file to that CA's certificate (PEM) rather than "
                "turning tls_verify off",
            )
            checks.skip(SMTP_SENDER, "no SMTP session")
        except DeliveryError as e:
            checks.fail(
                SMTP_CONNECTION,
                e,
                str(e),
                "check [smtp] host and port, that the server runs, and that no firewall "
                "blocks the port",
            )
            checks.skip(SMTP_SENDER, "no SMTP session")
    finally:
        await pool.aclose()


async def _check_sender(config: Config, client: aiosmtplib.SMTP, checks: _Checks) -> None:
    """MAIL FROM with the configured sender, then RSET: nothing is sent.

    This is where a server that needs a login (and none is configured) or
    refuses the sender address says so.
    """
    s, sender = config.smtp, config.email.sender
    where = f"{s.host}:{s.port}"
    try:
        await client.mail(sender)
    except aiosmtplib.SMTPResponseException as e:
        reply = f"{e.code} {e.message}"
        if e.code in (530, 535) or (e.code == 550 and "auth" in e.message.lower()):
            error: DeliveryError = SmtpLoginRefused(f"SMTP server {where}: {reply}")
            if s.username is None:
                fix = (
                    "the server requires a login: set [smtp] username, and its password in "
                    f"{SMTP_PASSWORD_ENV} or [smtp] password_file"
                )
            else:
                fix = f"the server does not accept the login of [smtp] username {s.username!r}"
        elif e.code >= 500:
            error = DeliveryFatalError(f"SMTP server {where} refused the sender: {reply}")
            fix = "use an [email] sender address this server may send from"
        else:
            error = TransientDeliveryError(f"SMTP server {where}: {reply}")
            fix = "a temporary refusal: try again later, or ask the mail administrator"
        checks.fail(SMTP_SENDER, error, f"MAIL FROM:<{sender}> refused: {reply}", fix)
        return
    except (aiosmtplib.SMTPException, OSError) as e:
        checks.fail(
            SMTP_SENDER,
            ChannelUnavailableError(f"SMTP server {where}: {type(e).__name__}: {e}"),
            f"MAIL FROM:<{sender}>: {type(e).__name__}: {e}",
            "the server dropped the session; check its logs",
        )
        return
    try:
        await client.rset()
    except (aiosmtplib.SMTPException, OSError):
        client.close()
    checks.ok(SMTP_SENDER, f"MAIL FROM:<{sender}> accepted, then reset (nothing sent)")


def _smtp_session(config: Config) -> str:
    s = config.smtp
    tls = {"tls": "TLS", "starttls": "STARTTLS", "none": "no TLS"}[s.security]
    if s.security != "none" and not s.tls_verify:
        tls += " (certificate not verified: [smtp] tls_verify = false)"
    login = f"logged in as {s.username!r}" if s.username else "no login configured"
    return f"connected, {tls}, {login}"


def _unreachable_fix(error: CouchError) -> str:
    text = str(error).lower()
    if "ssl" in text or "certificate" in text:
        return "TLS failed: check [couch] url (https?), ca_file and tls_verify"
    if error.status is None:
        return "check [couch] url, that CouchDB runs there, and that no firewall blocks the port"
    return "CouchDB answered with an error: check its log, and that [couch] url points at CouchDB"


def _access_fix(error: CouchError, database: str) -> str:
    if error.status == 403:
        return f"give the [couch] user access to {database!r} (its _security members)"
    if error.status == 401:
        return f"check [couch] username and its password ({COUCH_PASSWORD_ENV})"
    if isinstance(error, CouchTransientError):
        return "CouchDB is failing or overloaded: check its log and try again"
    return "see CouchDB's answer above"


def _server_name(welcome: Any) -> str:
    """What answered GET /, e.g. ``CouchDB 3.3.3`` or ``PouchDB Server 4.2.0``."""
    if not isinstance(welcome, dict):
        return "an unexpected answer (not a JSON object)"
    vendor = welcome.get("vendor")
    name = vendor.get("name") if isinstance(vendor, dict) else None
    version = welcome.get("version")
    if "couchdb" in welcome:
        kind = "CouchDB"
    elif "express-pouchdb" in welcome:
        kind = "PouchDB Server"
    else:
        kind = "a CouchDB-compatible server"
    text = f"{kind} {version}" if isinstance(version, str) else kind
    if name and name not in ("The Apache Software Foundation", "PouchDB authors"):
        text += f" ({name})"
    return text


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) else "?"


def _q(name: str) -> str:
    return quote(name, safe="")
