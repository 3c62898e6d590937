"""Running one worker from a configuration: build the clients, handle signals, run.

The clients are async context managers owned here, so they close after the
worker's own shutdown (stop reading, drain, cancel, final checkpoint), SMTP
first, then HTTP.

Beside the worker run two advisory tasks, cancelled once it has stopped: the
systemd reporter, and the look-out for a newer layout
(:class:`~notifier.layout.LayoutWatch`), which only logs.

Signals: the first SIGINT or SIGTERM asks the worker to stop gracefully; a
second one ends the process at once with exit status 130. What was in flight
then is sent again after a restart (the checkpoint never passed it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import time
from collections.abc import Callable

import httpx

from notifier import layout
from notifier.checkpoint import CheckpointStore
from notifier.config import Config, parse_listen
from notifier.couch import CouchClient
from notifier.lease import Lease
from notifier.mailer import EmailHandler, SmtpPool
from notifier.message import Composer
from notifier.metrics import Observability
from notifier.pacing import DomainLimit
from notifier.schedule import RetrySchedule
from notifier.shard import Shard
from notifier.systemd import SystemdNotifier
from notifier.templates import load_templates
from notifier.worker import Worker, WorkerSettings

log = logging.getLogger(__name__)

EXIT_FORCED = 130
#: Seconds between looks at the status line; STATUS= is sent when it changed.
STATUS_INTERVAL = 0.25


def settings_from_config(config: Config, shard: Shard) -> WorkerSettings:
    w, d, smtp = config.worker, config.delivery, config.smtp
    # Rates are for the whole worker set: documents spread evenly over the
    # workers by the hash of their id, so each paces at its share.
    share = 1 / shard.worker_count
    return WorkerSettings(
        database=config.couch.database,
        shard=shard,
        max_parallel=w.max_parallel,
        checkpoint_interval=w.checkpoint_interval,
        drain_timeout=w.drain_timeout,
        heartbeat=config.couch.heartbeat,
        schedule=RetrySchedule(first=d.retry_first, cap=d.retry_max, max_age=d.max_age),
        scan_interval=d.scan_interval,
        max_rate=None if smtp.max_rate is None else smtp.max_rate * share,
        domains={
            domain: DomainLimit(
                max_parallel=limit.max_parallel,
                max_rate=None if limit.max_rate is None else limit.max_rate * share,
            )
            for domain, limit in smtp.domains.items()
        },
        throttle_hold=d.throttle_hold,
        outage_recipients=d.outage_recipients,
        outage_window=d.outage_window,
        probe_first=d.probe_first,
        probe_max=d.probe_max,
        mark_batch_size=w.mark_batch_size,
        mark_batch_delay=w.mark_batch_delay,
        claims=w.claims,
        claim_ttl=w.claim_ttl,
    )


def build_composer(config: Config) -> Composer:
    """The Composer for ``config``: what ``run`` sends and ``render`` shows."""
    return Composer(
        sender=config.email.sender,
        sender_name=config.email.sender_name,
        database=config.couch.database,
        max_body_bytes=config.email.max_body_bytes,
        # Paths were made absolute and checked when the config was loaded.
        templates=load_templates(
            config.email.subject_template,
            config.email.text_template,
            config.email.html_template,
        ),
    )


async def run_worker(
    config: Config,
    shard: Shard,
    *,
    handle_signals: bool = True,
    transport: httpx.AsyncBaseTransport | None = None,
    on_start: Callable[[Worker], None] | None = None,
) -> Worker:
    """Run one worker until it is stopped; return it (for its counters).

    ``handle_signals=False`` leaves signals alone, for tests and for programs
    that embed a worker and stop it themselves through ``on_start``.
    """
    composer = build_composer(config)
    async with (
        CouchClient.from_config(config.couch, transport=transport) as couch,
        EmailHandler(
            composer=composer, pool=SmtpPool(config.smtp, size=config.worker.max_parallel)
        ) as handler,
    ):
        checkpoints = CheckpointStore(
            couch,
            database=config.couch.checkpoint_database,
            source_database=config.couch.database,
            shard=shard,
        )
        lease = Lease(
            couch,
            database=config.couch.checkpoint_database,
            source_database=config.couch.database,
            shard=shard,
            ttl=config.worker.lease_ttl,
        )
        worker = Worker(
            couch=couch,
            handler=handler,
            checkpoints=checkpoints,
            settings=settings_from_config(config, shard),
            lease=lease,
        )
        if on_start is not None:
            on_start(worker)
        systemd = SystemdNotifier()
        if handle_signals:
            _install_signal_handlers(worker, systemd)
        try:
            async with contextlib.AsyncExitStack() as stack:
                if config.metrics.listen is not None:
                    host, port = parse_listen(config.metrics.listen)
                    await stack.enter_async_context(Observability(worker, host=host, port=port))
                watch = layout.LayoutWatch(
                    couch,
                    checkpoint_database=config.couch.checkpoint_database,
                    database=config.couch.database,
                    shard=shard,
                    lease=lease,
                    interval=layout.CHECK_INTERVAL,
                )
                helpers = [
                    asyncio.create_task(_report_to_systemd(worker, systemd)),
                    asyncio.create_task(watch.run()),
                ]
                try:
                    await worker.run()
                finally:
                    for task in helpers:
                        task.cancel()
                    await asyncio.gather(*helpers, return_exceptions=True)
        finally:
            if handle_signals:
                _remove_signal_handlers()
    return worker


async def _report_to_systemd(worker: Worker, systemd: SystemdNotifier) -> None:
    """READY=1 once the worker runs or stands by; STATUS= when it changes;
    watchdog pings from the loop."""
    if not systemd.enabled:
        return
    ready = False
    status = ""
    pinged = -math.inf
    while True:
        fields: dict[str, str] = {}
        line = worker.status_line()
        if line != status:
            status = fields["STATUS"] = line
        # A standby is a started, healthy service too: without READY=1,
        # systemd would kill it at the start timeout and restart it forever.
        if not ready and (worker.ready.is_set() or worker.standing_by is not None):
            ready = True
            fields["READY"] = "1"
        now = time.monotonic()
        if systemd.watchdog_interval is not None and now - pinged >= systemd.watchdog_interval:
            # Sent from the event loop itself: if the loop hangs, pings stop
            # and systemd restarts the service.
            pinged = now
            fields["WATCHDOG"] = "1"
        if fields:
            systemd.notify(**fields)
        await asyncio.sleep(STATUS_INTERVAL)


def _install_signal_handlers(worker: Worker, systemd: SystemdNotifier) -> None:
    loop = asyncio.get_running_loop()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        if len(received) == 1:
            log.info(
                "received %s: stopping (finishing in-flight messages; send it again to "
                "exit at once)",
                sig.name,
            )
            systemd.notify(STOPPING="1", STATUS=f"stopping on {sig.name}: draining")
            worker.stop()
        else:
            log.warning("received %s again: exiting at once", sig.name)
            logging.shutdown()
            os._exit(EXIT_FORCED)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)


def _remove_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)
