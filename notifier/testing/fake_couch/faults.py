"""Fault switches' bookkeeping: what a rule matches, and the record of what fired."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class FaultEvent:
    """One fault that fired (or a fault switch that was thrown).

    ``kind`` is one of: ``status`` (an injected error status), ``latency``,
    ``cut`` (a feed dropped after some rows), ``stall``, ``refusing`` /
    ``accepting`` (the connection switch), ``refused`` (an in-process request
    refused while the switch is on), ``dropped`` (open connections dropped),
    ``replay`` (a feed started before the requested ``since``) and ``rewind``
    (a ``since`` from another database or an earlier incarnation of this one,
    restarted from 0 as CouchDB does).
    """

    kind: str
    method: str
    path: str
    detail: str
    at: float


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One request the fake answered (or was asked to answer)."""

    method: str
    path: str
    query: str
    status: int


@dataclass(slots=True)
class _RequestRule:
    """Matches requests by method and path; fires ``remaining`` times (None: forever)."""

    path: re.Pattern[str] | None
    method: str | None
    remaining: int | None
    status: int = 0
    delay: float = 0.0

    def take(self, method: str, path: str) -> bool:
        if self.remaining is not None and self.remaining <= 0:
            return False
        if self.method is not None and self.method != method:
            return False
        if self.path is not None and not self.path.search(path):
            return False
        if self.remaining is not None:
            self.remaining -= 1
        return True


@dataclass(slots=True)
class _FeedFault:
    kind: Literal["cut", "stall"]
    after_rows: int
    feed: str | None
    remaining: int | None


def _compile_pattern(path: str | re.Pattern[str] | None) -> re.Pattern[str] | None:
    if path is None or isinstance(path, re.Pattern):
        return path
    return re.compile(path)


def _check_count(count: int | None) -> None:
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1 or None (forever), not {count}")
