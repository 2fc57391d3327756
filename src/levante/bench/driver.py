"""Driving an engine through ``levante.Client`` and timing executions by the engine's clock.

An execution's end is read from its ``updated_at`` timestamp (the engine's
``time.time()`` at the commit that made it final; engine and benchmark share the
machine's clock), so how often the benchmark polls changes only how soon it notices,
never the figure. Polling backs off with the time elapsed (10 %, at most 5 s) so that
status reads of large executions take little from the engine being measured.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from levante.bench.processes import BenchError, Cluster
from levante.client import FINAL_STATES, Client
from levante.v1 import levante_pb2 as pb

__all__ = ["BenchClient", "start_many", "wait_final"]

MAX_POLL_SECONDS = 5.0


class BenchClient(Client):
    """A Client that also returns the raw ExecutionStatus, with its timestamps."""

    async def __aenter__(self) -> BenchClient:
        return self

    async def status_message(self, execution_id: str) -> pb.ExecutionStatus:
        status: pb.ExecutionStatus = await self._call(
            self._engine.GetStatus, pb.GetStatusRequest(execution_id=execution_id), timeout=60.0
        )
        return status


async def start_many(
    client: Client,
    workflow: str,
    count: int,
    *,
    in_flight: int | None = None,
    input: dict[str, object] | None = None,
) -> list[str]:
    """``count`` Run calls at once (asyncio.gather), at most ``in_flight`` outstanding."""
    if in_flight is None:
        return list(await asyncio.gather(*(client.run(workflow, input) for _ in range(count))))
    gate = asyncio.Semaphore(in_flight)

    async def one() -> str:
        async with gate:
            return await client.run(workflow, input)

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def wait_final(
    client: BenchClient,
    execution_ids: Sequence[str],
    *,
    started: float,
    deadline: float,
    what: str,
    cluster: Cluster | None = None,
) -> float:
    """Wait until every execution is final; returns the latest end (engine clock, epoch
    seconds). BenchError if one does not end in SUCCESS or ``deadline`` (monotonic) passes.
    ``started`` (epoch seconds) paces the polling."""
    pending = deque(execution_ids)
    ended = 0.0
    while pending:
        status = await client.status_message(pending[0])
        if status.state in FINAL_STATES:
            if status.state != "SUCCESS":
                raise BenchError(
                    f"{what}: execution {status.execution_id} ended {status.state}: "
                    f"{status.state_info}"
                )
            ended = max(ended, status.updated_at.ToNanoseconds() / 1e9)
            pending.popleft()
            continue
        now = time.monotonic()
        if now > deadline:
            done = sum(1 for t in status.tasks if t.state == "SUCCESS")
            raise BenchError(
                f"{what}: deadline passed with {len(pending)} of {len(execution_ids)} "
                f"executions unfinished; execution {status.execution_id} is {status.state} "
                f"with {done} of {len(status.tasks)} tasks done"
            )
        if cluster is not None:
            cluster.check_alive()
        pause = min(max(0.1 * (time.time() - started), 0.02), MAX_POLL_SECONDS)
        await asyncio.sleep(min(pause, max(deadline - now, 0.01)))
    return ended
