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
    BacklogResumed,
    Decision,
    DispatchAssignment,
    Event,
    ExecutionDrained,
    ExecutionRecord,
    ExecutionResumeRequested,
    ExecutionStarted,
    ExecutionState,
    Outcome,
    Snapshot,
    TaskFinished,
    TaskRecord,
    TaskState,
)
from levante.errors import InvalidInputError
from levante.ids import DefinitionId, ExecutionId, TaskId
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
        if isinstance(event, BacklogResumed):
            return self._snapshot(self.tasks[TaskId(str(event.entry["task_id"]))], None)
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

    def resume(self) -> None:
        self.now += 1
        self._apply(decide(self.spec, self._snapshot(None, None),
                           ExecutionResumeRequested(ExecutionId("ex"), self.now)))  # fmt: skip

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
    # Each recorded one std.noop action execution, done at once (as Mistral runs one).
    done = sorted((a.task_name, a.action, a.state.value, a.outcome) for a in d.assignments.values())
    assert done == [(name, "std.noop", "DONE", Outcome.success(None))
                    for name in ("one", "three", "two")]  # fmt: skip
    assert all(t.assignment_id and t.attempt == 1 for t in d.tasks.values())


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
    # Regular expressions are the one limit that is timed (backtracking cannot be
    # counted): their module reads the CPU clock.
    allowed_by_module = {"lang/regex_functions.py": {"time"}}
    src = Path(__file__).resolve().parents[1] / "src" / "levante"
    for folder, forbidden_in_folder in forbidden_by_folder.items():
        for path in (src / folder).glob("*.py"):
            forbidden = forbidden_in_folder - allowed_by_module.get(f"{folder}/{path.name}", set())
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


# ---------------------------------------------------------------- policy values


def _with_policy(policy: str) -> str:
    """``t`` runs after ``first`` published ``seen``; its policy reads the input ``v``."""
    return f"""
version: '2.0'
wf:
  input: [v]
  output-on-error: {{seen: <% $.get(seen) %>}}
  tasks:
    first:
      action: std.echo output=1
      publish: {{seen: <% task().result %>}}
      on-success: [t]
    t:
      action: test.boom
{policy}
      on-error: [handler]
    handler:
      action: std.noop
"""


NOT_NUMBERS = ["soon", "2", True, False, [1], {"s": 1}, float("nan"), float("inf"), -1, -0.5]
NOT_COUNTS = [*NOT_NUMBERS, 1.5]
NOT_FLAGS = ["yes", "true", 1, 0, [True], {"on": True}]
START = "Failed to run task"
COMPLETION = "Failed to handle action completion"
POLICIES = [
    # (policy text, policy class and key in the message, when it is checked, bad values)
    ("      retry:\n        count: <% $.v %>\n        delay: 0", "RetryPolicy: retry count",
     COMPLETION, NOT_COUNTS),
    ("      retry:\n        count: 1\n        delay: <% $.v %>", "RetryPolicy: retry delay",
     COMPLETION, NOT_NUMBERS),
    ("      wait-after: <% $.v %>", "WaitAfterPolicy: wait-after", COMPLETION, NOT_NUMBERS),
    ("      wait-before: <% $.v %>", "WaitBeforePolicy: wait-before", START, NOT_NUMBERS),
    ("      timeout: <% $.v %>", "TimeoutPolicy: timeout", START, NOT_NUMBERS),
    ("      pause-before: <% $.v %>", "PauseBeforePolicy: pause-before", START, NOT_FLAGS),
    ("      with-items: x in [1, 2]\n      concurrency: <% $.v %>",
     "ConcurrencyPolicy: concurrency", START, NOT_COUNTS),
]  # fmt: skip


@pytest.mark.parametrize(
    ("policy", "named", "when", "value"),
    [pytest.param(p, n, w, v, id=f"{n.split(': ')[1]}={v!r}") for p, n, w, vs in POLICIES
     for v in vs],
)  # fmt: skip
def test_a_policy_value_of_the_wrong_type_fails_the_task_and_the_execution(
    policy: str, named: str, when: str, value: Any
) -> None:
    d = Driver(_with_policy(policy))
    d.start({"v": value})
    d.complete("first", Outcome.success(1))
    if when == COMPLETION:
        d.complete("t", Outcome.failure({"type": "ValueError", "message": "boom"}))
    assert d.state() == ExecutionState.ERROR
    assert d.execution is not None
    info = d.execution.state_info
    assert info.startswith(f"{when} [error=Invalid data type in {named} must be "), info
    assert d.task_states() == {"first": "SUCCESS", "t": "ERROR"}  # Mistral: no on-error
    [t] = [t for t in d.tasks.values() if t.name == "t"]
    assert t.state_info == info
    # The failed task is an end task: output-on-error sees the context it had.
    assert d.execution.output == {"result": info, "seen": 1}
    assert d.execution.active_tasks == 0


def test_a_policy_value_that_is_text_is_named_in_the_message() -> None:
    d = Driver(_with_policy("      wait-after: <% $.v %>"))
    d.start({"v": "soon"})
    d.complete("first", Outcome.success(1))
    d.complete("t", Outcome.success(None))
    assert d.execution is not None
    assert "Invalid data type in WaitAfterPolicy: wait-after must be a number of seconds >= 0, " \
        "not 'soon', wf=wf, task=t" in d.execution.state_info


def test_policy_values_of_the_right_type_are_taken() -> None:
    # A whole float is a count, as in Mistral's schema: 2.0 retries twice.
    d = Driver(_with_policy("      retry:\n        count: <% $.v %>\n        delay: 0"))
    d.start({"v": 2.0})
    d.complete("first", Outcome.success(1))
    for _ in range(3):
        d.complete("t", Outcome.failure("boom"))
    d.complete("handler", Outcome.success(None))
    assert d.state() == ExecutionState.SUCCESS
    [t] = [t for t in d.tasks.values() if t.name == "t"]
    assert t.attempt == 3

    items = Driver(_with_policy("      with-items: x in [1, 2, 3]\n      concurrency: <% $.v %>"))
    items.start({"v": 2.0})
    items.complete("first", Outcome.success(1))
    assert [a.item for a in items.queued()] == [0, 1]

    delayed = Driver(_with_policy("      wait-before: <% $.v %>"))
    delayed.start({"v": 0.5})
    delayed.complete("first", Outcome.success(1))
    assert delayed.task_states()["t"] == "RUNNING_DELAYED"


@pytest.mark.parametrize("policy", [p for p, _, _, _ in POLICIES])
def test_a_policy_value_that_is_null_leaves_the_policy_off(policy: str) -> None:
    d = Driver(_with_policy(policy))
    d.start({"v": None})
    d.complete("first", Outcome.success(1))
    assert d.state() == ExecutionState.RUNNING
    assert {a.task_name for a in d.queued()} == {"t"}


# ---------------------------------------------------------------- the final context


ENDED_BY_A_COMMAND = """
version: '2.0'
wf:
  output: {{up: <% $.get(up) %>, mine: <% $.get(mine) %>}}
  output-on-error: {{up: <% $.get(up) %>, mine: <% $.get(mine) %>}}
  tasks:
    first:
      action: std.echo output=1
      publish: {{up: <% task().result %>}}
      on-success: [t]
    t:
      action: std.echo output=2
      publish: {{mine: <% task().result %>}}
      publish-on-error: {{mine: failed}}
      {clause}
"""


@pytest.mark.parametrize(
    ("clause", "ok", "state", "mine"),
    [
        ("on-success: [succeed]", True, ExecutionState.SUCCESS, 2),
        ("on-complete: [succeed]", True, ExecutionState.SUCCESS, 2),
        ("on-success: [noop, succeed]", True, ExecutionState.SUCCESS, 2),
        ("on-success: ['fail(msg=\"stop\")']", True, ExecutionState.ERROR, 2),
        ("on-error: [fail]", False, ExecutionState.ERROR, "failed"),
        ("on-complete: [fail]", False, ExecutionState.ERROR, "failed"),
        ("on-success: [pause]", True, ExecutionState.SUCCESS, 2),
        ("on-success: [pause, succeed]", True, ExecutionState.SUCCESS, 2),
        ("on-error: [pause, fail]", False, ExecutionState.ERROR, "failed"),
    ],
)  # fmt: skip
def test_the_task_that_ran_succeed_fail_or_pause_is_in_the_final_context(
    clause: str, ok: bool, state: ExecutionState, mine: Any
) -> None:
    d = Driver(ENDED_BY_A_COMMAND.format(clause=clause))
    d.start()
    d.complete("first", Outcome.success(1))
    d.complete("t", Outcome.success(2) if ok else Outcome.failure("boom"))
    if "pause" in clause:
        assert d.state() == ExecutionState.PAUSED
        d.resume()
    assert d.state() == state
    assert d.execution is not None
    output = dict(d.execution.output)
    output.pop("result", None)  # output-on-error adds the state_info
    assert output == {"up": 1, "mine": mine}
