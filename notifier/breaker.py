"""Relay-wide failure is an outage, not N bad messages.

Pure: every ``now`` is passed in (monotonic seconds).

:class:`OutageBreaker` watches delivery outcomes. When the relay cannot be
reached, or when ``recipients`` different recipients get temporary refusals
within ``window`` seconds with no delivery succeeding in between, the
trouble is the relay's, not theirs: the breaker *opens*. While it is open
no message is attempted, so none uses up an attempt; one message at a time
is let through as a probe, first after ``probe_first`` seconds, then at
doubling intervals up to ``probe_max``. The first probe the relay answers
(accepted, or refused for good: either way it is taking mail) closes it.

:class:`CrashStreak` counts unexpected errors (a bug, a template that
raises) in a row. A few are one odd document's; many in a row are the
daemon's, and dead-lettering the backlog for them would be wrong: the
worker stops instead (exit 70).
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass


class Gate(enum.Enum):
    """What the breaker allows one message to do now."""

    SEND = "send"
    PROBE = "probe"
    WAIT = "wait"


@dataclass(frozen=True, slots=True)
class Permit:
    gate: Gate
    #: For WAIT: seconds until asking again is worthwhile.
    wait: float = 0.0


_SEND = Permit(Gate.SEND)


class OutageBreaker:
    """Opens on a relay-wide failure; probes; closes when the relay answers.

    >>> b = OutageBreaker(recipients=3, window=60, probe_first=5, probe_max=40)
    >>> for n, who in enumerate(["a@x", "b@y", "a@x", "c@z"]):
    ...     opened = b.failed(who, now=float(n))
    >>> opened, b.is_open
    (True, True)
    >>> b.permit(now=4.0)
    Permit(gate=<Gate.WAIT: 'wait'>, wait=4.0)
    >>> b.permit(now=8.0).gate, b.permit(now=8.0).gate    # one probe at a time
    (<Gate.PROBE: 'probe'>, <Gate.WAIT: 'wait'>)
    >>> b.failed("d@w", now=9.0, probe=True); b.permit(now=18.0).gate   # next in 10 s
    False
    <Gate.WAIT: 'wait'>
    >>> b.succeeded(now=19.0, probe=True), b.is_open
    (True, False)
    """

    def __init__(
        self,
        *,
        recipients: int = 10,
        window: float = 60.0,
        probe_first: float = 5.0,
        probe_max: float = 120.0,
    ) -> None:
        if recipients < 1:
            raise ValueError(f"recipients must be at least 1, got {recipients}")
        if window <= 0 or not 0 < probe_first <= probe_max:
            raise ValueError("need window > 0 and 0 < probe_first <= probe_max")
        self.recipients = recipients
        self.window = window
        self.probe_first = probe_first
        self.probe_max = probe_max
        # recipient -> time of its latest temporary failure, oldest first
        self._failures: OrderedDict[str, float] = OrderedDict()
        self._open_since: float | None = None
        self._probe_at = 0.0
        self._probe_delay = probe_first
        self._probing = False
        self.opened = 0
        self.probes = 0

    def __repr__(self) -> str:
        state = "open" if self.is_open else "closed"
        return (
            f"<OutageBreaker {state} recent_failures={len(self._failures)} "
            f"opened={self.opened} probes={self.probes}>"
        )

    @property
    def is_open(self) -> bool:
        return self._open_since is not None

    def open_for(self, now: float) -> float:
        """Seconds the breaker has been open (0 when closed)."""
        return 0.0 if self._open_since is None else now - self._open_since

    def permit(self, now: float) -> Permit:
        """May a message be attempted now? PROBE reserves the one probe."""
        if self._open_since is None:
            return _SEND
        if self._probing:
            return Permit(Gate.WAIT, self._probe_delay)
        if now >= self._probe_at:
            self._probing = True
            self.probes += 1
            return Permit(Gate.PROBE)
        return Permit(Gate.WAIT, self._probe_at - now)

    def failed(
        self, recipient: str, *, now: float, relay_down: bool = False, probe: bool = False
    ) -> bool:
        """A temporary failure (``relay_down``: the relay could not be reached at all).

        Returns True when this failure opened the breaker.
        """
        if probe or self._open_since is not None:
            if probe:
                self._probing = False
                self._probe_delay = min(self.probe_max, self._probe_delay * 2)
                self._probe_at = now + self._probe_delay
            return False
        self._failures[recipient] = now
        self._failures.move_to_end(recipient)
        while self._failures:
            oldest = next(iter(self._failures.values()))
            if oldest >= now - self.window:
                break
            self._failures.popitem(last=False)
        if relay_down or len(self._failures) >= self.recipients:
            self._open(now)
            return True
        return False

    def succeeded(self, *, now: float, probe: bool = False) -> bool:
        """The relay took a message (or refused it for good). True if that closed the breaker."""
        self._failures.clear()
        if probe:
            self._probing = False
        if self._open_since is None:
            return False
        self._open_since = None
        self._probing = False
        return True

    def release_probe(self) -> None:
        """A probe that was given up without an answer (the worker stops): let another go."""
        self._probing = False

    def _open(self, now: float) -> None:
        self._open_since = now
        self._probe_delay = self.probe_first
        self._probe_at = now + self.probe_first
        self._failures.clear()
        self.opened += 1
        self._check()

    def _check(self) -> None:
        assert self.probe_first <= self._probe_delay <= self.probe_max, self
        assert not (self._probing and self._open_since is None), self
        assert self._open_since is None or not self._failures, self


class CrashStreak:
    """Unexpected errors in a row, across messages.

    >>> s = CrashStreak(limit=3)
    >>> s.crashed(), s.crashed(), s.succeeded(), s.crashed(), s.crashed(), s.crashed()
    (False, False, None, False, False, True)
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be at least 1, got {limit}")
        self.limit = limit
        self.count = 0

    def crashed(self) -> bool:
        """Count one; True once ``limit`` have come in a row."""
        self.count += 1
        return self.count >= self.limit

    def succeeded(self) -> None:
        """An outcome that was not an unexpected error: the streak is over."""
        self.count = 0
