"""``notifier prune-checkpoints``: delete the documents of retired layouts.

After a reshard, the old layout's checkpoint and lease documents stay in the
checkpoint database. Once the layout is *retired* (none of its workers has
run for ``[worker] retire_after`` while another layout has run since, as
``notifier status`` shows it; see :func:`notifier.layout.layout_states`),
:func:`prune_checkpoints` deletes them. It never touches a layout with a live
lease, nor one that is not retired, and says why for each.

Each document is deleted with the revision that was read: if a worker of
the layout writes its lease before the delete lands, the delete is a
conflict and the rest of that layout is kept; if the delete lands first, the
worker takes a fresh lease and may lose its checkpoint. Either way nothing
is lost: a worker without a checkpoint reads the feed from the beginning,
and marked messages are filtered out on the server.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Literal

import httpx

from notifier import process
from notifier.config import Config
from notifier.couch import CouchClient, doc_path
from notifier.errors import CouchFatalError, DocumentConflict
from notifier.layout import (
    LayoutState,
    SlotDocs,
    format_duration,
    iso_time,
    layout_states,
    read_slot_docs,
    workers_text,
)

__all__ = ["LayoutPrune", "PruneReport", "prune_checkpoints"]

PruneAction = Literal["deleted", "would delete", "kept"]

RESTART_NOTE = (
    "A worker of a deleted layout that is started again starts from the beginning of the "
    "feed; the marks on sent messages keep it from sending any of them again."
)


@dataclass(frozen=True, slots=True)
class LayoutPrune:
    """What was done with one layout's documents, and why."""

    worker_count: int
    action: PruneAction
    reason: str
    #: Every checkpoint and lease document of the layout.
    documents: tuple[str, ...]
    #: Those deleted (all of them, unless a worker started while pruning).
    deleted: tuple[str, ...]
    last_ran: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "worker_count": self.worker_count,
            "action": self.action,
            "reason": self.reason,
            "last_ran_at": None if self.last_ran is None else iso_time(self.last_ran),
            "documents": list(self.documents),
            "deleted": list(self.deleted),
        }


@dataclass(frozen=True, slots=True)
class PruneReport:
    """What :func:`prune_checkpoints` did (or, with ``dry_run``, would do)."""

    couch_url: str
    database: str
    checkpoint_database: str
    checkpoint_database_exists: bool
    generated_at: float
    retire_after: float
    dry_run: bool
    layouts: tuple[LayoutPrune, ...]

    @property
    def deleted(self) -> list[str]:
        return [doc_id for layout in self.layouts for doc_id in layout.deleted]

    @property
    def would_delete(self) -> list[str]:
        return [
            doc_id
            for layout in self.layouts
            if layout.action == "would delete"
            for doc_id in layout.documents
        ]

    def to_json(self) -> dict[str, Any]:
        return {
            "couch_url": self.couch_url,
            "database": self.database,
            "checkpoint_database": self.checkpoint_database,
            "checkpoint_database_exists": self.checkpoint_database_exists,
            "generated_at": iso_time(self.generated_at),
            "retire_after_seconds": self.retire_after,
            "dry_run": self.dry_run,
            "layouts": [layout.to_json() for layout in self.layouts],
            "deleted": self.deleted,
            "would_delete": self.would_delete,
        }

    def render(self) -> str:
        lines = [
            f"notifier prune-checkpoints: database {self.database!r} on {self.couch_url}, "
            f"checkpoints in {self.checkpoint_database!r}, at {iso_time(self.generated_at)}"
            + (" (dry run: nothing is deleted)" if self.dry_run else "")
        ]
        if not self.checkpoint_database_exists:
            lines.append(
                f"nothing to prune: the checkpoint database {self.checkpoint_database!r} "
                "does not exist"
            )
            return "\n".join(lines) + "\n"
        for layout in self.layouts:
            lines.append(
                f"layout: {workers_text(layout.worker_count)} "
                f"({self.database}.worker-N-of-{layout.worker_count}): "
                f"{layout.action}, {layout.reason}"
            )
            shown = layout.deleted if layout.action == "kept" else layout.documents
            lines.extend(f"  {doc_id}" for doc_id in shown)
        done = [layout for layout in self.layouts if layout.action != "kept"]
        count = sum(len(layout.documents) for layout in done)
        which = ", ".join(workers_text(layout.worker_count) for layout in done)
        if not done:
            after = format_duration(self.retire_after)
            lines.append(
                f"nothing to prune: no layout is retired (none of its workers has run for {after}, "
                "[worker] retire_after, while another layout has run since)"
            )
        elif self.dry_run:
            lines.append(
                f"would delete {count} document{'s' if count != 1 else ''} of "
                f"{len(done)} retired layout{'s' if len(done) != 1 else ''} ({which}); "
                "nothing was deleted (--dry-run)"
            )
        else:
            deleted = len(self.deleted)
            lines.append(
                f"deleted {deleted} document{'s' if deleted != 1 else ''} of "
                f"{len(done)} retired layout{'s' if len(done) != 1 else ''} ({which})"
            )
        partial = [layout for layout in self.layouts if layout.action == "kept" and layout.deleted]
        if done or partial:
            lines.append(RESTART_NOTE)
        return "\n".join(lines) + "\n"


async def prune_checkpoints(
    config: Config,
    *,
    dry_run: bool = False,
    now: float | None = None,
    retire_after: float | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> PruneReport:
    """Delete the checkpoint and lease documents of every retired layout of ``[couch] database``.

    ``now`` (default: the clock) and ``retire_after`` (default: ``[worker]
    retire_after``) decide which layouts are retired. Raises
    :class:`~notifier.errors.CouchError` when CouchDB cannot be read or a
    delete fails for another reason than a conflict or a missing document.
    """
    c = config.couch
    at = time.time() if now is None else now
    retire = config.worker.retire_after if retire_after is None else retire_after
    async with CouchClient.from_config(c, transport=transport) as couch:
        docs = await read_slot_docs(
            couch, checkpoint_database=c.checkpoint_database, database=c.database
        )
        layouts: list[LayoutPrune] = []
        if docs is not None:
            states = layout_states(docs, now=at, retire_after=retire, here=process.SCOPE)
            for count in docs.worker_counts:
                layouts.append(
                    await _prune_layout(
                        couch,
                        c.checkpoint_database,
                        docs,
                        states[count],
                        now=at,
                        retire_after=retire,
                        dry_run=dry_run,
                    )
                )
    return PruneReport(
        couch_url=couch.url,
        database=c.database,
        checkpoint_database=c.checkpoint_database,
        checkpoint_database_exists=docs is not None,
        generated_at=at,
        retire_after=retire,
        dry_run=dry_run,
        layouts=tuple(layouts),
    )


async def _prune_layout(
    couch: CouchClient,
    checkpoint_database: str,
    docs: SlotDocs,
    state: LayoutState,
    *,
    now: float,
    retire_after: float,
    dry_run: bool,
) -> LayoutPrune:
    slots = docs.slots(state.worker_count)
    # Leases first: a worker that starts now writes its lease before it reads
    # its checkpoint, so a conflict on a lease stops before any checkpoint goes.
    targets = [docs.leases[s] for s in slots if s in docs.leases]
    targets += [docs.checkpoints[s] for s in slots if s in docs.checkpoints]
    ids = tuple(str(doc["_id"]) for doc in targets)

    def result(action: PruneAction, reason: str, deleted: tuple[str, ...] = ()) -> LayoutPrune:
        return LayoutPrune(
            worker_count=state.worker_count,
            action=action,
            reason=reason,
            documents=ids,
            deleted=deleted,
            last_ran=state.last_ran,
        )

    if state.run is not None:
        hosts = f" on {', '.join(state.run.hosts)}" if state.run.hosts else ""
        current = "the current layout, " if state.current else ""
        return result(
            "kept", f"{current}running{hosts}: a layout with a live lease is never pruned"
        )
    if not state.retired:
        return result("kept", _not_retired(state, now=now, retire_after=retire_after))
    ran = _ran(state, now)
    if dry_run:
        return result("would delete", f"retired: {ran}")
    deleted: list[str] = []
    for doc in targets:
        doc_id = str(doc["_id"])
        try:
            await couch.request(
                "DELETE",
                doc_path(checkpoint_database, doc_id),
                params={"rev": str(doc.get("_rev"))},
            )
        except DocumentConflict:
            return result(
                "kept",
                f"{doc_id} changed while pruning (a worker of this layout started?); "
                "the rest of the layout was kept: run notifier status",
                tuple(deleted),
            )
        except CouchFatalError as e:
            if e.status != 404 or e.reason not in ("missing", "deleted"):
                raise
            # Deleted meanwhile (another prune): gone is what was wanted.
        deleted.append(doc_id)
    return result("deleted", f"retired: {ran}", tuple(deleted))


def _not_retired(state: LayoutState, *, now: float, retire_after: float) -> str:
    if state.last_ran is None:
        return "not retired: no document says when it last ran"
    if now - state.last_ran < retire_after:
        return (
            f"not retired: {_ran(state, now)}; a layout is retired after "
            f"{format_duration(retire_after)} without a run ([worker] retire_after)"
        )
    return f"not retired: {_ran(state, now)}, and no other layout has run since"


def _ran(state: LayoutState, now: float) -> str:
    assert state.last_ran is not None
    return f"last ran {iso_time(state.last_ran)} ({format_duration(now - state.last_ran)} ago)"
