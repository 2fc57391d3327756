"""The pure core, with no I/O: events in, decisions out.

A tiny in-test driver keeps rows in dicts and applies decisions the way the engine
does (save rows, then decide follow-ups), so each rule is checked on its own.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path
from typing import Any

import pytest

from levante.core.decide import bind_input, decide, merge_contexts
from levante.core.model import (
    AssignmentCompleted,
    AssignmentRecord,
    AssignmentState,
    Decision,
    DispatchAssignment,
    Event,
    ExecutionDrained,
    ExecutionRecord,
    ExecutionStarted,
    ExecutionState,
    Outcome,
    Snapshot,
    TaskFinished,
    TaskRecord,
    TaskState,
)
from levante.errors import InvalidInputError
from levante.ids import DefinitionId, ExecutionId
from levante.lang.parser import parse_document
from levante.lang.spec import WorkflowSpec


class Driver:
    """Applies decisions to in-memory rows, like the engine but without a store."""

    def __init__(self, text: str, workflow: str | None = None) -> None:
        doc = parse_document(text)
        name = workflow or next(iter(doc.workflows))
        self.spec: WorkflowSpec = doc.workflows[name]
        self.execution: ExecutionRecord | None = None
        self.tasks: dict[str, TaskRecord] = {}
        self.assignments: dict[str, AssignmentRecord] = {}
        self.now = 1000.0

    def start(self, given: dict[str, Any] | None = None, params: dict[str, Any] | None = None
              ) -> None:  # fmt: skip
        event = ExecutionStarted(
            ExecutionId("ex"), self.spec.name, DefinitionId(1),
            bind_input(self.spec, given or {}), params or {}, None, self.now,
        )  # fmt: skip
        self._apply(decide(self.spec, None, event))

    def _snapshot(self, task: TaskRecord | None, assignment: AssignmentRecord | None) -> Snapshot:
        assert self.execution is not None
        latest: dict[str, TaskRecord] = {}
        for t in sorted(self.tasks.values(), key=lambda t: t.seq):
            latest[t.name] = t
        return Snapshot(self.execution, latest, task, assignment)

    def _apply(self, first: Decision) -> None:
        pending: deque[Decision | Event] = deque([first])
        while pending:
            item = pending.popleft()
            d = item if isinstance(item, Decision) else decide(self.spec, self._for(item), item)
            self.execution = d.execution
            for t in d.tasks:
                self.tasks[t.id] = t
            for a in d.assignments:
                self.assignments[a.id] = a
            pending.extend(d.followups)

    def _for(self, event: Event) -> Snapshot:
        if isinstance(event, TaskFinished):
            return self._snapshot(self.tasks[event.task_id], None)
        assert isinstance(event, ExecutionDrained)
        return self._snapshot(None, None)

    def queued(self) -> list[AssignmentRecord]:
        return [a for a in self.assignments.values() if a.state == AssignmentState.QUEUED]

    def complete(self, task_name: str, outcome: Outcome) -> None:
        [a] = [a for a in self.queued() if a.task_name == task_name]
        self.now += 1
        snapshot = self._snapshot(self.tasks[a.task_id], a)
        self._apply(decide(self.spec, snapshot, AssignmentCompleted(a.id, a.task_id, outcome,
                                                                    self.now)))

    def state(self) -> ExecutionState:
        assert self.execution is not None
        return self.execution.state

    def task_states(self) -> dict[str, str]:
        return {t.name: t.state.value for t in sorted(self.tasks.values(), key=lambda t: t.seq)}


BRANCHES = """
version: '2.0'
wf:
  input: [n]
  output:
    path: <% $.path %>
  tasks:
    check:
      action: std.echo output=<% $.n %>
      publish:
        value: <% task().result %>
      on-success:
        - big: <% $.value > 10 %>
        - small: <% $.value <= 10 %>
    big:
      action: std.echo output="big"
      publish: {path: <% task().result %>}
    small:
      action: std.echo output="small"
      publish: {path: <% task().result %>}
"""


def test_start_queues_only_the_start_tasks() -> None:
    d = Driver(BRANCHES)
    d.start({"n": 3})
    assert [a.task_name for a in d.queued()] == ["check"]
    assert d.queued()[0].input == {"output": 3}
    assert d.state() == ExecutionState.RUNNING


@pytest.mark.parametrize(("n", "path", "not_run"), [(3, "small", "big"), (30, "big", "small")])
def test_conditional_branches_take_one_way(n: int, path: str, not_run: str) -> None:
    d = Driver(BRANCHES)
    d.start({"n": n})
    d.complete("check", Outcome.success(n))
    assert [a.task_name for a in d.queued()] == [path]
    d.complete(path, Outcome.success(path))
    assert d.state() == ExecutionState.SUCCESS
    assert d.execution is not None and d.execution.output == {"path": path}
    assert not_run not in d.task_states()


ERRORS = """
version: '2.0'
wf:
  tasks:
    risky:
      action: test.boom
      on-error: [recover]
      on-success: [unreachable]
    recover:
      action: std.echo output="recovered"
      publish: {how: <% task().result %>}
    unreachable:
      action: std.noop
"""


def test_on_error_routes_the_error_and_the_workflow_succeeds() -> None:
    d = Driver(ERRORS)
    d.start()
    d.complete("risky", Outcome.failure({"type": "ValueError", "message": "nope"}))
    assert d.task_states() == {"risky": "ERROR", "recover": "RUNNING"}
    d.complete("recover", Outcome.success("recovered"))
    assert d.state() == ExecutionState.SUCCESS
    assert d.execution is not None and d.execution.output == {"how": "recovered"}


UNHANDLED = """
version: '2.0'
wf:
  tasks:
    a:
      action: test.boom
      on-success: [b]
    other:
      action: std.echo output=1
    b:
      action: std.noop
"""


def test_unhandled_error_ends_in_error_once_nothing_else_runs() -> None:
    d = Driver(UNHANDLED)
    d.start()
    d.complete("a", Outcome.failure({"type": "ValueError", "message": "bad thing"}))
    assert d.state() == ExecutionState.RUNNING  # 'other' still runs
    d.complete("other", Outcome.success(1))
    assert d.state() == ExecutionState.ERROR
    assert d.execution is not None
    assert "a" in d.execution.state_info and "ValueError: bad thing" in d.execution.state_info
    assert "b" not in d.task_states()


def test_noop_tasks_finish_inline_and_chain() -> None:
    d = Driver("""
version: '2.0'
wf:
  tasks:
    one:
      on-success: [two]
    two:
      publish: {x: 1}
      on-complete: [three]
    three:
      publish: {y: <% $.x + 1 %>}
""")
    d.start()
    assert d.state() == ExecutionState.SUCCESS
    assert d.execution is not None and d.execution.output == {"x": 1, "y": 2}
    assert d.queued() == []


def test_fail_and_succeed_commands() -> None:
    d = Driver("""
version: '2.0'
wf:
  tasks:
    a:
      action: std.echo output=1
      on-success:
        - fail(msg="stopped on purpose"): <% task().result = 1 %>
        - b
    b:
      action: std.noop
""")
    d.start()
    d.complete("a", Outcome.success(1))
    assert d.state() == ExecutionState.ERROR
    assert d.execution is not None and d.execution.state_info == "stopped on purpose"
    assert "b" not in d.task_states()

    s = Driver("""
version: '2.0'
wf:
  tasks:
    a:
      action: test.boom
      on-error: [succeed]
""")
    s.start()
    s.complete("a", Outcome.failure("x"))
    assert s.state() == ExecutionState.SUCCESS


def test_input_defaults_missing_and_unexpected() -> None:
    spec = parse_document("""
version: '2.0'
wf:
  input:
    - a
    - b: 2
  tasks:
    t: {action: std.noop}
""").workflows["wf"]
    assert bind_input(spec, {"a": 1}) == {"a": 1, "b": 2}
    with pytest.raises(InvalidInputError, match="missing=\\['a'\\]"):
        bind_input(spec, {})
    with pytest.raises(InvalidInputError, match="unexpected=\\['zzz'\\]"):
        bind_input(spec, {"a": 1, "zzz": 0})


def test_expression_error_in_input_fails_the_task() -> None:
    d = Driver("""
version: '2.0'
wf:
  tasks:
    a:
      action: std.echo output=<% $.missing.deeper %>
""")
    d.start()
    assert d.state() == ExecutionState.ERROR
    assert d.task_states() == {"a": "ERROR"}


def test_join_all_fires_once_with_merged_context() -> None:
    d = Driver("""
version: '2.0'
wf:
  tasks:
    left:
      action: std.echo output="l"
      publish: {l: 1}
      on-success: [joined]
    right:
      action: std.echo output="r"
      publish: {r: 2}
      on-success: [joined]
    joined:
      join: all
      action: std.echo output=<% $.l + $.r %>
""")
    d.start()
    d.complete("left", Outcome.success("l"))
    assert d.task_states()["joined"] == "WAITING"
    d.complete("right", Outcome.success("r"))
    [a] = d.queued()
    assert a.task_name == "joined" and a.input == {"output": 3}
    d.complete("joined", Outcome.success(3))
    assert d.state() == ExecutionState.SUCCESS
    assert sum(1 for t in d.tasks.values() if t.name == "joined") == 1


def test_join_that_can_never_fire_ends_in_error() -> None:
    d = Driver("""
version: '2.0'
wf:
  tasks:
    left:
      action: std.echo output="l"
      on-success: [joined]
    right:
      action: test.boom
      on-success: [joined]
      on-error: [noop]
    joined:
      join: all
""")
    d.start()
    d.complete("left", Outcome.success("l"))
    d.complete("right", Outcome.failure("x"))
    assert d.state() == ExecutionState.ERROR
    assert d.task_states()["joined"] == "ERROR"


def test_merge_contexts_is_deep() -> None:
    assert merge_contexts({"a": {"x": 1, "y": 1}, "b": 1}, {"a": {"y": 2}, "c": 3}) == {
        "a": {"x": 1, "y": 2}, "b": 1, "c": 3,
    }  # fmt: skip


def test_dispatch_commands_name_the_assignments() -> None:
    doc = parse_document(BRANCHES).workflows["wf"]
    event = ExecutionStarted(ExecutionId("e"), "wf", DefinitionId(1), {"n": 1}, {}, None, 0.0)
    decision = decide(doc, None, event)
    [command] = decision.commands
    assert isinstance(command, DispatchAssignment)
    assert command.assignment.task_name == "check"
    assert decision.tasks[0].state == TaskState.RUNNING


def test_core_and_lang_import_no_io() -> None:
    """core/ and lang/ stay pure: no asyncio, grpc, sqlite, clock, uuid or store imports."""
    io = {"asyncio", "grpc", "sqlite3", "aiosqlite", "asyncpg", "time", "socket", "os",
          "levante.store", "levante.rpc", "levante.engine", "levante.dispatch"}  # fmt: skip
    # lang/ may use uuid for the expression function uuid(); the core may not.
    forbidden_by_folder = {"core": io | {"uuid", "random"}, "lang": io}
    src = Path(__file__).resolve().parents[1] / "src" / "levante"
    for folder, forbidden in forbidden_by_folder.items():
        for path in (src / folder).glob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for name in names:
                    assert not any(name == f or name.startswith(f + ".") for f in forbidden), (
                        f"{path.name} imports {name}"
                    )
