"""Running a worker inside a test, in the test's own event loop.

:func:`worker_running` starts a worker from a :class:`~notifier.config.Config`
and stops it (with the real shutdown sequence) when the block ends;
:func:`run_until` does the same around a condition::

    async with worker_running(config) as worker:
        await wait_for(lambda: sink.count >= 3)

Pass ``transport=`` to put an in-process fake CouchDB behind the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx

from notifier.config import Config
from notifier.runner import run_worker
from notifier.shard import Shard
from notifier.worker import Worker

Condition = Callable[[], bool | Awaitable[bool]]


async def wait_for(condition: Condition, *, timeout: float = 30.0, interval: float = 0.05) -> None:
    """Poll ``condition`` (sync or async) until it is true; TimeoutError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"condition still false after {timeout:.1f}s")
        await asyncio.sleep(interval)


@asynccontextmanager
async def worker_running(
    config: Config,
    *,
    worker_id: int = 0,
    worker_count: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> AsyncIterator[Worker]:
    """Run a worker for the duration of the block; errors it raised surface at exit."""
    shard = Shard(
        worker_id=worker_id,
        worker_count=config.worker.worker_count if worker_count is None else worker_count,
    )
    started: asyncio.Future[Worker] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run_worker(
            config,
            shard,
            handle_signals=False,
            transport=transport,
            on_start=started.set_result,
        )
    )
    # Either the worker starts, or run_worker fails before it could.
    await asyncio.wait({started, task}, return_when=asyncio.FIRST_COMPLETED)
    if not started.done():
        await task  # raises the start-up error
        raise RuntimeError("the worker stopped before it started")
    worker = started.result()
    ready = asyncio.create_task(worker.ready.wait())
    await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        ready.cancel()
        await task
    try:
        yield worker
    finally:
        worker.stop()
        await task


async def run_until(
    config: Config,
    condition: Condition,
    *,
    timeout: float = 30.0,
    worker_id: int = 0,
    worker_count: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Worker:
    """Run a worker until ``condition`` holds, stop it cleanly, and return it."""
    async with worker_running(
        config, worker_id=worker_id, worker_count=worker_count, transport=transport
    ) as worker:
        await wait_for(condition, timeout=timeout)
    return worker
