"""The ``notifier`` command line.

Exit statuses are listed once, in :data:`EXIT_STATUSES`: ``notifier --help``
shows them, README.md explains them (a test keeps the two in step), and
systemd units rely on them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any, ClassVar, TypeVar

from notifier import __version__
from notifier import config as config_module
from notifier.check import run_checks
from notifier.config import Config
from notifier.demo import add_demo_parser, run_demo
from notifier.errors import (
    ConfigError,
    CouchError,
    DeliveryError,
    LeaseLost,
    NotifierError,
    PermanentDeliveryError,
    UsageError,
)
from notifier.prune import prune_checkpoints
from notifier.requeue import requeue, selection_from
from notifier.runner import EXIT_FORCED, build_composer, run_worker
from notifier.shard import Shard
from notifier.status import gather_status

log = logging.getLogger("notifier")

EXIT_OK = 0
EXIT_STALE = 1
EXIT_USAGE = 2
EXIT_DATA = 65
EXIT_COUCH = 69
EXIT_CRASH = 70
EXIT_LEASE = 75
EXIT_SMTP = 76
EXIT_ACCESS = 77
EXIT_CONFIG = 78

#: Every exit status and its short meaning, for ``--help`` and README.md.
EXIT_STATUSES: tuple[tuple[int, str], ...] = (
    (EXIT_OK, "clean stop (check, status, prune-checkpoints, render: all good)"),
    (EXIT_STALE, "status: a worker is stale; demo: it failed"),
    (EXIT_USAGE, "bad command line"),
    (EXIT_DATA, "render: undeliverable document"),
    (EXIT_COUCH, "CouchDB error (requeue: a document could not be written)"),
    (EXIT_CRASH, "crash"),
    (EXIT_LEASE, "lease lost"),
    (EXIT_SMTP, "SMTP error"),
    (EXIT_ACCESS, "credentials or permissions refused"),
    (EXIT_CONFIG, "configuration error"),
    (EXIT_FORCED, "forced stop (second signal)"),
)
__all__ = ["EXIT_STATUSES", "main"]

DEFAULT_CONFIG = "/etc/notifier/config.toml"

T = TypeVar("T")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notifier",
        description=(
            "Follow a CouchDB database's _changes feed and email the recipient of every new "
            "message document, once."
        ),
        epilog="exit statuses: "
        + ", ".join(f"{status} {meaning}" for status, meaning in EXIT_STATUSES),
    )
    parser.add_argument("--version", action="version", version=f"notifier {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def config_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--config",
            metavar="PATH",
            default=os.environ.get("NOTIFIER_CONFIG", DEFAULT_CONFIG),
            help="TOML configuration file (default: $NOTIFIER_CONFIG or %(default)s)",
        )
        p.add_argument(
            "--log-level",
            default=os.environ.get("NOTIFIER_LOG_LEVEL", "INFO"),
            choices=["DEBUG", "INFO", "WARNING", "ERROR"],
            type=str.upper,
            help="log verbosity (default: $NOTIFIER_LOG_LEVEL or INFO)",
        )
        p.add_argument(
            "--log-format",
            default=os.environ.get("NOTIFIER_LOG_FORMAT", "text"),
            choices=["text", "json"],
            help="text for people and the journal, json (one object a line) for log shippers",
        )

    run = commands.add_parser(
        "run",
        help="run one worker until SIGINT or SIGTERM",
        description=(
            "Run one worker. Each worker handles the documents whose stable hash of _id, "
            "modulo the worker count, equals its worker id, and keeps its own checkpoint. "
            "SIGINT or SIGTERM stops it after in-flight messages finish (within "
            "[worker] drain_timeout); a second signal exits at once."
        ),
    )
    run.add_argument(
        "--worker-id",
        type=worker_slot,
        required=True,
        metavar="N",
        help=(
            "this worker's id, 0..count-1; or N-of-M, which also gives the worker count "
            "(systemd: notifier@0-of-3, so that two layouts can run on one machine "
            "during a reshard)"
        ),
    )
    run.add_argument(
        "--worker-count",
        type=int,
        metavar="M",
        help=(
            "number of workers sharing the database (default: the M of --worker-id N-of-M, "
            "else $NOTIFIER_WORKER_COUNT, else [worker] worker_count)"
        ),
    )
    config_option(run)

    check = commands.add_parser(
        "check",
        help="validate the configuration and connect to CouchDB and SMTP",
        description=(
            "Validate the configuration, then check CouchDB (server, credentials, databases, "
            "the _selector filter) and the SMTP server (connection, TLS, login, sender). "
            "Prints one line per check with how to fix what failed; sends no email."
        ),
    )
    config_option(check)

    status = commands.add_parser(
        "status",
        help="show every worker's checkpoint, lag estimate and lease, and each layout's state",
        description=(
            "List the checkpoint of every worker of every layout (worker count), when it "
            "was written, an estimate of the changes after it, and who holds its lease; and "
            "for each layout whether it runs, when it last ran, which is current (the newest "
            "running) and which are retired (no run for [worker] retire_after while another "
            "layout has run since). Exits 1 when a worker is stale: changes after a "
            "checkpoint older than --stale-after (a retired layout is never stale)."
        ),
    )
    config_option(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument(
        "--stale-after",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="age after which a checkpoint with changes after it is stale (default %(default)s)",
    )

    prune = commands.add_parser(
        "prune-checkpoints",
        help="delete the checkpoint and lease documents of retired layouts",
        description=(
            "Delete the checkpoint and lease documents of every retired layout: one none "
            "of whose workers has run for [worker] retire_after while another layout has "
            "run since (notifier status marks them). A layout with a live lease, or one "
            "that is not retired, is never touched; the report says why. If a worker of a "
            "deleted layout is ever started again, it starts from the beginning of the "
            "feed, which is safe: marked messages are never sent again."
        ),
    )
    config_option(prune)
    prune.add_argument(
        "--dry-run", action="store_true", help="show what would be deleted; delete nothing"
    )
    prune.add_argument("--json", action="store_true", help="print JSON instead of text")

    again = commands.add_parser(
        "requeue",
        help="send dead letters again",
        description=(
            "Requeue dead letters (documents with notificationFailed): remove the failure "
            "and any retry state, keep the failure in notificationHistory, and let the "
            "running workers send them again, with the same Message-ID. Select them by "
            "document id, by --reason (a regular expression searched in the failure's "
            "reason) and by when they failed (--older-than, --newer-than: 90s, 30m, 12h, "
            "7d); every given criterion must hold, and with none, every dead letter is "
            "requeued. Safe while workers run: each document is written with the revision "
            "that was read. Exits 69 if a document could not be written."
        ),
    )
    config_option(again)
    again.add_argument("ids", nargs="*", metavar="DOC_ID", help="only these documents")
    again.add_argument("--reason", metavar="REGEX", help="only failures whose reason matches")
    again.add_argument("--older-than", metavar="AGE", help="only failures at least this old")
    again.add_argument("--newer-than", metavar="AGE", help="only failures at most this old")
    again.add_argument(
        "--dry-run", action="store_true", help="show what would be requeued; write nothing"
    )
    again.add_argument("--json", action="store_true", help="print JSON instead of text")

    render = commands.add_parser(
        "render",
        help="print the email a document would produce, without sending it",
        description=(
            "Compose the email for the message document in DOC.json (a file, or - for "
            "stdin) with the configured templates and print it: headers and parts as they "
            "would be sent, with encoded headers and bodies decoded so that they read as "
            "text. Connects to nothing and needs no password. Exits 65 with the reason when "
            "the document would be dead-lettered."
        ),
    )
    config_option(render)
    render.add_argument("doc", metavar="DOC.json", help="a message document as JSON")
    add_demo_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    if args.command == "demo":
        return run_demo(args)  # brings its own servers and configuration
    try:
        # render connects to nothing, so it needs no password.
        config = config_module.load(args.config, secrets=args.command != "render")
        for warning in config.warnings:
            log.warning("%s", warning)
        if args.command == "run":
            shard = _shard(args, config)
            run_async(run_worker(config, shard))
        elif args.command == "check":
            report = run_async(run_checks(config))
            print(report.render(), end="")
            if not report.ok:
                assert report.first_error is not None
                return exit_status(report.first_error)
        elif args.command == "status":
            state = run_async(gather_status(config, stale_after=args.stale_after))
            print(json.dumps(state.to_json(), indent=2) if args.json else state.render())
            if state.any_stale:
                return EXIT_STALE
        elif args.command == "prune-checkpoints":
            pruned = run_async(prune_checkpoints(config, dry_run=args.dry_run))
            if args.json:
                print(json.dumps(pruned.to_json(), indent=2))
            else:
                print(pruned.render(), end="")
        elif args.command == "requeue":
            try:
                selection = selection_from(
                    ids=args.ids,
                    reason=args.reason,
                    older_than=args.older_than,
                    newer_than=args.newer_than,
                )
            except ValueError as e:
                log.error("%s", e)
                return EXIT_USAGE
            requeued = run_async(requeue(config, selection, dry_run=args.dry_run))
            if args.json:
                print(json.dumps(requeued.to_json(), indent=2))
            else:
                print(requeued.render(), end="")
            if not requeued.ok:
                return EXIT_COUCH
        elif args.command == "render":
            return render_document(config, args.doc)
    except UsageError as e:
        log.error("%s", e)
        return EXIT_USAGE
    except ConfigError as e:
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    except NotifierError as e:
        log.error("%s", e)
        return exit_status(e)
    except Exception:
        log.exception("unexpected error; this is a bug, please report it with this log")
        return EXIT_CRASH
    return EXIT_OK


def render_document(config: Config, doc_path: str) -> int:
    """``notifier render``: print what ``run`` would send for one document."""
    try:
        if doc_path == "-":
            raw = sys.stdin.read()
        else:
            with open(doc_path, encoding="utf-8") as f:
                raw = f.read()
    except (OSError, UnicodeDecodeError) as e:
        print(f"notifier render: cannot read {doc_path}: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError as e:
        print(f"{doc_path}: not valid JSON: {e}", file=sys.stderr)
        return EXIT_DATA
    if not isinstance(doc, dict):
        print(f"{doc_path}: expected a JSON object (one document)", file=sys.stderr)
        return EXIT_DATA
    try:
        email = build_composer(config).compose(doc)
    except PermanentDeliveryError as e:
        print(f"{doc_path}: would be dead-lettered: {e}", file=sys.stderr)
        return EXIT_DATA
    sys.stdout.write(readable(email.data))
    return EXIT_OK


def readable(data: bytes) -> str:
    """An email as a person reads it: its headers and parts as sent, but with
    encoded words and base64 or quoted-printable bodies decoded (non-ASCII
    travels encoded, which no one can read on a terminal)."""
    lines: list[str] = []

    def show(part: EmailMessage) -> None:
        lines.extend(f"{name}: {value}" for name, value in part.items())
        lines.append("")
        if part.is_multipart():
            boundary = part.get_boundary()
            for inner in part.iter_parts():
                lines.append(f"--{boundary}")
                show(inner)  # type: ignore[arg-type]
            lines.append(f"--{boundary}--")
        else:
            content = part.get_content()
            text = content if isinstance(content, str) else f"({len(content)} bytes)"
            lines.append(text.rstrip("\n"))

    show(message_from_bytes(data, policy=policy.default))
    return "\n".join(lines) + "\n"


def run_async(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` on uvloop where it is installed, else on asyncio's own loop.

    uvloop runs the same code with much less event-loop overhead per socket
    operation, which is most of this daemon's CPU at load.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def exit_status(error: NotifierError) -> int:
    """The documented exit status for an error that stopped the worker."""
    if isinstance(error, PermissionError):
        return EXIT_ACCESS
    if isinstance(error, CouchError):
        return EXIT_COUCH
    if isinstance(error, DeliveryError):
        return EXIT_SMTP
    if isinstance(error, LeaseLost):
        return EXIT_LEASE
    return EXIT_CRASH


def worker_slot(value: str) -> tuple[int, int | None]:
    """``--worker-id``: ``N``, or ``N-of-M`` (a systemd instance name that names its layout).

    >>> worker_slot("2"), worker_slot("0-of-3")
    ((2, None), (0, 3))
    """
    match = re.fullmatch(r"([0-9]+)(?:-of-([0-9]+))?", value.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"expected a worker id N or N-of-M (as in notifier@0-of-3), got {value!r}"
        )
    return int(match[1]), None if match[2] is None else int(match[2])


def _shard(args: argparse.Namespace, config: Config) -> Shard:
    worker_id, named_count = args.worker_id
    count = args.worker_count
    if named_count is not None:
        if count is not None and count != named_count:
            raise UsageError(
                f"--worker-id {worker_id}-of-{named_count} and --worker-count {count} disagree"
            )
        count = named_count
    on_command_line = count is not None
    if count is None and os.environ.get("NOTIFIER_WORKER_COUNT"):
        raw = os.environ["NOTIFIER_WORKER_COUNT"]
        try:
            count = int(raw)
        except ValueError:
            raise ConfigError(f"NOTIFIER_WORKER_COUNT: expected an integer, got {raw!r}") from None
    if count is None:
        count = config.worker.worker_count
    try:
        return Shard(worker_id=worker_id, worker_count=count)
    except ValueError as e:
        # With the count on the command line too, the command line is wrong
        # (5-of-3); against a configured count, the configuration may be.
        error = UsageError if on_command_line else ConfigError
        raise error(f"--worker-id/--worker-count: {e}") from None


class _JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority, which journald turns into a level."""

    _PRIORITY: ClassVar[dict[str, int]] = {
        "DEBUG": 7,
        "INFO": 6,
        "WARNING": 4,
        "ERROR": 3,
        "CRITICAL": 2,
    }

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self._PRIORITY.get(record.levelname, 6)}>{super().format(record)}"


class _JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message (and the traceback)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    elif os.environ.get("JOURNAL_STREAM"):
        # journald adds its own timestamps and host.
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # httpx logs every request at INFO; that is per-change noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
