"""Serve a :class:`~notifier.testing.fake_couch.FakeCouch` to an httpx client in process."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TYPE_CHECKING, Final

import httpx

from notifier.testing.fake_couch.wire import FeedCut

if TYPE_CHECKING:
    from notifier.testing.fake_couch.couch import FakeCouch

# Chunks an in-process streamed answer may run ahead of its reader.
_STREAM_BUFFER_CHUNKS: Final = 256


class FakeCouchTransport(httpx.AsyncBaseTransport):
    """Serves a :class:`FakeCouch` to an ``httpx.AsyncClient`` without sockets.

    Unlike ``httpx.ASGITransport`` it streams: a continuous feed yields its
    rows as they happen, and closing the response stops the feed. It also
    honours the request's read timeout (httpx leaves that to the transport),
    so a stalled feed or a long latency raises ``httpx.ReadTimeout`` just as
    over a socket. A cut feed raises ``httpx.RemoteProtocolError``; refused
    connections raise ``httpx.ConnectError``.
    """

    def __init__(self, couch: FakeCouch) -> None:
        self.couch = couch

    def __repr__(self) -> str:
        return f"<FakeCouchTransport {self.couch!r}>"

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        raw_path = request.url.raw_path.decode("ascii")
        path, _, query = raw_path.partition("?")
        if self.couch.refusing_connections:
            self.couch.note_refused(request.method, path)
            raise httpx.ConnectError("[Errno 111] Connection refused", request=request)
        body = await request.aread()
        read_timeout = _read_timeout(request)
        try:
            async with asyncio.timeout(read_timeout):
                answer = await self.couch.handle(
                    request.method, path, query, request.headers.multi_items(), body
                )
        except TimeoutError:
            raise httpx.ReadTimeout("timed out", request=request) from None
        if isinstance(answer.body, bytes):
            return httpx.Response(
                answer.status, headers=answer.headers, content=answer.body, request=request
            )
        return httpx.Response(
            answer.status,
            headers=answer.headers,
            stream=_FeedStream(answer.body, read_timeout, request),
            request=request,
        )


class _FeedStream(httpx.AsyncByteStream):
    """A streamed answer, produced as a server would: whether or not the client reads.

    A task runs the feed into a bounded buffer (the socket buffers of a real
    connection), so a feed's ``timeout`` runs out, heartbeats are produced and
    a cut happens on the server's clock, not when the client next reads; a
    client that stops reading still holds the server back once the buffer is
    full.
    """

    def __init__(
        self, body: AsyncIterator[bytes], read_timeout: float | None, request: httpx.Request
    ) -> None:
        self._body = body
        self._read_timeout = read_timeout
        self._request = request
        self._buffer: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(
            _STREAM_BUFFER_CHUNKS
        )
        self._pump = asyncio.get_running_loop().create_task(self._produce())

    async def _produce(self) -> None:
        try:
            async for chunk in self._body:
                await self._buffer.put(chunk)
        except Exception as e:
            await self._buffer.put(e)
        else:
            await self._buffer.put(None)
        finally:
            if isinstance(self._body, AsyncGenerator):
                await self._body.aclose()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            try:
                async with asyncio.timeout(self._read_timeout):
                    item = await self._buffer.get()
            except TimeoutError:
                await self.aclose()
                raise httpx.ReadTimeout("timed out", request=self._request) from None
            if item is None:
                return
            if isinstance(item, FeedCut):
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body "
                    "(incomplete chunked read)",
                    request=self._request,
                )
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aclose(self) -> None:
        # Closing the response is the client hanging up: the feed stops.
        self._pump.cancel()
        await asyncio.gather(self._pump, return_exceptions=True)


def _read_timeout(request: httpx.Request) -> float | None:
    timeouts = request.extensions.get("timeout")
    if isinstance(timeouts, dict):
        value = timeouts.get("read")
        if isinstance(value, int | float):
            return float(value)
    return None
