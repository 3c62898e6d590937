"""Pacing: a relay's quota respected rather than discovered.

Two pure cores and a thin async shell:

* :class:`RateLimit` grants on a grid ``1 / rate`` seconds apart (a token
  bucket that holds one token): at ``rate`` R no window of one second holds
  more than R grants, which is how relays count their quotas. A grant taken
  a little late (the event loop's timers have millisecond resolution) does
  not push the grid back, so lateness never lowers the rate.
* :class:`AdaptiveRate` lowers the rate on a throttling reply and raises it
  back once the relay stops complaining: halve at once (at most once per
  second, so that the replies of one burst count once), then add a tenth of
  the configured rate each quiet second. With no configured rate the
  relay's own pace when it first complained is what is halved and recovered.
* :class:`Pacer` is what a delivery uses: ``async with pacer.slot(domain):``
  waits for the worker's turn under the overall rate and the recipient
  domain's rate and concurrency, in arrival order, and holds the domain's
  concurrency slot until the send ends.

``[smtp] max_rate`` is for the whole worker set. Each worker paces at
``max_rate / worker_count``: documents are spread evenly over the workers by
the hash of their id, so the shares add up to the configured rate. Domain
rates are split the same way; a domain's concurrency limit is per worker.

Sends are paced at :data:`HEADROOM` (95%) of a configured rate. A relay
counts a message when its transaction ends, not when it starts: a send
whose transaction took a little longer than the next one's (a new
connection, a busy relay) would otherwise land in the same second as one
too many. The 5% leave 50 ms of such difference at any rate.

With no limit configured and no throttling seen, the shell does no work per
send beyond a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

#: The slowest an adaptive rate goes (messages per second).
MIN_RATE = 0.1
#: Throttling replies this close together count as one (seconds).
DECREASE_HOLD = 1.0
#: Seconds between additive increases, and the share of the target each adds.
INCREASE_EVERY = 1.0
INCREASE_SHARE = 0.1
#: Seconds over which the achieved rate is measured.
OBSERVE_WINDOW = 2.0
#: The share of a configured rate that sends are paced at (see above).
HEADROOM = 0.95


class RateLimit:
    """Grants at most ``rate`` per second, on a grid ``1/rate`` seconds apart.

    >>> r = RateLimit(2.0)
    >>> r.delay(10.0); r.take(10.0); r.delay(10.1)
    0.0
    0.4
    >>> r.take(10.51); r.delay(10.7)     # 10 ms late: the grid stays at 11.0
    0.3

    After an idle spell (more than one interval late) the grid starts again
    from now, so no burst makes up for time nobody wanted to send in.
    ``rate`` None means no limit. O(1) per call.
    """

    __slots__ = ("_next", "rate")

    def __init__(self, rate: float | None) -> None:
        self.rate: float | None = None
        self._next = float("-inf")
        self.set_rate(rate)

    def __repr__(self) -> str:
        return f"<RateLimit rate={self.rate}>"

    def set_rate(self, rate: float | None) -> None:
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be positive or None, got {rate}")
        self.rate = rate

    def delay(self, now: float) -> float:
        """Seconds until the next grant may be taken (0: now)."""
        if self.rate is None:
            return 0.0
        return round(max(0.0, self._next - now), 9)

    def take(self, now: float) -> None:
        """Record a grant at ``now``; the next is due one interval after this grid point."""
        if self.rate is None:
            return
        self._check(now)
        interval = 1.0 / self.rate
        late = now - self._next
        self._next = (now if late > interval else self._next) + interval

    def _check(self, now: float) -> None:
        # A grant taken before it was due would break the promise above.
        assert self._next - now <= 1e-6, f"grant taken {self._next - now:.6f}s early"


class AdaptiveRate:
    """Additive increase, multiplicative decrease of a send rate.

    ``ceiling`` is the configured rate (None: none). ``limit`` is what to
    pace at now (None: do not pace). A throttling reply halves the rate it
    was sent at; each quiet second then adds a tenth of the ceiling, up to
    it. With no ceiling each quiet second adds a tenth of the rate that was
    halved, and the rate keeps rising until the relay objects again, so it
    settles around the relay's quota (between half of it and all of it);
    once it has doubled without an objection, pacing stops.

    >>> a = AdaptiveRate(10.0)
    >>> a.throttled(now=0.0, observed=10.0); a.limit
    5.0
    >>> a.throttled(now=0.5, observed=5.0); a.limit    # the same burst: once
    5.0
    >>> a.refresh(now=3.0); a.limit                     # three quiet seconds
    8.0
    >>> a.refresh(now=10.0); a.limit
    10.0
    """

    __slots__ = ("_base", "_changed_at", "_decreased_at", "ceiling", "limit", "throttles")

    def __init__(self, ceiling: float | None) -> None:
        if ceiling is not None and not ceiling > 0:
            raise ValueError(f"ceiling must be positive or None, got {ceiling}")
        self.ceiling = ceiling
        self.limit: float | None = ceiling
        self.throttles = 0
        #: The rate the latest decrease halved (with no ceiling, the steps are a tenth of it).
        self._base = ceiling or 0.0
        self._decreased_at = float("-inf")
        self._changed_at = float("-inf")

    def __repr__(self) -> str:
        return (
            f"<AdaptiveRate limit={self.limit} ceiling={self.ceiling} throttles={self.throttles}>"
        )

    @property
    def slowed(self) -> bool:
        """Whether the rate is below the configured one because of throttling."""
        return self.limit != self.ceiling

    def throttled(self, *, now: float, observed: float) -> None:
        """A throttling reply arrived; ``observed`` is the achieved rate lately."""
        self.throttles += 1
        if now - self._decreased_at < DECREASE_HOLD:
            return
        # Not paced yet: the pace the relay objected to is what it measured.
        current = max(observed, MIN_RATE * 2) if self.limit is None else self.limit
        self._base = current
        self.limit = max(MIN_RATE, current / 2)
        self._decreased_at = self._changed_at = now
        self._check()

    def refresh(self, *, now: float) -> None:
        """Raise the rate for each quiet ``INCREASE_EVERY`` seconds since the last change."""
        if self.limit is None or self.limit == self.ceiling:
            return
        steps = int((now - self._changed_at) / INCREASE_EVERY)
        if steps <= 0:
            return
        self.limit += steps * INCREASE_SHARE * (self.ceiling or self._base)
        self._changed_at += steps * INCREASE_EVERY
        if self.ceiling is not None:
            self.limit = min(self.limit, self.ceiling)
        elif self.limit >= 2 * self._base:
            self.limit = None  # twice the old pace without an objection: no limit
        self._check()

    def _check(self) -> None:
        if self.limit is not None:
            assert self.limit >= MIN_RATE - 1e-9, self
            assert self.ceiling is None or self.limit <= self.ceiling + 1e-9, self


@dataclass(frozen=True, kw_only=True, slots=True)
class DomainLimit:
    """Limits for one recipient domain: sends at once (per worker), and per second."""

    max_parallel: int | None = None
    max_rate: float | None = None

    def __post_init__(self) -> None:
        if self.max_parallel is not None and self.max_parallel < 1:
            raise ValueError(f"max_parallel must be at least 1, got {self.max_parallel}")
        if self.max_rate is not None and not self.max_rate > 0:
            raise ValueError(f"max_rate must be positive, got {self.max_rate}")


Sleep = Callable[[float], Awaitable[None]]


class _Lane:
    """One rate limit with its FIFO queue of waiters (asyncio)."""

    def __init__(self, rate: float | None) -> None:
        self.limit = RateLimit(rate)
        self.lock = asyncio.Lock()

    async def turn(self, clock: Callable[[], float], sleep: Sleep) -> None:
        async with self.lock:
            # A loop, not one sleep: the rate may have changed meanwhile, and
            # sleeps can end a hair early on some clocks.
            while (wait := self.limit.delay(clock())) > 0:
                await sleep(wait)
            self.limit.take(clock())


class Pacer:
    """Paces sends: ``async with pacer.slot("example.com"): send()``.

    ``rate`` is this worker's share of ``[smtp] max_rate`` (None: none);
    ``domains`` maps a lower-case domain to its limits (rates already this
    worker's share).
    """

    def __init__(
        self,
        *,
        rate: float | None = None,
        domains: Mapping[str, DomainLimit] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.adaptive = AdaptiveRate(rate)
        self._clock = clock
        self._sleep = sleep
        self._lane = _Lane(None if rate is None else rate * HEADROOM)
        self._domains = dict(domains or {})
        self._domain_lanes = {
            d: _Lane(None if lim.max_rate is None else lim.max_rate * HEADROOM)
            for d, lim in self._domains.items()
        }
        self._domain_slots = {
            d: asyncio.Semaphore(lim.max_parallel)
            for d, lim in self._domains.items()
            if lim.max_parallel is not None
        }
        self._sends = 0
        self._window_at = clock()
        self._window_sends = 0
        self.waits = 0

    def __repr__(self) -> str:
        return f"<Pacer {self.adaptive!r} domains={len(self._domains)} waits={self.waits}>"

    @property
    def limit(self) -> float | None:
        """The overall rate paced at now (None: none)."""
        return self.adaptive.limit

    @asynccontextmanager
    async def slot(self, domain: str) -> AsyncIterator[None]:
        """``async with pacer.slot(domain):`` around one send: waits for its turn,
        and holds the domain's concurrency slot (if it has one) until it ends.

        With no limit and no throttling seen, this only counts the send.
        """
        if not self._limited:
            self._count_send()
            yield
            return
        slots = self._domain_slots.get(domain)
        if slots is None:
            await self._paced(domain)
            yield
            return
        async with slots:
            await self._paced(domain)
            yield

    @property
    def _limited(self) -> bool:
        return bool(self._domains) or self.adaptive.limit is not None

    async def _paced(self, domain: str) -> None:
        lane = self._domain_lanes.get(domain)
        if lane is not None and lane.limit.rate is not None:
            await lane.turn(self._clock, self._sleep)
        now = self._clock()
        self.adaptive.refresh(now=now)
        if self.adaptive.limit is not None:
            pace = self.adaptive.limit * HEADROOM
            if self._lane.limit.rate != pace:
                self._lane.limit.set_rate(pace)
            if self._lane.limit.delay(now) > 0 or self._lane.lock.locked():
                self.waits += 1
            await self._lane.turn(self._clock, self._sleep)
        self._count_send()

    def throttled(self) -> None:
        """A throttling reply: slow down."""
        now = self._clock()
        self.adaptive.throttled(now=now, observed=self._observed(now))

    def _count_send(self) -> None:
        # What "slower" means when no rate is configured: the pace of the last
        # few seconds, from a count and the time it started (no list per send).
        self._sends += 1
        now = self._clock()
        if now - self._window_at > 2 * OBSERVE_WINDOW:
            self._window_at, self._window_sends = now - OBSERVE_WINDOW, self._sends - 1

    def _observed(self, now: float) -> float:
        return (self._sends - self._window_sends) / max(now - self._window_at, OBSERVE_WINDOW)


def recipient_domain(address: object) -> str:
    """The lower-cased domain of an address, in its IDNA (``xn--``) form as it is
    sent, or "" when there is none.

    >>> recipient_domain("Ann@Example.COM"), recipient_domain("a@bücher.example")
    ('example.com', 'xn--bcher-kva.example')
    >>> recipient_domain(None)
    ''
    """
    if not isinstance(address, str):
        return ""
    return domain_key(address.rpartition("@")[2])


def domain_key(domain: str) -> str:
    """A domain as limits are keyed: lower case, IDNA where it has non-ASCII letters."""
    domain = domain.strip().lower()
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain
