"""What the parts of the fake CouchDB share: one lock, the databases, and a few hooks.

:class:`~notifier.testing.fake_couch.FakeCouch` is assembled from mixins,
one per concern (documents, the changes feed); each reads and writes the
state declared here, always under ``_lock``, and reaches the others only
through the hooks below.
"""

from __future__ import annotations

import random
import threading
from typing import TYPE_CHECKING

from notifier.testing.fake_couch.wire import FakeCouchError

if TYPE_CHECKING:
    from notifier.testing.fake_couch.changes import _Waiter
    from notifier.testing.fake_couch.documents import _Database
    from notifier.testing.fake_couch.faults import FaultEvent, _FeedFault

_NO_DB_REASON = "Database does not exist."


class CouchState:
    """The state of one fake server; :class:`FakeCouch` sets every attribute in ``__init__``."""

    replay_window: int
    selector_query_fallback: bool
    max_timeout: float
    events: list[FaultEvent]

    _lock: threading.RLock
    _random: random.Random
    #: Mixed into revs and seqs, so that two fakes never issue the same ones.
    _salt: str
    _dbs: dict[str, _Database]
    #: Counts databases ever created: a recreated database is a new incarnation.
    _incarnations: int
    _writes: int
    #: seq string -> (database incarnation, position): every seq ever issued.
    _seq_book: dict[str, tuple[int, int]]
    #: Bumped by every write; a feed waits for it to move.
    _generation: int
    #: Bumped when open connections must be dropped.
    _drop_generation: int
    _waiters: list[_Waiter]
    _feed_faults: list[_FeedFault]
    _bulk_shuffles: int | None
    _open_feeds: int

    def _db(self, name: str) -> _Database:
        """The database called ``name``; call it holding ``_lock``."""
        db = self._dbs.get(name)
        if db is None:
            raise FakeCouchError(404, "not_found", _NO_DB_REASON)
        return db

    def _db_checked(self, name: str) -> _Database:
        with self._lock:
            return self._db(name)

    def _notify(self, database: str | None) -> None:
        """Wake the feeds waiting on ``database`` (None: all): after every write."""
        raise NotImplementedError

    def _seq(self, db: _Database, n: int) -> str:
        """The opaque seq string of position ``n`` of ``db``."""
        raise NotImplementedError

    def _event(self, kind: str, method: str, path: str, detail: str) -> None:
        """Record a fault that fired; call it holding ``_lock``."""
        raise NotImplementedError
