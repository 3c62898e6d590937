"""The feed follower against scripted HTTP answers: reconnects, positions, fatal errors."""

from __future__ import annotations

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
    """Answers each _changes request with the next scripted response, recording requests."""

    def __init__(self, *responses: httpx.Response) -> None:
        self.responses = list(responses)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
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
