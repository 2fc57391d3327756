"""The memory store (``memory://``): for in-process runs and tests; gone with the process.

Transactions are serialised by one asyncio lock. Writes are staged in the transaction
and applied at commit, so a failed transaction leaves nothing behind, as with SQL.
"""

from __future__ import annotations

import asyncio
import bisect
from collections.abc import Callable, Collection, Sequence
from typing import Any

from levante.core.model import (
    AssignmentRecord,
    AssignmentState,
    ExecutionRecord,
    HistoryEntry,
    Outcome,
    TaskRecord,
    TaskState,
    TimerRecord,
    replace,
)
from levante.errors import RequestIdTakenError
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId
from levante.store.base import WAITING_FOR_WORKER, StoredDefinition
from levante.store.point_reads import PointReads


class _Tables:
    def __init__(self) -> None:
        self.executions: dict[ExecutionId, ExecutionRecord] = {}
        self.tasks: dict[TaskId, TaskRecord] = {}
        self.assignments: dict[AssignmentId, AssignmentRecord] = {}
        self.task_ids_by_execution: dict[ExecutionId, list[TaskId]] = {}
        # The newest task row of each (execution, task name): latest_tasks reads only these.
        self.latest: dict[tuple[ExecutionId, str], TaskId] = {}
        self.request_ids: dict[str, ExecutionId] = {}
        self.timers: dict[str, TimerRecord] = {}
        # Every execution's history in one sequence (an entry's seq is its place + 1,
        # given when read), and where each execution's entries are in it.
        self.history: list[HistoryEntry] = []
        self.history_seqs: dict[ExecutionId, list[int]] = {}
        # QUEUED assignment ids in queue order (the order the assignments were first
        # stored, as SQLite's rowid and PostgreSQL's seq), so that a claim reads only
        # as far as it takes.
        self.queued: dict[AssignmentId, None] = {}
        self.ordinals: dict[AssignmentId, int] = {}  # queue order of every assignment
        self.queue_unsorted = False
        self.actions: dict[str, float] = {}  # the catalogue: name -> online_until
        self.notes: dict[TaskId, str] = {}  # tasks noted as waiting for a worker -> action

    def put_assignment(self, assignment: AssignmentRecord) -> None:
        key = assignment.id
        self.assignments[key] = assignment
        ordinal = self.ordinals.setdefault(key, len(self.ordinals))
        if assignment.state != AssignmentState.QUEUED:
            self.queued.pop(key, None)
        elif key not in self.queued:
            if self.queued and self.ordinals[next(reversed(self.queued))] > ordinal:
                self.queue_unsorted = True  # back in the queue (resumed, released)
            self.queued[key] = None

    def queue_in_order(self) -> dict[AssignmentId, None]:
        if self.queue_unsorted:
            self.queued = dict.fromkeys(sorted(self.queued, key=self.ordinals.__getitem__))
            self.queue_unsorted = False
        return self.queued


class MemoryTransaction(PointReads):
    # Every transaction holds the store's one lock, and so does every other write: a
    # row read in a transaction cannot change under it (see StoreTransaction).
    holds_store_lock = True

    def __init__(self, tables: _Tables) -> None:
        self._t = tables
        self.executions: dict[ExecutionId, ExecutionRecord] = {}
        self.tasks: dict[TaskId, TaskRecord] = {}
        self.assignments: dict[AssignmentId, AssignmentRecord] = {}
        self.new_timers: dict[str, TimerRecord] = {}
        self.new_history: list[HistoryEntry] = []
        self.gone_timers: set[str] = set()
        self.notes: dict[TaskId, str] = {}  # waiting notes written in this transaction

    def _execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        return self.executions.get(execution_id) or self._t.executions.get(execution_id)

    def _task(self, task_id: TaskId) -> TaskRecord | None:
        return self.tasks.get(task_id) or self._t.tasks.get(task_id)

    def _tasks_of(self, execution_id: ExecutionId) -> list[TaskRecord]:
        ids = list(self._t.task_ids_by_execution.get(execution_id, ()))
        ids += [t.id for t in self.tasks.values() if t.execution_id == execution_id]
        seen: dict[TaskId, TaskRecord] = {}
        for task_id in ids:
            task = self._task(task_id)
            if task is not None:
                seen[task_id] = task
        return sorted(seen.values(), key=lambda t: t.seq)

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        return self._execution(execution_id)

    async def find_execution_by_request_id(self, request_id: str) -> ExecutionId | None:
        for e in self.executions.values():
            if e.request_id == request_id:
                return e.id
        return self._t.request_ids.get(request_id)

    async def insert_execution(self, execution: ExecutionRecord) -> None:
        request_id = execution.request_id
        if request_id is not None and await self.find_execution_by_request_id(request_id):
            raise RequestIdTakenError(f"request_id '{request_id}' belongs to another execution")
        self.executions[execution.id] = execution

    async def update_execution(self, execution: ExecutionRecord) -> None:
        self.executions[execution.id] = execution

    async def read_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        return self._execution(execution_id)

    async def execution_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        return self._tasks_of(execution_id)

    async def get_task(self, task_id: TaskId) -> TaskRecord | None:
        return self._task(task_id)

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        found: dict[str, TaskRecord] = {}
        for name in names:
            task_id = self._t.latest.get((execution_id, name))
            if task_id is not None:
                task = self._task(task_id)
                if task is not None:
                    found[name] = task
        for task in self.tasks.values():  # this transaction's own rows
            if task.execution_id == execution_id and task.name in names:
                known = found.get(task.name)
                if known is None or known.seq <= task.seq:
                    found[task.name] = task
        return found

    async def waiting_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        return [t for t in self._tasks_of(execution_id) if t.state.value == "WAITING"]

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        for task in tasks:
            self.tasks[task.id] = task

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        return self.assignments.get(assignment_id) or self._t.assignments.get(assignment_id)

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None:
        for a in assignments:
            self.assignments[a.id] = a

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        if limit <= 0 or not actions:
            return []
        own = self.assignments  # this transaction's own view wins
        queued, stored, ordinals = self._t.queue_in_order(), self._t.assignments, self._t.ordinals

        def claimable(a: AssignmentRecord) -> bool:
            return (
                a.state == AssignmentState.QUEUED and a.action in actions
                and (a.target is None or a.target in targets)
            )  # fmt: skip

        takes: list[AssignmentRecord] = []
        for assignment_id in queued:  # in queue order: stop once enough are found
            a = own.get(assignment_id) or stored[assignment_id]
            if claimable(a):
                takes.append(a)
                if len(takes) == limit:
                    break
        mine = [a for i, a in own.items() if i not in queued and claimable(a)]
        if mine:  # queued by this transaction: in queue order, new ones last
            takes += mine
            unstored = len(ordinals)
            takes.sort(key=lambda a: ordinals.get(a.id, unstored))  # stable
        claimed: list[AssignmentRecord] = []
        for a in takes[:limit]:
            leased = replace(
                a,
                state=AssignmentState.LEASED,
                worker_id=worker_id,
                lease_expires_at=min(lease_until, a.deadline or lease_until),
            )
            own[a.id] = leased
            claimed.append(leased)
        return claimed

    async def note_waiting(self, task: TaskRecord, action: str) -> None:
        await self.save_tasks([task])
        self.notes[task.id] = action

    async def action_catalogue(self, names: Collection[str]) -> dict[str, float]:
        return {n: self._t.actions[n] for n in names if n in self._t.actions}

    async def task_assignments(self, task_id: TaskId) -> list[AssignmentRecord]:
        merged = {a.id: a for a in self._t.assignments.values() if a.task_id == task_id}
        merged.update({a.id: a for a in self.assignments.values() if a.task_id == task_id})
        return sorted(merged.values(), key=lambda a: a.created_at)

    async def unfinished_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        return [t for t in self._tasks_of(execution_id) if not t.state.is_final]

    def _assignments_of(self, execution_id: ExecutionId) -> list[AssignmentRecord]:
        merged = {a.id: a for a in self._t.assignments.values() if a.execution_id == execution_id}
        merged.update(
            {a.id: a for a in self.assignments.values() if a.execution_id == execution_id}
        )
        return sorted(merged.values(), key=lambda a: a.created_at)

    async def _move(self, execution_id: ExecutionId, old: set[AssignmentState],
                    new: AssignmentState) -> None:  # fmt: skip
        for a in self._assignments_of(execution_id):
            if a.state in old:
                self.assignments[a.id] = replace(a, state=new, worker_id=None if new ==
                                                 AssignmentState.CANCELLED else a.worker_id)

    async def pause_assignments(self, execution_id: ExecutionId) -> None:
        await self._move(execution_id, {AssignmentState.QUEUED}, AssignmentState.PAUSED)

    async def resume_assignments(self, execution_id: ExecutionId) -> None:
        await self._move(execution_id, {AssignmentState.PAUSED}, AssignmentState.QUEUED)

    async def queued_actions(self, execution_id: ExecutionId) -> set[str]:
        return {a.action for a in self._assignments_of(execution_id)
                if a.state == AssignmentState.QUEUED}  # fmt: skip

    async def cancel_execution_work(self, execution_id: ExecutionId) -> None:
        open_states = set(AssignmentState) - {AssignmentState.DONE, AssignmentState.CANCELLED}
        await self._move(execution_id, open_states, AssignmentState.CANCELLED)
        for timer in list(self._t.timers.values()) + list(self.new_timers.values()):
            if timer.execution_id == execution_id:
                await self.delete_timers([timer.id])

    async def child_execution_ids(self, execution_id: ExecutionId) -> list[ExecutionId]:
        return [ExecutionId(a.id) for a in self._assignments_of(execution_id)
                if a.state == AssignmentState.CHILD]  # fmt: skip

    async def fail_task_assignments(self, task_id: TaskId, error: Any) -> None:
        for a in await self.task_assignments(task_id):
            if a.state not in (AssignmentState.DONE, AssignmentState.CANCELLED):
                self.assignments[a.id] = replace(
                    a, state=AssignmentState.DONE, worker_id=None, lease_expires_at=None,
                    outcome=Outcome.failure(error),
                )

    async def announce(self, actions: Collection[str]) -> None:
        return None  # nobody to tell: other processes sharing the store poll

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        self.new_history.extend(entries)

    async def save_timers(self, timers: Sequence[TimerRecord]) -> None:
        for timer in timers:
            exists = timer.id in self.new_timers or (
                timer.id in self._t.timers and timer.id not in self.gone_timers
            )
            if not exists:
                self.new_timers[timer.id] = timer
                self.gone_timers.discard(timer.id)

    async def delete_timers(self, timer_ids: Collection[str]) -> None:
        for timer_id in timer_ids:
            self.new_timers.pop(timer_id, None)
            self.gone_timers.add(timer_id)

    async def take_timer(self, timer_id: str) -> TimerRecord | None:
        timer = self.new_timers.pop(timer_id, None)
        if timer is None and timer_id not in self.gone_timers:
            timer = self._t.timers.get(timer_id)
        self.gone_timers.add(timer_id)
        return timer

    def commit(self) -> None:
        t = self._t
        for seq, entry in enumerate(self.new_history, len(t.history) + 1):
            t.history.append(entry)
            t.history_seqs.setdefault(entry.execution_id, []).append(seq)
        for timer_id in self.gone_timers:
            t.timers.pop(timer_id, None)
        t.timers.update(self.new_timers)
        for e in self.executions.values():
            t.executions[e.id] = e
            if e.request_id is not None:
                t.request_ids[e.request_id] = e.id
        for task in self.tasks.values():
            if task.id not in t.tasks:
                t.task_ids_by_execution.setdefault(task.execution_id, []).append(task.id)
            t.tasks[task.id] = task
            key = (task.execution_id, task.name)
            newest = t.latest.get(key)
            if newest is None or t.tasks[newest].seq <= task.seq:
                t.latest[key] = task.id
        for assignment in self.assignments.values():
            t.put_assignment(assignment)
        t.notes.update(self.notes)


class _Transaction:
    """``async with store.transaction() as tx``: commits when the block ends without error.

    A class rather than an ``asynccontextmanager``: one is entered per engine verb.
    """

    __slots__ = ("_lock", "_tables", "_tx")

    def __init__(self, lock: asyncio.Lock, tables: _Tables) -> None:
        self._lock = lock
        self._tables = tables

    async def __aenter__(self) -> MemoryTransaction:
        await self._lock.acquire()
        self._tx = MemoryTransaction(self._tables)
        return self._tx

    async def __aexit__(self, kind: type[BaseException] | None, *rest: object) -> None:
        try:
            if kind is None:
                self._tx.commit()
        finally:
            self._lock.release()


class MemoryStore:
    def __init__(self) -> None:
        self._t = _Tables()
        self._lock = asyncio.Lock()
        self._definitions: dict[DefinitionId, str] = {}
        self._workflows: dict[str, DefinitionId] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def save_definition(
        self, text: str, workflow_names: Sequence[str], now: float
    ) -> DefinitionId:
        definition_id = DefinitionId(len(self._definitions) + 1)
        self._definitions[definition_id] = text
        for name in workflow_names:
            self._workflows[name] = definition_id
        return definition_id

    async def find_workflow(self, name: str) -> StoredDefinition | None:
        definition_id = self._workflows.get(name)
        if definition_id is None:
            return None
        return StoredDefinition(definition_id, self._definitions[definition_id])

    async def get_definition(self, definition_id: DefinitionId) -> StoredDefinition | None:
        text = self._definitions.get(definition_id)
        return None if text is None else StoredDefinition(definition_id, text)

    def transaction(self) -> _Transaction:
        return _Transaction(self._lock, self._t)

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        return self._t.executions.get(execution_id)

    async def list_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        ids = self._t.task_ids_by_execution.get(execution_id, [])
        return sorted((self._t.tasks[i] for i in ids), key=lambda t: t.seq)

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None:
        return self._t.assignments.get(assignment_id)

    async def list_executions(
        self,
        *,
        state: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:
        found = [
            e for e in self._t.executions.values()
            if (not state or e.state.value == state) and (not workflow or e.workflow == workflow)
            and (before is None or (e.created_at, e.id) < before)
        ]  # fmt: skip
        found.sort(key=lambda e: (e.created_at, e.id), reverse=True)
        return found[:limit]

    async def history(
        self, execution_id: ExecutionId, after_seq: int = 0, limit: int = 10_000
    ) -> list[HistoryEntry]:
        seqs = self._t.history_seqs.get(execution_id, [])
        first = bisect.bisect_right(seqs, after_seq)
        return [replace(self._t.history[seq - 1], seq=seq) for seq in seqs[first:first + limit]]

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        async with self.transaction() as tx:
            return await tx.claim_assignments(worker_id, actions, limit, lease_until, targets)

    async def declare_actions(
        self, names: Collection[str], online_until: float, now: float
    ) -> None:
        for name in names:
            self._t.actions[name] = max(self._t.actions.get(name, online_until), online_until)

    async def clear_waiting_notes(self, actions: Collection[str]) -> int:
        cleared = 0
        async with self._lock:
            for task_id, action in list(self._t.notes.items()):
                if action not in actions:
                    continue
                del self._t.notes[task_id]
                task = self._t.tasks.get(task_id)
                if (
                    task is not None and task.state == TaskState.RUNNING
                    and task.state_info.startswith(WAITING_FOR_WORKER)
                ):  # fmt: skip
                    self._t.tasks[task_id] = replace(task, state_info="")
                    cleared += 1
        return cleared

    async def actions_offline(self, names: Collection[str], now: float) -> None:
        for name in names:
            if name in self._t.actions:
                self._t.actions[name] = min(self._t.actions[name], now)

    async def release_assignments(
        self, worker_id: str, keep: Collection[AssignmentId] = ()
    ) -> int:
        released = 0
        async with self._lock:
            for a in list(self._t.assignments.values()):
                leased = a.worker_id == worker_id and a.state == AssignmentState.LEASED
                if leased and a.id not in keep:
                    self._t.put_assignment(replace(
                        a, state=AssignmentState.QUEUED, worker_id=None, lease_expires_at=None
                    ))
                    released += 1
        return released

    async def extend_leases(
        self, worker_id: str, assignment_ids: Collection[AssignmentId], lease_until: float
    ) -> None:
        async with self._lock:
            for assignment_id in assignment_ids:
                a = self._t.assignments.get(assignment_id)
                if a is not None and a.worker_id == worker_id and a.state == AssignmentState.LEASED:
                    capped = min(lease_until, a.deadline or lease_until)
                    self._t.put_assignment(replace(a, lease_expires_at=capped))

    async def defer_assignment(self, assignment_id: AssignmentId, worker_id: str) -> bool:
        async with self._lock:
            a = self._t.assignments.get(assignment_id)
            if a is None or a.state not in (AssignmentState.LEASED, AssignmentState.QUEUED):
                return False
            if a.worker_id not in (None, worker_id):
                return False  # a worker defers only what it holds
            self._t.put_assignment(replace(
                a, state=AssignmentState.DEFERRED, lease_expires_at=None
            ))
            return True

    async def subscribe(self, on_work: Callable[[set[str]], None]) -> bool:
        return False

    async def queued_action_names(self) -> set[str]:
        return {a.action for a in self._t.assignments.values()
                if a.state == AssignmentState.QUEUED}  # fmt: skip

    async def expired_leases(self, now: float, limit: int) -> list[AssignmentRecord]:
        expired = [
            a for a in self._t.assignments.values()
            if a.state == AssignmentState.LEASED and a.lease_expires_at is not None
            and a.lease_expires_at <= now
        ]  # fmt: skip
        expired.sort(key=lambda a: a.lease_expires_at or 0.0)
        return expired[:limit]

    async def next_lease_expiry(self) -> float | None:
        leases = [
            a.lease_expires_at
            for a in self._t.assignments.values()
            if a.state == AssignmentState.LEASED and a.lease_expires_at is not None
        ]
        return min(leases, default=None)

    async def due_timers(self, now: float, limit: int) -> list[TimerRecord]:
        due = sorted((t for t in self._t.timers.values() if t.due_at <= now),
                     key=lambda t: t.due_at)  # fmt: skip
        return due[:limit]

    async def next_timer_due(self) -> float | None:
        return min((t.due_at for t in self._t.timers.values()), default=None)
