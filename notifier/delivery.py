"""One delivery attempt under the relay's conditions: the outage gate, the
pace, the reply's class.

:class:`Delivery` is the worker's only way to the handler. ``attempt(doc)``
waits while the relay is paused (:class:`~notifier.breaker.OutageBreaker`),
takes its turn under the pace (:class:`~notifier.pacing.Pacer`), calls the
handler, and turns what happened into a :mod:`notifier.lifecycle` outcome:

* accepted: :class:`~notifier.lifecycle.Sent`;
* refused for good: :class:`~notifier.lifecycle.Refused` (a dead letter); a
  document that cannot become a message at all says nothing of the relay;
* refused for now: :class:`~notifier.lifecycle.Failed` (deferred), unless
  the relay is paused, in which case the message waits here and uses up no
  attempt (a greylisting refusal never pauses the relay: it is about one
  recipient);
* throttled: the pace slows down and the message tries again here, without
  using up an attempt, for up to ``throttle_hold`` seconds (or until the
  worker stops); then it is deferred, still without using up an attempt. A
  throttled probe keeps the relay paused;
* the relay cannot be reached at all: the breaker opens, the message waits;
* an unexpected error (a bug, a template that raises): deferred like a
  temporary failure, never dead-lettered for it; ``crash_limit`` of them in
  a row stop the worker with :class:`~notifier.errors.HandlerCrashing`
  (exit 70);
* a fatal channel error (login refused, TLS): raised; the worker stops.

The policies are pure (:mod:`notifier.breaker`, :mod:`notifier.pacing`,
:mod:`notifier.replies`); this shell only waits and counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from notifier.breaker import CrashStreak, Gate, OutageBreaker
from notifier.errors import (
    ChannelUnavailableError,
    DeliveryError,
    HandlerCrashing,
    InvalidMessageError,
    PermanentDeliveryError,
    ThrottledDeliveryError,
    TransientDeliveryError,
)
from notifier.handler import Handler
from notifier.lifecycle import Failed, Outcome, Refused, Sent
from notifier.pacing import Pacer, recipient_domain
from notifier.replies import is_greylisting
from notifier.schedule import span

log = logging.getLogger(__name__)


class Abandoned(Exception):
    """A message given up because the worker is stopping; it will be tried again later."""


class Delivery:
    """Delivery attempts for one worker; counters show in ``repr``."""

    def __init__(
        self,
        handler: Handler,
        *,
        pacer: Pacer,
        breaker: OutageBreaker,
        stopping: asyncio.Event,
        throttle_hold: float = 60.0,
        crash_limit: int = 10,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._handler = handler
        self.pacer = pacer
        self.breaker = breaker
        self._streak = CrashStreak(crash_limit)
        self._stopping = stopping
        self._throttle_hold = throttle_hold
        self._clock = clock
        # Wakes messages waiting at the gate when the breaker closes.
        self._reopened = asyncio.Event()
        self.throttled = 0
        self.crashes = 0
        #: Seconds an accepted delivery took; set by the metrics, if any.
        self.on_delivered: Callable[[float], None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Delivery {self.breaker!r} {self.pacer!r} throttled={self.throttled} "
            f"crashes={self.crashes}>"
        )

    @property
    def paused(self) -> bool:
        """Whether sending is paused because the relay looks down."""
        return self.breaker.is_open

    async def check(self) -> None:
        await self._handler.check()

    async def attempt(
        self, doc: Mapping[str, Any], *, may_send: Callable[[], bool] = lambda: True
    ) -> Outcome:
        """Deliver ``doc`` once the relay and the pace allow; see the module docstring.

        ``may_send`` is asked before each try; when it says no (another
        worker took the message over, or the lease is in doubt) the attempt
        ends in :class:`Abandoned`.
        Raises :class:`Abandoned` too when the worker stops while waiting.
        """
        recipient = str(doc.get("to", ""))
        domain = recipient_domain(recipient)
        throttled_since: float | None = None
        while True:
            probe = await self._turn()
            async with self.pacer.slot(domain):
                # Asked after the pace's wait too, which can be long: the lease
                # or the claim may have been lost meanwhile.
                if not may_send():
                    self._release(probe)
                    raise Abandoned
                try:
                    started = self._clock()
                    receipt = await self._handler.deliver(doc)
                except InvalidMessageError as e:
                    # Refused before the relay was asked: it says nothing of the relay.
                    self._release(probe)
                    self._streak.succeeded()
                    return Refused(str(e))
                except PermanentDeliveryError as e:
                    self._answered(probe)
                    return Refused(str(e))
                except ThrottledDeliveryError as e:
                    self.throttled += 1
                    self.pacer.throttled()
                    log.debug("message %s: throttled: %s", doc.get("_id"), e)
                    if probe:
                        # A paused relay that now says "slow down" (a 421 while
                        # it restarts) is not back yet: probe again later.
                        self._failed(recipient, e, probe=True)
                        continue
                    self._streak.succeeded()
                    now = self._clock()
                    throttled_since = throttled_since if throttled_since is not None else now
                    if self._stopping.is_set() or now - throttled_since >= self._throttle_hold:
                        # Written on the document rather than tried on through a stop.
                        return Failed(str(e), counts=False)
                    continue
                except ChannelUnavailableError as e:
                    self._streak.succeeded()
                    self._failed(recipient, e, relay_down=True, probe=probe)
                    continue
                except TransientDeliveryError as e:
                    self._streak.succeeded()
                    if is_greylisting(str(e)) and not probe:
                        return Failed(str(e))  # about this recipient alone, by design
                    self._failed(recipient, e, probe=probe)
                    if self.breaker.is_open:
                        continue  # paused: this one waits, and uses up no attempt
                    return Failed(str(e))
                except DeliveryError:
                    self._release(probe)
                    raise  # fatal for the channel: the worker stops
                except Exception as e:
                    self._release(probe)
                    return self._crashed(doc, e)
            self._answered(probe)
            if self.on_delivered is not None:
                self.on_delivered(self._clock() - started)
            return Sent(receipt)

    async def _turn(self) -> bool:
        """Wait until the breaker lets this message go; True if it goes as the probe.

        A message that may go now goes, even while the worker stops (the drain
        lets what is in flight finish); one that would have to wait for the
        relay is given up instead.
        """
        while True:
            permit = self.breaker.permit(self._clock())
            if permit.gate is Gate.SEND:
                return False
            if self._stopping.is_set():
                if permit.gate is Gate.PROBE:
                    self.breaker.release_probe()
                raise Abandoned
            if permit.gate is Gate.PROBE:
                log.info("probing the relay with one message")
                return True
            self._reopened.clear()
            waits = [
                asyncio.ensure_future(self._stopping.wait()),
                asyncio.ensure_future(self._reopened.wait()),
            ]
            try:
                await asyncio.wait(waits, timeout=permit.wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()

    def _answered(self, probe: bool) -> None:
        """The relay took a message or refused it for good: it is up."""
        self._streak.succeeded()
        now = self._clock()
        paused_for = self.breaker.open_for(now)
        if self.breaker.succeeded(now=now, probe=probe):
            log.warning("the relay accepts mail again after %s; resuming", span(paused_for))
            self._reopened.set()

    def _failed(
        self, recipient: str, error: Exception, *, relay_down: bool = False, probe: bool
    ) -> None:
        if self.breaker.failed(recipient, now=self._clock(), relay_down=relay_down, probe=probe):
            b = self.breaker
            why = (
                f"{error}"
                if relay_down
                else f"{b.recipients} different recipients refused for now within "
                f"{span(b.window)} (latest: {error})"
            )
            log.warning(
                "the relay looks down: %s; pausing sending (no message uses up an attempt) "
                "and probing after %s, then at growing intervals up to %s",
                why,
                span(b.probe_first),
                span(b.probe_max),
            )
        elif probe:
            log.debug("the relay still refuses: %s", error)

    def _release(self, probe: bool) -> None:
        if probe:
            self.breaker.release_probe()

    def _crashed(self, doc: Mapping[str, Any], error: Exception) -> Failed:
        self.crashes += 1
        log.exception("message %s: unexpected error while delivering", doc.get("_id"))
        if self._streak.crashed():
            raise HandlerCrashing(
                f"{self._streak.count} messages in a row failed with unexpected errors "
                f"(the latest: {type(error).__name__}: {error}); this is a bug or a broken "
                "template, not bad messages: stopping without dead-lettering them"
            ) from error
        return Failed(f"unexpected error: {type(error).__name__}: {error}")
