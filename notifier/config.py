"""Configuration: a TOML file, validated once at load, plus secrets from outside it.

Every key, its type and default is declared once, in the dataclasses below;
``config.example.toml`` documents them for people and a test keeps the two in
step. Unknown keys, wrong types and missing required keys are errors that name
the file, the key and what was expected: a typo must never silently fall back
to a default.

Passwords never live in the TOML file. They come from an environment variable
or from a file (a systemd credential, say), are held in :class:`Secret`, and
never appear in ``repr``, logs or error messages.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import tomllib
import types
import typing
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar
from urllib.parse import urlsplit

from notifier.errors import ConfigError
from notifier.pacing import DomainLimit, domain_key
from notifier.templates import compile_template

COUCH_PASSWORD_ENV = "NOTIFIER_COUCH_PASSWORD"  # noqa: S105 (a variable name)
SMTP_PASSWORD_ENV = "NOTIFIER_SMTP_PASSWORD"  # noqa: S105 (a variable name)


class Secret:
    """A string that does not show itself.

    >>> s = Secret("hunter2")
    >>> s, str(s), f"{s}"
    (Secret('********'), '********', '********')
    >>> s.reveal()
    'hunter2'
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself: only for handing to a client library."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    def __str__(self) -> str:
        return "********"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, kw_only=True)
class CouchConfig:
    url: str = "http://127.0.0.1:5984"
    database: str = "messages"
    checkpoint_database: str = "workersequences"
    username: str | None = None
    password_file: str | None = None
    heartbeat: float = 10.0
    request_timeout: float = 30.0
    tls_verify: bool = True
    ca_file: str | None = None
    # Filled from the environment or password_file, never from TOML.
    password: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class SmtpConfig:
    host: str = "127.0.0.1"
    port: int = 25
    security: Literal["none", "starttls", "tls"] = "none"
    username: str | None = None
    password_file: str | None = None
    timeout: float = 30.0
    tls_verify: bool = True
    # A private CA's certificates (PEM), trusted in addition to none other.
    ca_file: str | None = None
    # A client certificate (PEM) and its key, for relays that ask for one.
    client_cert: str | None = None
    client_key: str | None = None
    # Messages per second for the whole worker set (None: no limit); each
    # worker paces at max_rate / worker_count.
    max_rate: float | None = None
    # [smtp.domains."example.com"]: per recipient domain limits.
    domains: Mapping[str, DomainLimit] = field(default_factory=dict)
    # No longer used: temporary failures are retried until [delivery] max_age.
    max_attempts: int | None = None
    password: Secret | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class EmailConfig:
    sender: str
    sender_name: str = "Notifier"
    max_body_bytes: int = 1_000_000
    # Jinja2 template files; None means the shipped default (and no HTML part).
    # After loading, a relative path has been made relative to the config file.
    subject_template: str | None = None
    text_template: str | None = None
    html_template: str | None = None


TEMPLATE_KEYS = ("subject_template", "text_template", "html_template")


@dataclass(frozen=True, kw_only=True)
class WorkerConfig:
    worker_count: int = 1
    max_parallel: int = 10
    checkpoint_interval: float = 5.0
    drain_timeout: float = 30.0
    lease_ttl: float = 30.0
    mark_batch_size: int = 100
    mark_batch_delay: float = 0.05
    claims: bool = True
    claim_ttl: float = 120.0
    retire_after: float = 604_800.0


@dataclass(frozen=True, kw_only=True)
class DeliveryConfig:
    # Seconds before the first retry of a temporary failure; each later one
    # waits twice as long, up to retry_max; jittered.
    retry_first: float = 60.0
    retry_max: float = 14_400.0
    # Seconds after its first failure that a message is dead-lettered.
    max_age: float = 432_000.0
    # Seconds between looks for deferred messages that are due.
    scan_interval: float = 30.0
    # Seconds a throttled message keeps waiting for the slower pace before
    # it is deferred (without using up an attempt).
    throttle_hold: float = 60.0
    # An outage: this many different recipients refused for now within
    # outage_window seconds, nothing accepted in between.
    outage_recipients: int = 10
    outage_window: float = 60.0
    # Seconds until the first probe of a paused relay; then doubling to probe_max.
    probe_first: float = 5.0
    probe_max: float = 120.0


@dataclass(frozen=True, kw_only=True)
class MetricsConfig:
    listen: str | None = None


@dataclass(frozen=True, kw_only=True)
class Config:
    couch: CouchConfig
    smtp: SmtpConfig
    email: EmailConfig
    worker: WorkerConfig
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    source: str = "<defaults>"
    #: Things to tell the operator that do not stop the start (deprecated keys).
    warnings: tuple[str, ...] = ()


SECTIONS: dict[str, type[Any]] = {
    "couch": CouchConfig,
    "smtp": SmtpConfig,
    "email": EmailConfig,
    "worker": WorkerConfig,
    "delivery": DeliveryConfig,
    "metrics": MetricsConfig,
}
# Keys that must be strictly positive (or at least 1 for counts).
_POSITIVE = {
    ("couch", "heartbeat"),
    ("couch", "request_timeout"),
    ("smtp", "port"),
    ("smtp", "timeout"),
    ("smtp", "max_attempts"),
    ("smtp", "max_rate"),
    ("email", "max_body_bytes"),
    ("worker", "worker_count"),
    ("worker", "max_parallel"),
    ("worker", "checkpoint_interval"),
    ("worker", "drain_timeout"),
    ("worker", "lease_ttl"),
    ("worker", "mark_batch_size"),
    ("worker", "mark_batch_delay"),
    ("worker", "claim_ttl"),
    ("worker", "retire_after"),
    ("delivery", "retry_first"),
    ("delivery", "retry_max"),
    ("delivery", "max_age"),
    ("delivery", "scan_interval"),
    ("delivery", "throttle_hold"),
    ("delivery", "outage_recipients"),
    ("delivery", "outage_window"),
    ("delivery", "probe_first"),
    ("delivery", "probe_max"),
}
# Keys with an upper bound too: (lowest, highest).
_RANGES = {("smtp", "port"): (1, 65535)}
_NOT_FROM_FILE = {"password"}
#: Keys still read but no longer used: accepted with a warning, so that an
#: upgrade never stops a worker from starting.
DEPRECATED_KEYS = {("smtp", "max_attempts")}
#: Keys whose value is a table of tables (``[smtp.domains."example.com"]``).
TABLE_KEYS = {("smtp", "domains")}

T = TypeVar("T")


def load(
    path: str | os.PathLike[str],
    *,
    environ: Mapping[str, str] | None = None,
    secrets: bool = True,
) -> Config:
    """Read, validate and complete the configuration at ``path``.

    ``environ`` defaults to ``os.environ``; it is where passwords come from
    when no ``password_file`` is configured. ``secrets=False`` reads no
    password at all, for commands that connect to nothing (``render``).
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{source}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{source}: cannot read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    return from_mapping(
        data, source=source, environ=environ, base_dir=Path(path).parent, secrets=secrets
    )


class _Problems:
    """Every error found in one configuration, so that one run names them all."""

    def __init__(self) -> None:
        self.found: list[str] = []

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except ConfigError as e:
            self.found.append(str(e))

    def raise_if_any(self) -> None:
        if len(self.found) == 1:
            raise ConfigError(self.found[0])
        if self.found:
            raise ConfigError(f"{len(self.found)} problems:\n  " + "\n  ".join(self.found))


def from_mapping(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    environ: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
    secrets: bool = True,
) -> Config:
    """Validate an already parsed TOML document (see :func:`load`).

    Relative template paths are taken from ``base_dir`` (the config file's
    directory), else from the current directory. Every problem found is
    named in the one ConfigError raised.
    """
    env = os.environ if environ is None else environ
    problems = _Problems()
    for name in sorted(set(data) - set(SECTIONS)):
        problems.found.append(f"{source}: unknown section [{name}] (known: {', '.join(SECTIONS)})")
    sections: dict[str, Any] = {}
    for name, cls in SECTIONS.items():
        table = data.get(name, {})
        if not isinstance(table, dict):
            problems.found.append(f"{source}: [{name}] must be a table, got {_kind(table)}")
            continue
        sections[name] = _build_section(cls, name, table, source, problems)

    couch: CouchConfig | None = sections.get("couch")
    smtp: SmtpConfig | None = sections.get("smtp")
    delivery: DeliveryConfig | None = sections.get("delivery")
    email: EmailConfig | None = sections.get("email")
    metrics: MetricsConfig | None = sections.get("metrics")
    if couch is not None:
        with problems.collect():
            _check_couch_url(couch.url, source)
        with problems.collect():
            if secrets:
                couch = dataclasses.replace(
                    couch, password=_password("couch", couch, COUCH_PASSWORD_ENV, env, source)
                )
    warnings: list[str] = []
    if smtp is not None:
        with problems.collect():
            if secrets:
                smtp = dataclasses.replace(
                    smtp, password=_password("smtp", smtp, SMTP_PASSWORD_ENV, env, source)
                )
        with problems.collect():
            smtp = _resolve_tls_files(smtp, base_dir or Path.cwd(), source)
        if smtp.max_attempts is not None:
            warnings.append(
                f"{source}: [smtp] max_attempts is no longer used and can be removed: "
                "temporary failures are deferred and retried until [delivery] max_age"
            )
    if delivery is not None:
        for low, high in (("retry_first", "retry_max"), ("probe_first", "probe_max")):
            if getattr(delivery, low) > getattr(delivery, high):
                problems.found.append(
                    f"{source}: [delivery] {low} ({getattr(delivery, low):g}) must not exceed "
                    f"{high} ({getattr(delivery, high):g})"
                )
    if email is not None:
        sender = email.sender
        if any(c < " " or c == "\x7f" for c in email.sender_name):
            problems.found.append(f"{source}: [email] sender_name: must be one line of text")
        if "@" not in sender or not sender.isascii() or any(c.isspace() for c in sender):
            problems.found.append(
                f"{source}: [email] sender: expected an ASCII email address, got {sender!r}"
            )
        with problems.collect():
            email = _resolve_templates(email, base_dir or Path.cwd(), source)
    if metrics is not None and metrics.listen is not None:
        try:
            parse_listen(metrics.listen)
        except ConfigError as e:
            problems.found.append(f"{source}: {e}")
    problems.raise_if_any()
    assert couch and smtp and delivery and email and metrics
    return Config(
        couch=couch,
        smtp=smtp,
        email=email,
        worker=sections["worker"],
        delivery=delivery,
        metrics=metrics,
        source=source,
        warnings=tuple(warnings),
    )


def _resolve_tls_files(smtp: SmtpConfig, base_dir: Path, source: str) -> SmtpConfig:
    """Make the TLS file paths absolute and check each can be read now, so that a
    typo stops start-up (and ``check``) instead of failing the first send."""
    if smtp.client_key is not None and smtp.client_cert is None:
        raise ConfigError(f"{source}: [smtp] client_key is set without client_cert")
    resolved: dict[str, Any] = {}
    for key in ("ca_file", "client_cert", "client_key"):
        value = getattr(smtp, key)
        if value is None:
            continue
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(f"{source}: [smtp] {key}: cannot read {path}: {e.strerror}") from None
        resolved[key] = str(path)
    if smtp.security == "none" and resolved:
        raise ConfigError(
            f'{source}: [smtp] {next(iter(resolved))} is set but security is "none": '
            'use "starttls" or "tls"'
        )
    return dataclasses.replace(smtp, **resolved)


def _resolve_templates(email: EmailConfig, base_dir: Path, source: str) -> EmailConfig:
    """Make template paths absolute and compile each once, so that a broken
    template stops start-up (and ``check``) with its file and line named,
    rather than dead-lettering every message."""
    resolved: dict[str, Any] = {}
    for key in TEMPLATE_KEYS:
        value = getattr(email, key)
        if value is None:
            continue
        path = Path(value) if Path(value).is_absolute() else base_dir / value
        try:
            compile_template(path, html=key == "html_template")
        except ConfigError as e:
            raise ConfigError(f"{source}: [email] {key}: {e}") from None
        resolved[key] = str(path)
    return dataclasses.replace(email, **resolved)


def parse_listen(value: str) -> tuple[str, int]:
    """``"host:port"`` as a pair; the error names the key.

    >>> parse_listen("127.0.0.1:9464"), parse_listen("[::1]:80")
    (('127.0.0.1', 9464), ('::1', 80))
    """
    host, sep, port = value.rpartition(":")
    # Port 0 picks a free port (useful in tests; the log says which).
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536 or not host:
        raise ConfigError(f"[metrics] listen: expected HOST:PORT, got {value!r}")
    return host.strip("[]"), int(port)


def _build_section(
    cls: type[T], section: str, table: Mapping[str, Any], source: str, problems: _Problems
) -> T | None:
    """The section's dataclass, or ``None`` when ``problems`` got any of its keys."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    allowed = [name for name in fields if name not in _NOT_FROM_FILE]
    values: dict[str, Any] = {}
    earlier = len(problems.found)
    for key, value in table.items():
        if (section, key) == ("smtp", "domains"):
            with problems.collect():
                values[key] = _domain_limits(value, f"{source}: [smtp.domains]")
            continue
        if key not in allowed:
            hint = ""
            if key in _NOT_FROM_FILE:
                hint = f" (passwords come from the environment or [{section}] password_file)"
            problems.found.append(
                f"{source}: [{section}] {key}: unknown key{hint}; known keys: {', '.join(allowed)}"
            )
            continue
        with problems.collect():
            values[key] = _coerce(value, hints[key], section, key, source)
    for name, f in fields.items():
        if (
            name not in table
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ):
            problems.found.append(f"{source}: [{section}] {name}: required key is missing")
    return None if len(problems.found) > earlier else cls(**values)


def _coerce(value: Any, hint: Any, section: str, key: str, source: str) -> Any:
    where = f"{source}: [{section}] {key}"
    if isinstance(hint, types.UnionType):
        # `str | None`: TOML has no null, so an optional key is simply left out.
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(
                f"{where}: expected one of {', '.join(map(repr, choices))}, got {value!r}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number (seconds), got {_kind(value)}")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_kind(value)}")
        if not value:
            raise ConfigError(f"{where}: expected a non-empty string")
    if (section, key) in _POSITIVE and not value > 0:
        raise ConfigError(f"{where}: expected a value greater than 0, got {value!r}")
    low, high = _RANGES.get((section, key), (value, value))
    if not low <= value <= high:
        raise ConfigError(f"{where}: expected {low} to {high}, got {value!r}")
    return value


def _domain_limits(value: Any, where: str) -> dict[str, DomainLimit]:
    """``[smtp.domains."example.com"]`` tables: ``max_parallel`` and ``max_rate``."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected tables named by domain, got {_kind(value)}")
    limits: dict[str, DomainLimit] = {}
    for domain, table in value.items():
        at = f'{where[:-1]}."{domain}"]'
        name = domain_key(domain)
        if not name or "@" in name or any(c.isspace() for c in name):
            raise ConfigError(f'{at}: expected a domain name such as "example.com"')
        if not isinstance(table, dict):
            raise ConfigError(f"{at}: expected a table, got {_kind(table)}")
        unknown = sorted(set(table) - {"max_parallel", "max_rate"})
        if unknown:
            raise ConfigError(f"{at} {unknown[0]}: unknown key; known keys: max_parallel, max_rate")
        parallel, rate = table.get("max_parallel"), table.get("max_rate")
        if parallel is not None and (
            isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1
        ):
            raise ConfigError(f"{at} max_parallel: expected an integer of at least 1")
        if rate is not None and (
            isinstance(rate, bool) or not isinstance(rate, int | float) or not rate > 0
        ):
            raise ConfigError(f"{at} max_rate: expected a number of messages per second above 0")
        if parallel is None and rate is None:
            raise ConfigError(f"{at}: set max_parallel, max_rate or both")
        limits[name] = DomainLimit(
            max_parallel=parallel, max_rate=None if rate is None else float(rate)
        )
    return limits


def _kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"


def _check_couch_url(url: str, source: str) -> None:
    parts = urlsplit(url)
    if parts.username or parts.password:
        # Rejected so that a password can never sit in a file that gets
        # printed, copied into tickets or logged with the URL.
        raise ConfigError(
            f"{source}: [couch] url: must not contain credentials; set [couch] username "
            f"and the password in {COUCH_PASSWORD_ENV} or [couch] password_file"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{source}: [couch] url: expected an http:// or https:// URL, got {url!r}"
        )


def _password(
    section: str,
    table: CouchConfig | SmtpConfig,
    env_name: str,
    env: Mapping[str, str],
    source: str,
) -> Secret | None:
    """The password for ``table.username``: from ``password_file``, else the environment."""
    username, password_file = table.username, table.password_file
    if password_file is not None:
        # A relative path names a systemd credential (LoadCredential=) when
        # the service has them, so one config file serves every worker.
        path = Path(password_file)
        credentials = env.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and credentials:
            path = Path(credentials) / path
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(
                f"{source}: [{section}] password_file: cannot read {path}: {e.strerror}"
            ) from None
        # A trailing newline is an artefact of `echo secret > file`.
        secret = text.rstrip("\r\n")
    elif env.get(env_name):
        secret = env[env_name]
    else:
        secret = None
    if username is None:
        return None
    if secret is None:
        raise ConfigError(
            f"{source}: [{section}] username is set but there is no password: "
            f"set {env_name} or [{section}] password_file"
        )
    return Secret(secret)
