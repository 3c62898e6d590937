"""When a message is tried again, and when it is given up: the retry schedule.

Pure: no I/O, no clocks of its own (every ``now`` is passed in, in epoch
seconds, because due times are stored in CouchDB and read by any worker on
any host).

A temporary failure defers a message as a mail queue does: the next attempt
is due after a delay that doubles with each counted attempt, from ``first``
(about a minute) up to ``cap`` (hours), with jitter so that a backlog that
failed together does not come due together. A message is given up (dead
lettered) only once ``max_age`` has passed since its first failure, however
many attempts that took.

Scheduled sends use the same mechanism: a document's ``sendAt`` is parsed
here (:func:`parse_send_at`), and the worker defers the message until then.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime

# RFC 3339 date-time with a mandatory offset (Z or ±hh:mm); seconds may
# carry a fraction. A time without an offset is ambiguous, so it is refused.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
#: Epoch seconds of 9999-12-31T23:59:59Z: the last time RFC 3339 and
#: Python's datetime can both write. No date a person meant lies beyond it.
_MAX_EPOCH = 253_402_300_799


@dataclass(frozen=True, slots=True)
class RetrySchedule:
    """Delays between attempts, and the age after which a message is given up.

    ``delay(n)`` is the wait after the ``n``-th counted attempt failed: about
    ``first * 2**(n-1)``, never more than ``cap``, spread by ``±jitter``
    (a fraction).

    >>> s = RetrySchedule(first=60, cap=3600, max_age=86400, jitter=0.0)
    >>> [s.delay(n, random.Random(0)) for n in (1, 2, 3, 7, 8, 30)]
    [60.0, 120.0, 240.0, 3600.0, 3600.0, 3600.0]
    >>> s.expired(since=1000.0, now=1000.0 + 86400)
    True
    >>> s.expired(since=1000.0, now=1000.0 + 86399)
    False
    """

    first: float = 60.0
    cap: float = 14_400.0
    max_age: float = 432_000.0
    jitter: float = 0.2
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.first <= self.cap:
            raise ValueError(f"need 0 < first <= cap, got first={self.first} cap={self.cap}")
        if self.max_age <= 0:
            raise ValueError(f"max_age must be positive, got {self.max_age}")
        if not 0 <= self.jitter < 1:
            raise ValueError(f"jitter must be in [0, 1), got {self.jitter}")

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``attempts``-th counted attempt failed (at least 1)."""
        base = min(self.cap, self.first * 2 ** min(max(attempts, 1) - 1, 64))
        if not self.jitter:
            return float(base)
        spread: float = (rng or self.rng).uniform(-self.jitter, self.jitter)
        # Jitter may push past the cap a little, never below `first`'s half.
        return float(max(self.first / 2, base * (1 + spread)))

    def expired(self, *, since: float, now: float) -> bool:
        """Whether a message failing since ``since`` has reached ``max_age``."""
        return now - since >= self.max_age


class BadSendAt(ValueError):
    """A ``sendAt`` value that names no time; ``str()`` says why."""


def parse_send_at(value: object) -> float | None:
    """``sendAt`` as epoch seconds: RFC 3339 with an offset, or epoch milliseconds.

    ``None`` (the field is absent or null) means "now". Anything else that is
    not one of the two forms raises :class:`BadSendAt`, whose text names the
    problem; the worker dead-letters such a message rather than guess.

    >>> parse_send_at("2026-12-03T10:00:00+01:00")
    1796288400.0
    >>> parse_send_at(1796288400000)
    1796288400.0
    >>> parse_send_at("tomorrow")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    notifier.schedule.BadSendAt: 'sendAt' is not RFC 3339 with an offset ... 'tomorrow'
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadSendAt(f"'sendAt' is a boolean ({value!r}), expected a time")
    if isinstance(value, int | float):
        if not 0 <= value <= _MAX_EPOCH * 1000 or value != value:
            raise BadSendAt(f"'sendAt' is out of range for epoch milliseconds: {value!r}")
        return float(value) / 1000
    if isinstance(value, str):
        text = value.strip()
        if _RFC3339.fullmatch(text):
            try:
                parsed = datetime.fromisoformat(text.replace("z", "Z").replace("t", "T"))
                epoch = parsed.astimezone(UTC).timestamp()
            except (ValueError, OverflowError) as e:
                # Also a valid text whose offset takes it outside years 1-9999.
                raise BadSendAt(
                    f"'sendAt' is not a valid date and time: {value[:60]!r} ({e})"
                ) from None
            if epoch > _MAX_EPOCH:
                raise BadSendAt(f"'sendAt' is after the year 9999: {value[:60]!r}")
            return epoch  # a time before 1970 is in the past: now
        raise BadSendAt(
            "'sendAt' is not RFC 3339 with an offset (as 2026-12-03T09:00:00Z) nor epoch "
            f"milliseconds: {value[:60]!r}"
        )
    raise BadSendAt(f"'sendAt' is {type(value).__name__}, expected a string or a number")


def iso(epoch: float) -> str:
    """An epoch time as UTC RFC 3339 with milliseconds, as stored on documents.

    Total: a time outside 1970 to 9999 (a hand-edited document) is written at
    the nearest end, never raised about.

    >>> iso(1796288400.0), iso(-1e16)
    ('2026-12-03T09:00:00.000+00:00', '1970-01-01T00:00:00.000+00:00')
    """
    clamped = min(max(epoch, 0.0), float(_MAX_EPOCH))
    return datetime.fromtimestamp(clamped, tz=UTC).isoformat(timespec="milliseconds")


def span(seconds: float) -> str:
    """A duration in words for logs and dead-letter reasons.

    >>> span(45), span(600), span(5400), span(432000)
    ('45s', '10m', '1h30m', '5d')
    """
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m:02d}m" if m else f"{h}h"
    d, h = divmod(s // 3600, 24)
    return f"{d}d{h}h" if h else f"{d}d"
