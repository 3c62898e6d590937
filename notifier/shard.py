"""Stable sharding of documents across workers.

A document belongs to worker ``stable_hash(doc_id) % worker_count``. The hash
must be the same in every process, on every machine and in every Python
version, because workers on different hosts must agree on who owns a doc.
Python's ``hash()`` is salted per process, so it is never used here.

The hash is the first 8 bytes of BLAKE2b (digest size 8) of the UTF-8 doc id,
read as a big-endian unsigned integer. Any tool can recompute it; in a shell::

    python3 -c 'import hashlib,sys; print(int.from_bytes(hashlib.blake2b(
        sys.argv[1].encode(), digest_size=8).digest(), "big") % 3)' DOC_ID
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def stable_hash(doc_id: str) -> int:
    """A 64-bit hash of ``doc_id`` that never changes between processes.

    >>> stable_hash("a") == stable_hash("a")
    True
    >>> 0 <= stable_hash("message-1") < 2**64
    True
    """
    # surrogatepass: a JSON id may hold a lone surrogate; it must still hash.
    digest = hashlib.blake2b(doc_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@dataclass(frozen=True, slots=True)
class Shard:
    """One worker's slice of the documents: ``worker_id`` of ``worker_count``.

    >>> Shard(worker_id=0, worker_count=1).owns("anything")
    True
    >>> Shard(worker_id=2, worker_count=2)
    Traceback (most recent call last):
    ...
    ValueError: worker_id 2 is out of range for worker_count 2 (use 0..1)
    """

    worker_id: int
    worker_count: int

    def __post_init__(self) -> None:
        if self.worker_count < 1:
            raise ValueError(f"worker_count must be at least 1, got {self.worker_count}")
        if not 0 <= self.worker_id < self.worker_count:
            raise ValueError(
                f"worker_id {self.worker_id} is out of range for worker_count "
                f"{self.worker_count} (use 0..{self.worker_count - 1})"
            )

    def owns(self, doc_id: str) -> bool:
        """Whether this worker is the one that handles ``doc_id``."""
        return stable_hash(doc_id) % self.worker_count == self.worker_id

    def __str__(self) -> str:
        return f"{self.worker_id}/{self.worker_count}"
