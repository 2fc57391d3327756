"""The Mistral conformance harness: run one corpus case on Levante and check what it expects.

The corpus (``../shared/conformance/mistral/*.yaml`` beside the checkout, or the
directory in ``$LEVANTE_CONFORMANCE``) describes Mistral's observable behaviour; its
README gives the schema. It is read at test time and never copied into the repository.

For each case the in-process harness

* builds the action registry: the std actions plus the case's mocks (``std.http``
  always fails; ``std.echo`` answering call by call, failing on given calls, always
  failing or always returning an error; ``sleep_echo``), and never registers
  ``action.doesnt_exist``;
* runs it on a fresh :class:`~levante.runner.LocalEngine` (memory store): registers the
  definition (``definition_rejected`` cases must raise DefinitionError), starts it with
  the case's input and params (``start_rejected`` cases must raise InvalidArgumentError
  or NotFoundError), carries out the ``steps`` (await, assert, complete_action through
  ``LocalEngine.complete``, sleep, and pause/resume when LocalEngine offers them), then
  waits for the end with a generous deadline;
* checks every ``expect`` key against the GetStatus-equivalent view
  (``LocalEngine.status``) and, where a key needs more (action executions, child
  executions, durations), against the rows the engine wrote through the store.

Waiting is event driven: the store's ``transaction()`` and ``defer_assignment()`` are
wrapped on the engine's store instance so that every commit wakes the waiters (with a
slow safety-net poll), and an execution that can no longer move by itself (PAUSED, or
every unfinished task waiting for an action nobody serves or for an outside completion
no step will send) ends the wait early instead of running into the deadline.

The same cases, with the same checks, also run through the real service
(:class:`ConformanceService`: one ``levante serve`` on a SQLite file and one worker
process, ``conformance_worker.py``, serving the std actions and the mocks, shared by all
cases). Each case is driven through ``levante.Client`` (:class:`ServiceDriver`), polling
GetStatus; what GetStatus does not show (action executions, subworkflow executions,
timers) is read from the server's store file, read-only (:class:`StoreReader`). Cases
run concurrently: a case holds its workflow names while it registers and starts
(:class:`NameLocks`), and the worker learns which executions belong to a case with a
std.echo mock from files the harness writes (``conformance_worker.MockBook``).

Mistral-specific wording (see the corpus README caveats) is compared only where
docs/semantics.md says Levante matches Mistral; every other wording check is listed in
:data:`DOCUMENTED_DIFFERENCES` with its reason, still evaluated, and reported.

Run it by hand: ``.venv/bin/python tests/support/conformance.py [--service] [STEM...]``
(``--service``: through a real ``levante serve`` and worker process, see
:class:`ConformanceService`, instead of in process).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import re
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import conformance_worker
import yaml
from conformance_worker import MOCKED_ACTIONS, is_echo_mock
from processes import SUPPORT, EngineServer, LevanteProcess

from levante.client import Client, ExecutionInfo, TaskInfo
from levante.core.model import AssignmentRecord, AssignmentState, ExecutionRecord, Outcome
from levante.errors import DefinitionError, InvalidArgumentError, LevanteError, NotFoundError
from levante.ids import AssignmentId, ExecutionId
from levante.lang.expressions import is_expression
from levante.lang.parser import parse_document
from levante.runner import LocalEngine
from levante.store import rows
from levante.worker.registry import ActionRegistry
from levante.worker.std import std_actions

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(
    os.environ.get(
        "LEVANTE_CONFORMANCE", ROOT.parent / "shared" / "conformance" / "mistral"
    )
)
GAPS_FILE = ROOT / "tests" / "conformance_gaps.txt"

FINAL_STATES = frozenset({"SUCCESS", "ERROR", "CANCELLED"})
UNREGISTERED_ACTIONS = frozenset({"action.doesnt_exist"})  # test_wrong_action needs it unknown

# Deadlines: generous, since waits end as soon as the execution ends or is stuck.
DEFAULT_DEADLINE = 30.0
TIMING_DEADLINE = 60.0  # cases tagged `timing` (wait-before 10 s, retries with delays...)
SAFETY_POLL = 0.1  # a change notification is the normal wake-up; this is the safety net

# Mistral's state names where Levante's differ.
MISTRAL_STATE_NAMES = {"DELAYED": "RUNNING_DELAYED"}


# ------------------------------------------------------------------ documented differences

DOCUMENTED_DIFFERENCES: dict[tuple[str, str], str] = {
    # Each entry: (case stem, check path) -> why Levante may differ from Mistral there.
    # The check is still evaluated and reported; an entry whose check matches Mistral is
    # stale and fails its case until removed.
    (
        "test_direct_workflow__test_wrong_first_task_input",
        "state_info_contains",
    ): "Mistral's wording 'Invalid input [...]'; Levante reports the worker's "
    "'TypeError: ...' (docs/semantics.md, Action errors)",
    (
        "test_direct_workflow__test_wrong_task_input",
        "state_info_contains",
    ): "Mistral's wording 'Invalid input [...]'; Levante reports the worker's "
    "'TypeError: ...' (docs/semantics.md, Action errors)",
    (
        "test_error_handling__test_action_error_message_format",
        "tasks.task1.state_info_startswith",
    ): "Mistral's 'The action raised an exception [action=..., action_ex_id=..., msg=...]'; "
    "Levante's state_info is '<Type>: <message>' (docs/semantics.md, Action errors)",
    (
        "test_dataflow__test_output_on_error_wb_yaql_failed",
        "state_info_contains",
    ): "Mistral's wording 'Failed to evaluate expression in output-on-error!'; "
    "docs/semantics.md claims Mistral's texts only for task start and completion failures",
    (
        "test_direct_workflow__test_inconsistent_task_names",
        "error_contains",
    ): "validation message in Mistral's wording ('Task ... not found'); Levante names the "
    "line and the unknown task in its own words",
    (
        "test_reverse_workflow__test_inconsistent_task_names",
        "error_contains",
    ): "validation message in Mistral's wording ('Task ... not found')",
    (
        "test_dataflow__test_publish_on_error",
        "tasks.task1.published_substrings.err",
    ): "task(name).result of a failed action is the worker's error data "
    "{type, message}, where Mistral has the message text (docs/semantics.md, Action errors)",
    (
        "test_yaql_functions__test_execution_function",
        "tasks.task1.published_subset_paths.result.params",
    ): "execution().params holds Mistral's own fields (namespace, an empty env); the case "
    "notes call them Mistral-specific",
}


# ------------------------------------------------------------------ cases


@dataclass(frozen=True)
class Case:
    stem: str
    path: Path
    data: Mapping[str, Any]

    @property
    def definition(self) -> str:
        return str(self.data["definition"])

    @property
    def workflow(self) -> str:
        return str(self.data["workflow"])

    @property
    def input(self) -> dict[str, Any]:
        return dict(self.data.get("input") or {})

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.data.get("params") or {})

    @property
    def expect(self) -> Mapping[str, Any]:
        return self.data.get("expect") or {}

    @property
    def steps(self) -> list[Mapping[str, Any]]:
        return list(self.data.get("steps") or [])

    @property
    def mock(self) -> Mapping[str, Any] | None:
        return self.data.get("mock")

    @property
    def tags(self) -> list[str]:
        return list(self.data.get("tags") or [])

    @property
    def deadline(self) -> float:
        return TIMING_DEADLINE if "timing" in self.tags else DEFAULT_DEADLINE


def case_paths(corpus: Path = CORPUS) -> list[Path]:
    return sorted(corpus.glob("*.yaml"))


def load_case(path_or_stem: Path | str, corpus: Path = CORPUS) -> Case:
    path = Path(path_or_stem)
    if path.suffix != ".yaml":
        path = corpus / f"{path_or_stem}.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "definition" not in data or "expect" not in data:
        raise ValueError(f"{path}: not a conformance case")
    return Case(path.stem, path, data)


def read_gaps(path: Path = GAPS_FILE) -> dict[str, str]:
    """``<case stem>  <reason>`` per line; blank lines and ``#`` comments are ignored."""
    gaps: dict[str, str] = {}
    if not path.exists():
        return gaps
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        stem, _, reason = line.partition(" ")
        if not reason.strip():
            raise ValueError(f"{path}:{number}: no reason given for {stem}")
        if stem in gaps:
            raise ValueError(f"{path}:{number}: {stem} listed twice")
        gaps[stem] = reason.strip()
    return gaps


# ------------------------------------------------------------------ actions and mocks


def case_actions(case: Case) -> dict[str, Callable[..., Any]]:
    """The actions that replace or add to the std actions for this case."""
    return conformance_worker.case_actions(case.mock, case.stem)


def install_actions(registry: ActionRegistry, case: Case) -> ActionRegistry:
    """Put the case's mocks into ``registry`` (std actions already there)."""
    for name, fn in case_actions(case).items():
        if name in registry:
            registry.unregister(name)
        registry.register(name, fn)
    for name in UNREGISTERED_ACTIONS:
        assert name not in registry, f"{name} must stay unregistered"
    return registry


def build_registry(case: Case) -> ActionRegistry:
    return install_actions(std_actions(), case)


# ------------------------------------------------------------------ observations


@dataclass
class Attempt:
    """One try of one action (Mistral: one action execution)."""

    assignment_id: str
    task_name: str
    execution_id: str
    attempt: int
    action: str
    state: str | None  # Mistral-style: SUCCESS, ERROR, RUNNING, CANCELLED; None = unknown
    value: Any = None
    item: int | None = None  # with-items index
    task_id: str = ""


def _mistral_action_state(record: AssignmentRecord) -> str | None:
    """The state Mistral would show for this try; None when Mistral has no action for it."""
    match record.state:
        case AssignmentState.DONE:
            return "SUCCESS" if record.outcome is not None and record.outcome.ok else "ERROR"
        case AssignmentState.CANCELLED:
            return "CANCELLED"
        case AssignmentState.QUEUED | AssignmentState.LEASED | AssignmentState.DEFERRED:
            return "RUNNING"  # Mistral creates action executions RUNNING before sending them
        case _:
            return None  # HELD back by a concurrency limit: Mistral has not created it yet


@dataclass
class Facts:
    """What a run showed, for the checks."""

    info: ExecutionInfo | None = None
    started: float = 0.0
    ended: float | None = None  # wall clock when the harness saw the end
    duration: float | None = None  # the engine's own start-to-end time, when known
    observed: dict[str, set[str]] = field(default_factory=dict)  # task name -> states seen
    attempts: list[Attempt] | None = None  # None: not observable on this driver
    executions: list[ExecutionInfo] | None = None  # every execution of the run (children too)
    unfinished: str = ""  # why the wait ended before a final state
    params: dict[str, Mapping[str, Any]] | None = None  # start params by execution id


class Driver(Protocol):
    """One engine to run a case on: the in-process LocalEngine, or the real service."""

    name: str

    async def register(self, definition: str) -> list[str]: ...

    async def start(self, workflow: str, input: Mapping[str, Any], params: Mapping[str, Any]
                    ) -> str: ...  # fmt: skip

    async def status(self, execution_id: str) -> ExecutionInfo: ...

    async def changed(self, timeout: float) -> None:
        """Return after the next change (or ``timeout``)."""
        ...

    async def stuck(self, info: ExecutionInfo, completions_pending: bool) -> str | None:
        """Why the execution cannot move by itself any more; None when it still may."""
        ...

    async def settled(self, info: ExecutionInfo) -> bool:
        """True when no task of this ended execution can still finish.

        Mistral lets a task that was already running finish after its workflow ended
        (test_fail_second, test_on_closures), so the checks wait for that too.
        """
        ...

    async def deferred_attempts(self, execution_id: str, task: str) -> list[tuple[str, bool]]:
        """(assignment id, ready to complete) of the task's tries, oldest first."""
        ...

    async def complete(self, assignment_id: str, data: Any) -> None: ...

    async def pause(self, execution_id: str) -> None: ...

    async def resume(self, execution_id: str) -> None: ...

    def can_pause(self) -> bool: ...

    async def facts(self, execution_id: str, facts: Facts) -> None:
        """Fill in attempts, executions and duration where this driver can see them."""
        ...


class LocalDriver:
    """A fresh LocalEngine on the memory store, with the case's actions."""

    name = "in-process"

    def __init__(self, case: Case) -> None:
        self.local = LocalEngine()
        install_actions(self.local.registry, case)
        self._changed = asyncio.Event()
        self._assignments: dict[tuple[str, int], AssignmentRecord] = {}  # (id, attempt)
        self._assignment_order: list[tuple[str, int]] = []
        self._children: set[tuple[str, int]] = set()  # tries carried out by a subworkflow
        self._executions: list[str] = []
        self._instrument()

    # -- instrumentation: the store's public methods, wrapped on this instance

    def _instrument(self) -> None:
        store = self.local.store
        transaction = store.transaction
        defer_assignment = store.defer_assignment
        driver = self

        @contextlib.asynccontextmanager
        async def observed_transaction() -> AsyncIterator[Any]:
            try:
                async with transaction() as tx:
                    recorder = _RecordingTransaction(tx)
                    yield recorder
                driver._committed(recorder)
            finally:
                driver._changed.set()

        async def observed_defer(assignment_id: AssignmentId, worker_id: str) -> bool:
            try:
                return await defer_assignment(assignment_id, worker_id)
            finally:
                driver._changed.set()

        store.transaction = observed_transaction  # type: ignore[method-assign]
        store.defer_assignment = observed_defer  # type: ignore[method-assign]

    def _committed(self, tx: _RecordingTransaction) -> None:
        self._executions.extend(e for e in tx.inserted_executions if e not in self._executions)
        for record in tx.saved_assignments:
            key = (str(record.id), record.attempt)
            if key not in self._assignments:
                self._assignment_order.append(key)
            self._assignments[key] = record
            if record.state == AssignmentState.CHILD:
                self._children.add(key)

    # -- life cycle

    async def __aenter__(self) -> LocalDriver:
        await self.local.start_engine()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.local.close()

    # -- the Driver protocol

    async def register(self, definition: str) -> list[str]:
        return await self.local.register(definition)

    async def start(self, workflow: str, input: Mapping[str, Any], params: Mapping[str, Any]
                    ) -> str:  # fmt: skip
        return await self.local.start(workflow, input, params=params)

    async def status(self, execution_id: str) -> ExecutionInfo:
        return await self.local.status(execution_id)

    async def changed(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)
        self._changed.clear()

    async def _current(self, key: tuple[str, int]) -> AssignmentRecord:
        """The newest version of one try: the store's row when it is still that try."""
        record = self._assignments[key]
        row = await self.local.store.get_assignment(AssignmentId(key[0]))
        if row is not None and row.attempt == key[1]:
            return row
        return record

    async def settled(self, info: ExecutionInfo) -> bool:
        if all(t.state in FINAL_STATES or t.state == "WAITING" for t in info.tasks):
            return True
        if await self.local.store.next_timer_due() is not None:
            return False
        for task in info.tasks:
            if task.state in FINAL_STATES or not task.assignment_id:
                continue
            row = await self.local.store.get_assignment(AssignmentId(task.assignment_id))
            if row is None:
                continue
            if row.state == AssignmentState.LEASED or (
                row.state == AssignmentState.QUEUED and row.action in self.local.registry
            ):
                return False  # a worker has it or will take it
        return True

    async def stuck(self, info: ExecutionInfo, completions_pending: bool) -> str | None:
        if info.state == "PAUSED":
            return "the execution is PAUSED"
        if info.state != "RUNNING":
            return None
        if await self.local.store.next_timer_due() is not None:
            return None  # a timer (wait-before, retry delay, timeout...) will move it
        latest: dict[str, TaskInfo] = {}
        for task in info.tasks:
            latest[task.name] = task
        reasons = []
        for task in latest.values():
            if task.state in FINAL_STATES:
                continue
            if task.state == "WAITING":
                reasons.append(f"{task.name} waits for its join")
                continue
            if not task.assignment_id:
                return None  # it may be delayed or about to get one: keep waiting
            row = await self.local.store.get_assignment(AssignmentId(task.assignment_id))
            if row is None:
                return None
            if row.state == AssignmentState.QUEUED and row.action not in self.local.registry:
                reasons.append(f"{task.name} waits for action {row.action!r}, which nobody serves")
            elif row.state == AssignmentState.DEFERRED and not completions_pending:
                reasons.append(f"{task.name} waits for an outside completion that never comes")
            else:
                return None
        return "the execution is RUNNING but cannot move: " + (
            "; ".join(reasons) if reasons else "every task is finished"
        )

    async def deferred_attempts(self, execution_id: str, task: str) -> list[tuple[str, bool]]:
        found = []
        for key in self._assignment_order:
            record = self._assignments[key]
            if record.execution_id != execution_id or record.task_name != task:
                continue
            current = await self._current(key)
            if key not in self._children:
                found.append((key[0], current.state == AssignmentState.DEFERRED))
        return found

    async def complete(self, assignment_id: str, data: Any) -> None:
        await self.local.complete(assignment_id, Outcome.success(data))

    def _lifecycle(self, verb: str) -> Callable[[str], Any] | None:
        """LocalEngine.<verb> when it has one, else its Engine's (same transaction rules)."""
        for owner in (self.local, self.local.engine):
            method = getattr(owner, verb, None)
            if callable(method):
                return method  # type: ignore[no-any-return]
        return None

    def can_pause(self) -> bool:
        return self._lifecycle("pause") is not None and self._lifecycle("resume") is not None

    async def pause(self, execution_id: str) -> None:
        method = self._lifecycle("pause")
        assert method is not None
        await method(ExecutionId(execution_id))

    async def resume(self, execution_id: str) -> None:
        method = self._lifecycle("resume")
        assert method is not None
        await method(ExecutionId(execution_id))

    async def facts(self, execution_id: str, facts: Facts) -> None:
        executions = [execution_id, *(e for e in self._executions if e != execution_id)]
        infos = []
        facts.params = {}
        for eid in executions:
            with contextlib.suppress(NotFoundError):
                infos.append(await self.local.status(eid))
            row = await self.local.store.get_execution(ExecutionId(eid))
            if row is not None:
                facts.params[eid] = dict(row.params)
        facts.executions = infos
        attempts = []
        for key in self._assignment_order:
            if key in self._children:
                continue  # a subworkflow: counted as an execution, not an action execution
            record = await self._current(key)
            state = _mistral_action_state(record)
            if state is None:
                continue  # held back: not an action execution yet
            value = record.outcome.value if record.outcome is not None else None
            attempts.append(Attempt(key[0], record.task_name, str(record.execution_id), key[1],
                                    record.action, state, value, record.item,
                                    str(record.task_id)))  # fmt: skip
        facts.attempts = attempts
        row = await self.local.store.get_execution(ExecutionId(execution_id))
        if row is not None and row.state.is_final:
            facts.duration = row.updated_at - row.created_at


class _RecordingTransaction:
    """Forwards to the store's transaction and notes what the engine inserted and saved."""

    def __init__(self, tx: Any) -> None:
        self._tx = tx
        self.inserted_executions: list[str] = []
        self.saved_assignments: list[AssignmentRecord] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def insert_execution(self, execution: Any) -> None:
        await self._tx.insert_execution(execution)
        self.inserted_executions.append(str(execution.id))

    async def save_assignments(self, assignments: Sequence[AssignmentRecord]) -> None:
        await self._tx.save_assignments(assignments)
        self.saved_assignments.extend(assignments)


def case_workflow_names(case: Case) -> tuple[frozenset[str], bool]:
    """The workflow names a case registers or calls by name, and whether it has subworkflows.

    Registering a document makes its names point at it, and a subworkflow is looked up by
    name when it starts; cases sharing one server therefore hold their names (see
    :class:`NameLocks`).
    """
    try:
        document = parse_document(case.definition)
    except Exception:
        return frozenset(), False  # refused at registration: it changes nothing
    names = set(document.workflows)
    children = False
    for spec in document.workflows.values():
        for task in spec.tasks.values():
            if task.workflow is None:
                continue
            children = True
            if isinstance(task.workflow, str) and not is_expression(task.workflow):
                names.add(task.workflow)
                if spec.workbook:
                    names.add(f"{spec.workbook}.{task.workflow}")
    return frozenset(names), children


class NameLocks:
    """Workflow names in use by the cases running on one server.

    A case holds its names from just before it registers its definition until Run has
    returned (an execution keeps the definition it started with), or until it ends when
    it starts subworkflows (they are looked up by name when they start). 99 cases call
    their workflow ``wf``: without this they would run each other's definitions.
    """

    def __init__(self) -> None:
        self._held: set[str] = set()
        self._changed = asyncio.Condition()

    async def acquire(self, names: frozenset[str]) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: not names & self._held)
            self._held |= names

    async def release(self, names: frozenset[str]) -> None:
        async with self._changed:
            self._held -= names
            self._changed.notify_all()


class StoreReader:
    """The server's SQLite file, read only: the rows GetStatus does not show.

    The in-process driver reads action executions (assignments), child executions and
    timers through its store; this reads the same rows of the real server's file with a
    read-only connection (in WAL mode it sees the last commit and never blocks the
    server). Row order is insertion order (rowid), as the in-process driver records it.
    """

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
        self._db.execute("PRAGMA busy_timeout=5000")

    def close(self) -> None:
        self._db.close()

    @staticmethod
    def _family(column: str, root: str) -> tuple[str, tuple[Any, ...]]:
        """An execution and its subworkflows (whose ids start with ``<root>.``)."""
        return f"({column} = ? OR substr({column}, 1, ?) = ?)", (root, len(root) + 1, root + ".")

    def executions(self, root: str) -> list[ExecutionRecord]:
        where, args = self._family("id", root)
        found = self._db.execute(
            f"SELECT {', '.join(rows.EXECUTION_COLUMNS)} FROM executions WHERE {where} "
            "ORDER BY rowid", args,
        ).fetchall()  # fmt: skip
        return [rows.execution_from_row(r) for r in found]

    def execution_ids_of(self, workflow: str) -> set[str]:
        found = self._db.execute("SELECT id FROM executions WHERE workflow = ?", (workflow,))
        return {str(r[0]) for r in found.fetchall()}

    def _assignments(self, where: str, args: Sequence[Any]) -> list[AssignmentRecord]:
        found = self._db.execute(
            f"SELECT {', '.join(rows.ASSIGNMENT_COLUMNS)} FROM assignments WHERE {where} "
            "ORDER BY rowid", args,
        ).fetchall()  # fmt: skip
        return [rows.assignment_from_row(r) for r in found]

    def assignments(self, root: str) -> list[AssignmentRecord]:
        where, args = self._family("execution_id", root)
        return self._assignments(where, args)

    def task_assignments(self, execution_id: str, task_name: str) -> list[AssignmentRecord]:
        return self._assignments("execution_id = ? AND task_name = ?", (execution_id, task_name))

    def assignment(self, assignment_id: str) -> AssignmentRecord | None:
        found = self._assignments("id = ?", (assignment_id,))
        return found[0] if found else None

    def next_timer_due(self, root: str) -> float | None:
        where, args = self._family("execution_id", root)
        row = self._db.execute(f"SELECT MIN(due_at) FROM timers WHERE {where}", args).fetchone()
        return None if row is None or row[0] is None else float(row[0])


@dataclass
class ServiceSession:
    """What the cases running on one server share (one event loop)."""

    client: Client
    reader: StoreReader
    mocks: Path  # the worker's mock book (see conformance_worker.MockBook)
    served: frozenset[str]  # the actions the worker serves
    names: NameLocks = field(default_factory=NameLocks)


class ServiceDriver:
    """One case on the real service: ``levante serve`` (SQLite) and a real worker process.

    Everything the checks see comes through the client (Run, GetStatus, TaskComplete,
    Pause/Resume, GetHistory for the states between polls); what GetStatus does not show
    (action executions, subworkflow executions, timers, params) comes from the server's
    store file through :class:`StoreReader`.
    """

    name = "service"
    POLL = 0.05
    STUCK_CONFIRM = 0.3

    def __init__(self, session: ServiceSession, case: Case) -> None:
        self.session = session
        self.client = session.client
        self.reader = session.reader
        self.case = case
        self.names, self.children = case_workflow_names(case)
        self._holding = False
        self._stuck_since: float | None = None
        self._root = ""
        self._before: set[str] = set()  # executions of the workflow before Run

    async def __aenter__(self) -> ServiceDriver:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    async def _release(self) -> None:
        if self._holding:
            self._holding = False
            await self.session.names.release(self.names)

    # -- register and start

    async def register(self, definition: str) -> list[str]:
        await self.session.names.acquire(self.names)
        self._holding = True
        try:
            return list(await self.client.register_workflows(definition))
        except InvalidArgumentError as e:  # INVALID_ARGUMENT: the service's DefinitionError
            await self._release()
            raise DefinitionError(str(e)) from e
        except BaseException:
            await self._release()
            raise

    async def start(self, workflow: str, input: Mapping[str, Any], params: Mapping[str, Any]
                    ) -> str:  # fmt: skip
        mocked = is_echo_mock(self.case.mock)
        marker = self.session.mocks / "pending" / self.case.stem
        self._before = self.reader.execution_ids_of(workflow)
        if mocked:
            marker.touch()
        try:
            execution_id = str(await self.client.run(workflow, input, params=params))
            if mocked:
                book = self.session.mocks / f"{execution_id}.json"
                scratch = book.with_suffix(".tmp")
                scratch.write_text(json.dumps(dict(self.case.mock or {})), encoding="utf-8")
                scratch.rename(book)  # the worker never sees half a file
        finally:
            if mocked:
                marker.unlink()
        # A refused Run keeps the names until the case ends: its facts count executions
        # of the workflow, which nobody else may start meanwhile.
        if not self.children:
            await self._release()
        self._root = execution_id
        return execution_id

    # -- observing

    async def status(self, execution_id: str) -> ExecutionInfo:
        info: ExecutionInfo = await self.client.get_status(execution_id)
        return info

    async def changed(self, timeout: float) -> None:
        # Polling: a WatchExecution stream per case would do, but every watch adds reads
        # to the server, and the states seen in between come from GetHistory at the end.
        await asyncio.sleep(min(timeout, self.POLL))

    def _child_ids(self) -> set[str]:
        return {str(e.id) for e in self.reader.executions(self._root)}

    async def settled(self, info: ExecutionInfo) -> bool:
        if all(t.state in FINAL_STATES or t.state == "WAITING" for t in info.tasks):
            return True
        if self.reader.next_timer_due(self._root) is not None:
            return False
        for task in info.tasks:
            if task.state in FINAL_STATES or not task.assignment_id:
                continue
            row = self.reader.assignment(task.assignment_id)
            if row is None:
                continue
            if row.state == AssignmentState.LEASED or (
                row.state == AssignmentState.QUEUED and row.action in self.session.served
            ):
                return False  # a worker has it or will take it
        return True

    async def stuck(self, info: ExecutionInfo, completions_pending: bool) -> str | None:
        if info.state == "PAUSED":
            return "the execution is PAUSED"
        why = await self._cannot_move(info, completions_pending)
        # GetStatus reads the execution and its tasks one after the other, and the store
        # rows read here are newer still: a verdict counts once it has held for a while.
        if why is None:
            self._stuck_since = None
            return None
        now = time.monotonic()
        if self._stuck_since is None:
            self._stuck_since = now
        return why if now - self._stuck_since >= self.STUCK_CONFIRM else None

    async def _cannot_move(self, info: ExecutionInfo, completions_pending: bool) -> str | None:
        if info.state != "RUNNING":
            return None
        if self.reader.next_timer_due(self._root) is not None:
            return None  # a timer (wait-before, retry delay, timeout...) will move it
        latest: dict[str, TaskInfo] = {}
        for task in info.tasks:
            latest[task.name] = task
        reasons = []
        for task in latest.values():
            if task.state in FINAL_STATES:
                continue
            if task.state == "WAITING":
                reasons.append(f"{task.name} waits for its join")
                continue
            if not task.assignment_id:
                return None
            row = self.reader.assignment(task.assignment_id)
            if row is None:
                return None
            if row.state == AssignmentState.QUEUED and row.action not in self.session.served:
                reasons.append(f"{task.name} waits for action {row.action!r}, which nobody serves")
            elif row.state == AssignmentState.DEFERRED and not completions_pending:
                reasons.append(f"{task.name} waits for an outside completion that never comes")
            else:
                return None
        return "the execution is RUNNING but cannot move: " + (
            "; ".join(reasons) if reasons else "every task is finished"
        )

    async def deferred_attempts(self, execution_id: str, task: str) -> list[tuple[str, bool]]:
        children = self._child_ids()
        return [
            (str(a.id), a.state == AssignmentState.DEFERRED)
            for a in self.reader.task_assignments(execution_id, task)
            if a.state != AssignmentState.CHILD and str(a.id) not in children
        ]

    # -- acting

    async def complete(self, assignment_id: str, data: Any) -> None:
        await self.client.task_complete(assignment_id, result=data)

    def can_pause(self) -> bool:
        return True

    async def pause(self, execution_id: str) -> None:
        await self.client.pause(execution_id)

    async def resume(self, execution_id: str) -> None:
        await self.client.resume(execution_id)

    # -- facts

    async def facts(self, execution_id: str, facts: Facts) -> None:
        if not execution_id:  # Run was refused: which executions did it leave behind?
            created = self.reader.execution_ids_of(self.case.workflow) - self._before
            facts.executions = [await self.status(e) for e in sorted(created)]
            facts.attempts = []
            return
        records = self.reader.executions(execution_id)
        facts.executions = [await self.status(str(e.id)) for e in records]
        facts.params = {str(e.id): dict(e.params) for e in records}
        children = {str(e.id) for e in records}
        attempts = []
        for record in self.reader.assignments(execution_id):
            if record.state == AssignmentState.CHILD or str(record.id) in children:
                continue  # a subworkflow: counted as an execution, not an action execution
            state = _mistral_action_state(record)
            if state is None:
                continue  # held back: not an action execution yet
            value = record.outcome.value if record.outcome is not None else None
            attempts.append(Attempt(str(record.id), record.task_name, str(record.execution_id),
                                    record.attempt, record.action, state, value, record.item,
                                    str(record.task_id)))  # fmt: skip
        facts.attempts = attempts
        if records and records[0].state.is_final:
            facts.duration = records[0].updated_at - records[0].created_at
        # Every state each task went through, also those between two polls.
        for event in await self.client.history(execution_id):
            if event.kind == "task" and event.task_name:
                facts.observed.setdefault(event.task_name, set()).add(event.state)


class ConformanceWorker(LevanteProcess):
    """tests/support/conformance_worker.py as a child process, collected like the others.

    (LevanteProcess starts ``python -m levante``; this starts the mock-serving worker.)
    """

    def __init__(self, engine: str, mocks: Path, concurrency: int = 64) -> None:
        self.args = ["conformance_worker.py", "--engine", engine, "--mocks", str(mocks),
                     "--concurrency", str(concurrency)]  # fmt: skip
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(SUPPORT), str(ROOT / "src"), env.get("PYTHONPATH", "")]
        )
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [sys.executable, str(SUPPORT / "conformance_worker.py"), *self.args[1:]],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=env, cwd=str(ROOT), text=True,
        )  # fmt: skip
        self.lines = []
        self._new_lines = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # Attached: its actions are in the engine's catalogue, so work for them is taken.
        self.wait_for_line("levante worker attached", timeout=60)


class ConformanceService:
    """One ``levante serve`` on a SQLite file and one worker process serving the mocks,
    for running many cases (start it once, run every case through it)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.store = folder / "levante.db"
        self.mocks = folder / "mocks"
        self.server: EngineServer | None = None
        self.worker: ConformanceWorker | None = None

    def start(self) -> ConformanceService:
        (self.mocks / "pending").mkdir(parents=True, exist_ok=True)
        self.server = EngineServer(f"sqlite:///{self.store}").start()
        self.worker = ConformanceWorker(self.server.address, self.mocks)
        return self

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
        if self.server is not None:
            for process in self.server.history:
                process.terminate()

    def __enter__(self) -> ConformanceService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def output(self) -> str:
        """The server's and the worker's output, for a failure report."""
        parts = []
        if self.server is not None and self.server.process is not None:
            parts.append("server:\n" + "\n".join(self.server.process.lines[-40:]))
        if self.worker is not None:
            parts.append("worker:\n" + "\n".join(self.worker.lines[-40:]))
        return "\n".join(parts)

    async def run_cases(self, cases: Iterable[Case], parallel: int = 24) -> dict[str, CaseResult]:
        """Run cases concurrently through the service, on the running loop."""
        assert self.server is not None
        gate = asyncio.Semaphore(parallel)
        ordered = sorted(cases, key=lambda c: -c.deadline)  # long (timing) cases first
        served = frozenset(std_actions().names()) | frozenset(MOCKED_ACTIONS)
        reader = StoreReader(self.store)
        try:
            async with Client(self.server.address) as client:
                session = ServiceSession(client, reader, self.mocks, served)

                async def one(case: Case) -> CaseResult:
                    async with gate:
                        try:
                            async with ServiceDriver(session, case) as driver:
                                return await run_case(case, driver)
                        except Exception as e:  # a crash is a failure of that case
                            result = CaseResult(case.stem, ServiceDriver.name)
                            result.failures.append(
                                f"{case.stem}: crashed: {type(e).__name__}: {e}"
                            )
                            return result

                results = await asyncio.gather(*(one(c) for c in ordered))
        finally:
            reader.close()
        return {r.case: r for r in results}

    def run_cases_in_thread(self, cases: Iterable[Case], parallel: int = 24
                            ) -> dict[str, CaseResult]:  # fmt: skip
        return _in_thread(lambda: self.run_cases(list(cases), parallel))


# ------------------------------------------------------------------ results


@dataclass
class CaseResult:
    case: str
    driver: str
    failures: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)  # documented differences seen
    refused: str | None = None  # "not supported yet" at registration
    facts: Facts = field(default_factory=Facts)
    elapsed: float = 0.0

    @property
    def passed(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        lines = [f"{self.case} [{self.driver}]: {'PASS' if self.passed else 'FAIL'}"
                 f" ({self.elapsed:.2f}s)"]  # fmt: skip
        lines += [f"  FAIL {f}" for f in self.failures]
        lines += [f"  DIFF {d}" for d in self.differences]
        return "\n".join(lines)


def _show(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return text if len(text) <= 600 else text[:600] + "..."


class Checker:
    """Collects check results for one case, applying the documented differences."""

    def __init__(self, result: CaseResult) -> None:
        self.result = result

    def check(self, path: str, ok: bool, expected: Any, actual: Any, note: str = "") -> bool:
        key = (self.result.case, path)
        suffix = f" ({note})" if note else ""
        message = (
            f"{self.result.case}: {path}: expected {_show(expected)}, "
            f"actual {_show(actual)}{suffix}"
        )
        reason = DOCUMENTED_DIFFERENCES.get(key)
        if reason is not None:
            if ok:
                self.result.failures.append(
                    f"{message}: matches Mistral now, so the documented difference is stale; "
                    "remove it from DOCUMENTED_DIFFERENCES"
                )
            else:
                self.result.differences.append(f"{message}: documented difference: {reason}")
            return True
        if not ok:
            self.result.failures.append(message)
        return ok

    def fail(self, path: str, expected: Any, actual: Any, note: str = "") -> None:
        self.check(path, False, expected, actual, note)


# ------------------------------------------------------------------ running


class _Aborted(Exception):
    """The steps cannot go on (the failure is recorded)."""


class Runner:
    def __init__(self, case: Case, driver: Driver, result: CaseResult) -> None:
        self.case = case
        self.driver = driver
        self.result = result
        self.checker = Checker(result)
        self.facts = result.facts
        self.execution_id = ""
        self.deadline = time.monotonic() + case.deadline

    async def run(self) -> None:
        expect = self.case.expect
        if not await self._register(expect):
            return
        if not await self._start(expect):
            return
        with contextlib.suppress(_Aborted):
            await self._steps()
        info, why = await self._wait_end()
        self.facts.info = info
        self.facts.unfinished = why if info.state not in FINAL_STATES else ""
        await self.driver.facts(self.execution_id, self.facts)
        check_expectations(self.case, self.facts, self.checker)

    # -- register and start

    async def _register(self, expect: Mapping[str, Any]) -> bool:
        rejected = expect.get("definition_rejected") is True
        try:
            names = await self.driver.register(self.case.definition)
        except DefinitionError as e:
            message = str(e)
            if "not supported yet" in message:
                self.result.refused = message
                self.checker.fail(
                    "definition_rejected" if rejected else "register",
                    "rejected as invalid" if rejected else "accepted",
                    f"refused as not supported yet: {message}",
                )
                return False
            if not rejected:
                self.checker.fail("register", "accepted", f"DefinitionError: {message}")
                return False
            if "error_contains" in expect:
                fragment = expect["error_contains"]
                self.checker.check("error_contains", fragment in message, fragment, message)
            return False
        except LevanteError as e:
            self.checker.fail("register", "DefinitionError" if rejected else "accepted",
                              f"{type(e).__name__}: {e}")  # fmt: skip
            return False
        if rejected:
            self.checker.fail("definition_rejected", "DefinitionError", f"accepted: {names}")
            return False
        if self.case.workflow not in names:
            self.checker.fail("workflow", self.case.workflow, names, "not defined")
            return False
        return True

    async def _start(self, expect: Mapping[str, Any]) -> bool:
        rejected = expect.get("start_rejected") is True
        self.facts.started = time.monotonic()
        try:
            self.execution_id = await self.driver.start(
                self.case.workflow, self.case.input, self.case.params
            )
        except (InvalidArgumentError, NotFoundError) as e:
            if not rejected:
                self.checker.fail("start", "started", f"{type(e).__name__}: {e}")
                return False
            facts = Facts()
            await self.driver.facts("", facts)
            if "workflow_execution_count" in expect and facts.executions is not None:
                count = len([x for x in facts.executions if x.id])
                self.checker.check("workflow_execution_count",
                                   count == expect["workflow_execution_count"],
                                   expect["workflow_execution_count"], count)  # fmt: skip
            return False
        if rejected:
            self.checker.fail("start_rejected", "InvalidArgumentError or NotFoundError",
                              f"started execution {self.execution_id}")  # fmt: skip
            await self._wait_end()
            return False
        return True

    # -- waiting

    async def _observe(self) -> ExecutionInfo:
        info = await self.driver.status(self.execution_id)
        for task in info.tasks:
            self.facts.observed.setdefault(task.name, set()).add(task.state)
        return info

    async def until(
        self, predicate: Callable[[ExecutionInfo], bool], completions_pending: bool
    ) -> tuple[ExecutionInfo, str]:
        """Wait for ``predicate``; returns (info, why not) when it can no longer hold."""
        while True:
            info = await self._observe()
            if predicate(info):
                return info, ""
            if info.state in FINAL_STATES:
                return info, f"the execution ended in {info.state}"
            why = await self.driver.stuck(info, completions_pending)
            if why:
                return info, why
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                return info, f"deadline of {self.case.deadline:.0f}s passed"
            await self.driver.changed(min(SAFETY_POLL, remaining))

    async def _wait_end(self) -> tuple[ExecutionInfo, str]:
        info, why = await self.until(lambda i: i.state in FINAL_STATES, False)
        if info.state not in FINAL_STATES:
            return info, why
        if self.facts.ended is None:
            self.facts.ended = time.monotonic()
        while not await self.driver.settled(info) and time.monotonic() < self.deadline:
            await self.driver.changed(SAFETY_POLL)
            info = await self._observe()
        # settled() may have read rows newer than ``info``: look again, after it.
        return await self._observe(), ""

    # -- steps

    async def _steps(self) -> None:
        steps = self.case.steps
        for index, step in enumerate(steps):
            if not isinstance(step, Mapping) or len(step) != 1:
                self.checker.fail(f"steps[{index}]", "one action per step", step)
                raise _Aborted
            ((kind, raw),) = step.items()
            args: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
            path = f"steps[{index}].{kind}"
            pending = any("complete_action" in s for s in steps[index + 1 :])
            pending = pending or kind == "complete_action"
            match kind:
                case "await":
                    await self._step_await(path, args, pending)
                case "assert":
                    await self._step_assert(path, args)
                case "complete_action":
                    await self._step_complete(path, args)
                case "pause" | "resume":
                    if not self.driver.can_pause():
                        self.checker.fail(path, f"the engine to {kind} the execution",
                                          f"{self.driver.name} offers no {kind}")  # fmt: skip
                        raise _Aborted
                    await (self.driver.pause if kind == "pause" else self.driver.resume)(
                        self.execution_id
                    )
                case "sleep":
                    # The case itself asks for this pause (to see that nothing happens).
                    await asyncio.sleep(float(args.get("seconds", 0)) if args else float(raw))
                case _:
                    self.checker.fail(path, "a known step", kind)
                    raise _Aborted

    async def _step_await(self, path: str, args: Mapping[str, Any], pending: bool) -> None:
        def holds(info: ExecutionInfo) -> bool:
            return not _await_mismatches(info, args)

        info, why = await self.until(holds, pending)
        if why:
            self.checker.fail(path, dict(args), _await_mismatches(info, args), why)
            raise _Aborted

    async def _step_assert(self, path: str, args: Mapping[str, Any]) -> None:
        info = await self._observe()
        for key, expected in args.items():
            match key:
                case "workflow_state":
                    self.checker.check(f"{path}.workflow_state", info.state == expected,
                                       expected, info.state)  # fmt: skip
                case "task_count":
                    self.checker.check(f"{path}.task_count", len(info.tasks) == expected,
                                       expected, [t.name for t in info.tasks])  # fmt: skip
                case "tasks":
                    for name, want in expected.items():
                        state = want.get("state") if isinstance(want, Mapping) else want
                        rows = info.tasks_named(name)
                        actual = rows[-1].state if rows else None
                        self.checker.check(f"{path}.tasks.{name}.state", actual == state,
                                           state, actual)  # fmt: skip
                case "task_not_completed":
                    rows = info.tasks_named(expected)
                    done = bool(rows) and rows[-1].state in FINAL_STATES
                    self.checker.check(f"{path}.task_not_completed", not done,
                                       f"{expected} not finished",
                                       rows[-1].state if rows else "absent")  # fmt: skip
                case "task":
                    continue  # names the task of running_actions
                case "running_actions":
                    task = args.get("task")
                    facts = Facts()
                    await self.driver.facts(self.execution_id, facts)
                    if facts.attempts is None:
                        self.checker.fail(f"{path}.running_actions", expected, None,
                                          "action executions are not observable here")
                        continue
                    tries = [a for a in facts.attempts
                             if a.task_name == task and a.execution_id == self.execution_id]
                    running = [a for a in tries if a.state == "RUNNING"]
                    self.checker.check(f"{path}.running_actions", len(running) == expected,
                                       expected, len(running),
                                       f"tries: {[(a.attempt, a.state) for a in tries]}")
                case _:
                    self.checker.fail(f"{path}.{key}", "a known assertion", key)

    async def _step_complete(self, path: str, args: Mapping[str, Any]) -> None:
        task = str(args.get("task"))
        index = args.get("action_index")
        which = args.get("which")
        result = args.get("result") or {}
        data = result.get("data") if isinstance(result, Mapping) else result
        chosen: list[str] = []

        async def ready(info: ExecutionInfo) -> bool:
            tries = await self.driver.deferred_attempts(self.execution_id, task)
            if index is not None:
                if len(tries) > index and tries[index][1]:
                    chosen[:] = [tries[index][0]]
                    return True
                return False
            candidates = [aid for aid, deferred in tries if deferred]
            if which not in (None, "incomplete"):
                raise ValueError(f"{path}: unknown 'which': {which!r}")
            if candidates:
                chosen[:] = [candidates[0]]
                return True
            return False

        while True:
            info = await self._observe()
            if await ready(info):
                break
            why = ""
            if info.state in FINAL_STATES:
                why = f"the execution ended in {info.state}"
            else:
                why = await self.driver.stuck(info, True) or ""
                if why and "outside completion" in why:
                    why = ""  # waiting for a completion is what we are about to send
            if not why and time.monotonic() > self.deadline:
                why = "deadline passed"
            if why:
                self.checker.fail(path, f"a deferred action of {task} to complete",
                                  [(t.name, t.state) for t in info.tasks], why)  # fmt: skip
                raise _Aborted
            await self.driver.changed(SAFETY_POLL)
        try:
            await self.driver.complete(chosen[0], data)
        except LevanteError as e:
            self.checker.fail(path, "completion accepted", f"{type(e).__name__}: {e}")
            raise _Aborted from None


def _await_mismatches(info: ExecutionInfo, args: Mapping[str, Any]) -> dict[str, Any]:
    """What of an await step does not hold yet: {key: actual}."""
    off: dict[str, Any] = {}
    if "workflow_state" in args and info.state != args["workflow_state"]:
        off["workflow_state"] = info.state
    if "task" in args:
        rows = info.tasks_named(str(args["task"]))
        state = rows[-1].state if rows else None
        wanted = args.get("task_state")
        if state is None or (wanted is not None and state != wanted):
            off["task"] = state
    for name, wanted in (args.get("tasks") or {}).items():
        rows = info.tasks_named(name)
        state = rows[-1].state if rows else None
        want = wanted.get("state") if isinstance(wanted, Mapping) else wanted
        if state != want:
            off[f"tasks.{name}"] = state
    return off


# ------------------------------------------------------------------ checks


def _substitute(value: Any, info: ExecutionInfo, task: TaskInfo | None = None) -> Any:
    """Replace <WF_EX_ID>, <TASKn_EX_ID> and <ACTION_EX_ID> with the engine's ids."""
    if isinstance(value, str):

        def task_id(match: re.Match[str]) -> str:
            rows = info.tasks_named(f"task{match.group(1)}")
            return rows[-1].id if rows else match.group(0)

        value = value.replace("<WF_EX_ID>", info.id)
        value = re.sub(r"<TASK(\d+)_EX_ID>", task_id, value)
        if task is not None:
            value = value.replace("<ACTION_EX_ID>", task.assignment_id)
        return value
    if isinstance(value, list):
        return [_substitute(v, info, task) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, info, task) for k, v in value.items()}
    return value


_TYPES: dict[str, type | tuple[type, ...]] = {
    "list": list, "dict": dict, "str": str, "string": str, "int": int,
    "float": (int, float), "bool": bool, "null": type(None),
}  # fmt: skip


def _is_type(value: Any, name: str) -> bool:
    kind = _TYPES.get(name)
    if kind is None:
        return False
    if name == "int" and isinstance(value, bool):
        return False
    return isinstance(value, kind)


def _fragments(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else [str(value)]


def _resolve(data: Any, path: str) -> tuple[bool, Any]:
    """A dotted path into published data; ``a.b|length`` applies len()."""
    base, _, filter_ = path.partition("|")
    value = data
    for part in base.split("."):
        if isinstance(value, Mapping) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return False, f"<no {part!r} in {_show(value)[:120]}>"
    if filter_ == "length":
        try:
            value = len(value)
        except TypeError:
            return False, f"<no length of {_show(value)}>"
    elif filter_:
        return False, f"<unknown filter {filter_!r}>"
    return True, value


def check_expectations(case: Case, facts: Facts, checker: Checker) -> None:
    """Every key of ``expect`` against what the run showed."""
    expect = case.expect
    info = facts.info
    assert info is not None
    c = checker
    counts = expect.get("task_name_counts") or {}
    handled = {"state", "definition_rejected", "start_rejected", "error_contains",
               "output_match"}  # fmt: skip

    def sub(value: Any, task: TaskInfo | None = None) -> Any:
        return _substitute(value, info, task)

    note = facts.unfinished or f"state_info: {info.state_info!r}"
    c.check("state", info.state == expect.get("state"), expect.get("state"), info.state,
            note if info.state != expect.get("state") else "")  # fmt: skip
    for key, expected in expect.items():
        if key in handled:
            continue
        match key:
            case "state_info_contains":
                missing = [f for f in _fragments(sub(expected)) if f not in info.state_info]
                c.check(key, not missing, sub(expected), info.state_info)
            case "state_info_equals":
                c.check(key, info.state_info == sub(expected), sub(expected), info.state_info)
            case "state_info_not_null":
                c.check(key, bool(info.state_info) == bool(expected), "a state_info",
                        info.state_info)  # fmt: skip
            case "output":
                output = info.output
                if expect.get("output_match", "exact") == "subset":
                    ok = isinstance(output, Mapping) and all(
                        k in output and output[k] == v for k, v in expected.items()
                    )
                else:
                    ok = output == expected
                c.check(key, ok, expected, output, f"match: {expect.get('output_match')}")
            case "output_keys":
                actual = sorted(info.output) if isinstance(info.output, Mapping) else info.output
                c.check(key, actual == sorted(expected), sorted(expected), actual)
            case "output_not_contains_keys":
                out = info.output if isinstance(info.output, Mapping) else {}
                present = [k for k in expected if k in out]
                c.check(key, not present and isinstance(info.output, Mapping),
                        f"none of {expected}", info.output)  # fmt: skip
            case "output_substrings":
                for k, fragment in expected.items():
                    value = info.output.get(k) if isinstance(info.output, Mapping) else None
                    c.check(f"{key}.{k}", isinstance(value, str) and fragment in value,
                            f"a text containing {fragment!r}", value)  # fmt: skip
            case "task_count":
                c.check(key, len(info.tasks) == expected, expected,
                        len(info.tasks), f"tasks: {[t.name for t in info.tasks]}")  # fmt: skip
            case "tasks_not_run":
                ran = [n for n in expected if info.tasks_named(n)]
                c.check(key, not ran, f"no execution of {expected}", f"ran: {ran}")
            case "task_name_counts":
                for name, n in expected.items():
                    actual = len(info.tasks_named(name))
                    c.check(f"{key}.{name}", actual == n, n, actual)
            case "all_tasks_state":
                off = [(t.name, t.state) for t in info.tasks if t.state != expected]
                c.check(key, not off and bool(info.tasks), expected,
                        [(t.name, t.state) for t in info.tasks])  # fmt: skip
            case "workflow_execution_count":
                if facts.executions is None:
                    c.fail(key, expected, None, "executions are not observable here")
                else:
                    c.check(key, len(facts.executions) == expected, expected,
                            [e.workflow for e in facts.executions])  # fmt: skip
            case "total_task_execution_count":
                if facts.executions is None:
                    c.fail(key, expected, None, "executions are not observable here")
                else:
                    total = sum(len(e.tasks) for e in facts.executions)
                    c.check(key, total == expected, expected, total)
            case "total_action_execution_count":
                if facts.attempts is None:
                    c.fail(key, expected, None, "action executions are not observable here")
                else:
                    c.check(key, len(facts.attempts) == expected, expected, len(facts.attempts))
            case "subworkflows":
                _check_subworkflows(expected, facts, c)
            case "min_duration_s":
                duration = facts.duration
                if duration is None and facts.ended is not None:
                    duration = facts.ended - facts.started
                c.check(key, duration is not None and duration >= expected,
                        f">= {expected}s", duration)  # fmt: skip
            case "custom":
                custom = CUSTOM_CHECKS.get(case.stem)
                if custom is None:
                    c.fail(key, expected, None, "no implementation of this custom check")
                else:
                    problems = custom(info)
                    c.check(key, not problems, expected, problems)
            case "tasks":
                for name, wanted in expected.items():
                    _check_task(name, wanted or {}, info, facts, c, counts)
            case _:
                c.fail(key, expected, None, "unknown expect key; teach the harness")


def _check_subworkflows(expected: Mapping[str, Any], facts: Facts, c: Checker) -> None:
    if facts.executions is None:
        c.fail("subworkflows", expected, None, "executions are not observable here")
        return
    children = facts.executions[1:]
    for name, wanted in expected.items():
        found = [e for e in children if e.workflow == name]
        if len(found) != 1:
            c.fail(f"subworkflows.{name}", f"one execution of {name}",
                   [e.workflow for e in children])  # fmt: skip
            continue
        child = found[0]
        for key, value in wanted.items():
            path = f"subworkflows.{name}.{key}"
            match key:
                case "state":
                    c.check(path, child.state == value, value, child.state)
                case "input":
                    c.check(path, child.input == value, value, child.input)
                case "output":
                    c.check(path, child.output == value, value, child.output)
                case "state_info_contains":
                    missing = [f for f in _fragments(value) if f not in child.state_info]
                    c.check(path, not missing, value, child.state_info)
                case "params_contains":
                    if facts.params is None or child.id not in facts.params:
                        c.fail(path, value, None, "an execution's params are not observable here")
                        continue
                    params = facts.params[child.id]
                    off = {k: params.get(k, "<absent>") for k, v in value.items()
                           if params.get(k) != v}  # fmt: skip
                    c.check(path, not off, value, dict(params))
                case _:
                    c.fail(path, value, None, "unknown subworkflow key; teach the harness")


def _check_task(
    name: str,
    wanted: Mapping[str, Any],
    info: ExecutionInfo,
    facts: Facts,
    c: Checker,
    counts: Mapping[str, int],
) -> None:
    rows = info.tasks_named(name)
    prefix = f"tasks.{name}"
    if not rows:
        c.fail(prefix, "a task execution", None, f"tasks: {[t.name for t in info.tasks]}")
        return
    if name not in counts:
        c.check(f"{prefix}.executions", len(rows) == 1, 1, len(rows),
                f"states: {[t.state for t in rows]}")  # fmt: skip
    task = rows[-1]
    published = task.published if isinstance(task.published, Mapping) else {}
    attempts = (
        None
        if facts.attempts is None
        else [a for a in facts.attempts if a.task_name == name and a.execution_id == info.id]
    )

    def sub(value: Any) -> Any:
        return _substitute(value, info, task)

    for key, expected in wanted.items():
        path = f"{prefix}.{key}"
        match key:
            case "state":
                note = f"state_info: {task.state_info!r}"
                if attempts is not None:
                    note += f"; its tries: {[a.state for a in attempts if a.task_id == task.id]}"
                c.check(path, task.state == expected, expected, task.state,
                        note if task.state != expected else "")  # fmt: skip
            case "published":
                off = {k: published.get(k, "<absent>") for k, v in sub(expected).items()
                       if k not in published or published[k] != v}  # fmt: skip
                c.check(path, not off, sub(expected), dict(published))
            case "published_exact":
                c.check(path, dict(published) == sub(expected), sub(expected), dict(published))
            case "published_keys":
                c.check(path, sorted(published) == sorted(expected), sorted(expected),
                        sorted(published))  # fmt: skip
            case "published_one_of":
                for k, options in expected.items():
                    c.check(f"{path}.{k}", published.get(k) in options, f"one of {options}",
                            published.get(k, "<absent>"))  # fmt: skip
            case "published_pattern":
                for k, pattern in expected.items():
                    value = published.get(k)
                    ok = isinstance(value, str) and re.search(pattern, value) is not None
                    c.check(f"{path}.{k}", ok, f"matching {pattern}", value)
            case "published_substrings":
                for k, fragment in expected.items():
                    value = published.get(k)
                    c.check(f"{path}.{k}", isinstance(value, str) and fragment in value,
                            f"a text containing {fragment!r}", value)  # fmt: skip
            case "published_contains_substrings":
                for k, fragments in expected.items():
                    value = published.get(k)
                    ok = isinstance(value, str) and all(f in value for f in fragments)
                    c.check(f"{path}.{k}", ok, f"a text containing {fragments}", value)
            case "published_subset_paths":
                for dotted, value in expected.items():
                    found, actual = _resolve(published, dotted)
                    c.check(f"{path}.{dotted}", found and actual == sub(value), sub(value),
                            actual)  # fmt: skip
            case "result":
                c.check(path, task.result == sub(expected), sub(expected), task.result)
            case "result_contains":
                result = task.result
                missing = [x for x in expected if not isinstance(result, list) or x not in result]
                c.check(path, not missing, f"a list holding {expected}", result)
            case "result_type":
                c.check(path, _is_type(task.result, expected), expected,
                        type(task.result).__name__, f"result: {_show(task.result)}")  # fmt: skip
            case "result_sorted_key":
                result = task.result
                try:
                    values = sorted(item[expected["key"]] for item in result)
                except (TypeError, KeyError):
                    values = None
                c.check(path, values == sorted(expected["values"]), sorted(expected["values"]),
                        values if values is not None else result)  # fmt: skip
            case "with_items_count":
                n = len(task.result) if isinstance(task.result, list) else None
                c.check(path, n == expected, expected, n, f"result: {_show(task.result)}")
            case "retry_no" | "retry_no_gt":
                # the task's try counter; with-items retries show in the items' tries
                tries = [a.attempt for a in attempts or () if a.task_id == task.id]
                retries = max([task.attempt, *tries]) - 1 if task.attempt or tries else 0
                ok = retries == expected if key == "retry_no" else retries > expected
                c.check(path, ok, expected if key == "retry_no" else f"> {expected}", retries,
                        f"attempt: {task.attempt}")  # fmt: skip
            case "state_info_contains":
                missing = [f for f in _fragments(sub(expected)) if f not in task.state_info]
                c.check(path, not missing, sub(expected), task.state_info)
            case "state_info_startswith":
                c.check(path, task.state_info.startswith(sub(expected)), sub(expected),
                        task.state_info)  # fmt: skip
            case "state_info_not_null":
                c.check(path, bool(task.state_info) == bool(expected), "a state_info",
                        task.state_info)  # fmt: skip
            case "observed_states":
                seen = facts.observed.get(name, set())
                wanted_states = [MISTRAL_STATE_NAMES.get(s, s) for s in expected]
                missing = [s for s in wanted_states if s not in seen]
                c.check(path, not missing, wanted_states, sorted(seen))
            case "action_executions" | "action_states" | "accepted_action_executions" | (
                "action_result_type"
            ):
                _check_attempts(path, key, expected, attempts, task, c)
            case _:
                c.fail(path, expected, None, "unknown task key; teach the harness")


def _check_attempts(
    path: str,
    key: str,
    expected: Any,
    attempts: list[Attempt] | None,
    task: TaskInfo,
    c: Checker,
) -> None:
    if attempts is None:
        c.fail(path, expected, None, "action executions are not observable here")
        return
    match key:
        case "action_executions":
            c.check(path, len(attempts) == expected, expected, len(attempts),
                    f"tries: {[(a.attempt, a.state) for a in attempts]}")  # fmt: skip
        case "action_states":
            states = sorted(str(a.state) for a in attempts)
            c.check(path, states == sorted(expected), sorted(expected), states)
        case "accepted_action_executions":
            # Mistral accepts one try per item (per task without with-items): the last.
            last: dict[tuple[str, int | None], Attempt] = {}
            for a in sorted(attempts, key=lambda a: a.attempt):
                last[(a.task_id, a.item)] = a
            accepted = [a for a in last.values() if a.state in ("SUCCESS", "ERROR")]
            c.check(path, len(accepted) == expected, expected, len(accepted))
        case "action_result_type":
            value = attempts[-1].value if attempts else task.result
            c.check(path, _is_type(value, expected), expected, type(value).__name__,
                    f"value: {_show(value)}")  # fmt: skip


# ------------------------------------------------------------------ custom (prose) checks


def _true_count(value: Any) -> int:
    return value.count("True") if isinstance(value, str) else -1


def _custom_discriminator(info: ExecutionInfo) -> list[str]:
    # at least 2 tasks SUCCESS; task4.published.result4 non-null, contains 'True' at least
    # once and 'False' fewer than 3 times
    problems = []
    succeeded = [t.name for t in info.tasks if t.state == "SUCCESS"]
    if len(succeeded) < 2:
        problems.append(f"fewer than 2 tasks in SUCCESS: {succeeded}")
    rows = info.tasks_named("task4")
    value = rows[-1].published.get("result4") if rows else None
    if value is None:
        problems.append("task4.published.result4 is null")
    elif _true_count(value) < 1 or not isinstance(value, str) or value.count("False") >= 3:
        problems.append(f"task4.published.result4 = {value!r}")
    return problems


def _custom_partial_join_once(info: ExecutionInfo) -> list[str]:
    # at least 3 tasks SUCCESS; task5.published.result5 is non-null and contains the
    # substring 'True' at least twice
    problems = []
    succeeded = [t.name for t in info.tasks if t.state == "SUCCESS"]
    if len(succeeded) < 3:
        problems.append(f"fewer than 3 tasks in SUCCESS: {succeeded}")
    rows = info.tasks_named("task5")
    value = rows[-1].published.get("result5") if rows else None
    if value is None:
        problems.append("task5.published.result5 is null")
    elif _true_count(value) < 2:
        problems.append(f"task5.published.result5 = {value!r}")
    return problems


def _custom_notify_progress(info: ExecutionInfo) -> list[str]:
    # the three 'notify' executions published progress values are exactly
    # {completed task1, completed task2, completed task3} (any order)
    values = sorted(str(t.published.get("progress")) for t in info.tasks_named("notify"))
    wanted = ["completed task1", "completed task2", "completed task3"]
    return [] if values == wanted else [f"notify published progress {values}"]


CUSTOM_CHECKS: dict[str, Callable[[ExecutionInfo], list[str]]] = {
    "test_join__test_discriminator": _custom_discriminator,
    "test_join__test_partial_join_triggers_once": _custom_partial_join_once,
    "test_dataflow__test_linear_with_branches_dataflow": _custom_notify_progress,
}


# ------------------------------------------------------------------ entry points


async def run_case(case: Case, driver: Driver | None = None) -> CaseResult:
    """Run one case on ``driver`` (a fresh LocalEngine when None)."""
    began = time.monotonic()
    if driver is None:
        local = LocalDriver(case)
        async with local:
            result = await run_case(case, local)
        result.elapsed = time.monotonic() - began
        return result
    result = CaseResult(case.stem, driver.name)
    try:
        await asyncio.wait_for(Runner(case, driver, result).run(), case.deadline + 30)
    except TimeoutError:
        result.failures.append(f"{case.stem}: harness: the run did not finish in time")
    result.elapsed = time.monotonic() - began
    return result


async def run_cases(cases: Iterable[Case], parallel: int = 16) -> dict[str, CaseResult]:
    """Run cases concurrently, each on its own LocalEngine, on the running loop."""
    gate = asyncio.Semaphore(parallel)
    ordered = sorted(cases, key=lambda c: -c.deadline)  # long (timing) cases first

    async def one(case: Case) -> CaseResult:
        async with gate:
            try:
                return await run_case(case)
            except Exception as e:  # a harness or engine crash is a failure of that case
                result = CaseResult(case.stem, "in-process")
                result.failures.append(f"{case.stem}: crashed: {type(e).__name__}: {e}")
                return result

    results = await asyncio.gather(*(one(c) for c in ordered))
    return {r.case: r for r in results}


T = TypeVar("T")


def _in_thread(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on a fresh event loop of its own thread (callable from sync code,
    also from inside a running loop such as a pytest-asyncio test)."""
    found: list[T] = []
    errors: list[BaseException] = []

    def target() -> None:
        async def main() -> T:
            return await make()

        try:
            found.append(asyncio.run(main()))
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, name="conformance", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return found[0]


def run_cases_in_thread(cases: Iterable[Case], parallel: int = 16) -> dict[str, CaseResult]:
    """run_cases on a fresh event loop of its own thread (callable from sync code)."""
    chosen = list(cases)
    return _in_thread(lambda: run_cases(chosen, parallel))


def snapshot(info: ExecutionInfo) -> dict[str, Any]:
    """An execution's observable result with its ids replaced, to compare two engines."""

    def scrub(value: dict[str, Any]) -> dict[str, Any]:
        text = json.dumps(value, sort_keys=True, default=str)
        scrubbed: dict[str, Any] = json.loads(text.replace(info.id, "<WF_EX_ID>"))
        return scrubbed

    return scrub(
        {
            "state": info.state,
            "state_info": info.state_info,
            "output": info.output,
            "tasks": [
                {
                    "name": t.name,
                    "state": t.state,
                    "state_info": t.state_info,
                    "action": t.action,
                    "published": t.published,
                    "result": t.result,
                    "attempt": t.attempt,
                    "id": t.id,
                    "assignment_id": t.assignment_id,
                }
                for t in info.tasks
            ],
        }
    )


def _main(argv: Sequence[str]) -> int:
    stems = [a for a in argv if not a.startswith("-")]
    paths = [CORPUS / f"{s}.yaml" for s in stems] if stems else case_paths()
    began = time.monotonic()
    cases = [load_case(p) for p in paths]
    if "--service" in argv:
        with (
            tempfile.TemporaryDirectory(prefix="levante-conformance-") as folder,
            ConformanceService(Path(folder)) as service,
        ):
            results = service.run_cases_in_thread(cases)
    else:
        results = run_cases_in_thread(cases)
    failed = 0
    for stem in sorted(results):
        result = results[stem]
        failed += not result.passed
        if "--quiet" not in argv or not result.passed:
            print(result.summary())
    took = time.monotonic() - began
    print(f"{len(results) - failed} passed, {failed} failed in {took:.1f}s", file=sys.stderr)
    if "--gaps" in argv or "--write-gaps" in argv:
        lines = gap_lines(results, read_gaps())
        if "--write-gaps" in argv:
            write_gaps(lines)
            print(f"wrote {len(lines)} lines to {GAPS_FILE}", file=sys.stderr)
        else:
            print("\n".join(lines))
    return 1 if failed else 0


GAPS_HEADER = """\
# Mistral conformance cases that fail today: `<case stem>  <reason>`, one per line.
# tests/test_conformance.py marks them xfail(strict=True), in process and through the
# service alike: remove a line as soon as its case passes (the suite turns red until
# then). Regenerate from an actual run with
# `.venv/bin/python tests/support/conformance.py --quiet --write-gaps` (it keeps the
# reasons of cases still failing, drops the cases that pass, adds new failures as
# UNTRIAGED), then triage by hand. Reasons start with BUG (engine bug), MISSING (a
# language feature not there yet), REFUSED ("not supported yet" at registration),
# DIFFERENCE-DOCUMENTED (docs/semantics.md says Levante differs) or
# DIFFERENCE-UNDOCUMENTED (differs; needs a decision: fix, or document in semantics.md).
"""


def gap_lines(results: Mapping[str, CaseResult], known: Mapping[str, str]) -> list[str]:
    """``<stem>  <reason>`` for each failing case: known reasons kept, new ones UNTRIAGED."""
    lines = []
    for stem in sorted(results):
        result = results[stem]
        if result.passed:
            continue
        reason = known.get(stem)
        if reason is None and result.refused is not None:
            refused = re.sub(r"^line \d+: workflow '[^']*': (task '[^']*': )?", "",
                             result.refused)  # fmt: skip
            reason = f"REFUSED: {refused}"
        if reason is None:
            first = result.failures[0].split(": ", 1)[-1].replace("\n", " ")
            reason = f"UNTRIAGED: {first[:300]}"
        lines.append(f"{stem}  {reason}")
    return lines


def write_gaps(lines: Sequence[str], path: Path = GAPS_FILE) -> None:
    order = ("BUG", "MISSING", "REFUSED", "DIFFERENCE-DOCUMENTED", "DIFFERENCE-UNDOCUMENTED")

    def rank(line: str) -> tuple[int, str]:
        reason = line.split("  ", 1)[1]
        kind = reason.split(":", 1)[0]
        return (order.index(kind) if kind in order else len(order), line)

    path.write_text(GAPS_HEADER + "\n" + "".join(f"{x}\n" for x in sorted(lines, key=rank)))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(_main(sys.argv[1:]))
