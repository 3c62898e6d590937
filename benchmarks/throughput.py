"""Throughput of one notifier worker against PouchDB Server and aiosmtpd.

Starts PouchDB Server (from tests/servers, installed by ./scripts/test) and an
aiosmtpd sink on loopback, seeds N message documents, then runs the installed
``notifier run`` command as a subprocess and times it until the SMTP sink has
received every email. Repeats on fresh databases and prints each run and the
median. A benchmark, not a test: it prints figures and never fails on them.

    .venv/bin/python benchmarks/throughput.py --messages 1000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from realservers import CouchTestDB, PouchDBServer, create_database, unique_db_name  # noqa: E402
from scenario import config_data, message, to_toml  # noqa: E402

from notifier.testing.smtp import SmtpSink  # noqa: E402

NOTIFIER = str(Path(sys.executable).with_name("notifier"))


def one_run(
    server: PouchDBServer, sink: SmtpSink, count: int, max_parallel: int
) -> dict[str, float]:
    name = unique_db_name("bench")
    create_database(server.url, name)
    couch = CouchTestDB(server.url, name)
    for start in range(0, count, 500):
        couch.bulk(message(n) for n in range(start, min(start + 500, count)))
    sink.clear()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "notifier.toml"
        data = config_data(
            couch, sink, {"worker": {"max_parallel": max_parallel, "checkpoint_interval": 5.0}}
        )
        cfg.write_text(to_toml(data))
        log = open(Path(tmp) / "log", "wb")  # noqa: SIM115
        started = time.monotonic()
        proc = subprocess.Popen(
            [NOTIFIER, "run", "--worker-id", "0", "--config", str(cfg), "--log-level", "WARNING"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        first = None
        while len(sink.messages) < count:
            if first is None and sink.messages:
                first = time.monotonic()
            if proc.poll() is not None:
                raise SystemExit(f"notifier exited early:\n{(Path(tmp) / 'log').read_text()}")
            time.sleep(0.005)
        done = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    couch.close()
    steady = (count - 1) / (done - first) if first and done > first else float("nan")
    return {
        "seconds_total": done - started,
        "emails_per_second_total": count / (done - started),
        "emails_per_second_steady": steady,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-parallel", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    print(
        f"{args.messages} messages, max_parallel {args.max_parallel}, one worker, {args.runs} runs"
    )
    runs = []
    with PouchDBServer() as server, SmtpSink() as sink:
        for i in range(args.runs):
            result = one_run(server, sink, args.messages, args.max_parallel)
            runs.append(result)
            print(
                f"run {i + 1}: {result['seconds_total']:.2f} s total, "
                f"{result['emails_per_second_total']:.0f} emails/s including start-up, "
                f"{result['emails_per_second_steady']:.0f} emails/s first-to-last"
            )
    median_total = statistics.median(r["emails_per_second_total"] for r in runs)
    median_steady = statistics.median(r["emails_per_second_steady"] for r in runs)
    print(
        f"median: {median_total:.0f} emails/s including start-up, {median_steady:.0f} first-to-last"
    )
    if args.json:
        args.json.write_text(
            json.dumps(
                {"runs": runs, "median_total": median_total, "median_steady": median_steady},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
