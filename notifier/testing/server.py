"""Serve a :class:`~notifier.testing.fake_couch.FakeCouch` on a real loopback socket.

:class:`FakeCouchServer` is a small HTTP/1.1 server built on ``h11`` (already
installed as a dependency of httpx, so the harness needs nothing more). It
exists so that code which opens its own connections, a subprocess running the
``notifier`` CLI above all, can talk to the fake, and so that the fake is
exercised through a real socket, real keep-alive and real chunked encoding.

What it promises:

* It listens on ``127.0.0.1`` and a free port (port 0 unless told otherwise);
  :attr:`FakeCouchServer.url` says where.
* Keep-alive connections; every ``_changes`` answer is streamed with chunked
  encoding and flushed chunk by chunk, so a continuous feed and its
  heartbeats arrive as they happen.
* A feed the fake cuts ends the connection without the final chunk (httpx
  raises ``RemoteProtocolError``); a client that closes its end stops the feed.
* ``refuse_connections()`` on the fake closes the listening socket (new
  connections are refused by the kernel) and drops open connections; the
  socket is reopened on the same port when the refusal ends.
  ``drop_connections()`` drops open connections only.
* Two ways to run it: ``async with FakeCouchServer(fake) as server`` serves
  from the current event loop; ``with FakeCouchServer(fake) as server`` (or
  :meth:`FakeCouchServer.start_in_thread`) serves from a background thread
  with its own loop, for synchronous tests and subprocesses.

Starlette and uvicorn would also do, but they would add two dependencies to
``notifier[testing]`` for what is a few dozen lines on top of h11, and
uvicorn's own timeouts and flow control would sit between the fault
injection and the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
from collections.abc import AsyncIterator, Callable
from http import HTTPStatus
from types import TracebackType
from typing import Self

import h11

from notifier.testing.fake_couch import FakeCouch, FeedCut

__all__ = ["FakeCouchServer"]

log = logging.getLogger(__name__)

_READ_SIZE = 65536
_MAX_HEADER_BYTES = 64 * 1024


class _ClientGone(Exception):
    """The client closed its end while an answer was being streamed."""


class FakeCouchServer:
    """An HTTP/1.1 server for one :class:`FakeCouch` on loopback.

    >>> server = FakeCouchServer(FakeCouch(), port=0)
    >>> server.url
    Traceback (most recent call last):
    ...
    RuntimeError: FakeCouchServer is not started
    """

    def __init__(self, couch: FakeCouch, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.couch = couch
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.connections_served = 0
        self._server: asyncio.Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._seen_drop_generation = couch.drop_generation
        self._reopen_handle: asyncio.TimerHandle | None = None
        self._remove_listener: Callable[[], None] | None = None
        self._loop_thread: int | None = None
        self._background: set[asyncio.Task[None]] = set()
        self._started = False
        # Background-thread mode.
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._thread_error: BaseException | None = None

    def __repr__(self) -> str:
        where = self.url if self.port is not None else "not started"
        return (
            f"<FakeCouchServer {where} open_connections={len(self._connections)} "
            f"served={self.connections_served}>"
        )

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``, once started."""
        if self.port is None:
            raise RuntimeError("FakeCouchServer is not started")
        return f"http://{self.host}:{self.port}"

    @property
    def listening(self) -> bool:
        """Whether the listening socket is open (it is closed while refusing connections)."""
        return self._server is not None

    # -- in the current event loop -----------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("FakeCouchServer is already started")
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        await self._serve_on(self._bind(self._requested_port))
        self._started = True
        self._remove_listener = self.couch.add_listener(self._fault_switch_changed)
        # The fake may already be refusing.
        self._on_fault_switch()

    async def aclose(self) -> None:
        """Stop listening, drop every connection and wait for their tasks. Idempotent."""
        if not self._started:
            return
        self._started = False
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._reopen_handle is not None:
            self._reopen_handle.cancel()
            self._reopen_handle = None
        await self._close_listener()
        # Aborted sockets end most connections by themselves; whatever is
        # still busy after a moment (a long injected latency) is cancelled.
        self._abort_connections()
        tasks = [*self._connections, *self._background]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- in a background thread --------------------------------------------------------

    def start_in_thread(self, timeout: float = 10.0) -> Self:
        """Serve from a new thread with its own event loop; returns once listening."""
        if self._thread is not None:
            raise RuntimeError("FakeCouchServer is already running in a thread")
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._thread_main, args=(ready,), name="fake-couch-server", daemon=True
        )
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"FakeCouchServer did not start within {timeout:g}s")
        if self._thread_error is not None:
            self._thread.join()
            self._thread = None
            raise RuntimeError("FakeCouchServer failed to start") from self._thread_error
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with :meth:`start_in_thread`. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            _call_soon(loop, stop.set)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"FakeCouchServer thread did not stop within {timeout:g}s")

    def __enter__(self) -> Self:
        return self.start_in_thread()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    def _thread_main(self, ready: threading.Event) -> None:
        async def serve() -> None:
            self._stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as e:
                self._thread_error = e
                ready.set()
                return
            ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.aclose()

        asyncio.run(serve())

    # -- listening, refusing, dropping -------------------------------------------------

    def _bind(self, port: int) -> socket.socket:
        """A listening socket, bound now: connections queue from this moment on.

        Binding synchronously (rather than inside ``asyncio.start_server``)
        is what lets ``accept_connections()`` take effect before it returns.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self.port = sock.getsockname()[1]
        return sock

    async def _serve_on(self, sock: socket.socket) -> None:
        self._server = await asyncio.start_server(self._accept, sock=sock, limit=_READ_SIZE)
        log.debug("fake couch server listening on %s", self.url)

    async def _close_listener(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)

    def _fault_switch_changed(self) -> None:
        """The fake's listener: apply the switch in the server's loop before returning.

        Waiting matters: a test that calls ``refuse_connections()`` and then
        connects must be refused, not race the server thread.
        """
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._on_fault_switch()
            return
        applied = threading.Event()

        def apply() -> None:
            try:
                self._on_fault_switch()
            finally:
                applied.set()

        _call_soon(loop, apply)
        applied.wait(5.0)

    def _on_fault_switch(self) -> None:
        """Apply the fake's connection switches; runs in the server's loop."""
        if not self._started:
            return
        generation = self.couch.drop_generation
        if generation != self._seen_drop_generation:
            self._seen_drop_generation = generation
            self._abort_connections()
        refusing = self.couch.refusing_connections
        if refusing and self._server is not None:
            server, self._server = self._server, None
            server.close()
            self._abort_connections()
        if self._reopen_handle is not None:
            self._reopen_handle.cancel()
            self._reopen_handle = None
        if refusing:
            remaining = self.couch.refusal_remaining
            if remaining is not None and self._loop is not None:
                # Nobody else will notice that a timed refusal has ended.
                self._reopen_handle = self._loop.call_later(remaining, self._on_fault_switch)
        elif self._server is None and self._loop is not None and self.port is not None:
            try:
                sock = self._bind(self.port)
            except OSError:
                log.exception("fake couch server could not listen again on port %s", self.port)
                return
            task = self._loop.create_task(self._serve_on(sock))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def _abort_connections(self) -> None:
        for writer in list(self._writers):
            # abort() closes the socket only on the next loop iteration; the
            # shutdown is immediate, so a client that reuses a pooled
            # connection right away already sees it closed.
            sock = writer.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
            writer.transport.abort()

    # -- one connection ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if self.couch.refusing_connections:
            # Queued just before the listener closed: the server is "down".
            writer.transport.abort()
            return
        self._connections.add(task)
        self._writers.add(writer)
        self.connections_served += 1
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self._serve(reader, writer)
        except (ConnectionError, _ClientGone, h11.ProtocolError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # Only aclose() cancels a connection. Ending normally keeps
            # asyncio's stream callback from logging the cancellation.
            pass
        except Exception:
            log.exception("fake couch server: connection failed")
        finally:
            self._writers.discard(writer)
            self._connections.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        while True:
            request = await self._read_request(conn, reader)
            if request is None:
                return
            event, body = request
            target = event.target.decode("ascii")
            path, _, query = target.partition("?")
            headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in event.headers]
            method = event.method.decode("ascii")
            answer = await self.couch.handle(method, path, query, headers, body)
            out_headers = [(k.encode(), v.encode()) for k, v in answer.headers]
            # One write per answer (or per chunk): several small writes meet
            # the client's delayed ACKs and cost tens of milliseconds each.
            if isinstance(answer.body, bytes):
                out_headers.append((b"content-length", str(len(answer.body)).encode()))
                events: list[h11.Event] = [
                    h11.Response(
                        status_code=answer.status,
                        headers=out_headers,
                        reason=_reason(answer.status),
                    )
                ]
                if answer.body and method != "HEAD":
                    events.append(h11.Data(data=answer.body))
                events.append(h11.EndOfMessage())
                writer.write(_encode(conn, events))
                await writer.drain()
            else:
                out_headers.append((b"transfer-encoding", b"chunked"))
                head = h11.Response(
                    status_code=answer.status, headers=out_headers, reason=_reason(answer.status)
                )
                writer.write(_encode(conn, [head]))
                await writer.drain()
                if not await self._stream(conn, reader, writer, answer.body):
                    return
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(_READ_SIZE))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None

    async def _stream(
        self,
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        body: AsyncIterator[bytes],
    ) -> bool:
        """Send a streamed body; False when the connection must end (cut or client gone).

        The client sends nothing while it reads a response, so a read that
        returns means it closed its end: the feed then stops at once instead
        of waiting for its next heartbeat to hit a dead socket.
        """

        async def pump() -> None:
            try:
                async for chunk in body:
                    if chunk:
                        writer.write(_encode(conn, [h11.Data(data=chunk)]))
                        await writer.drain()
            finally:
                aclose = getattr(body, "aclose", None)
                if aclose is not None:
                    await aclose()
            writer.write(_encode(conn, [h11.EndOfMessage()]))
            await writer.drain()

        pump_task = asyncio.create_task(pump())
        watch_task = asyncio.create_task(reader.read(_READ_SIZE))
        try:
            done, _ = await asyncio.wait(
                {pump_task, watch_task}, return_when=asyncio.FIRST_COMPLETED
            )
            if watch_task in done and pump_task not in done:
                data = b"" if watch_task.exception() else watch_task.result()
                if not data:
                    raise _ClientGone
                # A pipelined request: keep it for h11 and finish the answer.
                conn.receive_data(data)
                await pump_task
            try:
                pump_task.result()
            except FeedCut:
                # Close without the final chunk: the client sees an
                # incomplete body, as when a real server's connection drops.
                writer.close()
                return False
            if watch_task.done():
                data = b"" if watch_task.exception() else watch_task.result()
                if not data:
                    return False
                conn.receive_data(data)
            return True
        finally:
            for task in (pump_task, watch_task):
                if not task.done():
                    task.cancel()
            await asyncio.gather(pump_task, watch_task, return_exceptions=True)


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], object]) -> None:
    # A closed loop means the server is gone: nothing to tell it.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback)


def _reason(status: int) -> bytes:
    """The status line's reason phrase, as CouchDB sends it ("201 Created")."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""


def _encode(conn: h11.Connection, events: list[h11.Event]) -> bytes:
    out = bytearray()
    for event in events:
        data = conn.send(event)
        if data is not None:
            out += data
    return bytes(out)
