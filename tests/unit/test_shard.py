"""Stable sharding: the same answer in every process, and an even spread."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import pytest

from notifier.shard import Shard, stable_hash


def test_hash_is_the_same_in_a_fresh_interpreter_with_another_hash_seed() -> None:
    ids = ["message-1", "ünïcödé", "a" * 300, ""]
    code = (
        "import sys; from notifier.shard import stable_hash; "
        "print([stable_hash(i) for i in sys.argv[1:]])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *ids],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PYTHONPATH": ":".join(sys.path)},
    ).stdout
    assert out.strip() == str([stable_hash(i) for i in ids])


def test_hash_is_blake2b_as_documented() -> None:
    import hashlib

    digest = hashlib.blake2b(b"doc-42", digest_size=8).digest()
    assert stable_hash("doc-42") == int.from_bytes(digest, "big")


@pytest.mark.parametrize("count", [1, 2, 3, 7])
def test_every_doc_has_exactly_one_owner(count: int) -> None:
    shards = [Shard(worker_id=i, worker_count=count) for i in range(count)]
    for n in range(500):
        owners = [s for s in shards if s.owns(f"doc-{n}")]
        assert len(owners) == 1


def test_spread_is_even_enough() -> None:
    counts = Counter(stable_hash(f"msg-{n}") % 4 for n in range(40_000))
    assert all(9_000 < c < 11_000 for c in counts.values()), counts


@pytest.mark.parametrize(("worker_id", "count"), [(2, 2), (-1, 2), (0, 0)])
def test_out_of_range_layouts_are_refused_with_the_numbers(worker_id: int, count: int) -> None:
    with pytest.raises(ValueError, match=str(count)):
        Shard(worker_id=worker_id, worker_count=count)
