"""The immutable model of a parsed Mistral v2 document.

The parser (lang/parser.py) turns YAML text into these frozen dataclasses; everything
downstream (the core, the engine) reads only these. Values that may hold expressions
(``<% %>`` or ``{{ }}``) are kept as raw JSON-like data (str, int, float, bool, None,
list, dict) and evaluated later by lang/expressions.py.

Task-defaults are already applied to each TaskSpec by the parser, the way Mistral
applies them: a task's own clause wins, a default clause is used when the task has
none, and a task never transitions to itself through a default.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

ENGINE_COMMANDS = frozenset({"fail", "succeed", "pause", "noop"})

WorkflowType = Literal["direct", "reverse"]
Join = Literal["all", "one"] | int | None


@dataclass(frozen=True)
class Transition:
    """One entry of an on-success / on-error / on-complete / on-skip clause.

    ``target`` is a task name or an engine command (fail, succeed, pause, noop).
    ``condition`` is an expression (or a literal) that must be truthy for the
    transition to be taken; None means always. ``params`` holds an engine
    command's arguments, e.g. ``{"msg": "..."}`` from ``fail(msg="...")``.
    """

    target: str
    condition: Any = None
    params: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None

    @property
    def is_engine_command(self) -> bool:
        return self.target in ENGINE_COMMANDS


@dataclass(frozen=True)
class TransitionClause:
    """A whole on-* clause: its transitions in order, plus advanced publishing."""

    transitions: tuple[Transition, ...] = ()
    publish: Mapping[str, Any] = field(default_factory=dict)  # "branch" scope
    publish_global: Mapping[str, Any] = field(default_factory=dict)
    line: int | None = None


@dataclass(frozen=True)
class RetrySpec:
    count: Any  # int or expression
    delay: Any = 0
    break_on: Any = None
    continue_on: Any = None


@dataclass(frozen=True)
class PoliciesSpec:
    retry: RetrySpec | None = None
    timeout: Any = None
    wait_before: Any = None
    wait_after: Any = None
    pause_before: Any = None
    fail_on: Any = None
    concurrency: Any = None


@dataclass(frozen=True)
class WithItems:
    """``with-items``: loop variables and the expression or literal list for each."""

    variables: tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    action: Any = None  # action name (may be an expression); None with workflow None = std.noop
    workflow: Any = None  # subworkflow name (may be an expression)
    input: Mapping[str, Any] = field(default_factory=dict)  # inline k=v params merged in
    publish: Mapping[str, Any] = field(default_factory=dict)
    publish_on_error: Mapping[str, Any] = field(default_factory=dict)
    on_success: TransitionClause | None = None
    on_error: TransitionClause | None = None
    on_complete: TransitionClause | None = None
    on_skip: TransitionClause | None = None
    join: Join = None
    requires: tuple[str, ...] = ()
    with_items: WithItems | None = None
    policies: PoliciesSpec = field(default_factory=PoliciesSpec)
    keep_result: Any = True
    safe_rerun: Any = False
    target: Any = None
    description: str = ""
    line: int | None = None
    # ``input: <% ... %>``: one expression that evaluates to the whole input mapping
    # (``input`` is then empty: Mistral refuses inline parameters next to it).
    input_expression: str | None = None
    tags: tuple[str, ...] = ()  # exposed to expressions as task(name).spec.tags

    @property
    def runs_noop(self) -> bool:
        """A task with neither action nor workflow runs std.noop."""
        return self.action is None and self.workflow is None

    @cached_property
    def view(self) -> dict[str, Any]:
        """What ``task(name).spec`` shows an expression (Mistral's task spec fields)."""
        view: dict[str, Any] = {"name": self.name, "description": self.description,
                                "tags": list(self.tags)}  # fmt: skip
        for key, value in (("action", self.action), ("workflow", self.workflow)):
            if value is not None:
                view[key] = value
        if self.input:
            view["input"] = dict(self.input)
        if self.publish:
            view["publish"] = dict(self.publish)
        return view

    def clauses(self) -> tuple[TransitionClause, ...]:
        return tuple(
            c
            for c in (self.on_success, self.on_error, self.on_complete, self.on_skip)
            if c is not None
        )

    def next_task_names(self) -> tuple[str, ...]:
        """Every task this task may transition to, in clause order, without duplicates."""
        seen: dict[str, None] = {}
        for clause in self.clauses():
            for t in clause.transitions:
                if not t.is_engine_command:
                    seen.setdefault(t.target, None)
        return tuple(seen)


@dataclass(frozen=True)
class InputParam:
    name: str
    has_default: bool = False
    default: Any = None


@dataclass(frozen=True)
class WorkflowSpec:
    name: str  # full name: "wb.wf" inside a workbook
    type: WorkflowType = "direct"
    input: tuple[InputParam, ...] = ()
    output: Any = None  # None: the output is the final context
    output_on_error: Any = None
    vars: Mapping[str, Any] = field(default_factory=dict)
    tasks: Mapping[str, TaskSpec] = field(default_factory=dict)  # in document order
    description: str = ""
    tags: tuple[str, ...] = ()
    line: int | None = None
    workbook: str | None = None  # names inside a workbook resolve against it first
    actions: Mapping[str, ActionSpec] = field(default_factory=dict)  # the document's ad-hoc
    max_with_items: int | None = None  # the engine's limit (levante.limits); None: none

    def task(self, name: str) -> TaskSpec:
        return self.tasks[name]

    @cached_property
    def view(self) -> dict[str, Any]:
        """What ``execution().spec`` shows an expression."""
        return {
            "name": self.name.rsplit(".", 1)[-1] if self.workbook else self.name,
            "version": "2.0",
            "type": self.type,
            "description": self.description,
            "tags": list(self.tags),
            "input": [p.name if not p.has_default else {p.name: p.default} for p in self.input],
            "tasks": {name: task.view for name, task in self.tasks.items()},
        }

    @cached_property
    def _inbound(self) -> dict[str, tuple[str, ...]]:
        inbound: dict[str, list[str]] = {name: [] for name in self.tasks}
        for task in self.tasks.values():
            sources = task.requires if self.type == "reverse" else ()
            if self.type == "reverse":
                inbound[task.name].extend(s for s in sources if s in self.tasks)
            else:
                for target in task.next_task_names():
                    inbound[target].append(task.name)
        return {name: tuple(dict.fromkeys(names)) for name, names in inbound.items()}

    @cached_property
    def _dependents(self) -> dict[str, tuple[str, ...]]:
        dependents: dict[str, list[str]] = {name: [] for name in self.tasks}
        for task in self.tasks.values():
            for required in task.requires:
                if required in dependents:
                    dependents[required].append(task.name)
        return {name: tuple(names) for name, names in dependents.items()}

    def inbound_task_names(self, name: str) -> tuple[str, ...]:
        """Tasks that lead to ``name``: its transitions' sources, or its requires (reverse);
        each once."""
        return self._inbound.get(name, ())

    def dependent_task_names(self, name: str) -> tuple[str, ...]:
        """Reverse workflows: the tasks that require ``name``."""
        return self._dependents.get(name, ())

    def start_task_names(self) -> tuple[str, ...]:
        """Direct workflows start with every task that no transition leads to."""
        return tuple(n for n in self.tasks if not self._inbound[n])

    def required_closure(self, target: str) -> tuple[str, ...]:
        """Reverse workflows: ``target`` and everything it requires, transitively."""
        seen: dict[str, None] = {}
        stack = [target]
        while stack:
            name = stack.pop()
            if name in seen or name not in self.tasks:
                continue
            seen[name] = None
            stack.extend(self.tasks[name].requires)
        return tuple(n for n in self.tasks if n in seen)

    def resolve_name(self, name: str, known: Mapping[str, Any]) -> str:
        """A workbook-local name resolves to ``workbook.name`` when that exists."""
        if self.workbook is not None and f"{self.workbook}.{name}" in known:
            return f"{self.workbook}.{name}"
        return name


@dataclass(frozen=True)
class ActionSpec:
    """An ad-hoc action: a base action with preset input and an output transform."""

    name: str
    base: str
    base_input: Mapping[str, Any] = field(default_factory=dict)
    input: tuple[InputParam, ...] = ()
    output: Any = None
    description: str = ""
    line: int | None = None


@dataclass(frozen=True)
class Document:
    """One registered YAML document: its workflows and ad-hoc actions by full name."""

    workflows: Mapping[str, WorkflowSpec]
    actions: Mapping[str, ActionSpec] = field(default_factory=dict)
    workbook: str | None = None
