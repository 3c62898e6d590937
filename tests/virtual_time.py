"""A virtual clock for the pure cores' async shells: time passes only when
someone sleeps, so hours of pacing run in milliseconds and no test waits."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class VirtualTime:
    """A clock that advances only when someone sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleeper(self, sleepers: list[str] | None = None) -> Callable[[float], Awaitable[None]]:
        async def sleep(seconds: float) -> None:
            if sleepers is not None:
                task = asyncio.current_task()
                sleepers.append(task.get_name() if task else "?")
            self.now += seconds
            await asyncio.sleep(0)

        return sleep
