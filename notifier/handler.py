"""The seam between the pipeline and a delivery channel.

The worker, the in-flight tracker and the checkpoint logic know nothing about
email. They hand each message document to a :class:`Handler` and act on the
outcome:

* it returns a :data:`Receipt` (a small JSON object stored on the document
  with the "notified" mark, for instance the email's Message-ID);
* it raises :class:`~notifier.errors.PermanentDeliveryError`: the document is
  dead-lettered with the error's text as the reason;
* it raises :class:`~notifier.errors.TransientDeliveryError`: the worker
  retries with backoff;
* it raises :class:`~notifier.errors.DeliveryFatalError`: the worker stops.

The product ships one handler, :class:`notifier.mailer.EmailHandler`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias

#: What a handler reports about a delivery; stored on the document. JSON only.
Receipt: TypeAlias = dict[str, Any]


class Handler(Protocol):
    async def check(self) -> None:
        """Prove the channel works (connect, log in) before any message is taken."""

    async def deliver(self, doc: Mapping[str, Any]) -> Receipt:
        """Deliver one message document, or raise a DeliveryError saying why not."""
