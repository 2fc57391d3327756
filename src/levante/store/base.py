"""The store interface: what the engine needs from a backend, and nothing more.

A backend keeps definitions, executions, tasks and assignments (the queue of ready
work). All SQL and locking live in the backends; the engine only calls these methods.

Rules every backend keeps:
- ``transaction()`` is atomic: everything written inside it lands, or nothing does.
  ``lock_execution`` serialises writers of one execution until the transaction ends
  (a row lock where the database has one); writers of different executions may run
  in parallel.
- Reads inside a transaction see that transaction's own writes.
- Queue operations (claim, release, extend, requeue) are each atomic on their own and
  never hand one assignment to two workers while its lease is live.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from levante.core.model import (
    AssignmentRecord,
    ExecutionRecord,
    HistoryEntry,
    TaskRecord,
    TimerRecord,
)
from levante.ids import AssignmentId, DefinitionId, ExecutionId, TaskId

SCHEMA_VERSION = 3

# How a task's state_info starts while its action's workers are all offline; it is
# cleared when a worker serving the action attaches (Store.clear_waiting_notes).
WAITING_FOR_WORKER = "waiting for a worker serving"


@dataclass(frozen=True)
class StoredDefinition:
    id: DefinitionId
    text: str


class StoreTransaction(Protocol):
    #: True when a transaction holds the whole store's write lock from its start, so a
    #: row it read cannot change before it ends (SQLite); False when only the rows it
    #: locks are protected (PostgreSQL: re-read a row after locking its execution).
    holds_store_lock: bool

    async def lock_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None: ...

    async def find_execution_by_request_id(self, request_id: str) -> ExecutionId | None: ...

    async def insert_execution(self, execution: ExecutionRecord) -> None: ...

    async def update_execution(self, execution: ExecutionRecord) -> None: ...

    async def get_task(self, task_id: TaskId) -> TaskRecord | None: ...

    async def latest_tasks(
        self, execution_id: ExecutionId, names: Collection[str]
    ) -> dict[str, TaskRecord]:
        """The newest row (highest seq) of each named task that has one."""
        ...

    async def waiting_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]: ...

    async def read_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None:
        """Another execution, read without locking it (what an expression may look at)."""
        ...

    async def execution_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        """Every task row of an execution, oldest first, read without locking it."""
        ...

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        """Insert new rows, update existing ones (by id)."""
        ...

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None: ...

    # -- several rows at once: one round trip where the database is a server

    async def get_assignments(
        self, assignment_ids: Collection[AssignmentId]
    ) -> dict[AssignmentId, AssignmentRecord]:
        """``get_assignment`` of each (those that exist), locked as it locks one."""
        ...

    async def lock_executions(
        self, execution_ids: Collection[ExecutionId]
    ) -> dict[ExecutionId, ExecutionRecord]:
        """``lock_execution`` of each (those that exist), locked in id order, so that two
        transactions locking overlapping sets cannot deadlock on them."""
        ...

    async def tasks_and_latest(
        self, task_ids: Collection[TaskId], latest: Mapping[ExecutionId, Collection[str]]
    ) -> tuple[dict[TaskId, TaskRecord], dict[ExecutionId, dict[str, TaskRecord]]]:
        """``get_task`` of each id, and ``latest_tasks`` of each execution's names (every
        execution asked for has an entry, perhaps empty)."""
        ...

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None: ...

    async def task_assignments(self, task_id: TaskId) -> list[AssignmentRecord]:
        """Every assignment of one task (all items, all attempts), oldest first."""
        ...

    async def unfinished_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        """Tasks of the execution in neither SUCCESS, ERROR nor CANCELLED."""
        ...

    async def pause_assignments(self, execution_id: ExecutionId) -> None:
        """QUEUED assignments of the execution become PAUSED (nobody may take them)."""
        ...

    async def resume_assignments(self, execution_id: ExecutionId) -> None:
        """PAUSED assignments of the execution are QUEUED again."""
        ...

    async def queued_actions(self, execution_id: ExecutionId) -> set[str]:
        """The actions of the execution's QUEUED assignments (to wake their workers)."""
        ...

    async def cancel_execution_work(self, execution_id: ExecutionId) -> None:
        """Every open assignment of the execution is CANCELLED and its timers deleted."""
        ...

    async def child_execution_ids(self, execution_id: ExecutionId) -> list[ExecutionId]:
        """Running subworkflows of the execution (its assignments in state CHILD)."""
        ...

    async def fail_task_assignments(self, task_id: TaskId, error: Any) -> None:
        """Every open assignment of the task is DONE with this error (a timeout)."""
        ...

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        """``Store.claim_assignments`` inside this transaction (it sees this
        transaction's own writes): a worker that reports a result is handed its next
        work in the same commit."""
        ...

    async def note_waiting(self, task: TaskRecord, action: str) -> None:
        """Save ``task`` (whose state_info says it waits for a worker serving ``action``)
        and remember it, so that the note is cleared when such a worker attaches."""
        ...

    async def action_catalogue(self, names: Collection[str]) -> dict[str, float]:
        """Of these action names, those some worker has declared, each with the time
        until which a worker serving it is known to be connected (``online_until``)."""
        ...

    async def announce(self, actions: Collection[str]) -> None:
        """Work of these actions was queued: tell every engine process at commit.

        PostgreSQL sends a NOTIFY (delivered only if the transaction commits); SQLite and
        memory have nobody to tell (other processes sharing a SQLite file poll).
        """
        ...

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        """Append state changes to their executions' histories, in order."""
        ...

    async def save_timers(self, timers: Sequence[TimerRecord]) -> None:
        """Insert timers; a timer whose id exists already is left as it is."""
        ...

    async def delete_timers(self, timer_ids: Collection[str]) -> None: ...

    async def take_timer(self, timer_id: str) -> TimerRecord | None:
        """Delete the timer and return it; None when it is gone (another engine took it).

        On PostgreSQL this skips a timer locked by another transaction.
        """
        ...


class Store(Protocol):
    async def open(self) -> None:
        """Connect, create or migrate the schema."""
        ...

    async def close(self) -> None: ...

    # -- definitions

    async def save_definition(
        self, text: str, workflow_names: Sequence[str], now: float
    ) -> DefinitionId:
        """Store a document as a new version of each workflow it defines."""
        ...

    async def find_workflow(self, name: str) -> StoredDefinition | None:
        """The newest definition that defines workflow ``name``."""
        ...

    async def get_definition(self, definition_id: DefinitionId) -> StoredDefinition | None: ...

    # -- executions

    def transaction(self) -> AbstractAsyncContextManager[StoreTransaction]: ...

    async def get_execution(self, execution_id: ExecutionId) -> ExecutionRecord | None: ...

    async def list_tasks(self, execution_id: ExecutionId) -> list[TaskRecord]:
        """Every task row of an execution in creation order (for status views only)."""
        ...

    async def get_assignment(self, assignment_id: AssignmentId) -> AssignmentRecord | None: ...

    async def list_executions(
        self,
        *,
        state: str | None = None,
        workflow: str | None = None,
        limit: int = 50,
        before: tuple[float, str] | None = None,
    ) -> list[ExecutionRecord]:
        """Executions newest first (by created_at, then id), strictly older than ``before``."""
        ...

    async def history(
        self, execution_id: ExecutionId, after_seq: int = 0, limit: int = 10_000
    ) -> list[HistoryEntry]:
        """The execution's state changes with seq > ``after_seq``, in order."""
        ...

    # -- the queue

    async def claim_assignments(
        self,
        worker_id: str,
        actions: Collection[str],
        limit: int,
        lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:
        """Lease up to ``limit`` QUEUED assignments of the given actions, oldest first.

        An assignment with a target goes only to a worker that declared that target.
        """
        ...

    async def release_assignments(
        self, worker_id: str, keep: Collection[AssignmentId] = ()
    ) -> int:
        """Put the worker's LEASED assignments (except ``keep``) back in the queue."""
        ...

    async def extend_leases(
        self, worker_id: str, assignment_ids: Collection[AssignmentId], lease_until: float
    ) -> None: ...

    async def defer_assignment(self, assignment_id: AssignmentId, worker_id: str) -> bool:
        """Mark a LEASED assignment DEFERRED (its outcome will come through TaskComplete)."""
        ...

    async def subscribe(self, on_work: Callable[[set[str]], None]) -> bool:
        """Call ``on_work(actions)`` when another process announces work; False if this
        store cannot (then callers poll)."""
        ...

    async def declare_actions(
        self, names: Collection[str], online_until: float, now: float
    ) -> None:
        """Workers serving these actions are connected (until ``online_until``, unless
        declared again): they enter the catalogue of known actions for good."""
        ...

    async def clear_waiting_notes(self, actions: Collection[str]) -> int:
        """A worker serving these actions attached: the tasks noted as waiting for one
        no longer say so (those still RUNNING). Returns how many notes were cleared."""
        ...

    async def actions_offline(self, names: Collection[str], now: float) -> None:
        """This engine's last worker serving these actions left (others may still
        declare them again)."""
        ...

    async def queued_action_names(self) -> set[str]:
        """The actions that have QUEUED assignments (a cheap read, for polling)."""
        ...

    async def expired_leases(self, now: float, limit: int) -> list[AssignmentRecord]:
        """LEASED assignments whose lease ran out by ``now``, earliest first (read only)."""
        ...

    async def next_lease_expiry(self) -> float | None: ...

    # -- timers

    async def due_timers(self, now: float, limit: int) -> list[TimerRecord]:
        """Timers due at ``now`` or earlier, earliest first (read only)."""
        ...

    async def next_timer_due(self) -> float | None: ...
