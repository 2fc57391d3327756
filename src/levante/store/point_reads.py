"""The bulk reads of StoreTransaction, made of point reads: for the in-process stores
(memory, SQLite), where a statement costs microseconds and a round trip nothing."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping
from typing import TypeVar

from levante.core.model import TaskRecord
from levante.ids import ExecutionId, TaskId

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


async def tasks_and_latest(
    get_task: Callable[[TaskId], Awaitable[TaskRecord | None]],
    latest_tasks: Callable[[ExecutionId, Collection[str]], Awaitable[dict[str, TaskRecord]]],
    task_ids: Iterable[TaskId],
    latest: Mapping[ExecutionId, Collection[str]],
) -> tuple[dict[TaskId, TaskRecord], dict[ExecutionId, dict[str, TaskRecord]]]:
    """``StoreTransaction.tasks_and_latest`` from ``get_task`` and ``latest_tasks``."""
    newest = {e: await latest_tasks(e, names) for e, names in latest.items()}
    # A task asked for by id is nearly always the newest of its name, read already.
    known = {t.id: t for tasks in newest.values() for t in tasks.values()}
    by_id = {}
    for task_id in task_ids:
        task = known.get(task_id) or await get_task(task_id)
        if task is not None:
            by_id[task_id] = task
    return by_id, newest
