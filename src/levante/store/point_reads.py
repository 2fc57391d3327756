"""The bulk reads of StoreTransaction, made of point reads: for the in-process stores
(memory, SQLite), where a statement costs microseconds and a round trip nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TypeVar

from levante.core.model import AssignmentRecord, ExecutionRecord, TaskRecord
from levante.ids import AssignmentId, ExecutionId, TaskId

K = TypeVar("K")
V = TypeVar("V")


async def each_found(read: Callable[[K], Awaitable[V | None]], keys: Iterable[K]) -> dict[K, V]:
    """``read`` of each key, in the keys' order; the keys with nothing left out."""
    found = {}
    for key in keys:
        value = await read(key)
        if value is not None:
            found[key] = value
    return found


class PointReads:
    """``get_assignments``, ``lock_executions`` and ``tasks_and_latest`` of a transaction
    class, from its point reads (which it defines)."""

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        raise NotImplementedError

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        raise NotImplementedError

    async def get_task(self, task_id: TaskId) -> TaskRecord | None:
        raise NotImplementedError

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        raise NotImplementedError

    async def get_assignments(
        self, assignment_ids: Collection[AssignmentId]
    ) -> dict[AssignmentId, AssignmentRecord]:
        return await each_found(self.get_assignment, assignment_ids)

    async def lock_executions(
        self, execution_ids: Collection[ExecutionId]
    ) -> dict[ExecutionId, ExecutionRecord]:
        return await each_found(self.lock_execution, sorted(execution_ids))  # in id order

    async def tasks_and_latest(
        self, task_ids: Collection[TaskId], latest: Mapping[ExecutionId, Collection[str]]
    ) -> tuple[dict[TaskId, TaskRecord], dict[ExecutionId, dict[str, TaskRecord]]]:
        newest = {e: await self.latest_tasks(e, names) for e, names in latest.items()}
        # A task asked for by id is nearly always the newest of its name, read already.
        known = {t.id: t for tasks in newest.values() for t in tasks.values()}
        by_id = {}
        for task_id in task_ids:
            task = known.get(task_id) or await self.get_task(task_id)
            if task is not None:
                by_id[task_id] = task
        return by_id, newest
