"""Driving an engine through ``levante.Client`` and timing executions by the engine's clock.

An execution's end is read from its ``updated_at`` timestamp (the engine's
``time.time()`` at the commit that made it final; engine and benchmark share the
machine's clock), so how often the benchmark polls changes only how soon it notices,
never the figure.

Waiting is a cheap loop over ``ListExecutions`` (the workflow's RUNNING executions,
whose ``updated_at`` also shows progress), backing off with the time elapsed (5 %, at
most 1 s). It does not read the executions' tasks: a ``GetStatus`` of a 10,000-task
execution costs the engine tens of milliseconds, and (engine bug, see
docs/benchmarks.md) a long read can make the engine answer NOT_FOUND to a worker's
result. Engines without ListExecutions are waited on with ``GetStatus``.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from levante.bench.processes import BenchError, Cluster
from levante.client import FINAL_STATES, Client
from levante.errors import LevanteError
from levante.v1 import levante_pb2 as pb

__all__ = ["STALL_SECONDS", "BenchClient", "start_many", "wait_final", "wait_workflow"]

MAX_POLL_SECONDS = 5.0
# A step of these workflows takes milliseconds: this long without any progress is a hang.
STALL_SECONDS = 30.0


class BenchClient(Client):
    """A Client that also returns the raw ExecutionStatus, with its timestamps."""

    async def __aenter__(self) -> BenchClient:
        return self

    async def executions(self, workflow: str, state: str = "") -> list[pb.ExecutionSummary]:
        """Every execution of ``workflow`` (in ``state``), all pages of ListExecutions."""
        found: list[pb.ExecutionSummary] = []
        token = ""
        while True:
            request = pb.ListExecutionsRequest(
                workflow=workflow, state=state, page_size=1000, page_token=token
            )
            response: pb.ListExecutionsResponse = await self._call(
                self._engine.ListExecutions, request, timeout=60.0
            )
            found.extend(response.executions)
            token = response.next_page_token
            if not token:
                return found

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
    seconds). BenchError if one does not end in SUCCESS, if nothing progresses for
    STALL_SECONDS, or if ``deadline`` (monotonic) passes. ``started`` (epoch seconds)
    paces the polling."""
    pending = deque(execution_ids)
    ended = 0.0
    progress: tuple[int, int, int] = (-1, -1, -1)
    progressed = time.monotonic()
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
        done = sum(1 for t in status.tasks if t.state == "SUCCESS")
        if (len(pending), len(status.tasks), done) != progress:
            progress, progressed = (len(pending), len(status.tasks), done), now
        stalled = now - progressed > STALL_SECONDS
        if now > deadline or stalled:
            unfinished = [
                f"{t.name} {t.state} (attempt {t.attempt}, {t.assignment_id})"
                for t in status.tasks
                if t.state != "SUCCESS"
            ][:5]
            reason = f"no progress for {now - progressed:.0f} s" if stalled else "deadline passed"
            raise BenchError(
                f"{what}: {reason} with {len(pending)} of {len(execution_ids)} executions "
                f"unfinished; execution {status.execution_id} is {status.state} with {done} "
                f"of {len(status.tasks)} tasks done; unfinished: {', '.join(unfinished)}"
            )
        if cluster is not None:
            cluster.check_alive()
        pause = min(max(0.1 * (time.time() - started), 0.02), MAX_POLL_SECONDS)
        await asyncio.sleep(min(pause, max(deadline - now, 0.01)))
    return ended


def _seconds(timestamp: Timestamp) -> float:
    return timestamp.ToNanoseconds() / 1e9


async def wait_workflow(
    client: BenchClient,
    workflow: str,
    execution_ids: Sequence[str],
    *,
    started: float,
    deadline: float,
    what: str,
    cluster: Cluster | None = None,
) -> float:
    """Wait until no execution of ``workflow`` is RUNNING; check that all of
    ``execution_ids`` (the only executions of ``workflow``) ended in SUCCESS; return the
    latest end (engine clock, epoch seconds). BenchError if nothing progresses for
    STALL_SECONDS or ``deadline`` (monotonic) passes."""
    try:
        await client.executions(workflow, "RUNNING")
    except LevanteError:  # an engine without ListExecutions
        return await wait_final(
            client, execution_ids, started=started, deadline=deadline, what=what, cluster=cluster
        )
    progress: tuple[int, float] = (-1, 0.0)
    progressed = time.monotonic()
    while running := await client.executions(workflow, "RUNNING"):
        now = time.monotonic()
        latest = max(_seconds(e.updated_at) for e in running)
        if (len(running), latest) != progress:
            progress, progressed = (len(running), latest), now
        stalled = now - progressed > STALL_SECONDS
        if now > deadline or stalled:
            reason = f"no progress for {now - progressed:.0f} s" if stalled else "deadline passed"
            first = await client.status_message(running[0].execution_id)
            unfinished = [
                f"{t.name} {t.state} (attempt {t.attempt}, {t.assignment_id})"
                for t in first.tasks
                if t.state != "SUCCESS"
            ][:5]
            raise BenchError(
                f"{what}: {reason} with {len(running)} of {len(execution_ids)} executions "
                f"running; execution {first.execution_id} has "
                f"{len(first.tasks) - len(unfinished)}+ of {len(first.tasks)} tasks done; "
                f"unfinished: {', '.join(unfinished)}"
            )
        if cluster is not None:
            cluster.check_alive()
        pause = min(max(0.05 * (time.time() - started), 0.02), 1.0)
        await asyncio.sleep(min(pause, max(deadline - now, 0.01)))
    ended = {e.execution_id: e for e in await client.executions(workflow)}
    missing = [i for i in execution_ids if i not in ended]
    failed = [e for e in ended.values() if e.state != "SUCCESS"]
    if missing or failed:
        detail = f"{len(missing)} missing" if missing else ""
        if failed:
            detail += f"; {len(failed)} not SUCCESS, e.g. {failed[0].execution_id} "
            detail += f"{failed[0].state}: {failed[0].state_info}"
        raise BenchError(f"{what}: {detail}")
    return max(_seconds(ended[i].updated_at) for i in execution_ids)
