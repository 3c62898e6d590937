"""In-flight tracking: which feed position is safe to checkpoint.

Rows arrive from the ``_changes`` feed in order but finish in any order (sends
run in parallel, some are retried). The checkpoint may only name the seq of a
row when every row before it has finished too.

Seqs are opaque (``"10-g1AA…"`` sorts before ``"9-g1AA…"`` in CouchDB 2+), so
they are never compared. Each row instead gets a local *arrival number*, the
order it came off the feed, and only those numbers are ordered; this is what
CouchDB's own replicator does with its ``{Ts, Seq}`` pairs.

Memory is bounded by the number of unfinished rows, not by the backlog: only
the seqs the checkpoint could still need are kept (the one just before each
unfinished arrival, and the newest one).
"""

from __future__ import annotations

from typing import TypeAlias

from sortedcontainers import SortedSet

#: A CouchDB update sequence: an int on PouchDB Server, an opaque string on
#: CouchDB 2+ (a list on old BigCouch). A JSON value that is never inspected.
Seq: TypeAlias = object


class InFlightTracker:
    """Arrival numbers of unfinished rows, and the checkpoint they allow.

    >>> t = InFlightTracker()
    >>> a, b, c = t.add("10-x"), t.add("9-x"), t.add("11-x")
    >>> t.complete(b); t.checkpoint is None   # "10-x" is not done yet
    True
    >>> t.complete(a); t.checkpoint          # a and b are done, c is not
    '9-x'
    >>> t.complete(c); t.checkpoint
    '11-x'

    ``add`` is O(1) amortised; ``complete`` is O(log n) in the number of
    unfinished rows; ``checkpoint`` is O(1).
    """

    def __init__(self) -> None:
        self._last_arrival = 0  # arrivals are numbered from 1
        self._pending: SortedSet = SortedSet()
        # Seqs still needed to answer `checkpoint`, keyed by arrival number.
        self._seqs: dict[int, Seq] = {}

    def __repr__(self) -> str:
        return (
            f"<InFlightTracker arrived={self._last_arrival} pending={len(self._pending)} "
            f"completed={self._last_arrival - len(self._pending)}>"
        )

    def __len__(self) -> int:
        """Number of arrivals that have not completed."""
        return len(self._pending)

    @property
    def arrived(self) -> int:
        """Number of rows added so far."""
        return self._last_arrival

    def add(self, seq: Seq) -> int:
        """Register a row that has just come off the feed; return its arrival number."""
        # The previous newest seq stays: it is the predecessor of this new,
        # unfinished arrival, so the checkpoint may have to name it.
        self._last_arrival = arrival = self._last_arrival + 1
        self._pending.add(arrival)
        self._seqs[arrival] = seq
        return arrival

    def add_done(self, seq: Seq) -> int:
        """Register a row that needs no work (another shard, a design doc, a tombstone)."""
        arrival = self.add(seq)
        self.complete(arrival)
        return arrival

    def complete(self, arrival: int) -> None:
        """Mark an arrival as finished. Completing twice or an unknown arrival is a bug."""
        if arrival not in self._pending:
            raise ValueError(f"arrival {arrival} is not in flight")
        self._pending.remove(arrival)
        # Its own seq is needed only as the newest, or as the predecessor of
        # the next arrival if that one is still unfinished.
        if arrival != self._last_arrival and arrival + 1 not in self._pending:
            self._forget(arrival)
        # Its predecessor's seq was kept for it; now only for other reasons.
        before = arrival - 1
        if before >= 1 and before not in self._pending:
            self._forget(before)

    @property
    def checkpoint(self) -> Seq | None:
        """Seq of the highest arrival such that it and all before it are done.

        ``None`` when no arrival is done yet past the starting point.
        """
        if not self._pending:
            return self._seqs.get(self._last_arrival)
        lowest = self._pending[0]
        return self._seqs.get(lowest - 1)

    @property
    def checkpoint_arrival(self) -> int:
        """Arrival number that :attr:`checkpoint` names (0 before any)."""
        return self._pending[0] - 1 if self._pending else self._last_arrival

    def _forget(self, arrival: int) -> None:
        self._seqs.pop(arrival, None)

    def check(self) -> None:
        """Assert the internal invariants; for tests (sortedcontainers' ``_check`` habit)."""
        pending = list(self._pending)
        assert pending == sorted(set(pending)), "pending arrivals are unique and ordered"
        assert all(1 <= a <= self._last_arrival for a in pending), "pending within range"
        needed = set(pending)
        needed.update(a - 1 for a in pending if a > 1)
        if self._last_arrival:
            needed.add(self._last_arrival)
        assert set(self._seqs) == needed, (
            f"kept seqs {sorted(self._seqs)} != needed {sorted(needed)}"
        )
        assert len(self._seqs) <= 2 * len(pending) + 1, "memory bounded by unfinished rows"
