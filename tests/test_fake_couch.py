"""FakeCouch's own behaviour: what no real server can show on demand.

Faults and their event log, the replay window, opaque seq ordering, auth,
mango selector semantics (including the 400 on operators the fake does not
evaluate), error cases that would kill PouchDB Server, and the two ways of
reaching the fake. What the fake shares with a real server is proven in
tests/contract/test_contract.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from notifier.testing.fake_couch import (
    FakeCouch,
    FakeCouchError,
    SelectorError,
    compile_selector,
    selector_matches,
)
from notifier.testing.server import FakeCouchServer

pytestmark = pytest.mark.anyio

FEED_HEADERS = {"Accept-Encoding": "identity"}
DB = "messages"


@dataclass
class Reached:
    """A fake and a client that reaches it one way or the other."""

    fake: FakeCouch
    client: httpx.AsyncClient
    how: str


@pytest.fixture
def fake() -> FakeCouch:
    return FakeCouch(databases=[DB], seed=7)


@pytest.fixture
async def client(fake: FakeCouch, anyio_backend: str) -> AsyncIterator[httpx.AsyncClient]:
    async with fake.client(timeout=5.0) as c:
        yield c


@pytest.fixture(params=["in-process", "socket"])
async def reached(
    fake: FakeCouch, request: pytest.FixtureRequest, anyio_backend: str
) -> AsyncIterator[Reached]:
    """The fake through the in-process transport, then through the socket server."""
    if request.param == "in-process":
        async with fake.client(timeout=5.0) as c:
            yield Reached(fake, c, request.param)
        return
    async with (
        FakeCouchServer(fake) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5.0, trust_env=False) as c,
    ):
        yield Reached(fake, c, request.param)


async def rows_of(client: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    response = await client.get(f"/{DB}/_changes", params=params)
    assert response.status_code == 200, response.text
    rows: list[dict[str, Any]] = response.json()["results"]
    return rows


async def changes_with_selector(
    client: httpx.AsyncClient, selector: Any, **params: Any
) -> httpx.Response:
    return await client.post(
        f"/{DB}/_changes", params={"filter": "_selector", **params}, json={"selector": selector}
    )


async def eventually(predicate: Any, what: str) -> None:
    """Wait (bounded) for something another task or thread does; fail if it never happens."""
    for _ in range(200):
        if predicate():
            return
        await asyncio.sleep(0.01)
    pytest.fail(f"never happened: {what}")


# -- seqs ------------------------------------------------------------------------------


async def test_seqs_are_opaque_strings_whose_text_order_is_not_their_order(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    for i in range(12):
        fake.put(DB, {"_id": f"m{i:02}"})

    seqs = [row["seq"] for row in await rows_of(client)]

    assert all(re.fullmatch(r"\d+-g1AAAA[A-Za-z0-9_-]+", seq) for seq in seqs)
    # Feed order is not text order ("10-…" < "9-…"): code that sorts or
    # compares seqs gets it wrong against the fake, as against CouchDB.
    assert sorted(seqs) != seqs


async def test_since_takes_every_seq_the_fake_issued(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "a"})
    info_seq = (await client.get(f"/{DB}")).json()["update_seq"]
    fake.put(DB, {"_id": "b"})
    row_seq = (await rows_of(client))[0]["seq"]
    last_seq = (await client.get(f"/{DB}/_changes")).json()["last_seq"]

    assert [r["id"] for r in await rows_of(client, since=info_seq)] == ["b"]
    assert [r["id"] for r in await rows_of(client, since=row_seq)] == ["b"]
    assert await rows_of(client, since=last_seq) == []
    assert [r["id"] for r in await rows_of(client, since="0")] == ["a", "b"]


@pytest.mark.parametrize("since", ["5", "garbage", "2-g1AAAAnotoneofours", '"0"'])
async def test_a_since_the_fake_never_issued_is_400(client: httpx.AsyncClient, since: str) -> None:
    response = await client.get(f"/{DB}/_changes", params={"since": since})

    assert response.status_code == 400
    assert response.json() == {
        "error": "bad_request",
        "reason": "Malformed sequence supplied in 'since' parameter.",
    }


async def test_a_since_from_another_database_starts_from_zero(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.create_database("other")
    fake.put("other", {"_id": "x"})
    fake.put(DB, {"_id": "a"})
    foreign = fake.update_seq("other")

    rows = await rows_of(client, since=foreign)

    assert [r["id"] for r in rows] == ["a"]
    assert [e.kind for e in fake.events] == ["rewind"]


async def test_a_recreated_database_does_not_resume_old_seqs(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "old"})
    old_seq = fake.update_seq(DB)
    fake.delete_database(DB)
    fake.create_database(DB)
    fake.put(DB, {"_id": "new"})

    rows = await rows_of(client, since=old_seq)

    assert [r["id"] for r in rows] == ["new"]
    assert fake.events_of("rewind")


# -- the replay window --------------------------------------------------------------


async def test_replay_window_restarts_a_reconnect_before_its_since(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    for i in range(1, 6):
        fake.put(DB, {"_id": f"d{i}"})
    since = (await rows_of(client))[3]["seq"]  # after d4

    before = [r["id"] for r in await rows_of(client, since=since)]
    fake.replay_window = 2
    replayed = [r["id"] for r in await rows_of(client, since=since)]

    assert before == ["d5"]
    assert replayed == ["d3", "d4", "d5"]
    (event,) = fake.events_of("replay")
    assert "2 changes" in event.detail


async def test_replay_window_leaves_fresh_starts_alone(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.replay_window = 3
    for i in range(1, 4):
        fake.put(DB, {"_id": f"d{i}"})

    from_zero = [r["id"] for r in await rows_of(client, since="0")]
    from_now = await rows_of(client, since="now")

    assert from_zero == ["d1", "d2", "d3"]
    assert from_now == []
    assert fake.events_of("replay") == []


def test_replay_window_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="replay_window"):
        FakeCouch(replay_window=-1)


# -- selectors ---------------------------------------------------------------------------

MESSAGE = {
    "_id": "m1",
    "to": "whaa@example.com",
    "n": 3,
    "flag": None,
    "meta": {"lang": "en", "tags": ["a", "b"]},
    "list": [10, 20],
}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        # A missing field matches nothing but `$exists: false`.
        ({"notified": {"$exists": False}}, True),
        ({"notified": {"$ne": True}}, False),
        ({"$not": {"notified": True}}, False),
        ({"notified": {"$nin": [True]}}, False),
        ({"notified": {"$lt": 1}}, False),
        ({"$not": {"notified": {"$exists": True}}}, True),
        ({"$not": {"$and": [{"n": 3}, {"notified": True}]}}, False),
        # Present fields.
        ({"to": "whaa@example.com"}, True),
        ({"to": {"$eq": "other@example.com"}}, False),
        ({"n": {"$gt": 2, "$lte": 3}}, True),
        ({"n": {"$gte": 4}}, False),
        ({"n": {"$in": [1, 3]}}, True),
        ({"n": {"$nin": [1, 3]}}, False),
        ({"$not": {"n": {"$gt": 5}}}, True),
        ({"$or": [{"n": 1}, {"to": "whaa@example.com"}]}, True),
        ({"$and": [{"n": 3}, {"notified": {"$exists": True}}]}, False),
        # null is a present value.
        ({"flag": {"$exists": True}}, True),
        ({"flag": None}, True),
        # Nested and dotted paths, array elements by index.
        ({"meta.lang": "en"}, True),
        ({"meta": {"lang": {"$ne": "en"}}}, False),
        ({"meta.tags": {"$in": ["b"]}}, True),
        ({"list.1": 20}, True),
        ({"list.5": {"$exists": False}}, False),  # a bad path matches nothing
        ({"to.x": {"$exists": False}}, False),
        # CouchDB's collation: numbers sort before strings.
        ({"to": {"$gt": 100}}, True),
        ({"n": {"$lt": "a"}}, True),
        ({"_id": {"$gt": "m0"}}, True),
        ({}, True),
        # The array and pattern operators; on a missing field each matches nothing.
        ({"to": {"$regex": "^whaa@"}}, True),
        ({"to": {"$regex": "example"}}, True),  # unanchored, as PCRE's re:run
        ({"n": {"$regex": "3"}}, False),  # only strings match a pattern
        ({"notified": {"$regex": ".*"}}, False),
        ({"to": {"$beginsWith": "whaa"}}, True),
        ({"to": {"$beginsWith": "example"}}, False),
        ({"notified": {"$beginsWith": ""}}, False),
        ({"list": {"$size": 2}}, True),
        ({"meta.tags": {"$size": 3}}, False),
        ({"to": {"$size": 16}}, False),  # a string is not an array
        ({"notified": {"$size": 0}}, False),
        ({"meta.tags": {"$all": ["b", "a"]}}, True),
        ({"meta.tags": {"$all": ["a", "c"]}}, False),
        ({"meta.tags": {"$all": []}}, False),
        ({"notified": {"$all": []}}, False),
        ({"list": {"$elemMatch": {"$gt": 15}}}, True),
        ({"list": {"$elemMatch": {"$gt": 25}}}, False),
        ({"list": {"$allMatch": {"$gt": 5}}}, True),
        ({"list": {"$allMatch": {"$gt": 15}}}, False),
        ({"notified": {"$elemMatch": {"$exists": False}}}, False),
        ({"n": {"$mod": [2, 1]}}, True),
        ({"n": {"$mod": [2, 0]}}, False),
        ({"flag": {"$mod": [2, 0]}}, False),  # only integers
        ({"n": {"$type": "number"}}, True),
        ({"flag": {"$type": "null"}}, True),
        ({"meta": {"$type": "object"}}, True),
        ({"list": {"$type": "array"}}, True),
        ({"notified": {"$type": "null"}}, False),
        ({"$not": {"to": {"$regex": "^x"}}}, True),
        ({"to": {"$not": {"$beginsWith": "w"}}}, False),
    ],
)
def test_selector_semantics_follow_couchdb(selector: Any, expected: bool) -> None:
    assert selector_matches(selector, MESSAGE) is expected


@pytest.mark.parametrize(
    ("selector", "reason"),
    [
        ({"$nor": [{"n": 1}]}, "$nor"),
        ({"meta": {"$keyMapMatch": {"$eq": "lang"}}}, "$keyMapMatch"),
        ({"to": {"$regex": "(unclosed"}}, "Bad argument for operator $regex"),
        # PCRE understands \p{L}; Python's re does not, so the fake refuses it.
        ({"to": {"$regex": "\\p{L}"}}, "Bad argument for operator $regex"),
        ({"n": {"$mod": [0, 1]}}, "Bad argument for operator $mod"),
        ({"n": {"$size": -1}}, "Bad argument for operator $size"),
        ({"n": {"$type": "integer"}}, "Bad argument for operator $type"),
        ({"list": {"$elemMatch": [1]}}, "Bad argument for operator $elemMatch"),
        ({"to": {"$foo": 1}}, "Invalid operator: $foo"),
        ({"$and": {"n": 1}}, "Bad argument for operator $and"),
        ({"n": {"$in": 3}}, "Bad argument for operator $in"),
        ({"n": {"$exists": "yes"}}, "Bad argument for operator $exists"),
        ({"$eq": 1}, "field name"),
        ([{"n": 1}], "expected a JSON object"),
    ],
)
def test_selectors_the_fake_cannot_evaluate_are_rejected(selector: Any, reason: str) -> None:
    with pytest.raises(SelectorError) as caught:
        compile_selector(selector)
    assert caught.value.status == 400
    assert reason in caught.value.reason


async def test_a_bad_selector_is_a_400_before_the_feed_starts(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "a"})

    response = await changes_with_selector(
        client, {"to": {"$nor": [{"n": 1}]}}, feed="continuous", heartbeat=50
    )

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"
    assert "$nor" in response.json()["reason"]


async def test_the_body_selector_wins_over_the_query_parameter(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "a", "kind": "body"})
    fake.put(DB, {"_id": "b", "kind": "query"})

    response = await client.post(
        f"/{DB}/_changes",
        params={"filter": "_selector", "selector": json.dumps({"kind": "query"})},
        json={"selector": {"kind": "body"}},
    )

    assert [r["id"] for r in response.json()["results"]] == ["a"]


async def test_a_query_selector_is_refused_like_couchdb_unless_the_fallback_is_on(
    client: httpx.AsyncClient,
) -> None:
    lenient = FakeCouch(databases=[DB], selector_query_fallback=True)
    strict = FakeCouch(databases=[DB])
    for couch in (lenient, strict):
        couch.put(DB, {"_id": "a", "kind": "x"})
        couch.put(DB, {"_id": "b"})
    params = {"filter": "_selector", "selector": json.dumps({"kind": "x"})}

    async with lenient.client() as lc, strict.client() as sc:
        from_query = await lc.get(f"/{DB}/_changes", params=params)
        strict_get = await sc.get(f"/{DB}/_changes", params=params)
        strict_post = await sc.post(f"/{DB}/_changes", params=params, json={})

    assert [r["id"] for r in from_query.json()["results"]] == ["a"]
    # What CouchDB 3 answers when the selector is not in the body.
    assert strict_get.status_code == strict_post.status_code == 400
    assert strict_get.json()["reason"] == "Selector must be specified in POST payload"
    assert strict_post.json()["reason"] == "Selector error: expected a JSON object"


async def test_filter_selector_without_any_selector_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(f"/{DB}/_changes", params={"filter": "_selector"}, json={})

    assert response.status_code == 400
    assert response.json()["error"] == "bad_request"


async def test_a_filter_naming_a_missing_design_doc_is_404(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    missing = await client.get(f"/{DB}/_changes", params={"filter": "app/new"})
    fake.put(DB, {"_id": "_design/app", "filters": {"new": "function(doc) { return true; }"}})
    javascript = await client.get(f"/{DB}/_changes", params={"filter": "app/new"})

    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "reason": "missing"}
    # The fake cannot run JavaScript: it says so instead of guessing.
    assert javascript.status_code == 501
    assert javascript.json()["error"] == "not_implemented"


async def test_design_filter_sends_only_design_docs(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "m1"})
    fake.put(DB, {"_id": "_design/app"})

    rows = await rows_of(client, filter="_design")

    assert [r["id"] for r in rows] == ["_design/app"]


# -- feeds: CouchDB 3 behaviour PouchDB Server lacks ----------------------------------


async def test_deleting_the_database_ends_its_feeds_with_last_seq(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.put(DB, {"_id": "a"})

    async with client.stream(
        "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "50"}
    ) as response:
        lines = response.aiter_lines()
        assert json.loads(await anext(lines))["id"] == "a"
        fake.delete_database(DB)
        rest = [line async for line in lines]

    assert set(json.loads(rest[-1])) == {"last_seq", "pending"}
    assert all(line == "" for line in rest[:-1])


async def test_longpoll_timeout_ends_with_empty_results(client: httpx.AsyncClient) -> None:
    body = (
        await client.get(f"/{DB}/_changes", params={"feed": "longpoll", "timeout": "50"})
    ).json()

    assert body["results"] == []
    assert "last_seq" in body


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"feed": "bogus"}, 400),
        ({"feed": "eventsource"}, 501),
        ({"feed": "continuous", "heartbeat": "0"}, 400),
        ({"feed": "continuous", "heartbeat": "soon"}, 400),
        ({"limit": "-1"}, 400),
        ({"include_docs": "yes"}, 400),
        ({"descending": "true"}, 501),
    ],
)
async def test_feed_parameters_are_checked(
    client: httpx.AsyncClient, params: dict[str, str], status: int
) -> None:
    response = await client.get(f"/{DB}/_changes", params=params)

    assert response.status_code == status
    assert "error" in response.json()


async def test_closing_the_response_stops_the_feed(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    async with client.stream(
        "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "50"}
    ) as response:
        assert await anext(response.aiter_lines()) == ""
        assert fake.open_feeds == 1

    await eventually(lambda: fake.open_feeds == 0, "the feed ended")


# -- faults ---------------------------------------------------------------------------


async def test_fail_next_answers_the_next_requests_with_the_status(reached: Reached) -> None:
    reached.fake.fail_next(2, status=503)

    statuses = [(await reached.client.get(f"/{DB}")).status_code for _ in range(3)]
    first = await reached.client.get("/")

    assert statuses == [503, 503, 200]
    assert first.status_code == 200
    events = reached.fake.events_of("status")
    assert [(e.path, e.detail) for e in events] == [(f"/{DB}", "503"), (f"/{DB}", "503")]


async def test_an_injected_error_has_a_couchdb_error_body(anyio_backend: str) -> None:
    fake_500 = FakeCouch(databases=[DB])
    fake_500.fail_next(status=500)
    async with fake_500.client() as c:
        response = await c.get(f"/{DB}")

    assert response.status_code == 500
    assert set(response.json()) == {"error", "reason"}


async def test_fail_requests_only_hits_matching_paths_and_methods(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.fail_requests(status=500, path=r"/_changes$", method="POST")

    info = await client.get(f"/{DB}")
    get_changes = await client.get(f"/{DB}/_changes")
    post_changes = [(await client.post(f"/{DB}/_changes", json={})).status_code for _ in range(3)]
    fake.clear_faults()
    after = await client.post(f"/{DB}/_changes", json={})

    assert (info.status_code, get_changes.status_code) == (200, 200)
    assert post_changes == [500, 500, 500]
    assert after.status_code == 200
    assert len(fake.events_of("status")) == 3


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda f: f.fail_next(status=200), "status"),
        (lambda f: f.fail_next(0), "count"),
        (lambda f: f.add_latency(-1), "seconds"),
        (lambda f: f.cut_feed_after(-1), "rows"),
        (lambda f: f.stall_feed_after(feed="sometimes"), "feed"),
    ],
)
def test_fault_switches_check_their_arguments(call: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(FakeCouch())


async def test_latency_is_added_and_recorded(reached: Reached) -> None:
    reached.fake.add_latency(0.05, path="/_changes", count=1)

    info = await reached.client.get(f"/{DB}")
    changes = await reached.client.get(f"/{DB}/_changes")

    assert (info.status_code, changes.status_code) == (200, 200)
    (event,) = reached.fake.events_of("latency")
    assert event.path == f"/{DB}/_changes"


async def test_latency_beyond_the_read_timeout_is_a_read_timeout(reached: Reached) -> None:
    reached.fake.add_latency(2.0)

    with pytest.raises(httpx.ReadTimeout):
        await reached.client.get(f"/{DB}", timeout=httpx.Timeout(5.0, read=0.1))


async def test_cut_feed_drops_the_connection_after_n_rows(reached: Reached) -> None:
    for i in range(4):
        reached.fake.put(DB, {"_id": f"m{i}"})
    reached.fake.cut_feed_after(2)
    received: list[str] = []

    with pytest.raises(httpx.RemoteProtocolError):
        async with reached.client.stream(
            "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "50"}
        ) as response:
            async for line in response.aiter_lines():
                if line:
                    received.append(json.loads(line)["id"])
    # The cut fires once: the reconnect gets everything after its since.
    again = await reached.client.get(f"/{DB}/_changes", params={"feed": "normal"})

    assert received == ["m0", "m1"]
    assert [e.detail for e in reached.fake.events_of("cut")] == ["after 2 rows"]
    assert [r["id"] for r in again.json()["results"]] == ["m0", "m1", "m2", "m3"]


async def test_stalled_feed_sends_nothing_not_even_heartbeats(reached: Reached) -> None:
    reached.fake.put(DB, {"_id": "m0"})
    reached.fake.put(DB, {"_id": "m1"})
    reached.fake.stall_feed_after(1)
    lines: list[str] = []

    with pytest.raises(httpx.ReadTimeout):
        async with reached.client.stream(
            "GET",
            f"/{DB}/_changes",
            params={"feed": "continuous", "heartbeat": "20"},
            timeout=httpx.Timeout(5.0, read=0.3),
        ) as response:
            async for line in response.aiter_lines():
                lines.append(line)

    assert [json.loads(line)["id"] for line in lines] == ["m0"]
    assert len(reached.fake.events_of("stall")) == 1
    await eventually(lambda: reached.fake.open_feeds == 0, "the stalled feed ended")


async def test_refused_connections_in_process_raise_connect_error(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    fake.refuse_connections()

    with pytest.raises(httpx.ConnectError):
        await client.get(f"/{DB}")
    fake.accept_connections()
    after = await client.get(f"/{DB}")

    assert after.status_code == 200
    assert [e.kind for e in fake.events] == ["refusing", "refused", "accepting"]


async def test_refused_connections_on_the_socket_close_the_listener(fake: FakeCouch) -> None:
    async with (
        FakeCouchServer(fake) as server,
        httpx.AsyncClient(base_url=server.url, timeout=5.0, trust_env=False) as c,
    ):
        before = await c.get(f"/{DB}")  # leaves a keep-alive connection in the pool
        fake.refuse_connections(0.2)
        with pytest.raises(httpx.ConnectError):
            await c.get(f"/{DB}")
        # A timed refusal ends by itself, on the same port.
        await eventually(lambda: server.listening, "the server listened again")
        after = await c.get(f"/{DB}")

    assert (before.status_code, after.status_code) == (200, 200)
    assert [e.kind for e in fake.events] == ["refusing"]


async def test_refusing_connections_drops_open_feeds(reached: Reached) -> None:
    with pytest.raises(httpx.TransportError):
        async with reached.client.stream(
            "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "20"}
        ) as response:
            async for _ in response.aiter_lines():
                reached.fake.refuse_connections()
    reached.fake.accept_connections()

    assert (await reached.client.get(f"/{DB}")).status_code == 200


async def test_drop_connections_ends_feeds_but_accepts_new_ones(reached: Reached) -> None:
    with pytest.raises(httpx.TransportError):
        async with reached.client.stream(
            "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "20"}
        ) as response:
            async for _ in response.aiter_lines():
                reached.fake.drop_connections()

    assert (await reached.client.get(f"/{DB}")).status_code == 200
    assert len(reached.fake.events_of("dropped")) == 1


# -- auth ----------------------------------------------------------------------------------


async def test_basic_auth_rejects_missing_and_bad_credentials() -> None:
    fake = FakeCouch(databases=[DB], users={"admin": "secret"})
    async with (
        fake.client() as anonymous,
        fake.client(auth=("admin", "wrong")) as wrong,
        fake.client(auth=("admin", "secret")) as admin,
    ):
        no_credentials = await anonymous.get(f"/{DB}")
        bad_password = await wrong.get("/")
        welcome = await anonymous.get("/")
        up = await anonymous.get("/_up")
        allowed = await admin.get(f"/{DB}")

    assert no_credentials.status_code == 401
    assert no_credentials.json() == {
        "error": "unauthorized",
        "reason": "You are not authorized to access this db.",
    }
    # Bad credentials are rejected even where none are needed, as CouchDB does.
    assert bad_password.status_code == 401
    assert bad_password.json()["reason"] == "Name or password is incorrect."
    assert (welcome.status_code, up.status_code, allowed.status_code) == (200, 200, 200)


# -- documents: details PouchDB Server does differently ------------------------------------


async def test_the_fake_keeps_only_the_current_revision(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    first = fake.put(DB, {"_id": "a", "n": 1})
    fake.put(DB, {"_id": "a", "_rev": first, "n": 2})

    old = await client.get(f"/{DB}/a", params={"rev": first})
    history = (await client.get(f"/{DB}/a", params={"revs": "true"})).json()["_revisions"]

    # As on a CouchDB that has just compacted (PouchDB Server keeps old bodies).
    assert old.status_code == 404
    assert history["start"] == 2
    assert history["ids"][1] == first.split("-", 1)[1]


async def test_deleting_a_deleted_doc_is_404_deleted(
    fake: FakeCouch, client: httpx.AsyncClient
) -> None:
    rev = fake.put(DB, {"_id": "a"})
    tombstone = fake.delete(DB, "a", rev)

    again = await client.delete(f"/{DB}/a", params={"rev": tombstone})

    assert again.status_code == 404
    assert again.json() == {"error": "not_found", "reason": "deleted"}


async def test_bad_database_names_and_special_members_are_400(client: httpx.AsyncClient) -> None:
    bad_name = await client.put("/Messages")
    bad_member = await client.put(f"/{DB}/a", json={"_secret": 1})

    assert bad_name.status_code == 400
    assert bad_name.json()["error"] == "illegal_database_name"
    assert bad_member.status_code == 400
    assert bad_member.json() == {
        "error": "doc_validation",
        "reason": "Bad special document member: _secret",
    }


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", f"/{DB}/_explain", {"selector": {}}),
        ("GET", f"/{DB}/a/attachment.txt", None),
        ("POST", f"/{DB}/_bulk_docs", {"docs": [], "new_edits": False}),
        ("GET", f"/{DB}/_design/app/_view/by_date", None),
        ("PUT", f"/{DB}/a", {"_attachments": {}}),
    ],
)
async def test_what_the_fake_does_not_implement_is_501(
    client: httpx.AsyncClient, method: str, path: str, body: Any
) -> None:
    response = await client.request(method, path, json=body)

    assert response.status_code == 501
    assert response.json()["error"] == "not_implemented"


def test_python_helpers_follow_the_same_rules() -> None:
    fake = FakeCouch(databases=[DB])
    rev = fake.put(DB, {"_id": "a", "nested": {"n": 1}})
    with pytest.raises(FakeCouchError) as conflict:
        fake.put(DB, {"_id": "a"})
    doc = fake.get(DB, "a")
    assert doc is not None
    doc["nested"]["n"] = 99  # a copy: the stored doc does not change
    fake.delete(DB, "a", rev)

    assert conflict.value.status == 409
    assert conflict.value.reason == "Document update conflict."
    assert fake.get(DB, "a") is None
    assert fake.docs(DB) == []
    with pytest.raises(FakeCouchError) as missing:
        fake.get("nope", "a")
    assert missing.value.reason == "Database does not exist."


async def test_every_request_is_recorded(fake: FakeCouch, client: httpx.AsyncClient) -> None:
    await client.put(f"/{DB}/a", json={})
    await client.get(f"/{DB}/missing")

    assert [(r.method, r.path, r.status) for r in fake.requests] == [
        ("PUT", f"/{DB}/a", 201),
        ("GET", f"/{DB}/missing", 404),
    ]
    assert "requests=2" in repr(fake)


# -- the socket server -------------------------------------------------------------------


async def test_the_server_keeps_connections_alive(fake: FakeCouch) -> None:
    async with (
        FakeCouchServer(fake) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as c,
    ):
        for i in range(3):
            assert (await c.put(f"/{DB}/m{i}", json={})).status_code == 201

    assert server.connections_served == 1


async def test_the_server_stops_a_feed_whose_client_went_away(fake: FakeCouch) -> None:
    fake.put(DB, {"_id": "a"})
    async with (
        FakeCouchServer(fake) as server,
        httpx.AsyncClient(base_url=server.url, trust_env=False) as c,
    ):
        async with c.stream(
            "GET", f"/{DB}/_changes", params={"feed": "continuous", "heartbeat": "1000"}
        ) as response:
            assert json.loads(await anext(response.aiter_lines()))["id"] == "a"
        # No heartbeat is due for a second: the server noticed the close itself.
        await eventually(lambda: fake.open_feeds == 0, "the server ended the feed")


def test_a_server_in_a_thread_serves_another_process() -> None:
    fake = FakeCouch(databases=[DB])
    with FakeCouchServer(fake) as server:
        fake.put(DB, {"_id": "m1", "to": "whaa@example.com"})
        script = (
            "import json, sys, urllib.request\n"
            "with urllib.request.urlopen(sys.argv[1]) as r:\n"
            "    print(json.load(r)['to'])\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", script, f"{server.url}/{DB}/m1"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        sync = httpx.get(f"{server.url}/{DB}", trust_env=False)

    assert result.stdout.strip() == "whaa@example.com"
    assert sync.json()["doc_count"] == 1
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{server.url}/{DB}", trust_env=False)


def test_elem_match_reaches_into_the_elements_fields() -> None:
    doc = {"items": [{"sku": "a", "qty": 1}, {"sku": "b", "qty": 5}], "neg": -7}

    assert selector_matches({"items": {"$elemMatch": {"sku": "b", "qty": {"$gt": 2}}}}, doc)
    assert not selector_matches({"items": {"$elemMatch": {"sku": "a", "qty": {"$gt": 2}}}}, doc)
    assert selector_matches({"items": {"$allMatch": {"qty": {"$gte": 1}}}}, doc)
    # Erlang's rem: the remainder takes the dividend's sign (Python's % would say 1).
    assert selector_matches({"neg": {"$mod": [4, -3]}}, doc)
    assert not selector_matches({"neg": {"$mod": [4, 1]}}, doc)


@pytest.mark.parametrize(
    ("path", "params"),
    [
        (f"/{DB}/_all_docs", {"group": "true"}),
        (f"/{DB}/_changes", {"view": "app/by_date"}),
        (f"/{DB}/_changes", {"seq_interval": "10"}),
        (f"/{DB}/a", {"open_revs": "all"}),
        (f"/{DB}", {"nonsense": "1"}),
        ("/_all_dbs", {"nonsense": "1"}),
        ("/", {"x": "1"}),
    ],
)
async def test_a_query_parameter_the_fake_does_not_implement_is_501_naming_it(
    fake: FakeCouch, client: httpx.AsyncClient, path: str, params: dict[str, str]
) -> None:
    fake.put(DB, {"_id": "a"})

    response = await client.get(path, params=params)

    assert response.status_code == 501
    assert response.json()["error"] == "not_implemented"
    assert next(iter(params)) in response.json()["reason"]
