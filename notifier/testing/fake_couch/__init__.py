"""An in-memory CouchDB 3 for tests: stateful, strict where it matters, faulty on demand.

:class:`FakeCouch` answers the CouchDB HTTP API that notifier and its users'
scripts speak: databases, documents with real MVCC (``N-<32 hex>`` revs, 409
on a stale or missing ``_rev``, tombstones), ``_bulk_docs``, ``_all_docs``,
``_local/`` docs, optional Basic auth, and the ``_changes`` feed in its normal,
longpoll and continuous forms with ``since``, ``limit``, ``include_docs``,
``heartbeat``, ``timeout`` and the ``_selector``, ``_doc_ids`` and ``_design``
filters.

What it promises:

* **It behaves like Apache CouchDB 3, not like PouchDB Server.** Seqs are
  opaque strings (``"10-g1AAAA…"`` sorts before ``"9-g1AAAA…"``), a selector
  follows mango semantics (a missing field matches no operator except
  ``{"$exists": false}``, and ``$not`` is pushed down the same way CouchDB
  does it), the ``_selector`` filter reads its selector from the POST body.
  Where CouchDB would answer with an error, the fake does too; where the fake
  cannot do what CouchDB does (JavaScript filters, views, attachments, some
  mango operators), it answers an error that says so, never a silent
  approximation. ``docs/testing.md`` lists every known difference.
* **Faults on demand, and a record of them.** Error statuses for the next
  requests or for a path, added latency, a feed cut after N rows, a feed that
  stalls (no heartbeats either), refused connections, a replayed window of
  changes on reconnect. Every fault that fires is appended to
  :attr:`FakeCouch.events`; every request to :attr:`FakeCouch.requests`.
* **Transport-independent.** :meth:`FakeCouch.handle` takes a method, raw
  path, raw query, headers and body and returns a :class:`FakeResponse` whose
  body is bytes or an async iterator of chunks. :class:`FakeCouchTransport`
  serves it to an ``httpx.AsyncClient`` in process (streaming, honouring the
  client's read timeout); :mod:`notifier.testing.server` serves it on a
  loopback socket.
* **Thread-safe state.** The state lives behind one lock and feeds are woken
  with ``call_soon_threadsafe``, so a test thread may write docs while a
  socket server in a background thread streams the feed.

The fake needs an asyncio event loop; it does not run under trio.

The package is split by concern, each module readable on its own:
:mod:`~notifier.testing.fake_couch.couch` (the :class:`FakeCouch` class:
state, Python helpers, fault switches, HTTP routing and auth),
:mod:`~notifier.testing.fake_couch.documents` (databases, documents and
revisions), :mod:`~notifier.testing.fake_couch.changes` (the ``_changes``
feed), :mod:`~notifier.testing.fake_couch.mango` (selectors),
:mod:`~notifier.testing.fake_couch.wire` (answers, errors, parameters),
:mod:`~notifier.testing.fake_couch.faults` and
:mod:`~notifier.testing.fake_couch.transport`.
"""

from notifier.testing.fake_couch.changes import DEFAULT_MAX_TIMEOUT
from notifier.testing.fake_couch.couch import IN_PROCESS_URL, FakeCouch
from notifier.testing.fake_couch.faults import FaultEvent, RequestRecord
from notifier.testing.fake_couch.mango import SelectorError, compile_selector, selector_matches
from notifier.testing.fake_couch.transport import FakeCouchTransport
from notifier.testing.fake_couch.wire import FakeCouchError, FakeResponse, FeedCut

__all__ = [
    "DEFAULT_MAX_TIMEOUT",
    "IN_PROCESS_URL",
    "FakeCouch",
    "FakeCouchError",
    "FakeCouchTransport",
    "FakeResponse",
    "FaultEvent",
    "FeedCut",
    "RequestRecord",
    "SelectorError",
    "compile_selector",
    "selector_matches",
]
