"""Delivery figures: pacing against a relay's quota, throttling with no rate set, and
throughput with no limits against an earlier version of notifier, all in one run.

    .venv/bin/python benchmarks/delivery.py                  # about 5 minutes
    .venv/bin/python benchmarks/delivery.py --before 246e763 --rounds 3

It uses bench.py's servers: PouchDB Server in memory, the SMTP sink in a
process of its own (which can answer 454 past a quota, as Amazon SES does),
and ``notifier run`` processes. The earlier version runs from a git worktree
of ``--before`` with the same virtualenv, its ``notifier`` package first on
the path. Rows of one kind take turns (round robin), and figures are medians
of the rounds. A benchmark, not a test: it prints figures and never judges
them.

- **Pacing**: the sink's quota is R messages in any second; notifier has
  ``[smtp] max_rate = R`` (one worker, or two splitting it). The achieved
  rate is (N - 1) over the time from the first to the Nth acceptance at the
  sink; throttled is the number of 454 replies the sink sent.
- **No rate set**: the same quota, no ``max_rate``: throttling replies halve
  the pace, quiet seconds raise it again.
- **No limits, before and after**: bench.py's throughput run (1,000 messages
  written while the worker follows its feed, max_parallel 50, claims on)
  with the earlier version and with this tree; CPU is the worker's own from
  ready to exit, per 1,000 emails.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCHMARKS = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS))
sys.path.insert(0, str(BENCHMARKS.parent / "tests"))

from bench import ROOT, SETTLE, Bench, machine  # noqa: E402
from common import message  # noqa: E402
from procs import notifier_counters  # noqa: E402
from realservers import create_database, delete_database, unique_db_name  # noqa: E402


def paced_run(
    bench: Bench, *, n: int, quota: float, max_rate: float | None, workers: int = 1
) -> dict[str, Any]:
    """N messages through ``workers`` notifier processes against a sink with ``quota``."""
    database = unique_db_name("bench_paced")
    create_database(bench.pouch.url, database)
    bench.smtp.reset()
    bench.smtp.ask(f"quota {quota}")
    smtp = {} if max_rate is None else {"max_rate": max_rate}
    checkpoints = unique_db_name("bench_checkpoints")
    daemons = [
        bench.notifier(
            f"paced-{w}-of-{workers}",
            bench.pouch.url,
            database,
            50,
            shard=(w, workers),
            checkpoints=checkpoints,
            smtp=smtp,
        )[0]
        for w in range(workers)
    ]
    try:
        for daemon in daemons:
            daemon.wait_ready()
        time.sleep(SETTLE)
        cpu_ready = sum(d.cpu_seconds() for d in daemons)
        bench.seed(database, (message(i) for i in range(n)))
        got = bench.smtp.wait(n, timeout=max(120.0, 4 * n / quota))
        if got["count"] < n:
            raise RuntimeError(f"only {got['count']} of {n} emails arrived")
    except BaseException:
        for daemon in daemons:
            daemon.kill()
        raise
    ends = [d.stop() for d in daemons]
    stats = bench.smtp.ask("stats")
    bench.smtp.ask("quota 0")
    for db in (database, checkpoints):
        delete_database(bench.pouch.url, db)
    counters = [notifier_counters(end.log) for end in ends]
    return {
        "emails_per_second": (n - 1) / (got["last"] - got["first"]),
        "throttled": stats["throttled"],
        "duplicates": stats["count"] - n,
        "cpu_seconds_per_1000": (sum(e.cpu_seconds for e in ends) - cpu_ready) / n * 1000,
        "exit": [end.status for end in ends],
        "couch_requests_per_email": sum(c["couch_requests"] for c in counters) / n,
    }


def before_command(ref: str, scratch: Path) -> tuple[list[str], str]:
    """A command that runs notifier as of ``ref``, from a detached git worktree."""
    tree = scratch / "before"
    subprocess.run(
        ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), ref],
        check=True,
        capture_output=True,
    )
    commit = subprocess.run(
        ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    code = (
        f"import sys; sys.path.insert(0, {str(tree)!r}); "
        "from notifier.cli import main; sys.exit(main())"
    )
    return [sys.executable, "-c", code], commit


def median(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--before", default="246e763", help="the earlier version (%(default)s)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--messages", type=int, default=1000, help="for the no-limit runs")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of a paced run")
    parser.add_argument("--json", type=Path, default=BENCHMARKS / "delivery-results.json")
    args = parser.parse_args()
    # Bench reads these from its own command line; the figures here use no others.
    args.quick = False
    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="notifier-delivery-") as tmp:
        scratch = Path(tmp)
        before, commit = before_command(args.before, scratch)
        results["before"] = commit
        results["after"] = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        rows: dict[str, list[dict[str, Any]]] = {}
        try:
            with Bench(args, scratch) as bench:
                for _ in range(args.rounds):
                    for name, command in ((f"before ({commit})", before), ("after", None)):
                        run = bench.worker_run("notifier", 50, command=command)
                        rows.setdefault(f"no limits, {name}", []).append(run)
                    for rate in (20.0, 100.0):
                        n = int(rate * args.seconds)
                        for workers in (1, 2):
                            run = paced_run(bench, n=n, quota=rate, max_rate=rate, workers=workers)
                            key = f"max_rate {rate:g}, quota {rate:g}, {workers} worker(s)"
                            rows.setdefault(key, []).append(run)
                    rate = 50.0
                    run = paced_run(bench, n=int(rate * args.seconds), quota=rate, max_rate=None)
                    rows.setdefault(f"no max_rate, quota {rate:g}", []).append(run)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(scratch / "before")],
                check=False,
                capture_output=True,
            )
    results["rows"] = rows
    results["minutes"] = round((time.monotonic() - started) / 60, 1)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"before {results['before']}, after {results['after']}; {results['minutes']} minutes")
    print("| run | emails/s | x target | 454s | CPU s / 1,000 emails | duplicates |")
    print("|---|---:|---:|---:|---:|---:|")
    for key, runs in rows.items():
        rate = median(runs, "emails_per_second")
        target = ""
        if key.startswith("max_rate"):
            target = f"{rate / float(key.split()[1].rstrip(',')):.3f}"
        throttled = statistics.median(r.get("throttled", 0) for r in runs)
        print(
            f"| {key} | {rate:,.1f} | {target} | {throttled:g} | "
            f"{median(runs, 'cpu_seconds_per_1000'):.2f} | "
            f"{max(r['duplicates'] for r in runs)} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
