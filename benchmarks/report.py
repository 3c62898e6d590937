"""Turn the benchmark's JSON into the printed table and docs/performance.md.

The document is generated, except for the part between the ``analysis``
markers, which a person writes (what bounds a missed target, with the
profile that shows it) and which regenerating keeps.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs" / "performance.md"
BEGIN, END = "<!-- analysis: written by hand, kept when regenerated -->", "<!-- /analysis -->"

ROWS = [
    ("baseline", "baseline: naive worker, 5 in flight"),
    ("notifier_5", "notifier, max_parallel 5"),
    ("notifier_50", "notifier, max_parallel 50"),
    ("notifier_5_noclaims", "notifier, max_parallel 5, claims off"),
    ("notifier_50_noclaims", "notifier, max_parallel 50, claims off"),
    ("smtp", "SMTP sink ceiling: aiosmtplib, 50 reused connections"),
    ("couch", "PouchDB Server ceiling: `_bulk_docs` updates, 100 a request"),
]
#: Rows that a results file from before claims does not have at all.
CLAIM_ROWS = ("notifier_5_noclaims", "notifier_50_noclaims", "overlap")


def has_claims(results: dict[str, Any]) -> bool:
    """Whether the run measured claims on and off (a results file from before
    claims has neither the rows nor the figures)."""
    return any(k in results.get("runs", {}) for k in CLAIM_ROWS)


def row_labels(results: dict[str, Any]) -> dict[str, str]:
    """The rows of the tables this results file has, with their labels."""
    runs = results.get("runs", {})
    labels = {k: v for k, v in ROWS if k not in CLAIM_ROWS or k in runs}
    if has_claims(results):
        for key in ("notifier_5", "notifier_50"):
            labels[key] += ", claims on"
    if results["settings"].get("naive_reuse_smtp"):
        labels["baseline"] += ", reused SMTP connections"
    return labels


def _num(value: Any, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}{unit}"
    return f"{value:,.{digits}f}{unit}"


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in rows
    ]
    return "\n".join(lines)


def best_notifier(summary: dict[str, Any]) -> str | None:
    candidates = [k for k in ("notifier_5", "notifier_50") if k in summary]
    if not candidates:
        return None
    return max(candidates, key=lambda k: summary[k]["emails_per_second"])


def main_table(results: dict[str, Any]) -> str:
    summary = results.get("summary", {})
    labels = row_labels(results)
    base = summary.get("baseline", {}).get("emails_per_second")
    rows = []
    for key, label in labels.items():
        s = summary.get(key)
        if s is None:
            rows.append([label, "failed", "", "", "", "", ""])
            continue
        if key == "couch":
            rows.append(
                [
                    label,
                    _num(s["docs_per_second"]) + " docs/s",
                    "",
                    _num(s["couch_requests_per_doc"], 2) + " a doc",
                    "",
                    "",
                    "",
                ]
            )
            continue
        eps = s["emails_per_second"]
        ratio = f"{eps / base:.1f}x" if base else "-"
        if key == "smtp":
            rows.append([label, _num(eps), ratio, "", "", "", ""])
            continue
        rows.append(
            [
                label,
                _num(eps),
                ratio,
                _num(s["couch_requests_per_email"], 3),
                _num(s["checkpoint_writes"], 0),
                _num(s["cpu_seconds_per_1000"], 2),
                _num(s["peak_rss_mb"], 1),
            ]
        )
    return table(
        [
            "run",
            "emails/s",
            "x baseline",
            "CouchDB requests / email",
            "checkpoint writes",
            "CPU s / 1,000 emails",
            "peak RSS MiB",
        ],
        rows,
    )


def cpu_table(results: dict[str, Any]) -> str:
    """CPU seconds per 1,000 emails of each process, for each row of the main table."""
    summary = results.get("summary", {})
    rows = []
    for key, label in row_labels(results).items():
        s = summary.get(key)
        if s is None:
            continue
        own = s.get("cpu_seconds_per_1000", s.get("client_cpu_seconds_per_1000"))
        parts = [own, s.get("sink_cpu_seconds_per_1000"), s.get("pouchdb_cpu_seconds_per_1000")]
        total = sum(p for p in parts if p is not None)
        rows.append([label, *(_num(p, 2) for p in parts), _num(total, 2)])
    return table(
        [
            "run (per 1,000 emails; docs for the last)",
            "worker or client",
            "SMTP sink",
            "PouchDB",
            "all",
        ],
        rows,
    )


def claims_table(results: dict[str, Any]) -> str:
    """Each notifier row with claims on next to the same row with claims off."""
    summary = results.get("summary", {})
    figures = [
        ("emails/s", "emails_per_second", 0),
        ("CouchDB requests / email", "couch_requests_per_email", 3),
        ("document writes / email (the driver's included)", "doc_writes_per_email", 2),
        ("notifier CPU s / 1,000 emails", "cpu_seconds_per_1000", 2),
        ("PouchDB CPU s / 1,000 emails", "pouchdb_cpu_seconds_per_1000", 2),
        ("SMTP sink CPU s / 1,000 emails", "sink_cpu_seconds_per_1000", 2),
    ]
    headers = ["figure"]
    for parallel in (5, 50):
        headers += [f"max_parallel {parallel}: claims on", "claims off", "on / off"]
    rows = []
    for name, field, digits in figures:
        row = [name]
        for parallel in (5, 50):
            on = summary.get(f"notifier_{parallel}", {}).get(field)
            off = summary.get(f"notifier_{parallel}_noclaims", {}).get(field)
            ratio = f"{on / off:.2f}" if on is not None and off else "-"
            row += [_num(on, digits), _num(off, digits), ratio]
        rows.append(row)
    return table(headers, rows)


def overlap_table(results: dict[str, Any]) -> str:
    """Two layouts on one database at once: the cost of a reshard while it lasts."""
    o = results.get("summary", {}).get("overlap")
    runs = results.get("runs", {}).get("overlap") or []
    if o is None or not runs:
        return "The overlap run failed: no figures."
    alone = results.get("summary", {}).get("notifier_50", {})

    def versus(field: str, digits: int) -> str:
        base = alone.get(field)
        return f"{_num(o[field], digits)} ({o[field] / base:.2f}x)" if base else _num(o[field])

    rows = [
        ["emails/s at the sink", versus("emails_per_second", 0)],
        ["CouchDB requests / email, three workers", versus("couch_requests_per_email", 3)],
        ["document writes / email (the driver's included)", _num(o["doc_writes_per_email"], 2)],
        ["notifier CPU s / 1,000 emails, three workers", versus("cpu_seconds_per_1000", 2)],
        ["PouchDB CPU s / 1,000 emails", versus("pouchdb_cpu_seconds_per_1000", 2)],
        [
            "claims lost (409) / waits for a claim / taken over",
            f"{_num(o['claims_lost'])} / {_num(o['claim_waits'])} / {_num(o['takeovers'])}",
        ],
        ["seconds from the last email until all three were idle", _num(o["catch_up_seconds"], 1)],
        [
            "sent by the 1-worker layout / the 2-worker layout",
            f"{_num(o['sent_by_layout_1'])} / {_num(o['sent_by_layout_2'])}",
        ],
        ["duplicate emails, most in a round", _num(max(r["duplicates"] for r in runs))],
    ]
    return table(
        [
            "overlap: worker 0 of 1 and workers 0, 1 of 2",
            "value (x max_parallel 50, claims on, alone)",
        ],
        rows,
    )


def other_table(results: dict[str, Any]) -> str:
    rows: list[list[str]] = []
    backlog = results.get("backlog") or {}
    for n, b in sorted(backlog.items(), key=lambda kv: int(kv[0])):
        if b is None:
            rows.append([f"RSS after a backlog of {int(n):,} messages", "failed", ""])
            continue
        rows.append(
            [
                f"RSS after a backlog of {int(n):,} messages",
                f"peak {_num(b['peak_rss_mb'], 1)} MiB, now {_num(b['rss_mb'], 1)} MiB",
                f"{_num(b['emails_per_second'])} emails/s on the fake CouchDB; "
                f"{_num(b['settled'])} docs marked",
            ]
        )
    growth = rss_growth(results)
    if growth is not None:
        rows.append(["RSS growth, big backlog vs 1,000", f"{growth:+.1f} MiB", "peak RSS"])
    skim = results.get("skim")
    if skim:
        rows.append(
            [
                f"catch-up skim of {_num(skim['changes'])} changes",
                f"{skim['seconds']:.2f} s ({_num(skim['changes_per_second'])} changes/s)",
                f"{skim['seconds_with_startup']:.2f} s with start-up; "
                f"final checkpoint at the end: {'yes' if skim['checkpoint_at_end'] else 'no'}",
            ]
        )
        rows.append(
            [
                "same filtered feed, plain httpx loop",
                f"{skim['raw_filtered_seconds']:.2f} s "
                f"({_num(skim['raw_filtered_changes_per_second'])} changes/s)",
                f"unfiltered feed with docs: {skim['raw_unfiltered_seconds']:.2f} s "
                f"({_num(skim['raw_unfiltered_changes_per_second'])} changes/s)",
            ]
        )
    lat = results.get("latency")
    if lat:
        rows.append(
            [
                f"latency at idle, {lat['docs']} docs one by one",
                f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms",
                f"max {lat['max_ms']:.1f} ms; {lat['gap_ms']:.0f} ms between writes",
            ]
        )
    idle = results.get("idle")
    if idle:
        rows.append(
            [
                f"idle CPU over {idle['seconds']:.0f} s",
                f"{idle['cpu_percent']:.2f} % ({idle['cpu_seconds']:.2f} s)",
                f"{idle['couch_requests_whole_run']} CouchDB requests and "
                f"{idle['checkpoint_writes']} checkpoint writes in the whole "
                f"{idle['run_seconds']:.0f} s run",
            ]
        )
    return table(["figure", "value", "notes"], rows)


def rss_growth(results: dict[str, Any]) -> float | None:
    backlog = results.get("backlog") or {}
    sizes = sorted(int(n) for n, b in backlog.items() if b)
    if len(sizes) < 2:
        return None
    small, big = backlog[str(sizes[0])], backlog[str(sizes[-1])]
    growth: float = big["peak_rss_mb"] - small["peak_rss_mb"]
    return growth


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with its measured value and whether it was met (None: not measured)."""
    summary = results.get("summary", {})
    best_key = best_notifier(summary)
    best = summary.get(best_key) if best_key else None
    label = f" ({dict(ROWS)[best_key].removeprefix('notifier, ')})" if best_key else ""
    base = summary.get("baseline", {}).get("emails_per_second")
    ceiling = summary.get("smtp", {}).get("emails_per_second")
    out: list[dict[str, Any]] = []

    def add(figure: str, target: str, value: float | None, shown: str, ok: bool | None) -> None:
        out.append({"figure": figure, "target": target, "value": value, "shown": shown, "met": ok})

    eps = best["emails_per_second"] if best else None
    ratio = eps / base if eps and base else None
    add(
        f"notifier's best emails/s{label} vs baseline",
        "≥ 8x",
        ratio,
        f"{ratio:.1f}x ({eps:,.0f} vs {base:,.0f})" if ratio and eps and base else "-",
        None if ratio is None else ratio >= 8,
    )
    share = eps / ceiling if eps and ceiling else None
    add(
        f"notifier's best emails/s{label} vs SMTP sink ceiling",
        "≥ 70%",
        share,
        f"{share:.0%} ({eps:,.0f} vs {ceiling:,.0f})" if share and eps and ceiling else "-",
        None if share is None else share >= 0.7,
    )
    rpe = best["couch_requests_per_email"] if best else None
    add(
        f"CouchDB requests per email at load{label}",
        "≤ 0.1",
        rpe,
        _num(rpe, 3),
        None if rpe is None else rpe <= 0.1,
    )
    cpu = best["cpu_seconds_per_1000"] if best else None
    add(
        f"notifier CPU per 1,000 emails{label}",
        "≤ 0.5 s",
        cpu,
        _num(cpu, 2, " s"),
        None if cpu is None else cpu <= 0.5,
    )
    growth = rss_growth(results)
    sizes = sorted(int(n) for n, b in (results.get("backlog") or {}).items() if b)
    big = f"{sizes[-1]:,}" if sizes else "big"
    add(
        f"RSS growth, {big} backlog vs 1,000",
        "≤ 10 MB",
        growth,
        "-" if growth is None else f"{growth:+.1f} MiB",
        None if growth is None else growth <= 10 * 1000 * 1000 / 2**20,
    )
    skim = results.get("skim")
    skim_share = (
        skim["changes_per_second"] / skim["raw_filtered_changes_per_second"] if skim else None
    )
    add(
        "catch-up skim vs raw `_changes` read of the same feed",
        "≥ 50%",
        skim_share,
        f"{skim_share:.0%}" if skim_share else "-",
        None if skim_share is None else skim_share >= 0.5,
    )
    lat = results.get("latency")
    p99 = lat["p99_ms"] if lat else None
    add(
        "idle latency p99",
        "< 200 ms",
        p99,
        _num(p99, 1, " ms"),
        None if p99 is None else p99 < 200,
    )
    idle = results.get("idle")
    pct = idle["cpu_percent"] if idle else None
    add("idle CPU", "< 1%", pct, _num(pct, 2, " %"), None if pct is None else pct < 1)
    return out


def targets_table(results: dict[str, Any]) -> str:
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    rows = [[t["figure"], t["target"], t["shown"], verdict[t["met"]]] for t in targets(results)]
    return table(["figure", "target", "measured", ""], rows)


def render_text(results: dict[str, Any]) -> str:
    s = results["settings"]
    parts = [
        f"{s['messages']:,} messages a run, median of {s['runs']} runs; "
        f"{results['machine']['nproc']} cores, Python {results['machine']['python']}, "
        f"PouchDB Server {results['machine'].get('pouchdb_server')}",
        "",
        main_table(results),
        "",
        cpu_table(results),
        "",
        *([claims_table(results), "", overlap_table(results), ""] if has_claims(results) else []),
        other_table(results),
        "",
        targets_table(results),
    ]
    if results.get("warnings"):
        parts += ["", "warnings:", *(f"  {w}" for w in results["warnings"])]
    if results.get("errors"):
        parts += ["", "errors:", *(f"  {e}" for e in results["errors"])]
    return "\n".join(parts)


def _problems(results: dict[str, Any]) -> str:
    lines = [f"- warning: {w}" for w in results.get("warnings", [])]
    lines += [f"- error: {e}" for e in results.get("errors", [])]
    return "\n" + "\n".join(lines) + "\n" if lines else ""


def _kept_analysis() -> str:
    if DOCS.exists():
        match = re.search(re.escape(BEGIN) + r".*?" + re.escape(END), DOCS.read_text(), re.S)
        if match:
            return match.group(0)
    return f"{BEGIN}\n\n(No analysis written yet.)\n\n{END}"


def _claims_section(results: dict[str, Any]) -> str:
    if not has_claims(results):
        return ""
    return f"""
## Claims

Each notifier row above runs with claims on (`[worker] claims = true`, the
default), measured next to the same row with claims off, in the same rounds:

{claims_table(results)}

Two layouts at once on one database, as while a reshard overlaps them:
worker 0 of 1 and workers 0 and 1 of 2, each a `notifier run` of its own
with the same config (max_parallel 50, claims on); figures for the three
processes together, against the max_parallel 50 row with claims on:

{overlap_table(results)}
"""


def _claims_method(results: dict[str, Any]) -> str:
    if not has_claims(results):
        return ""
    n = results["settings"]["messages"]
    return f"""- **Claims on and off**: the two notifier rows run as configured by
  default (claims on) and again with `claims = false` in `[worker]`, in the
  same rounds. **Document writes / email** is the database's `update_seq`
  at the end divided by N: the driver's write of each message, the claim
  (with claims on) and the mark.
- **Overlap**: three `notifier run` processes on one database and one
  checkpoint database, started one after the other (`--worker-id 0
  --worker-count 1`, then `0` and `1` of `2`), each waited for until ready;
  then {n:,} messages as for the workers at load. emails/s is timed at the
  sink; requests and CPU (from ready to exit) are the three processes'
  sums. The layout that loses the claims lags behind on the feed, so the
  workers are stopped only once all three are idle (at most 20 ms of CPU
  in half a second); the seconds from the last email to then are shown.
  **Duplicate emails** are the sink's count beyond N once all three have
  exited.
"""


def render_docs(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    backlog = s["backlog"]
    labels = row_labels(results)
    workers = sum(1 for k in labels if k not in ("smtp", "couch"))
    turns = {3: "three", 5: "five"}.get(workers, str(workers))
    overlap = " and the overlap" if has_claims(results) else ""
    return f"""# Performance

Generated by `benchmarks/bench.py` from its JSON output; edit the analysis
section only (it is kept when the rest is regenerated). Re-run with:

```sh
./scripts/test   # once: installs PouchDB Server and the test extras
{results["command"]} --write-docs
```

`--quick` gives smaller figures in about two minutes. The figures are
medians of {s["runs"]} runs on a shared machine: compare ratios, not absolutes.

- **Date:** {results["date"]}
- **Machine:** {m["nproc"]} cores ({m["cpu_model"]}), Linux {m["kernel"]}; load
  average {" ".join(m.get("loadavg_at_start", []))} at the start and
  {" ".join(m.get("loadavg_at_end", []))} at the end (the cores are shared)
- **Software:** Python {m["python"]}, PouchDB Server {m.get("pouchdb_server")}
  (in memory) on Node.js {m["node"]}, aiosmtpd {m["aiosmtpd"]},
  aiosmtplib {m["aiosmtplib"]}, httpx {m["httpx"]}
- **notifier:** commit `{m["commit"]}`
- **Command:** `{results["command"]}` ({results["seconds"] / 60:.1f} minutes)

## Throughput, {s["messages"]:,} messages a run

{main_table(results)}

Where the CPU time goes, in seconds per 1,000 emails, by process, from the
worker's ready line to its exit (the two cores are shared by all of them;
PouchDB Server's share includes the driver writing the messages):

{cpu_table(results)}
{_claims_section(results)}
## Memory, catch-up, latency, idle cost

{other_table(results)}

## Targets

{targets_table(results)}
{_problems(results)}
{_kept_analysis()}

## How each figure is measured

All servers and workers run on loopback, each in a process of its own: PouchDB
Server {m.get("pouchdb_server")} (`--in-memory`), the SMTP sink
(`benchmarks/smtp_sink.py`: aiosmtpd, which accepts every message and keeps
only a recipient and a time), the worker under test, and the driver
(`benchmarks/bench.py`). Times are `CLOCK_MONOTONIC`, which all processes
share. Each run uses fresh databases. The {turns} worker rows{overlap} and the two
ceilings take turns (round robin), so a noisy neighbour hits every row alike.

- **Workers at load.** The worker starts on an empty database; once it
  follows the feed, the driver writes {s["messages"]:,} message documents with
  `_bulk_docs` (500 a request). **emails/s** is (N - 1) divided by the time
  from the first to the Nth acceptance at the sink. Then SIGTERM; the worker
  finishes and exits, and every document is checked for its mark.
- **Baseline.** `benchmarks/naive_worker.py`: the same filtered continuous
  feed, 5 messages in flight; for each message a new SMTP connection
  (`aiosmtplib.send`: connect, EHLO, MAIL, RCPT, DATA, QUIT), a PUT of the
  doc, a GET and a PUT of the checkpoint doc (a 409 on it is ignored). About
  three CouchDB requests per email; it counts its own.
- **CouchDB requests / email** for notifier come from its final log line
  (`couch_requests=`), which counts every request of the run, start-up
  (database check, checkpoint, lease), the feed, marks and checkpoints
  included. **Checkpoint writes** likewise (`checkpoint_writes=`).
- **CPU s / 1,000 emails**: the worker's user + system CPU time from the moment
  it was ready (`/proc/<pid>/stat`) to its exit (`wait4`), so Python's
  start-up and imports are left out but the final marks, checkpoint and
  connection close are in; divided by N, times 1,000.
- **Peak RSS**: `VmHWM` from `/proc/<pid>/status`, read after the Nth email
  and before SIGTERM.
{_claims_method(results)}- **SMTP sink ceiling**: the driver sends the same N emails (built before
  the clock starts) over 50 reused aiosmtplib connections, timed at the sink
  like the workers. It is the sink's ceiling as a plain Python client sees
  it; client and sink share the machine's two cores, as notifier and sink do.
- **PouchDB Server ceiling**: N existing docs updated with `_bulk_docs`, 100
  docs a request, one request at a time, timed by the driver.
- **Memory versus backlog**: notifier (max_parallel 50) follows a backlog
  of 1,000 and of {backlog:,} fresh messages, all sent and marked, on
  notifier's fake CouchDB served on a loopback socket from its own process
  (`benchmarks/fake_couch_server.py`; seeding {backlog:,} docs into PouchDB
  Server over HTTP would take longer than the run). Peak RSS is read after
  the last email is accepted; the growth is the difference of the two peaks.
- **Catch-up skim**: {s["skim"]:,} already-notified docs, then one fresh message
  (the sentinel), on PouchDB Server; median of {s["runs"]} rounds, each adding
  a sentinel after the last and starting notifier from a fresh checkpoint.
  The selector keeps notified docs on the server, so no row crosses the wire
  until the sentinel's. notifier is timed
  from its first SMTP connection (its start-up check, made just before it
  opens the feed) to the sentinel's acceptance; its final checkpoint must be
  the sentinel's seq or a later one (the echo of its claim). The comparison
  is a plain httpx streaming loop reading the same filtered feed (same
  parameters) from 0 to the sentinel's row, in the same run; the
  unfiltered feed, docs included, is shown for scale.
- **Latency at idle**: notifier (max_parallel 50, default timings) idles on
  an empty database; {s["latency_docs"]} docs are written one at a time with a
  PUT, 50 ms apart. Latency runs from just before each PUT to the sink's
  acceptance of that doc's email.
- **Idle cost**: notifier with default timings (heartbeat 10 s, checkpoint
  interval 5 s, lease renewed every 10 s) on an empty database; its CPU time
  over {s["idle"]:g} s with no changes, from `/proc/<pid>/stat` (10 ms ticks),
  starting 2 s after it was ready.
- **Profile**: `benchmarks/profile_notifier.py` runs one throughput run
  (5,000 messages, max_parallel 50) with py-spy attached and prints CPU time
  by package and function (`.venv/bin/pip install py-spy` first; it is not a
  dependency of the project).
"""
