"""Jittered exponential backoff.

Retries of CouchDB requests, of the feed connection and of transient SMTP
failures all wait a jittered delay (uniform between half the base and an
exponentially growing cap), so that many workers restarting together do not
hit a recovering server in lock-step.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for successive attempts: uniform in ``[base/2, min(cap, base * 2**n)]``.

    The floor of half the base keeps a tight loop from ever forming, even with
    an unlucky draw.

    >>> b = Backoff(base=1.0, cap=8.0, rng=random.Random(1))
    >>> delays = [b.next_delay() for _ in range(6)]
    >>> all(0.5 <= d <= 8.0 for d in delays)
    True
    >>> b.attempts
    6
    >>> b.reset(); b.attempts
    0
    """

    base: float = 0.5
    cap: float = 30.0
    rng: random.Random = field(default_factory=random.Random)
    attempts: int = 0

    def next_delay(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, 32))
        self.attempts += 1
        return self.rng.uniform(min(self.base / 2, ceiling), ceiling)

    def reset(self) -> None:
        """Forget past failures, after a success."""
        self.attempts = 0
