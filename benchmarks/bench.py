"""notifier's performance against the naive worker and the servers' own ceilings.

One command runs everything on the same servers, in one go:

    .venv/bin/python benchmarks/bench.py            # ~6 minutes
    .venv/bin/python benchmarks/bench.py --quick    # ~2 minutes, smaller figures
    .venv/bin/python benchmarks/bench.py --write-docs   # also regenerate docs/performance.md

It needs what ./scripts/test installs: PouchDB Server under tests/servers and
the test extras in .venv. It starts PouchDB Server (in memory), an aiosmtpd
sink in a process of its own (benchmarks/smtp_sink.py) and, for the 100,000
message backlog, notifier's fake CouchDB on a socket, also in a process of its
own (benchmarks/fake_couch_server.py). notifier runs as the installed
``notifier run`` command, the baseline as benchmarks/naive_worker.py, each in
its own process, so the CPU time and memory read from /proc are theirs alone.

It prints a table and writes the figures as JSON (benchmarks/results.json by
default); ``--render-docs FILE`` turns a saved JSON into docs/performance.md
without running anything. A benchmark, not a test: the exit status says
whether it ran, never whether a target was met.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCHMARKS))

from common import SELECTOR, SENDER, compose, message, recipient_number  # noqa: E402
from procs import (  # noqa: E402
    Daemon,
    FakeCouchProcess,
    Sink,
    cpu_seconds,
    naive_counters,
    notifier_counters,
)
from realservers import (  # noqa: E402
    POUCHDB_BIN,
    PouchDBServer,
    create_database,
    delete_database,
    unique_db_name,
)
from report import render_docs, render_text  # noqa: E402
from scenario import to_toml  # noqa: E402

NOTIFIER = str(Path(sys.executable).with_name("notifier"))
NAIVE = str(BENCHMARKS / "naive_worker.py")
DEFAULT_JSON = BENCHMARKS / "results.json"
DOCS = ROOT / "docs" / "performance.md"

#: The log lines a worker writes just before it opens its feed. Not "changes
#: feed connected": PouchDB Server holds back the response headers of a
#: filtered continuous feed with nothing to send until the first heartbeat.
NOTIFIER_READY = r"no checkpoint yet|resuming from checkpoint"
NAIVE_READY = r"^ready$"
#: Seconds between the ready line and the first write: the feed request goes out.
SETTLE = 0.5


class Bench:
    """The servers of one benchmark run and the scenarios run against them."""

    def __init__(self, args: argparse.Namespace, scratch: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.pouch = PouchDBServer()
        self.sink: Sink | None = None
        self.fake: FakeCouchProcess | None = None
        self.http: httpx.Client | None = None
        self.counter = 0

    def __enter__(self) -> Bench:
        self.pouch.start()
        self.sink = Sink()
        self.http = httpx.Client(
            base_url=self.pouch.url,
            trust_env=False,
            timeout=120.0,
            headers={"Accept": "application/json"},
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.http is not None:
            self.http.close()
        for helper in (self.sink, self.fake):
            if helper is not None:
                helper.close()
        self.pouch.stop()

    # -- helpers ---------------------------------------------------------------------

    @property
    def smtp(self) -> Sink:
        assert self.sink is not None
        return self.sink

    @property
    def client(self) -> httpx.Client:
        assert self.http is not None
        return self.http

    def log_path(self, name: str) -> Path:
        self.counter += 1
        return self.scratch / f"{self.counter:03d}-{name}.log"

    def seed(self, database: str, docs: Iterator[dict[str, Any]], batch: int = 500) -> list[Any]:
        """Write docs with _bulk_docs; return the result rows."""
        rows: list[Any] = []
        chunk: list[dict[str, Any]] = []
        for doc in docs:
            chunk.append(doc)
            if len(chunk) == batch:
                rows += self._bulk(database, chunk)
                chunk = []
        if chunk:
            rows += self._bulk(database, chunk)
        return rows

    def _bulk(self, database: str, docs: list[dict[str, Any]]) -> list[Any]:
        response = self.client.post(f"/{database}/_bulk_docs", json={"docs": docs})
        response.raise_for_status()
        rows: list[Any] = response.json()
        bad = [r for r in rows if not r.get("ok")]
        if bad:
            raise RuntimeError(f"_bulk_docs refused {len(bad)} docs: {bad[:3]}")
        return rows

    def servers_cpu(
        self, since: dict[str, float] | None = None, per: int = 1000
    ) -> dict[str, float]:
        """CPU seconds of the SMTP sink and PouchDB Server; with `since`, per 1,000 of `per`."""
        assert self.pouch._proc is not None
        now = {"sink": self.smtp.cpu_seconds(), "pouchdb": cpu_seconds(self.pouch._proc.pid)}
        if since is None:
            return now
        return {
            f"{name}_cpu_seconds_per_1000": (now[name] - since[name]) / per * 1000 for name in now
        }

    def update_seq(self, database: str) -> int:
        """The database's count of document writes (PouchDB Server's seqs are integers)."""
        response = self.client.get(f"/{database}")
        response.raise_for_status()
        return int(str(response.json()["update_seq"]).split("-")[0])

    def marked(self, database: str) -> int:
        rows = self.client.get(f"/{database}/_all_docs", params={"include_docs": "true"})
        rows.raise_for_status()
        return sum(1 for r in rows.json()["rows"] if r["doc"].get("notifiedRecipient") is True)

    def notifier(
        self,
        name: str,
        couch_url: str,
        database: str,
        max_parallel: int,
        *,
        shard: tuple[int, int] = (0, 1),
        checkpoints: str | None = None,
        smtp: dict[str, Any] | None = None,
        command: list[str] | None = None,
        **worker: Any,
    ) -> tuple[Daemon, str]:
        """A ``notifier run`` of worker ``shard`` (id, count); a fresh checkpoint
        database unless one is given. ``smtp`` adds keys to ``[smtp]``;
        ``command`` replaces the installed ``notifier`` (another version)."""
        checkpoints = checkpoints or unique_db_name("bench_checkpoints")
        config = {
            "couch": {
                "url": couch_url,
                "database": database,
                "checkpoint_database": checkpoints,
            },
            "smtp": {"host": self.smtp.host, "port": self.smtp.port, **(smtp or {})},
            "email": {"sender": SENDER},
            "worker": {"max_parallel": max_parallel, **worker},
        }
        path = self.scratch / f"{database}.toml"
        path.write_text(to_toml(config))
        worker_id, count = shard
        argv = [*(command or [NOTIFIER]), "run", "--worker-id", str(worker_id)]
        argv += ["--worker-count", str(count)]
        argv += ["--config", str(path), "--log-level", "INFO"]
        return Daemon(argv, self.log_path(name), ready=NOTIFIER_READY), checkpoints

    def naive(self, name: str, database: str) -> tuple[Daemon, str]:
        checkpoints = unique_db_name("bench_checkpoints")
        argv = [
            sys.executable,
            NAIVE,
            "--couch",
            self.pouch.url,
            "--database",
            database,
            "--checkpoint-database",
            checkpoints,
            "--smtp-host",
            self.smtp.host,
            "--smtp-port",
            str(self.smtp.port),
            "--parallel",
            "5",
        ]
        if getattr(self.args, "naive_reuse_smtp", False):
            argv.append("--reuse-smtp")
        return Daemon(argv, self.log_path(name), ready=NAIVE_READY), checkpoints

    # -- 1-3: workers at load -------------------------------------------------------

    def worker_run(
        self,
        kind: str,
        max_parallel: int,
        *,
        claims: bool = True,
        attach: Callable[[Daemon], Callable[[], None]] | None = None,
        command: list[str] | None = None,
    ) -> dict[str, Any]:
        """One run of a worker over N messages written while it waits on its feed.

        The worker starts on an empty database; once it is following the
        feed, N messages are written with _bulk_docs. emails/s is measured at
        the SMTP sink, from the first acceptance to the Nth; CPU time from
        the moment the worker was ready to its exit (after SIGTERM, so the
        last marks and the final checkpoint are included). ``attach`` (a
        profiler) is called once the worker is ready and returns what to call
        before the worker is stopped. ``claims`` is notifier's ``[worker]
        claims``; document writes per email come from the database's
        update_seq (the driver's own write of each message included).
        """
        n = self.args.messages
        database = unique_db_name(f"bench_{kind}")
        create_database(self.pouch.url, database)
        self.smtp.reset()
        if kind == "naive":
            daemon, checkpoints = self.naive(f"naive-{max_parallel}", database)
        else:
            daemon, checkpoints = self.notifier(
                f"notifier-{max_parallel}{'' if claims else '-noclaims'}",
                self.pouch.url,
                database,
                max_parallel,
                claims=claims,
                command=command,
            )
        try:
            daemon.wait_ready()
            time.sleep(SETTLE)
            detach = attach(daemon) if attach else None
            cpu_ready = daemon.cpu_seconds()
            servers_ready = self.servers_cpu()
            self.seed(database, (message(i) for i in range(n)))
            got = self.smtp.wait(n, timeout=max(60.0, n / 20))
            if got["count"] < n:
                raise RuntimeError(f"only {got['count']} of {n} emails arrived:\n{daemon.tail()}")
            memory = daemon.memory()
            if detach:
                detach()
        except BaseException:
            daemon.kill()
            raise
        end = daemon.stop()
        servers = self.servers_cpu(since=servers_ready, per=n)
        if end.status != 0:
            raise RuntimeError(f"{kind} exited with status {end.status}:\n{end.log[-3000:]}")
        counters = naive_counters(end.stdout) if kind == "naive" else notifier_counters(end.log)
        marked = self.marked(database)
        writes = self.update_seq(database)
        duplicates = self.smtp.ask("stats")["count"] - n
        for db in (database, checkpoints):
            delete_database(self.pouch.url, db)
        work_cpu = end.cpu_seconds - cpu_ready
        return {
            "emails_per_second": (n - 1) / (got["last"] - got["first"]),
            "couch_requests": counters["couch_requests"],
            "couch_requests_per_email": counters["couch_requests"] / n,
            "checkpoint_writes": counters["checkpoint_writes"],
            "doc_writes_per_email": writes / n,
            "cpu_seconds_total": end.cpu_seconds,
            "cpu_seconds_work": work_cpu,
            "cpu_seconds_per_1000": work_cpu / n * 1000,
            **memory,
            **servers,
            "marked": marked,
            "duplicates": duplicates,
            "counters": counters,
        }

    # -- two layouts at once (a reshard) -------------------------------------------------

    def overlap_run(self, layouts: tuple[int, ...] = (1, 2)) -> dict[str, Any]:
        """N messages while two layouts follow one database: worker 0 of 1 and
        workers 0 and 1 of 2, max_parallel 50, claims on, one config; as in a reshard."""
        n = self.args.messages
        database = unique_db_name("bench_overlap")
        create_database(self.pouch.url, database)
        checkpoints = unique_db_name("bench_checkpoints")
        self.smtp.reset()
        daemons: list[Daemon] = []
        try:
            for shard in [(i, m) for m in layouts for i in range(m)]:
                name = "overlap-{}-of-{}".format(*shard)
                args = (name, self.pouch.url, database, 50)
                daemons.append(self.notifier(*args, shard=shard, checkpoints=checkpoints)[0])
                daemons[-1].wait_ready()
            time.sleep(SETTLE)
            cpu_ready = sum(d.cpu_seconds() for d in daemons)
            servers_ready = self.servers_cpu()
            self.seed(database, (message(i) for i in range(n)))
            got = self.smtp.wait(n, timeout=max(60.0, n / 20))
            if got["count"] < n:
                raise RuntimeError(f"only {got['count']} of {n} emails arrived")
            # The layout that loses the claims lags behind on the feed: stop
            # once all three are idle, so that its catching up is counted.
            idle_at = wait_idle(daemons)
        except BaseException:
            for d in daemons:
                d.kill()
            raise
        ends = [d.stop() for d in daemons]
        servers = self.servers_cpu(since=servers_ready, per=n)
        if any(e.status != 0 for e in ends):
            raise RuntimeError(
                f"a worker failed: {[e.status for e in ends]}\n{ends[0].log[-3000:]}"
            )
        counters = [notifier_counters(e.log) for e in ends]
        total = {k: sum(c.get(k, 0) for c in counters) for k in COUNTED}
        marked, writes = self.marked(database), self.update_seq(database)
        for db in (database, checkpoints):
            delete_database(self.pouch.url, db)
        return {
            "emails_per_second": (n - 1) / (got["last"] - got["first"]),
            "couch_requests_per_email": total["couch_requests"] / n,
            "doc_writes_per_email": writes / n,
            "cpu_seconds_per_1000": (sum(e.cpu_seconds for e in ends) - cpu_ready) / n * 1000,
            **servers,
            "marked": marked,
            "duplicates": self.smtp.ask("stats")["count"] - n,
            **total,
            "catch_up_seconds": max(0.0, idle_at - got["last"]),
            "sent_by_layout_1": counters[0]["sent"],
            "sent_by_layout_2": total["sent"] - counters[0]["sent"],
            "counters": counters,
            "cpu_seconds_by_worker": [e.cpu_seconds for e in ends],
        }

    # -- 4: the SMTP sink's ceiling ---------------------------------------------------

    def smtp_ceiling(self, connections: int = 50) -> dict[str, Any]:
        """A plain aiosmtplib loop: N emails over `connections` reused connections.

        The emails are built before the clock starts, so the client does as
        little as it can; emails/s is measured at the sink, as for the workers.
        """
        n = self.args.messages
        mails = [(m["to"], compose(m).as_bytes()) for m in (message(i) for i in range(n))]
        self.smtp.reset()
        servers = self.servers_cpu()
        cpu = time.process_time()

        async def send_all() -> None:
            clients = [
                aiosmtplib.SMTP(hostname=self.smtp.host, port=self.smtp.port)
                for _ in range(connections)
            ]
            await asyncio.gather(*(c.connect() for c in clients))
            queue = iter(mails)

            async def pump(client: aiosmtplib.SMTP) -> None:
                for to, raw in queue:
                    await client.sendmail(SENDER, [to], raw)

            await asyncio.gather(*(pump(c) for c in clients))
            await asyncio.gather(*(c.quit() for c in clients))

        asyncio.run(send_all())
        cpu = time.process_time() - cpu
        got = self.smtp.wait(n, timeout=60)
        return {
            "emails_per_second": (n - 1) / (got["last"] - got["first"]),
            "client_cpu_seconds_per_1000": cpu / n * 1000,
            **self.servers_cpu(since=servers, per=n),
        }

    # -- 5: PouchDB Server's _bulk_docs ceiling -------------------------------------

    def couch_ceiling(self, batch: int = 100) -> dict[str, Any]:
        """Update N existing docs with _bulk_docs, `batch` at a time, one request in flight."""
        n = self.args.messages
        database = unique_db_name("bench_bulk")
        create_database(self.pouch.url, database)
        docs = [message(i) for i in range(n)]
        for doc, row in zip(docs, self.seed(database, iter(docs)), strict=True):
            doc["_rev"] = row["rev"]
            doc["notifiedRecipient"] = True
            doc["notification"] = {"messageId": f"<{doc['_id']}@example.com>", "worker": "0/1"}
        servers = self.servers_cpu()
        started = time.monotonic()
        for i in range(0, n, batch):
            self._bulk(database, docs[i : i + batch])
        elapsed = time.monotonic() - started
        servers = self.servers_cpu(since=servers, per=n)
        delete_database(self.pouch.url, database)
        return {
            "docs_per_second": n / elapsed,
            "couch_requests_per_doc": 1 / batch,
            "pouchdb_cpu_seconds_per_1000": servers["pouchdb_cpu_seconds_per_1000"],
        }

    # -- memory versus backlog ---------------------------------------------------------

    def backlog_run(self, n: int) -> dict[str, Any]:
        """notifier (max_parallel 50) follows a backlog of N fresh messages on the fake."""
        if self.fake is None:
            self.fake = FakeCouchProcess()
        database = unique_db_name(f"bench_backlog_{n}")
        self.fake.seed(database, n)
        self.smtp.reset()
        daemon, _ = self.notifier(f"backlog-{n}", self.fake.url, database, 50)
        try:
            got = self.smtp.wait(n, timeout=max(60.0, n / 50))
            if got["count"] < n:
                raise RuntimeError(f"only {got['count']} of {n} emails arrived:\n{daemon.tail()}")
            memory = daemon.memory()
        except BaseException:
            daemon.kill()
            raise
        end = daemon.stop()
        if end.status != 0:
            raise RuntimeError(f"notifier exited with status {end.status}:\n{end.log[-3000:]}")
        settled = self.fake.settled(database)
        self.fake.drop(database)
        return {
            "messages": n,
            **memory,
            "settled": settled,
            "seconds": got["last"] - daemon.started,
            "emails_per_second": (n - 1) / (got["last"] - got["first"]),
            "cpu_seconds_total": end.cpu_seconds,
            "counters": notifier_counters(end.log),
        }

    # -- catch-up skim -------------------------------------------------------------------

    def skim(self, n: int, rounds: int) -> dict[str, Any]:
        """Pass N already-notified changes, then one fresh message (the sentinel).

        The selector keeps already-notified docs on the server, so what is
        timed is the server filtering N changes plus the worker's own
        overhead. The same filtered feed read by a plain httpx loop is the
        comparison. Each round adds a sentinel after the last one and takes
        turns: the plain read, then notifier from a fresh checkpoint.
        """
        database = unique_db_name("bench_skim")
        create_database(self.pouch.url, database)
        self.seed(database, (message(i, notifiedRecipient=True) for i in range(n)), batch=1000)
        runs = []
        for r in range(rounds):
            sentinel = message(n + r)
            self.seed(database, iter([sentinel]))
            raw, sentinel_seq = self.read_feed(database, sentinel["_id"], filtered=True)
            self.smtp.reset()
            daemon, checkpoints = self.notifier(f"skim-{r}", self.pouch.url, database, 50)
            try:
                got = self.smtp.wait(1, timeout=300)
                if got["count"] < 1:
                    raise RuntimeError(f"the sentinel never arrived:\n{daemon.tail()}")
            except BaseException:
                daemon.kill()
                raise
            end = daemon.stop()
            counters = notifier_counters(end.log)
            delete_database(self.pouch.url, checkpoints)
            # The first SMTP connection is notifier's start-up check, made just
            # before it opens the feed: the skim is timed from there.
            runs.append(
                {
                    "seconds": got["first"] - got["first_connection"],
                    "seconds_with_startup": got["first"] - daemon.started,
                    "raw_filtered_seconds": raw,
                    "checkpoint_at_end": past(counters.get("checkpoint"), sentinel_seq),
                    "final_checkpoint": counters.get("checkpoint"),
                    "sentinel_seq": sentinel_seq,
                    "couch_requests": counters.get("couch_requests"),
                }
            )
        unfiltered, _ = self.read_feed(database, sentinel["_id"], filtered=False)
        delete_database(self.pouch.url, database)
        seconds = statistics.median(r["seconds"] for r in runs)
        raw = statistics.median(r["raw_filtered_seconds"] for r in runs)
        return {
            "changes": n + 1,
            "rounds": runs,
            "seconds": seconds,
            "seconds_with_startup": statistics.median(r["seconds_with_startup"] for r in runs),
            "changes_per_second": (n + 1) / seconds,
            "raw_filtered_seconds": raw,
            "raw_filtered_changes_per_second": (n + 1) / raw,
            "raw_unfiltered_seconds": unfiltered,
            "raw_unfiltered_changes_per_second": (n + 1) / unfiltered,
            "checkpoint_at_end": all(r["checkpoint_at_end"] for r in runs),
        }

    def read_feed(self, database: str, last_id: str, *, filtered: bool) -> tuple[float, Any]:
        """Seconds for a plain streaming loop to read the feed from 0 up to `last_id`."""
        params = {"feed": "continuous", "include_docs": "true", "since": "0", "heartbeat": "10000"}
        body: dict[str, Any] = {}
        if filtered:
            params |= {"filter": "_selector", "selector": json.dumps(SELECTOR)}
            body = {"selector": SELECTOR}
        started = time.monotonic()
        with self.client.stream(
            "POST",
            f"/{database}/_changes",
            params=params,
            json=body,
            headers={"Accept-Encoding": "identity"},
        ) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("id") == last_id:
                        return time.monotonic() - started, row["seq"]
        raise RuntimeError(f"the feed of {database} ended before {last_id}")

    # -- idle ------------------------------------------------------------------------------

    def idle(self, seconds: float) -> dict[str, Any]:
        """CPU % of a notifier with default timings and nothing to do."""
        database = unique_db_name("bench_idle")
        create_database(self.pouch.url, database)
        daemon, checkpoints = self.notifier("idle", self.pouch.url, database, 50)
        try:
            daemon.wait_ready()
            time.sleep(2.0)
            cpu0, t0 = daemon.cpu_seconds(), time.monotonic()
            time.sleep(seconds)
            cpu1, t1 = daemon.cpu_seconds(), time.monotonic()
            memory = daemon.memory()
        except BaseException:
            daemon.kill()
            raise
        end = daemon.stop()
        counters = notifier_counters(end.log)
        for db in (database, checkpoints):
            delete_database(self.pouch.url, db)
        return {
            "seconds": t1 - t0,
            "cpu_seconds": cpu1 - cpu0,
            "cpu_percent": (cpu1 - cpu0) / (t1 - t0) * 100,
            "run_seconds": t1 - daemon.started,
            "couch_requests_whole_run": counters.get("couch_requests"),
            "checkpoint_writes": counters.get("checkpoint_writes"),
            **memory,
        }

    def latency(self, count: int, gap: float = 0.05) -> dict[str, Any]:
        """Docs written one by one to an idle notifier: write -> SMTP acceptance."""
        database = unique_db_name("bench_latency")
        create_database(self.pouch.url, database)
        self.smtp.reset()
        daemon, checkpoints = self.notifier("latency", self.pouch.url, database, 50)
        written: dict[int, float] = {}
        try:
            daemon.wait_ready()
            time.sleep(1.0)
            for i in range(count):
                doc = message(i)
                written[i] = time.monotonic()
                self.client.put(f"/{database}/{doc['_id']}", json=doc).raise_for_status()
                time.sleep(gap)
            got = self.smtp.wait(count, timeout=60)
            if got["count"] < count:
                raise RuntimeError(f"only {got['count']} of {count} emails arrived")
        except BaseException:
            daemon.kill()
            raise
        daemon.stop()
        for db in (database, checkpoints):
            delete_database(self.pouch.url, db)
        latencies = sorted(
            (t - written[recipient_number(rcpt)]) * 1000 for rcpt, t in self.smtp.accepted()
        )
        return {
            "docs": count,
            "gap_ms": gap * 1000,
            "p50_ms": percentile(latencies, 50),
            "p99_ms": percentile(latencies, 99),
            "max_ms": latencies[-1],
        }


def past(checkpoint: Any, seq: Any) -> bool:
    """Whether notifier's final checkpoint is `seq` or after it. The log shows
    the seq with repr(): quotes around a string. With claims on, the echoes of
    the claim and the mark come after the message's own row."""
    checkpoint = str(checkpoint).strip("'\"")
    if checkpoint == str(seq):
        return True
    number = checkpoint.split("-")[0]
    return number.isdigit() and int(number) >= int(str(seq).split("-")[0])


def wait_idle(daemons: list[Daemon], window: float = 0.5, timeout: float = 120.0) -> float:
    """Wait until the daemons together use at most 20 ms of CPU in `window`
    seconds (two clock ticks); return when that window began."""
    deadline = time.monotonic() + timeout
    before = sum(d.cpu_seconds() for d in daemons)
    while time.monotonic() < deadline:
        time.sleep(window)
        now = sum(d.cpu_seconds() for d in daemons)
        if now - before <= 0.02:
            return time.monotonic() - window
        before = now
    raise RuntimeError(f"the workers were still busy after {timeout:g} s")


def percentile(values: list[float], p: float) -> float:
    """The p-th percentile of sorted values, by linear interpolation."""
    k = (len(values) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


# -- putting it together -----------------------------------------------------------------

#: key, worker, max_parallel, notifier's [worker] claims
WORKER_ROWS = [
    ("baseline", "naive", 5, True),
    ("notifier_5", "notifier", 5, True),
    ("notifier_50", "notifier", 50, True),
    ("notifier_5_noclaims", "notifier", 5, False),
    ("notifier_50_noclaims", "notifier", 50, False),
]
#: The counters of notifier's final log line that the overlap run adds up.
COUNTED = ("sent", "couch_requests", "claims_lost", "claim_waits", "takeovers")


def run_all(args: argparse.Namespace, results: dict[str, Any], scratch: Path) -> list[str]:
    """Run every scenario, filling `results`; return the errors met on the way.

    A worker run that leaves docs unmarked or sends an email twice is a
    warning in `results`, not an error: its figures still stand.
    """
    errors: list[str] = []
    warnings: list[str] = results.setdefault("warnings", [])

    def attempt(what: str, step: Callable[[], Any]) -> Any:
        print(f"  {what} ...", end="", flush=True)
        started = time.monotonic()
        try:
            value = step()
        except Exception as e:
            print(f" failed ({time.monotonic() - started:.1f} s)", flush=True)
            errors.append(f"{what}: {e}")
            traceback.print_exc()
            return None
        print(f" {time.monotonic() - started:.1f} s", flush=True)
        return value

    with Bench(args, scratch) as bench:
        results["machine"]["pouchdb_server"] = pouchdb_version(bench)
        keys = [row[0] for row in WORKER_ROWS] + ["overlap", "smtp", "couch"]
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in keys}
        # Round robin, so that a noisy neighbour hurts every row alike.
        for r in range(args.runs):
            print(f"round {r + 1} of {args.runs}, {args.messages} messages each")
            steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
                (key, lambda k=kind, p=parallel, c=claims: bench.worker_run(k, p, claims=c))
                for key, kind, parallel, claims in WORKER_ROWS
            ]
            steps.append(("overlap", bench.overlap_run))
            for key, step in steps:
                run = attempt(key, step)
                if run:
                    runs[key].append(run)
                    if run["marked"] != args.messages or run["duplicates"]:
                        warnings.append(
                            f"{key}, round {r + 1}: {run['marked']} of {args.messages} docs "
                            f"marked, {run['duplicates']} duplicate emails"
                        )
            for key, step in (("smtp", bench.smtp_ceiling), ("couch", bench.couch_ceiling)):
                run = attempt(f"{key} ceiling", step)
                if run:
                    runs[key].append(run)
        results["runs"] = runs
        print("memory, skim, latency and idle cost")
        results["backlog"] = {
            str(n): attempt(f"backlog of {n}", lambda n=n: bench.backlog_run(n))
            for n in (args.small_backlog, args.backlog)
        }
        results["skim"] = attempt(f"skim of {args.skim}", lambda: bench.skim(args.skim, args.runs))
        results["latency"] = attempt(
            f"latency over {args.latency_docs} docs", lambda: bench.latency(args.latency_docs)
        )
        results["idle"] = attempt(f"idle for {args.idle:g} s", lambda: bench.idle(args.idle))
    return errors


def pouchdb_version(bench: Bench) -> str:
    with contextlib.suppress(Exception):
        package = POUCHDB_BIN.resolve().parents[1] / "package.json"
        return str(json.loads(package.read_text())["version"])
    return str(bench.client.get("/").json().get("version"))


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    node = subprocess.run(["node", "--version"], capture_output=True, text=True, check=False)
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "node": node.stdout.strip(),
        "aiosmtpd": importlib.metadata.version("aiosmtpd"),
        "aiosmtplib": importlib.metadata.version("aiosmtplib"),
        "httpx": importlib.metadata.version("httpx"),
        "kernel": platform.release(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
        "commit": commit.stdout.strip(),
    }


def summarise(results: dict[str, Any]) -> None:
    """Medians of the rounds, into results['summary']."""
    summary: dict[str, Any] = {}
    for key, runs in results["runs"].items():
        if not runs:
            continue
        fields = [k for k, v in runs[0].items() if isinstance(v, int | float)]
        summary[key] = {f: statistics.median(run[f] for run in runs) for f in fields}
        summary[key]["runs"] = len(runs)
    results["summary"] = summary


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller figures, for a check in about 2 minutes"
    )
    parser.add_argument("--messages", type=int, help="messages per throughput run (1000)")
    parser.add_argument("--runs", type=int, help="rounds of the throughput runs (3)")
    parser.add_argument("--backlog", type=int, help="the big backlog (100000)")
    parser.add_argument("--skim", type=int, help="already-notified changes to skim (100000)")
    parser.add_argument("--latency-docs", type=int, help="docs for the latency figure (200)")
    parser.add_argument("--idle", type=float, help="seconds of the idle figure (30)")
    parser.add_argument(
        "--naive-reuse-smtp",
        action="store_true",
        help="let the baseline keep its SMTP connections (default: one per email, the naive way)",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help="where to write the figures (%(default)s)"
    )
    parser.add_argument(
        "--write-docs", action="store_true", help=f"also regenerate {DOCS.relative_to(ROOT)}"
    )
    parser.add_argument(
        "--render-docs",
        type=Path,
        metavar="JSON",
        help=f"only turn a saved JSON into {DOCS.relative_to(ROOT)}; run nothing",
    )
    args = parser.parse_args()
    if args.render_docs:
        results = json.loads(args.render_docs.read_text())
        DOCS.write_text(render_docs(results))
        print(f"wrote {DOCS}")
        return 0
    quick = args.quick
    defaults = {
        "messages": 500 if quick else 1000,
        "runs": 3,
        "backlog": 20_000 if quick else 100_000,
        "skim": 20_000 if quick else 100_000,
        "latency_docs": 50 if quick else 200,
        "idle": 10.0 if quick else 30.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.small_backlog = 1000
    command = ".venv/bin/python benchmarks/bench.py" + (" --quick" if quick else "")
    results: dict[str, Any] = {
        "date": datetime.datetime.now(tz=datetime.UTC).isoformat(timespec="seconds"),
        "command": command,
        "argv": shlex.join(sys.argv[1:]),
        "settings": {
            k: getattr(args, k) for k in (*defaults, "small_backlog", "quick", "naive_reuse_smtp")
        },
        "machine": machine(),
    }
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="notifier-bench-") as tmp:
        errors = run_all(args, results, Path(tmp))
    results["seconds"] = time.monotonic() - started
    results["machine"]["loadavg_at_end"] = Path("/proc/loadavg").read_text().split()[:3]
    results["errors"] = errors
    summarise(results)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print()
    print(render_text(results))
    print(f"\nfigures written to {args.json}")
    if args.write_docs:
        DOCS.write_text(render_docs(results))
        print(f"wrote {DOCS}")
    if errors:
        print("\nerrors:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
