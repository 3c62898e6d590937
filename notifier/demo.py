"""``notifier demo``: the whole pipeline on one machine, in one command.

It starts a fake CouchDB (or uses a real one given with ``--couch-url``) and
an SMTP sink on free loopback ports, seeds sample messages (a few of them
malformed, so that dead-lettering shows), runs two sharded workers in this
process and draws their progress live. Every email the sink accepts is
written to a folder as an ``.eml`` file. Ctrl-C (or SIGTERM) drains the
workers with their real shutdown sequence and exits 0.

The fake and the sink come from :mod:`notifier.testing`, which needs the
``testing`` extra; without it the demo says how to install it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import re
import secrets
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

from notifier import config as config_module
from notifier.config import COUCH_PASSWORD_ENV, Config
from notifier.couch import CouchClient
from notifier.errors import ConfigError, NotifierError
from notifier.runner import EXIT_FORCED, run_worker
from notifier.shard import Shard
from notifier.worker import FAILED, Worker

__all__ = [
    "MALFORMED_COUNT",
    "add_demo_parser",
    "build_parser",
    "malformed_messages",
    "run_demo",
    "sample_messages",
]

log = logging.getLogger(__name__)

EXIT_OK: Final = 0
EXIT_FAILED: Final = 1

#: Database the demo uses on a real CouchDB: its own, so that it never reads
#: or marks documents that belong to someone else.
REAL_DATABASE: Final = "notifier_demo"
REAL_CHECKPOINT_DATABASE: Final = "notifier_demo_checkpoints"
FAKE_DATABASE: Final = "messages"
WORKER_COUNT: Final = 2
SENDER: Final = "notifications@example.com"
#: Seconds between redraws of the live table.
REFRESH_INTERVAL: Final = 0.2
#: Seconds between plain progress lines when stdout is not a terminal; a log
#: file or a pipe wants a record of progress, not a line every redraw.
PLAIN_INTERVAL: Final = 1.0

_PEOPLE: Final = [
    ("Ann Lee", "ann.lee@example.com"),
    ("Zoë Martín", "zoe.martin@example.org"),
    ("José Ñúñez", "jose.nunez@example.net"),
    ("Renée Dubois", "renee.dubois@example.com"),
    ("Søren Kierkegaard", "soren.k@example.org"),
    ("Yuki Tanaka", "yuki.tanaka@example.jp"),
    ("Олена Коваль", "olena.koval@example.com"),
    ("Priya Raman", "priya.raman@example.in"),
    ("Ahmed Farouk", "ahmed.farouk@example.net"),
    ("Grace Hopper", "grace@example.com"),
]
_TOPICS: Final = [
    ("Your order has shipped", "Good news: your order is on its way and should arrive Thursday."),
    ("Café reservation ☕", "Your table for two is booked for Friday at 19:30. À bientôt !"),
    ("Meeting moved to 15:00", "The design review moves to 15:00, same room (Tokyo 東京)."),
    ("Password changed", "Your password was changed. If this was not you, reply to this email."),
    ("New comment on “Roadmap Q3”", "Maria wrote: “Looks good — ship it.”"),
    ("Invoice #2024-117", "Your invoice for 42,00 € is ready. Thank you for your business."),
    ("Ваш заказ готов", "Ваш заказ готов к выдаче. Спасибо!"),
    ("Weekly digest 📬", "3 new followers, 12 likes and 1 mention this week."),
    ("Reminder: dentist tomorrow", "Dr. Müller expects you tomorrow at 08:45."),
    ("Welcome aboard!", "Hi, welcome to the team. Your first week's plan is attached below."),
]

#: How many malformed messages the demo seeds next to the good ones.
MALFORMED_COUNT: Final = 3


def sample_messages(count: int, *, prefix: str = "demo") -> list[dict[str, Any]]:
    """``count`` well-formed message documents, cycling through people and topics.

    >>> docs = sample_messages(2, prefix="t")
    >>> [d["_id"] for d in docs], docs[1]["to"]
    (['t-001', 't-002'], 'zoe.martin@example.org')
    """
    docs: list[dict[str, Any]] = []
    now_ms = int(time.time() * 1000)
    for i in range(count):
        name, address = _PEOPLE[i % len(_PEOPLE)]
        sender_name, sender = _PEOPLE[(i + 3) % len(_PEOPLE)]
        subject, body = _TOPICS[i % len(_TOPICS)]
        docs.append(
            {
                "_id": f"{prefix}-{i + 1:03d}",
                "from": sender,
                "to": address,
                "subject": subject,
                "body": f"Hello {name.split()[0]},\n\n{body}\n\n— {sender_name}",
                "createdAt": now_ms + i,
            }
        )
    return docs


def malformed_messages(*, prefix: str = "demo") -> list[dict[str, Any]]:
    """Documents that can never be delivered, one per kind of mistake the worker refuses."""
    base = {"from": "ops@example.com", "body": "This one should be dead-lettered.", "createdAt": 0}
    return [
        {**base, "_id": f"{prefix}-bad-no-recipient", "subject": "Nobody to send to"},
        {**base, "_id": f"{prefix}-bad-address", "to": "not-an-address", "subject": "Typo"},
        {
            **base,
            "_id": f"{prefix}-bad-header-injection",
            "to": "ann.lee@example.com",
            # A line break in a header field is how a document would smuggle
            # in extra headers or recipients; the worker refuses it.
            "subject": "Hi\r\nBcc: everyone@example.com",
        },
    ]


# -- command line ---------------------------------------------------------------------


def _add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--couch-url",
        metavar="URL",
        help=(
            f"use this CouchDB instead of the built-in fake; the demo writes only to its own "
            f"databases {REAL_DATABASE} and {REAL_CHECKPOINT_DATABASE} (created if missing). "
            f"Credentials go in the URL (http://user:pass@host:5984) or in {COUCH_PASSWORD_ENV}"
        ),
    )
    parser.add_argument(
        "--messages",
        type=_positive_int,
        default=30,
        metavar="N",
        help=(
            f"well-formed sample messages to seed (default %(default)s); "
            f"{MALFORMED_COUNT} malformed ones are added"
        ),
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        type=Path,
        help="folder for the received emails as .eml files (default: a new temporary folder)",
    )
    parser.add_argument(
        "--no-follow",
        action="store_true",
        help="exit once every seeded message is sent or dead-lettered, instead of following",
    )
    # main() sets up logging from these before it dispatches. ERROR by
    # default: log lines on the same terminal would tear the live table, and
    # the demo prints the dead-lettered messages itself.
    parser.add_argument(
        "--log-level",
        default="ERROR",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="log verbosity, on stderr (default %(default)s)",
    )
    parser.add_argument(
        "--log-format", default="text", choices=["text", "json"], help=argparse.SUPPRESS
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {text}")
    return value


_DESCRIPTION: Final = (
    "Run the whole pipeline on this machine: a fake CouchDB (or --couch-url) and an SMTP "
    "sink on free loopback ports, sample messages with a few malformed ones, and "
    f"{WORKER_COUNT} sharded workers, with live progress. Received emails are written as .eml "
    "files. Ctrl-C drains the workers and exits 0."
)


def add_demo_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``demo`` subcommand to ``notifier``'s subparsers."""
    demo = commands.add_parser(
        "demo", help="run the pipeline against built-in test servers", description=_DESCRIPTION
    )
    _add_options(demo)


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m notifier.demo`` (the same options as ``notifier demo``)."""
    parser = argparse.ArgumentParser(prog="notifier demo", description=_DESCRIPTION)
    _add_options(parser)
    return parser


def run_demo(args: argparse.Namespace) -> int:
    """Run the demo until SIGINT/SIGTERM (or, with ``--no-follow``, until settled)."""
    missing = [name for name in ("aiosmtpd", "h11") if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"notifier demo needs {' and '.join(missing)}, from the testing extra: "
            f"pip install 'notifier[testing]'",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if args.out is None:
        out = Path(tempfile.mkdtemp(prefix="notifier-demo-"))
    else:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    demo = _Demo(
        out=out,
        couch_url=args.couch_url,
        messages=args.messages,
        follow=not args.no_follow,
        stream=sys.stdout,
    )
    try:
        return asyncio.run(demo.run())
    except (NotifierError, ConfigError) as e:
        print(f"notifier demo: {e}", file=sys.stderr)
        return EXIT_FAILED


# -- the demo itself ------------------------------------------------------------------


@dataclass
class _Target:
    """Where the workers read from, as the config and the printed curl command need it."""

    url: str
    database: str
    checkpoint_database: str
    username: str | None = None
    password: str | None = None


@dataclass
class _Demo:
    out: Path
    couch_url: str | None
    messages: int
    follow: bool
    stream: IO[str]
    workers: list[Worker] = field(default_factory=list, init=False)
    _written: int = field(default=0, init=False)
    _table_lines: int = field(default=0, init=False)
    _last_rows: list[str] = field(default_factory=list, init=False)
    _last_plain: str = field(default="", init=False)
    _last_plain_at: float = field(default=0.0, init=False)

    @property
    def tty(self) -> bool:
        return self.stream.isatty()

    async def run(self) -> int:
        stop = asyncio.Event()
        self._install_signal_handlers(stop)
        async with self._servers() as (target, sink):
            self.say(f"emails are written to {self.out}")
            self.say(
                f"CouchDB: {target.url}/{target.database}   SMTP sink: {sink.host}:{sink.port}"
            )
            config = _config(target, sink.host, sink.port)
            prefix = f"demo-{time.strftime('%H%M%S')}-{secrets.token_hex(2)}"
            good = sample_messages(self.messages, prefix=prefix)
            bad = malformed_messages(prefix=prefix)
            async with CouchClient.from_config(config.couch) as couch:
                if self.couch_url is not None and await couch.create_database(target.database):
                    self.say(f"created database {target.database}")
                tasks = await self._start_workers(config)
                self.say(
                    f"seeding {len(good)} messages and {len(bad)} malformed ones "
                    f"into {target.database}"
                )
                await couch.bulk_docs(target.database, [*good, *bad])
                status = await self._watch(couch, target, sink, tasks, stop, bad, len(good))
            status = await self._drain(sink, tasks, status)
        self.say(f"{self._written} emails in {self.out}")
        return status

    # -- servers and workers -----------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _servers(self) -> AsyncIterator[tuple[_Target, Any]]:
        # Imported here: they need the testing extra, which run_demo checks first.
        from notifier.testing.fake_couch import FakeCouch
        from notifier.testing.server import FakeCouchServer
        from notifier.testing.smtp import SmtpSink

        sink = SmtpSink()
        # aiosmtpd starts its own thread and waits for it; keep the loop free.
        await asyncio.to_thread(sink.start)
        try:
            if self.couch_url is not None:
                yield _real_target(self.couch_url), sink
            else:
                fake = FakeCouch(databases=[FAKE_DATABASE])
                async with FakeCouchServer(fake) as server:
                    yield _Target(server.url, FAKE_DATABASE, "workersequences"), sink
                self.say("fake CouchDB stopped")
        finally:
            await asyncio.to_thread(sink.stop)
            self.say("SMTP sink stopped")

    async def _start_workers(self, config: Config) -> list[asyncio.Task[Worker]]:
        started: list[asyncio.Future[Worker]] = []
        tasks: list[asyncio.Task[Worker]] = []
        loop = asyncio.get_running_loop()
        for worker_id in range(WORKER_COUNT):
            future: asyncio.Future[Worker] = loop.create_future()
            started.append(future)
            tasks.append(
                asyncio.create_task(
                    run_worker(
                        config,
                        Shard(worker_id=worker_id, worker_count=WORKER_COUNT),
                        handle_signals=False,
                        on_start=future.set_result,
                    )
                )
            )
        # Both workers must be following the feed before the seed is written,
        # or a start-up error (a wrong URL, credentials) would hide behind an
        # empty table.
        for future, task in zip(started, tasks, strict=True):
            await asyncio.wait({future, task}, return_when=asyncio.FIRST_COMPLETED)
            if not future.done():
                await _stop_all(tasks, [])
                await task  # raises the start-up error
            worker = future.result()
            self.workers.append(worker)
            ready = asyncio.ensure_future(worker.ready.wait())
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                ready.cancel()
                await _stop_all(tasks, self.workers)
                await task
        return tasks

    # -- following ---------------------------------------------------------------------

    async def _watch(
        self,
        couch: CouchClient,
        target: _Target,
        sink: Any,
        tasks: list[asyncio.Task[Worker]],
        stop: asyncio.Event,
        bad: Sequence[dict[str, Any]],
        good_count: int,
    ) -> int:
        """Redraw progress until asked to stop; the exit status so far."""
        seeded = good_count + len(bad)
        unreported = {doc["_id"] for doc in bad}
        settled_announced = False
        while not stop.is_set():
            failed = [t for t in tasks if t.done()]
            if failed:
                # A worker that stops by itself hit a fatal error; the drain
                # reports it.
                return EXIT_FAILED
            new_emails = self._write_emails(sink)
            if settled_announced:
                for path, recipients in new_emails:
                    self.event(f"delivered to {', '.join(recipients)}: {path}")
            for doc_id in sorted(unreported):
                doc = await couch.get_doc(target.database, doc_id)
                failure = (doc or {}).get(FAILED)
                if isinstance(failure, dict):
                    unreported.discard(doc_id)
                    self.event(f"dead-lettered {doc_id}: {failure.get('reason')}")
            done = sum(w.stats.sent + w.stats.dead_lettered for w in self.workers)
            if not settled_announced and done >= seeded and not unreported:
                settled_announced = True
                self.event(f"all {seeded} seeded messages settled")
                if not self.follow:
                    return EXIT_OK
                self.event("following the feed; add a message and watch it arrive:")
                self.event("  " + _curl_command(target))
                self.event("press Ctrl-C to stop")
            self.draw()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REFRESH_INTERVAL)
        return EXIT_OK

    async def _drain(self, sink: Any, tasks: list[asyncio.Task[Worker]], status: int) -> int:
        self.event("stopping: the workers finish what is in flight and save their checkpoints")
        results = await _stop_all(tasks, self.workers)
        self._write_emails(sink)
        self.draw(final=True)
        for worker, result in zip(self.workers, results, strict=False):
            shard = worker.settings.shard
            if isinstance(result, BaseException):
                status = EXIT_FAILED
                self.say(f"worker {shard} failed: {result}")
            else:
                st = worker.stats
                self.say(
                    f"worker {shard} stopped: {st.sent} sent, {st.dead_lettered} dead-lettered, "
                    f"{worker.in_flight} in flight, checkpoint {_short(worker.tracker.checkpoint)}"
                )
        return status

    def _write_emails(self, sink: Any) -> list[tuple[Path, list[str]]]:
        """Write the emails received since the last call; return their paths and recipients."""
        written: list[tuple[Path, list[str]]] = []
        for received in sink.messages[self._written :]:
            self._written += 1
            rcpt = "_".join(received.rcpt_tos)
            path = self.out / f"{self._written:04d}-{_SAFE_NAME.sub('_', rcpt)[:60]}.eml"
            # Written under a temporary name and renamed, so that whoever
            # watches the folder never opens a half-written email.
            partial = path.with_suffix(".eml.partial")
            partial.write_bytes(received.raw)
            os.replace(partial, path)
            written.append((path, list(received.rcpt_tos)))
        return written

    # -- terminal output ---------------------------------------------------------------

    def say(self, line: str) -> None:
        self.stream.write(line + "\n")
        self.stream.flush()

    def event(self, line: str) -> None:
        """A line above the live table, which is redrawn under it."""
        self._erase_table()
        self.say(line)

    def _erase_table(self) -> None:
        if self.tty and self._table_lines:
            # Up to the table's first line, then clear to the end of the screen.
            self.stream.write(f"\x1b[{self._table_lines}F\x1b[J")
            self._table_lines = 0

    def draw(self, *, final: bool = False) -> None:
        rows = _table(self.workers)
        if self.tty:
            if self._table_lines and rows == self._last_rows:
                return  # unchanged: redrawing would only flicker
            self._last_rows = rows
            self._erase_table()
            self.stream.write("\n".join(rows) + "\n")
            self.stream.flush()
            self._table_lines = len(rows)
            return
        line = _plain_line(self.workers)
        now = time.monotonic()
        if final or (line != self._last_plain and now - self._last_plain_at >= PLAIN_INTERVAL):
            self._last_plain, self._last_plain_at = line, now
            self.say(line)

    def _install_signal_handlers(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def on_signal(sig: signal.Signals) -> None:
            if stop.is_set():
                # A second signal: the user does not want to wait for the
                # drain. Same status as `notifier run` in that case.
                os._exit(EXIT_FORCED)
            stop.set()
            self.event(f"received {sig.name} (send it again to exit at once)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal, sig)


_SAFE_NAME: Final = re.compile(r"[^A-Za-z0-9@._-]")


async def _stop_all(
    tasks: list[asyncio.Task[Worker]], workers: list[Worker]
) -> list[Worker | BaseException]:
    for worker in workers:
        worker.stop()
    # A task whose worker never started has nothing to drain.
    for task in tasks[len(workers) :]:
        task.cancel()
    return await asyncio.gather(*tasks, return_exceptions=True)


def _config(target: _Target, smtp_host: str, smtp_port: int) -> Config:
    couch: dict[str, Any] = {
        "url": target.url,
        "database": target.database,
        "checkpoint_database": target.checkpoint_database,
        # Short heartbeats and checkpoints, so the table moves visibly and a
        # stop is quick; production defaults are seconds apart.
        "heartbeat": 1.0,
    }
    environ: dict[str, str] = {}
    if target.username is not None:
        couch["username"] = target.username
        environ[COUCH_PASSWORD_ENV] = target.password or ""
    data: dict[str, Any] = {
        "couch": couch,
        "smtp": {"host": smtp_host, "port": smtp_port, "timeout": 10.0},
        "email": {"sender": SENDER, "sender_name": "notifier demo"},
        "worker": {
            "worker_count": WORKER_COUNT,
            "checkpoint_interval": 0.5,
            "drain_timeout": 5.0,
            "lease_ttl": 10.0,
        },
    }
    return config_module.from_mapping(data, source="<demo>", environ=environ)


def _real_target(url: str) -> _Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--couch-url: expected an http(s) URL, got {url!r}")
    # The config refuses credentials in the URL (they end up in logs); move
    # them to where it takes them from.
    netloc = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    bare = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
    username = parts.username
    password = parts.password
    if username is not None and password is None:
        password = os.environ.get(COUCH_PASSWORD_ENV)
    return _Target(
        bare,
        REAL_DATABASE,
        REAL_CHECKPOINT_DATABASE,
        username=username,
        password=password,
    )


def _curl_command(target: _Target) -> str:
    doc = {
        "from": "you@example.com",
        "to": "friend@example.com",
        "subject": "Hello from curl",
        "body": "It works!",
    }
    # $(date +%s) gives each run of the command a new document id; the same
    # id twice would be a 409 conflict, as in CouchDB.
    url = f"{target.url}/{quote(target.database, safe='')}/hello-$(date +%s)"
    auth = f"-u {shlex.quote(target.username)} " if target.username else ""
    return (
        f'curl {auth}-X PUT "{url}" -H "Content-Type: application/json" '
        f"-d {shlex.quote(json.dumps(doc))}"
    )


def _short(seq: object) -> str:
    """An opaque CouchDB seq, cut to fit a table cell (``"23-g1AAAA…"``)."""
    if seq is None:
        return "-"
    text = seq if isinstance(seq, str) else json.dumps(seq)
    return text if len(text) <= 12 else text[:11] + "…"


def _table(workers: Sequence[Worker]) -> list[str]:
    header = f"{'worker':<8}{'sent':>6}{'dead-lettered':>15}{'in flight':>11}  checkpoint"
    rows = [header]
    for w in workers:
        st = w.stats
        rows.append(
            f"{w.settings.shard!s:<8}{st.sent:>6}{st.dead_lettered:>15}{w.in_flight:>11}"
            f"  {_short(w.tracker.checkpoint)}"
        )
    rows.append(
        f"{'total':<8}{sum(w.stats.sent for w in workers):>6}"
        f"{sum(w.stats.dead_lettered for w in workers):>15}"
        f"{sum(w.in_flight for w in workers):>11}"
    )
    return rows


def _plain_line(workers: Sequence[Worker]) -> str:
    return "progress: " + "; ".join(
        f"worker {w.settings.shard}: {w.stats.sent} sent, {w.stats.dead_lettered} dead-lettered, "
        f"{w.in_flight} in flight, checkpoint {_short(w.tracker.checkpoint)}"
        for w in workers
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m notifier.demo``: the same as ``notifier demo``."""
    # Imported here because notifier.cli imports this module.
    from notifier.cli import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    return run_demo(args)


if __name__ == "__main__":
    sys.exit(main())
