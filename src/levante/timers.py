"""The timekeeper: fires durable timers (wait-before, wait-after, retry delays, timeouts).

Timers live in the store, so a restart neither loses nor repeats one: whichever engine
takes a due timer fires it in the same transaction that deletes it. The keeper sleeps
until the earliest due timer, and is woken early when a commit schedules an earlier one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from levante.engine import Engine
from levante.store.base import Store

log = logging.getLogger("levante.timers")

# Even with nothing due, look again this often (another replica may have added timers).
IDLE_RECHECK_SECONDS = 1.0
BATCH = 100


class Timekeeper:
    def __init__(
        self, store: Store, engine: Engine, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._engine = engine
        self._clock = clock
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="timekeeper")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def scheduled(self, due_at: float) -> None:
        """A commit scheduled a timer: look again now."""
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._fire_due()
                due = await self._store.next_timer_due()
                delay = IDLE_RECHECK_SECONDS if due is None else due - self._clock()
                delay = min(max(delay, 0.0), IDLE_RECHECK_SECONDS)
                if delay > 0:
                    # asyncio.timeout, not wait_for: on 3.11, cancelling a wait_for whose
                    # inner wait was just woken can leave the task stuck "cancelling".
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._wake.wait()
                self._wake.clear()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("firing timers failed; retrying")
                await asyncio.sleep(0.5)

    async def _fire_due(self) -> None:
        while True:
            due = await self._store.due_timers(self._clock(), BATCH)
            failed = False
            for timer in due:
                try:
                    await self._engine.fire_timer(timer)
                except asyncio.CancelledError:
                    raise
                except Exception:  # one bad timer must not hold back the others
                    log.exception("timer %s failed to fire; it stays for a later try", timer.id)
                    failed = True
            if failed or len(due) < BATCH:
                return
