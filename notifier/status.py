"""``notifier status``: every worker's checkpoint, lag and lease, and every layout's state.

:func:`gather_status` reads the checkpoint and lease documents of every
worker of every layout (worker count) and estimates how far each worker is
behind. Each layout is shown as running or stopped, with when it last ran;
the newest running one is *current*, and one that has not run for
``[worker] retire_after`` while another has run since is *retired* (never
stale; ``notifier prune-checkpoints`` deletes its documents). It only reads.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import quote

import httpx

from notifier import process
from notifier.check import LooksSettled, count_looks_settled
from notifier.config import Config
from notifier.couch import CouchClient, seq_param, short_reason
from notifier.errors import CouchError
from notifier.layout import (
    LayoutRun,
    format_duration,
    iso_time,
    layout_states,
    read_slot_docs,
    slot_last_ran,
    workers_text,
)
from notifier.lease import is_released, lease_state, parse_time
from notifier.retries import DeferredSummary, summarise
from notifier.tracker import Seq

__all__ = ["LayoutStatus", "LeaseInfo", "StatusReport", "WorkerStatus", "gather_status"]


WorkerState = Literal["running", "stopped", "lease expired", "holder gone"]


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A worker slot's lease document, as read at ``now``."""

    host: str | None
    pid: int | None
    expires_at: float | None
    renewed_at: str | None
    #: Seconds until expiry at the time of the report; negative once expired.
    expires_in: float | None
    #: The holder's process is known to be gone (a crash; see notifier.process).
    holder_gone: bool
    #: When the (last) holder took the lease, epoch seconds.
    started_at: float | None = None
    #: When a clean stop released it, epoch seconds; ``None`` while it is held.
    released_at: float | None = None
    #: Seconds since it was released, at the time of the report.
    released_ago: float | None = None

    @property
    def live(self) -> bool:
        return (
            self.released_at is None
            and self.expires_in is not None
            and self.expires_in > 0
            and not self.holder_gone
        )

    def describe(self) -> str:
        who = f"{self.host or '?'} pid {self.pid if self.pid is not None else '?'}"
        if self.released_at is not None:
            return f"released {format_duration(self.released_ago or 0.0)} ago ({who})"
        if self.expires_in is None:
            return f"{who}, no expiry (malformed lease)"
        if self.expires_in <= 0:
            return f"expired {format_duration(-self.expires_in)} ago ({who})"
        if self.holder_gone:
            return f"{who} is gone (lease would expire in {format_duration(self.expires_in)})"
        return f"{who}, expires in {format_duration(self.expires_in)}"

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pid": self.pid,
            "expires_at": self.expires_at,
            "expires_in": _round(self.expires_in),
            "renewed_at": self.renewed_at,
            "started_at": self.started_at,
            "released_at": self.released_at,
            "live": self.live,
            "holder_gone": self.holder_gone,
        }


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One worker slot of one layout: its checkpoint, its lease, how far behind it is.

    ``pending_estimate`` is CouchDB's count of changes after the checkpoint
    (any document, any shard), ``None`` where the server does not report it;
    ``behind`` says whether there is at least one change after it, which every
    server tells. ``stale`` is true when there are changes after the
    checkpoint and the checkpoint is older than ``stale_after``, unless the
    layout is superseded (stopped, and another layout ran since).
    ``last_ran`` is when the slot last ran (the report's time while its
    lease is live).
    """

    worker_id: int
    worker_count: int
    checkpoint_id: str
    has_checkpoint: bool
    since: Seq | None
    updated_at: str | None
    age: float | None
    checkpoint_host: str | None
    checkpoint_pid: int | None
    behind: bool | None
    pending_estimate: int | None
    pending_note: str | None
    lease: LeaseInfo | None
    stale: bool
    last_ran: float | None = None

    @property
    def state(self) -> WorkerState:
        if self.lease is None or self.lease.released_at is not None:
            return "stopped"
        if self.lease.holder_gone:
            return "holder gone"
        return "running" if self.lease.live else "lease expired"

    @property
    def pending_text(self) -> str:
        if not self.has_checkpoint:
            return "-"
        if self.pending_estimate is not None:
            return "0" if self.pending_estimate == 0 else f"~{self.pending_estimate}"
        if self.behind is True:
            return "unknown (>=1)"
        return "unknown"

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_id": self.worker_id,
            "worker_count": self.worker_count,
            "checkpoint_id": self.checkpoint_id,
            "has_checkpoint": self.has_checkpoint,
            "since": self.since,
            "updated_at": self.updated_at,
            "age_seconds": _round(self.age),
            "checkpoint_host": self.checkpoint_host,
            "checkpoint_pid": self.checkpoint_pid,
            "behind": self.behind,
            "pending_estimate": self.pending_estimate,
            "pending_note": self.pending_note,
            "lease": None if self.lease is None else self.lease.to_json(),
            "last_ran_at": None if self.last_ran is None else iso_time(self.last_ran),
            "state": self.state,
            "stale": self.stale,
        }


@dataclass(frozen=True, slots=True)
class LayoutStatus:
    """Every worker slot seen for one worker count, and the layout's state.

    ``run`` is set while at least one of its workers holds a live lease;
    ``current`` marks the newest running layout; ``superseded`` a stopped one
    that another layout has run after (its workers are never stale);
    ``retired`` a superseded one that has not run for ``retire_after``.
    """

    worker_count: int
    workers: tuple[WorkerStatus, ...]
    #: Worker ids of this layout with neither a checkpoint nor a lease.
    missing_workers: tuple[int, ...]
    run: LayoutRun | None = None
    last_ran: float | None = None
    current: bool = False
    superseded: bool = False
    retired: bool = False

    @property
    def running(self) -> bool:
        return self.run is not None

    @property
    def state(self) -> Literal["running", "stopped", "retired"]:
        if self.running:
            return "running"
        return "retired" if self.retired else "stopped"

    def describe(self, now: float) -> str:
        """The layout's state in words, for its title line."""
        if self.run is not None:
            since = (
                "running (start unknown)"
                if self.run.started_at is None
                else f"running since {iso_time(self.run.started_at)}"
            )
            hosts = f" on {', '.join(self.run.hosts)}" if self.run.hosts else ""
            if self.current:
                return f"current, {since}{hosts}"
            return f"{since}{hosts}; a newer layout is running"
        if self.last_ran is None:
            ran = "when it last ran is unknown"
        else:
            ran = f"last ran {iso_time(self.last_ran)} ({format_duration(now - self.last_ran)} ago)"
        if self.superseded and not self.retired:
            ran += "; another layout has run since, so it is not stale"
        return f"{self.state}, {ran}"

    def to_json(self) -> dict[str, Any]:
        started = None if self.run is None else self.run.started_at
        return {
            "worker_count": self.worker_count,
            "state": self.state,
            "running": self.running,
            "current": self.current,
            "superseded": self.superseded,
            "retired": self.retired,
            "started_at": None if started is None else iso_time(started),
            "last_ran_at": None if self.last_ran is None else iso_time(self.last_ran),
            "running_hosts": [] if self.run is None else list(self.run.hosts),
            "workers": [w.to_json() for w in self.workers],
            "missing_workers": list(self.missing_workers),
        }


@dataclass(frozen=True, slots=True)
class StatusReport:
    """What :func:`gather_status` found; :meth:`render` for people, :meth:`to_json` for tools."""

    couch_url: str
    database: str
    checkpoint_database: str
    checkpoint_database_exists: bool
    generated_at: float
    stale_after: float
    layouts: tuple[LayoutStatus, ...]
    retire_after: float = 604_800.0
    #: Messages that look settled but were never sent; ``None`` if not counted.
    looks_settled: LooksSettled | None = None
    #: Why they were not counted.
    looks_settled_note: str | None = None
    #: The deferred and scheduled messages; ``None`` if not counted ...
    deferred: DeferredSummary | None = None
    #: ... and why.
    deferred_note: str | None = None

    @property
    def workers(self) -> list[WorkerStatus]:
        return [w for layout in self.layouts for w in layout.workers]

    @property
    def stale_workers(self) -> list[WorkerStatus]:
        return [w for w in self.workers if w.stale]

    @property
    def any_stale(self) -> bool:
        return bool(self.stale_workers)

    @property
    def current_layout(self) -> LayoutStatus | None:
        return next((layout for layout in self.layouts if layout.current), None)

    @property
    def retired_layouts(self) -> list[LayoutStatus]:
        return [layout for layout in self.layouts if layout.retired]

    def to_json(self) -> dict[str, Any]:
        """Plain JSON values with stable keys (``since`` exactly as stored)."""
        return {
            "couch_url": self.couch_url,
            "database": self.database,
            "checkpoint_database": self.checkpoint_database,
            "checkpoint_database_exists": self.checkpoint_database_exists,
            "generated_at": iso_time(self.generated_at),
            "stale_after_seconds": self.stale_after,
            "retire_after_seconds": self.retire_after,
            "layouts": [layout.to_json() for layout in self.layouts],
            "stale_workers": [w.checkpoint_id for w in self.stale_workers],
            "current_layout": None if (c := self.current_layout) is None else c.worker_count,
            "retired_layouts": [layout.worker_count for layout in self.retired_layouts],
            "looks_settled": None if (ls := self.looks_settled) is None else ls.to_json(),
            "looks_settled_note": self.looks_settled_note,
            "deferred": None if (d := self.deferred) is None else d.to_json(),
            "deferred_note": self.deferred_note,
        }

    def _document_lines(self) -> list[str]:
        """What the documents themselves say: the deferred ones, and any that look
        settled but were never sent."""
        if self.deferred is None:
            lines = [f"Deferred messages: not counted ({self.deferred_note})."]
        else:
            lines = [f"Deferred messages: {self.deferred.describe()}."]
        if self.looks_settled is None:
            lines.append(f"Documents that look settled: not counted ({self.looks_settled_note}).")
        elif self.looks_settled.count:
            lines += [f"{self.looks_settled.describe()}.", f"  hint: {LooksSettled.FIX}."]
        return lines

    def render(self) -> str:
        lines = [
            f"notifier status: database {self.database!r} on {self.couch_url}, "
            f"checkpoints in {self.checkpoint_database!r}, at {iso_time(self.generated_at)}"
        ]
        if not self.checkpoint_database_exists:
            lines.append(
                f"The checkpoint database {self.checkpoint_database!r} does not exist: no "
                "worker has run yet (the first worker creates it). If workers are running, "
                "check that they use the same [couch] url and checkpoint_database."
            )
            return "\n".join([*lines, *self._document_lines()]) + "\n"
        if not self.layouts:
            lines.append(
                f"No checkpoint or lease of database {self.database!r} in "
                f"{self.checkpoint_database!r}: no worker has checkpointed yet."
            )
            return "\n".join([*lines, *self._document_lines()]) + "\n"
        header = ("WORKER", "SINCE", "CHECKPOINTED", "AGE", "PENDING (est.)", "STALE", "LEASE")
        shortened = False
        tables: list[list[tuple[str, ...]]] = []
        for layout in self.layouts:
            rows: list[tuple[str, ...]] = []
            for w in layout.workers:
                since, cut = _short_seq(w.since) if w.has_checkpoint else ("(none)", False)
                shortened = shortened or cut
                rows.append(
                    (
                        f"{w.worker_id} of {w.worker_count}",
                        since,
                        w.updated_at or "-",
                        "-" if w.age is None else format_duration(w.age),
                        w.pending_text,
                        "STALE" if w.stale else "no",
                        "none" if w.lease is None else w.lease.describe(),
                    )
                )
            tables.append(rows)
        # One set of column widths for every layout, so the tables line up.
        widths = _widths([header, *(row for rows in tables for row in rows)])
        for layout, rows in zip(self.layouts, tables, strict=True):
            count = layout.worker_count
            lines.append("")
            lines.append(
                f"layout: {count} worker{'s' if count != 1 else ''} "
                f"({self.database}.worker-N-of-{count}): {layout.describe(self.generated_at)}"
            )
            lines.extend("  " + _row(row, widths) for row in [header, *rows])
            if layout.missing_workers:
                ids = ", ".join(str(i) for i in layout.missing_workers)
                lines.append(
                    f"  no checkpoint and no lease for worker {ids} of {count}: "
                    "never started in this layout?"
                )
        stale = self.stale_workers
        lines.append("")
        if stale:
            lines.append(f"{len(stale)} stale: " + ", ".join(w.checkpoint_id for w in stale))
        else:
            lines.append("no stale worker")
        lines.extend(self._document_lines())
        retired = self.retired_layouts
        if retired:
            which = ", ".join(workers_text(layout.worker_count) for layout in retired)
            lines.append(
                f"retired layouts: {which}. No worker of a retired layout has run for "
                f"{format_duration(self.retire_after)} ([worker] retire_after) while another "
                "layout has run since: it is never stale, and notifier prune-checkpoints "
                "deletes its documents."
            )
        lines.append(
            "PENDING is an estimate: CouchDB's count of changes to any document after the "
            'checkpoint (all shards, including settled documents); "unknown" where the '
            "server does not report it (PouchDB Server)."
        )
        lines.append(
            f"STALE: there are changes after the checkpoint and it is older than "
            f"{format_duration(self.stale_after)}."
            + (" SINCE is shortened; --json shows it in full." if shortened else "")
        )
        return "\n".join(lines) + "\n"


async def gather_status(
    config: Config,
    *,
    now: float | None = None,
    stale_after: float = 300.0,
    retire_after: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> StatusReport:
    """Read every worker's checkpoint and lease for ``[couch] database``, of every layout.

    ``now`` (epoch seconds, default: the clock) is the time ages and lease
    expiries are measured against; ``retire_after`` defaults to ``[worker]
    retire_after``. Raises :class:`~notifier.errors.CouchError` when CouchDB
    cannot be read; a missing checkpoint database is a report, not an error.
    """
    c = config.couch
    at = time.time() if now is None else now
    retire = config.worker.retire_after if retire_after is None else retire_after
    async with CouchClient.from_config(c, transport=transport) as couch:
        docs = await read_slot_docs(
            couch, checkpoint_database=c.checkpoint_database, database=c.database
        )
        looks: LooksSettled | None = None
        looks_note: str | None = None
        try:
            looks = await count_looks_settled(couch, c.database)
        except CouchError as e:
            looks_note = short_reason(e)
        deferred: DeferredSummary | None = None
        deferred_note: str | None = None
        try:
            deferred = await summarise(couch, c.database, now=at)
        except CouchError as e:
            deferred_note = short_reason(e)
        if docs is None:
            return StatusReport(
                couch_url=couch.url,
                database=c.database,
                checkpoint_database=c.checkpoint_database,
                checkpoint_database_exists=False,
                generated_at=at,
                stale_after=stale_after,
                layouts=(),
                retire_after=retire,
                looks_settled=looks,
                looks_settled_note=looks_note,
                deferred=deferred,
                deferred_note=deferred_note,
            )
        checkpoints, leases = docs.checkpoints, docs.leases

        # One _changes request per distinct checkpoint.
        sinces: dict[str, Seq] = {}
        for checkpoint in checkpoints.values():
            if "since" in checkpoint:
                sinces.setdefault(_key(checkpoint["since"]), checkpoint["since"])
        limit = asyncio.Semaphore(8)

        async def probe(since: Seq) -> tuple[bool | None, int | None, str | None]:
            async with limit:
                return await _pending(couch, c.database, since)

        results = await asyncio.gather(*(probe(s) for s in sinces.values()))
        pending = dict(zip(sinces, results, strict=True))

    here = process.SCOPE
    states = layout_states(docs, now=at, retire_after=retire, here=here)
    prefix = f"{c.database}.worker-"
    workers: dict[int, list[WorkerStatus]] = {}
    for slot in sorted(set(checkpoints) | set(leases)):
        count, worker_id = slot
        doc = checkpoints.get(slot)
        lease_doc = leases.get(slot)
        has_checkpoint = doc is not None and "since" in doc
        since = doc["since"] if doc is not None and has_checkpoint else None
        updated_at = _str(doc.get("updated_at")) if doc is not None else None
        age = _age(updated_at, at)
        behind, estimate, note = (
            pending[_key(since)] if has_checkpoint else (None, None, "no checkpoint yet")
        )
        if doc is not None and not has_checkpoint:
            note = "the checkpoint document has no 'since' field"
        # A layout replaced by a newer one (a reshard) is expected to fall
        # behind: it is not stale, or every reshard would raise an alert.
        stale = bool(behind) and (age is None or age > stale_after) and not states[count].superseded
        lease = None if lease_doc is None else _lease(lease_doc, at, here)
        workers.setdefault(count, []).append(
            WorkerStatus(
                worker_id=worker_id,
                worker_count=count,
                checkpoint_id=f"{prefix}{worker_id}-of-{count}",
                has_checkpoint=has_checkpoint,
                since=since,
                updated_at=updated_at,
                age=age,
                checkpoint_host=_str(doc.get("host")) if doc is not None else None,
                checkpoint_pid=_int(doc.get("pid")) if doc is not None else None,
                behind=behind,
                pending_estimate=estimate,
                pending_note=note,
                lease=lease,
                stale=stale,
                last_ran=slot_last_ran(
                    doc, lease_doc, now=at, live=lease is not None and lease.live
                ),
            )
        )
    layouts = tuple(
        LayoutStatus(
            worker_count=count,
            workers=tuple(found),
            missing_workers=tuple(sorted(set(range(count)) - {w.worker_id for w in found})),
            run=states[count].run,
            last_ran=states[count].last_ran,
            current=states[count].current,
            superseded=states[count].superseded,
            retired=states[count].retired,
        )
        for count, found in sorted(workers.items())
    )
    return StatusReport(
        couch_url=couch.url,
        database=c.database,
        checkpoint_database=c.checkpoint_database,
        checkpoint_database_exists=True,
        generated_at=at,
        stale_after=stale_after,
        layouts=layouts,
        retire_after=retire,
        looks_settled=looks,
        looks_settled_note=looks_note,
        deferred=deferred,
        deferred_note=deferred_note,
    )


async def _pending(
    couch: CouchClient, database: str, since: Seq
) -> tuple[bool | None, int | None, str | None]:
    """(behind, pending estimate, note) for a checkpoint at ``since``.

    One unfiltered ``_changes?since=…&limit=1``: the rows it returns are
    changes after ``since``, and CouchDB 2+ adds ``pending``, the number of
    changes after its ``last_seq``. (``limit=1`` rather than ``0``: CouchDB
    answers ``limit=0`` with one row anyway.)
    """
    try:
        answer = await couch.request(
            "GET",
            f"/{_q(database)}/_changes",
            params={"since": seq_param(since), "limit": "1"},
        )
    except CouchError as e:
        return None, None, f"not estimated: {short_reason(e)}"
    rows = answer.get("results") if isinstance(answer, dict) else None
    if not isinstance(rows, list):
        return None, None, "not estimated: the _changes answer has no results"
    behind = bool(rows)
    remaining = answer.get("pending")
    if isinstance(remaining, int) and not isinstance(remaining, bool):
        return behind, len(rows) + remaining, None
    if not behind:
        return False, 0, None
    return True, None, "the server does not report pending changes"


def _lease(doc: Mapping[str, Any], now: float, here: str | None) -> LeaseInfo:
    expires = parse_time(doc.get("expires_at"))
    host, pid = _str(doc.get("host")), _int(doc.get("pid"))
    expires_in = None if expires is None else expires - now
    released_at = parse_time(doc.get("released_at")) if is_released(doc) else None
    # An expired or released lease is reported as such; "gone" is for live-looking ones.
    gone = lease_state(doc, now=now, here=here) == "gone"
    return LeaseInfo(
        host=host,
        pid=pid,
        expires_at=expires,
        renewed_at=_str(doc.get("renewed_at")),
        expires_in=expires_in,
        holder_gone=gone,
        started_at=parse_time(doc.get("started_at")),
        released_at=released_at,
        released_ago=None if released_at is None else now - released_at,
    )


def _key(seq: Seq) -> str:
    return json.dumps(seq, sort_keys=True)


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _age(updated_at: str | None, now: float) -> float | None:
    when = parse_time(updated_at)
    return None if when is None else now - when


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


_SEQ_WIDTH = 24


def _short_seq(seq: Seq | None) -> tuple[str, bool]:
    text = seq_param(seq)
    if len(text) <= _SEQ_WIDTH:
        return text, False
    return text[: _SEQ_WIDTH - 1] + "…", True


def _widths(rows: Sequence[Sequence[str]]) -> list[int]:
    return [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]


def _row(cells: Sequence[str], widths: Sequence[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _q(name: str) -> str:
    return quote(name, safe="")
