"""Where each worker remembers how far it got: one document per worker and layout.

The checkpoint lives in CouchDB (by default in the ``workersequences``
database), so workers on any machine can be restarted, moved or inspected.
Its id names the source database and the layout, for example
``messages.worker-0-of-2``, so that changing the worker count starts a new set
of checkpoints instead of misreading the old ones. Its ``since`` field holds
the seq exactly as the feed gave it: an integer or an opaque string.

Reading is strict: a missing document (404) means "start from the
beginning"; any other failure stops the worker, because starting from 0 by
mistake would replay the whole history and starting late would lose mail.
"""

from __future__ import annotations

import logging
import os
import socket
from datetime import UTC, datetime
from typing import Any

from notifier.couch import CouchClient, Doc, is_missing_database
from notifier.errors import CouchFatalError, CouchTransientError, DocumentConflict
from notifier.shard import Shard
from notifier.tracker import Seq

log = logging.getLogger(__name__)


def checkpoint_id(database: str, shard: Shard) -> str:
    """The checkpoint document id for one worker of one layout.

    >>> checkpoint_id("messages", Shard(worker_id=1, worker_count=3))
    'messages.worker-1-of-3'
    """
    return f"{database}.worker-{shard.worker_id}-of-{shard.worker_count}"


class CheckpointStore:
    """Reads and writes one worker's checkpoint document."""

    def __init__(
        self, couch: CouchClient, *, database: str, source_database: str, shard: Shard
    ) -> None:
        self._couch = couch
        self._database = database
        self._source = source_database
        self._shard = shard
        self.doc_id = checkpoint_id(source_database, shard)
        self._rev: str | None = None
        self.saved: Seq | None = None
        self.writes = 0

    def __repr__(self) -> str:
        return f"<CheckpointStore {self._database}/{self.doc_id} writes={self.writes}>"

    async def load(self) -> Seq | None:
        """The saved seq, or ``None`` if this worker has never checkpointed.

        Creates the checkpoint database when it is missing. Raises
        CouchError for anything else; the caller must not start from 0 then.
        """
        try:
            doc = await self._couch.get_doc(self._database, self.doc_id)
        except CouchFatalError as e:
            if not is_missing_database(e):
                raise
            log.info("creating checkpoint database %r", self._database)
            await self._couch.create_database(self._database)
            doc = None
        if doc is None:
            return None
        if "since" not in doc:
            raise CouchFatalError(
                f"checkpoint {self._database}/{self.doc_id} has no 'since' field; "
                "fix or delete the document"
            )
        self._rev = doc["_rev"]
        self.saved = doc["since"]
        return self.saved

    async def save(self, seq: Seq) -> None:
        """Write ``seq`` as the checkpoint; a lost race for the document is retried."""
        for _ in range(5):
            doc: dict[str, Any] = {
                "_id": self.doc_id,
                "since": seq,
                "database": self._source,
                "worker_id": self._shard.worker_id,
                "worker_count": self._shard.worker_count,
                "updated_at": datetime.now(tz=UTC).isoformat(timespec="seconds"),
                "host": socket.gethostname(),
                "pid": os.getpid(),
            }
            if self._rev is not None:
                doc["_rev"] = self._rev
            try:
                self._rev = await self._couch.put_doc(self._database, doc)
            except DocumentConflict:
                # Someone else wrote it (an operator, or a previous run whose
                # write we never saw answered): take its rev and write again.
                current: Doc | None = await self._couch.get_doc(self._database, self.doc_id)
                self._rev = current["_rev"] if current else None
                continue
            self.saved = seq
            self.writes += 1
            return
        raise CouchTransientError(
            f"checkpoint {self.doc_id}: kept losing the write race; giving up"
        )
