"""The feed follower against scripted HTTP answers: reconnects, positions, fatal errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from notifier.backoff import Backoff
from notifier.couch import CouchClient
from notifier.errors import CouchFatalError
from notifier.feed import Change, ChangeFeed

pytestmark = pytest.mark.anyio

SELECTOR = {"notifiedRecipient": {"$exists": False}}


def row(seq: Any, doc_id: str, **extra: Any) -> bytes:
    return (json.dumps({"seq": seq, "id": doc_id, "changes": [], **extra}) + "\n").encode()


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


class Script:
    """Answers each _changes request with the next scripted response, recording requests.

    The feed's ``since=now`` probes (made while it is not connected) are
    answered at once and recorded apart, in ``probes``.
    """

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []
        self.probes: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.params.get("since") == "now":
            self.probes.append(request)
            return httpx.Response(200, json={"results": [], "last_seq": "now-1"})
        self.requests.append(request)
        if not self.responses:
            return httpx.Response(200, content=chunks(b"\n"))  # quiet, then closes
        return self.responses.pop(0)

    def since(self, n: int) -> str | None:
        return self.requests[n].url.params.get("since")


async def take(feed: ChangeFeed, since: Any, count: int) -> list[Change]:
    out: list[Change] = []
    async for change in feed.follow(since):
        out.append(change)
        if len(out) == count:
            break
    return out


def make_feed(script: Script, resync_after: float = 60.0) -> tuple[CouchClient, ChangeFeed]:
    client = CouchClient(url="http://couch.test", transport=httpx.MockTransport(script))
    feed = ChangeFeed(
        client,
        database="messages",
        selector=SELECTOR,
        heartbeat=1.0,
        resync_after=resync_after,
        backoff=Backoff(base=0.001, cap=0.005),
    )
    return client, feed


async def test_request_carries_selector_in_body_and_query_and_refuses_gzip() -> None:
    script = Script(httpx.Response(200, content=chunks(row("1-a", "m1"))))
    client, feed = make_feed(script)
    async with client:
        await take(feed, 0, 1)
    request = script.requests[0]
    assert request.method == "POST"
    assert request.headers["Accept-Encoding"] == "identity"
    assert request.url.params["filter"] == "_selector"
    assert json.loads(request.url.params["selector"]) == SELECTOR
    assert json.loads(request.content) == {"selector": SELECTOR}
    assert request.url.params["feed"] == "continuous"
    assert request.url.params["heartbeat"] == "1000"
    assert request.url.params["include_docs"] == "true"


async def test_a_dropped_connection_resumes_from_the_last_seq_seen() -> None:
    script = Script(
        httpx.Response(200, content=chunks(row("1-x", "m1"), b"\n", row("2-x", "m2"))),
        httpx.Response(200, content=chunks(row("3-x", "m3"))),
    )
    client, feed = make_feed(script)
    async with client:
        changes = await take(feed, "0", 3)
    assert [c.doc_id for c in changes] == ["m1", "m2", "m3"]
    assert script.since(0) == "0"
    assert script.since(1) == "2-x"
    assert feed.reconnects == 1


async def test_a_last_seq_row_is_a_position_and_a_reconnect() -> None:
    script = Script(
        httpx.Response(200, content=chunks(row(7, "m1"), b'{"last_seq": 9}\n')),
        httpx.Response(200, content=chunks(row(10, "m2"))),
    )
    client, feed = make_feed(script)
    async with client:
        changes = await take(feed, 0, 3)
    assert changes[1] == Change(seq=9, doc_id=None)
    assert script.since(1) == "9"


async def test_server_errors_are_retried_and_fatal_ones_raise() -> None:
    script = Script(
        httpx.Response(503, json={"error": "unavailable", "reason": "busy"}),
        httpx.Response(500, text="not json"),
        httpx.Response(200, content=chunks(row("5-a", "m5"))),
        httpx.Response(
            401, json={"error": "unauthorized", "reason": "Name or password is incorrect."}
        ),
    )
    client, feed = make_feed(script)
    async with client:
        changes = await take(feed, 0, 1)
        assert changes[0].doc_id == "m5"
        with pytest.raises(CouchFatalError, match="401 unauthorized"):
            await take(feed, changes[0].seq, 1)


async def test_garbage_in_the_stream_reconnects_from_the_last_good_row() -> None:
    script = Script(
        httpx.Response(200, content=chunks(row("1-a", "m1"), b"{not json\n")),
        httpx.Response(200, content=chunks(row("2-a", "m2"))),
    )
    client, feed = make_feed(script)
    async with client:
        changes = await take(feed, 0, 2)
    assert [c.doc_id for c in changes] == ["m1", "m2"]
    assert script.since(1) == "1-a"


async def test_a_quiet_feed_asks_where_the_filtered_feed_stands() -> None:
    async def heartbeats() -> AsyncIterator[bytes]:
        yield row("4-q", "m4")
        for _ in range(50):
            yield b"\n"

    script = Script(
        httpx.Response(200, content=heartbeats()),
        httpx.Response(200, json={"results": [], "last_seq": "9-q"}),
    )
    client, feed = make_feed(script, resync_after=0.0)
    async with client:
        changes = await take(feed, 0, 2)
    assert changes == [Change(seq="4-q", doc_id="m4"), Change(seq="9-q", doc_id=None)]
    assert script.requests[1].url.params["feed"] == "normal"
    assert script.since(1) == "4-q"


async def test_deleted_rows_are_flagged() -> None:
    script = Script(httpx.Response(200, content=chunks(row("1-d", "gone", deleted=True))))
    client, feed = make_feed(script)
    async with client:
        (change,) = await take(feed, 0, 1)
    assert change.deleted is True


async def test_the_feed_is_connected_when_couchdb_answers_not_at_its_first_heartbeat() -> None:
    script = Script()

    async def idle_database(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("since") == "now":
            return script(request)
        # As CouchDB and PouchDB Server do on an idle database: no status
        # line or headers until the first heartbeat.
        await asyncio.sleep(3.0)
        return httpx.Response(200, content=chunks(b"\n", row("1-a", "m1")))

    client = CouchClient(url="http://couch.test", transport=httpx.MockTransport(idle_database))
    connected = asyncio.Event()
    feed = ChangeFeed(
        client,
        database="messages",
        selector=SELECTOR,
        heartbeat=3.0,
        on_connect=connected.set,
        backoff=Backoff(base=0.001, cap=0.005),
    )
    async with client:
        reading = asyncio.create_task(take(feed, 0, 1))
        await asyncio.wait_for(connected.wait(), timeout=1.0)
        assert feed.connected
        (change,) = await reading
    assert change.doc_id == "m1"
    (probe,) = script.probes
    assert probe.url.params["feed"] == "normal"
    assert json.loads(probe.url.params["selector"]) == SELECTOR


async def test_a_resync_reconnects_without_ever_reporting_the_feed_disconnected() -> None:
    feed: ChangeFeed | None = None
    seen_while_reconnecting: list[bool] = []

    async def quiet(request: httpx.Request) -> httpx.Response:
        if request.url.params.get("since") == "now":
            return httpx.Response(200, json={"results": [], "last_seq": "now-1"})
        assert feed is not None
        seen_while_reconnecting.append(feed.connected)
        if request.url.params["feed"] == "normal":
            return httpx.Response(200, json={"results": [], "last_seq": "9-q"})
        return httpx.Response(200, content=chunks(b"\n", b"\n"))

    client = CouchClient(url="http://couch.test", transport=httpx.MockTransport(quiet))
    feed = ChangeFeed(
        client,
        database="messages",
        selector=SELECTOR,
        heartbeat=1.0,
        resync_after=0.0,
        backoff=Backoff(base=0.001, cap=0.005),
    )
    async with client:
        changes = await take(feed, 0, 3)
    assert changes == [Change(seq="9-q", doc_id=None)] * 3
    # The first continuous request comes after the probe; every later one,
    # and every resync, while the feed counts as connected.
    assert seen_while_reconnecting[0] is True
    assert all(seen_while_reconnecting), seen_while_reconnecting
