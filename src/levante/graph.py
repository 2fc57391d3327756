"""``levante graph``: a workflow, or one execution of it, drawn as a graph.

Pure functions turn a parsed ``WorkflowSpec`` (and, for an execution, its status and
history as ``levante.Client`` returns them) into a ``Graph``, and a ``Graph`` into
Mermaid (``flowchart TD``) or Graphviz DOT text. The I/O is at the bottom of the module
and nowhere else: ``render`` runs Graphviz's ``dot`` for SVG and PNG, ``command`` is the
CLI's subcommand.

What is drawn:

* direct workflows: a node per task (with its action, ``join`` and ``with-items``), an
  edge per transition labelled with its clause (on-success, on-error, on-complete,
  on-skip) and its guard, shortened; engine commands (fail, succeed, pause, noop) as
  round nodes; a start node leading to the start tasks;
* reverse workflows: an edge from each required task to the task that requires it;
* an execution: each node coloured by the state of its task's latest run (dashed: never
  ran), and the transitions that fired drawn thick (the others dotted).

Which transition fired is not stored as such: ``fired_transitions`` reads it from the
history. The engine records every state change of one transaction with the same time,
in the order it decided them, so a task that appears (or a join that starts) in the
transaction where one of its inbound tasks finished, after that task finished, was
reached from it. What cannot be seen is not drawn as fired: transitions to engine
commands, and the arrivals of a ``join: N`` other than the first and the last
(``join: all`` is known to have had them all once it ran).

An execution is drawn over the document the engine registered for it (GetStatus with
``include_definition``), or over the YAML that ``--file`` gives; with neither (an
engine that does not send definitions), from what ran alone.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

from levante.errors import LevanteError
from levante.lang.parser import parse_document
from levante.lang.spec import TaskSpec, Transition, WorkflowSpec

if TYPE_CHECKING:
    from levante.client import Client, ExecutionEvent, ExecutionInfo

__all__ = [
    "FORMATS",
    "Edge",
    "Graph",
    "GraphvizError",
    "Node",
    "add_arguments",
    "command",
    "execution_graph",
    "fired_transitions",
    "render",
    "to_dot",
    "to_mermaid",
    "workflow_graph",
]

FORMATS: Final = ("mermaid", "dot", "svg", "png")
START: Final = "s0"  # the start node's key ("start" and "end" are risky words in Mermaid)
GUARD_WIDTH: Final = 40
FINISHED: Final = frozenset({"SUCCESS", "ERROR"})
# States in which a join has started (not waiting, not failed as impossible).
STARTED: Final = frozenset({"RUNNING", "RUNNING_DELAYED", "PAUSED", "SUCCESS"})

Shape = Literal["task", "join", "command", "start"]


class GraphvizError(LevanteError):
    """Graphviz's ``dot`` is not installed, or it could not draw the graph."""


@dataclass(frozen=True)
class Node:
    key: str  # identifier in the output: t1, t2, ..., s0 (start), cmd_fail
    label: str
    detail: str = ""  # the second line: action, join, with-items
    shape: Shape = "task"
    state: str | None = None  # an execution's view: the latest run's state, "" never ran


@dataclass(frozen=True)
class Edge:
    source: str  # node keys
    target: str
    label: str = ""
    fired: bool | None = None  # None when drawing a workflow rather than an execution


@dataclass(frozen=True)
class Graph:
    title: str
    nodes: tuple[Node, ...]
    edges: tuple[Edge, ...]
    notes: tuple[str, ...] = ()  # shown as comments

    def node(self, label: str) -> Node:
        """The node of the task called ``label``."""
        for node in self.nodes:
            if node.label == label and node.shape in ("task", "join"):
                return node
        raise KeyError(label)


# ---------------------------------------------------------------- a workflow


CLAUSES: Final = ("on-success", "on-error", "on-complete", "on-skip")


def _clauses(task: TaskSpec) -> Iterable[tuple[str, Transition]]:
    for kind, clause in zip(
        CLAUSES, (task.on_success, task.on_error, task.on_complete, task.on_skip), strict=True
    ):
        if clause is not None:
            for transition in clause.transitions:
                yield kind, transition


def shorten(condition: Any, width: int = GUARD_WIDTH) -> str:
    """A guard as a short line: expression delimiters dropped, spaces collapsed, cut."""
    if condition is None or condition is True:
        return ""
    text = condition if isinstance(condition, str) else json.dumps(condition)
    text = " ".join(text.split())
    for opening, closing in (("<%", "%>"), ("{{", "}}")):
        if text.startswith(opening) and text.endswith(closing) and text.count(opening) == 1:
            text = text[len(opening) : -len(closing)].strip()
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


def _detail(task: TaskSpec) -> str:
    if task.workflow is not None:
        parts = [f"workflow {shorten(task.workflow, 30)}"]
    elif task.action is not None:
        parts = [shorten(task.action, 30)]
    else:
        parts = ["std.noop"]
    if task.with_items is not None:
        parts.append("with-items")
    if task.join is not None:
        parts.append(f"join: {task.join}")
    return ", ".join(parts)


def _task_keys(spec: WorkflowSpec) -> dict[str, str]:
    return {name: f"t{i}" for i, name in enumerate(spec.tasks, 1)}


def workflow_graph(spec: WorkflowSpec) -> Graph:
    """Every task and transition of ``spec`` (requires, for a reverse workflow)."""
    keys = _task_keys(spec)
    nodes: list[Node] = []
    edges: list[Edge] = []
    commands: dict[str, Node] = {}
    if spec.type == "direct" and spec.tasks:
        nodes.append(Node(START, "start", shape="start"))
        edges.extend(Edge(START, keys[name]) for name in spec.start_task_names())
    for name, task in spec.tasks.items():
        shape: Shape = "join" if task.join is not None else "task"
        nodes.append(Node(keys[name], name, _detail(task), shape))
        if spec.type == "reverse":
            edges.extend(Edge(keys[r], keys[name]) for r in task.requires if r in keys)
            continue
        for kind, transition in _clauses(task):
            target = transition.target
            if transition.is_engine_command:
                node = commands.setdefault(target, Node(f"cmd_{target}", target, shape="command"))
                target_key = node.key
            else:
                target_key = keys[target]
            guard = shorten(transition.condition)
            edges.append(Edge(keys[name], target_key, f"{kind}: {guard}" if guard else kind))
    title = f"workflow {spec.name} ({spec.type})"
    return Graph(title, (*nodes, *commands.values()), tuple(edges))


# ---------------------------------------------------------------- an execution


@dataclass
class _Reading:
    """What the history says about one execution's transitions."""

    # (source, target, the source's state), in the order they fired.
    fired: dict[tuple[str, str, str], None] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)  # tasks created when the execution began
    ran: set[str] = field(default_factory=set)  # task names that got past WAITING


def _read_history(
    spec: WorkflowSpec | None, history: Sequence[ExecutionEvent]
) -> _Reading:
    reading = _Reading()
    state_of: dict[str, str] = {}  # task id -> last state seen
    finished: tuple[str, str] | None = None  # the last task that finished in this transaction
    transaction: float | None = None
    for event in sorted(history, key=lambda e: e.seq):
        if event.kind != "task":
            continue
        if event.at != transaction:
            transaction, finished = event.at, None
        name, previous = event.task_name, state_of.get(event.task_id)
        state_of[event.task_id] = event.state
        if event.state in STARTED:
            reading.ran.add(name)
        arrived = previous is None or (previous == "WAITING" and event.state in STARTED)
        if arrived:
            if event.cause == "ExecutionStarted" and previous is None:
                reading.started.add(name)
            elif finished is not None and (
                spec is None or finished[0] in spec.inbound_task_names(name)
            ):
                reading.fired.setdefault((finished[0], name, finished[1]))
        if event.state in FINISHED:
            finished = (name, event.state)
    return reading


def _latest(status: ExecutionInfo) -> dict[str, str]:
    """Each task name's latest run's state (tasks are listed in the order they began)."""
    return {task.name: task.state for task in status.tasks}


def _clause_fits(kind: str, state: str) -> bool:
    return (
        (kind == "on-success" and state == "SUCCESS")
        or (kind == "on-error" and state == "ERROR")
        or (kind == "on-complete" and state in FINISHED)
    )


def fired_transitions(
    spec: WorkflowSpec | None, status: ExecutionInfo, history: Sequence[ExecutionEvent]
) -> frozenset[tuple[str, str, str]]:
    """The transitions that fired: (source task, target task, clause).

    The clause is on-success, on-error or on-complete; ``requires`` for a reverse
    workflow (a requirement that was met); ``""`` when ``spec`` is None and the clause
    cannot be known.
    """
    reading = _read_history(spec, history)
    latest = _latest(status)
    found: set[tuple[str, str, str]] = set()
    if spec is None:
        return frozenset((s, t, "") for s, t, _ in reading.fired)
    if spec.type == "reverse":
        for name, task in spec.tasks.items():
            if name in latest:
                found.update((r, name, "requires") for r in task.requires
                             if latest.get(r) == "SUCCESS")  # fmt: skip
        return frozenset(found)
    for name, task in spec.tasks.items():
        for kind, transition in _clauses(task):
            target = transition.target
            if transition.is_engine_command:
                continue
            if any(s == name and t == target and _clause_fits(kind, st)
                   for s, t, st in reading.fired):  # fmt: skip
                found.add((name, target, kind))
            elif (
                spec.task(target).join == "all" and target in reading.ran
                and _clause_fits(kind, latest.get(name, ""))
            ):  # fmt: skip
                found.add((name, target, kind))  # a join: all that ran had every arrival
    return frozenset(found)


def execution_graph(
    spec: WorkflowSpec | None, status: ExecutionInfo, history: Sequence[ExecutionEvent]
) -> Graph:
    """``spec``'s graph with the execution's states and fired transitions on it; without
    ``spec``, the tasks that ran and the transitions the history shows between them."""
    title = f"execution {status.id} of {status.workflow}: {status.state}"
    latest = _latest(status)
    runs: dict[str, int] = {}
    for task in status.tasks:
        runs[task.name] = runs.get(task.name, 0) + 1
    if spec is None:
        return _graph_of_what_ran(status, history, title, latest, runs)
    fired = fired_transitions(spec, status, history)
    base = workflow_graph(spec)
    by_key = {n.key: n for n in base.nodes}
    nodes = tuple(
        n if n.shape in ("start", "command")
        else Node(n.key, n.label, _with_runs(n.detail, runs.get(n.label, 0)), n.shape,
                  latest.get(n.label, ""))
        for n in base.nodes
    )  # fmt: skip
    edges: list[Edge] = []
    for edge in base.edges:
        source, target = by_key[edge.source], by_key[edge.target]
        if source.shape == "start":
            was = target.label in latest
        elif spec.type == "reverse":
            was = (source.label, target.label, "requires") in fired
        else:
            kind = edge.label.split(":", 1)[0]
            was = (source.label, target.label, kind) in fired
        edges.append(Edge(edge.source, edge.target, edge.label, was))
    notes = (
        ("thick: the requirement was met" if spec.type == "reverse" else
         "thick: the transition fired (read from the history); transitions to engine "
         "commands are never marked"),
    )  # fmt: skip
    return Graph(title, nodes, tuple(edges), notes)


def _with_runs(detail: str, runs: int) -> str:
    return detail if runs <= 1 else f"{detail}, {runs} runs"


def _graph_of_what_ran(
    status: ExecutionInfo, history: Sequence[ExecutionEvent], title: str,
    latest: Mapping[str, str], runs: Mapping[str, int],
) -> Graph:  # fmt: skip
    keys = {name: f"t{i}" for i, name in enumerate(latest, 1)}
    actions = {task.name: task.action for task in status.tasks}
    nodes = [Node(START, "start", shape="start")]
    nodes += [Node(keys[n], n, _with_runs(actions[n] or "", runs[n]), "task", latest[n])
              for n in latest]  # fmt: skip
    reading = _read_history(None, history)
    edges = [Edge(START, keys[n], fired=True) for n in latest if n in reading.started]
    edges += [Edge(keys[s], keys[t], fired=True)
              for s, t, _ in reading.fired if s in keys and t in keys]  # fmt: skip
    notes = ("the engine sent no workflow definition: only the tasks that ran are "
             "drawn; add --file FILE.yaml to draw the whole workflow",)  # fmt: skip
    return Graph(title, tuple(nodes), tuple(edges), notes)


# ---------------------------------------------------------------- text

# Fill and stroke by task state; "" is a task that never ran.
COLOURS: Final[Mapping[str, tuple[str, str]]] = {
    "SUCCESS": ("#c8e6c9", "#2e7d32"),
    "ERROR": ("#ffcdd2", "#c62828"),
    "RUNNING": ("#bbdefb", "#1565c0"),
    "RUNNING_DELAYED": ("#ffe0b2", "#ef6c00"),
    "WAITING": ("#fff9c4", "#f9a825"),
    "PAUSED": ("#e1bee7", "#6a1b9a"),
    "CANCELLED": ("#e0e0e0", "#616161"),
    "IDLE": ("#f5f5f5", "#9e9e9e"),
    "": ("#ffffff", "#bdbdbd"),
}
FIRED_COLOUR: Final = "#2e7d32"
QUIET_COLOUR: Final = "#9e9e9e"
COMMAND_FILL: Final = "#eceff1"


def _mermaid_text(text: str) -> str:
    """Text safe inside a quoted Mermaid label (entity codes for what would end it)."""
    out = text.replace("#", "#35;")
    for char, code in (('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("|", "#124;"),
                       ("`", "#96;")):  # fmt: skip
        out = out.replace(char, code)
    return " ".join(out.split())


MERMAID_SHAPES: Final[Mapping[Shape, tuple[str, str]]] = {
    "task": ('["', '"]'),
    "join": ('{{"', '"}}'),
    "command": ('(["', '"])'),
    "start": ('(("', '"))'),
}


def _mermaid_class(state: str) -> str:
    return f"state_{state.lower()}" if state else "not_run"


def to_mermaid(graph: Graph) -> str:
    lines = ["flowchart TD", f"  %% {' '.join(graph.title.split())}"]
    lines += [f"  %% {' '.join(note.split())}" for note in graph.notes]
    for node in graph.nodes:
        label = _mermaid_text(node.label)
        if node.detail:
            label += "<br/>" + _mermaid_text(node.detail)
        opening, closing = MERMAID_SHAPES[node.shape]
        lines.append(f"  {node.key}{opening}{label}{closing}")
    fired: list[str] = []
    for index, edge in enumerate(graph.edges):
        arrow = "-->" if edge.fired is None else "==>" if edge.fired else "-.->"
        label = f'|"{_mermaid_text(edge.label)}"|' if edge.label else ""
        lines.append(f"  {edge.source} {arrow}{label} {edge.target}")
        if edge.fired:
            fired.append(str(index))
    if fired:
        lines.append(f"  linkStyle {','.join(fired)} stroke:{FIRED_COLOUR},stroke-width:3px")
    commands = [n.key for n in graph.nodes if n.shape in ("command", "start")]
    if commands:
        lines.append(f"  classDef command fill:{COMMAND_FILL},stroke:{QUIET_COLOUR}")
        lines.append(f"  class {','.join(commands)} command")
    by_state: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.state is not None and node.shape in ("task", "join"):
            by_state.setdefault(node.state, []).append(node.key)
    for state, keys in by_state.items():
        fill, stroke = COLOURS.get(state, COLOURS[""])
        name = _mermaid_class(state)
        dashes = ",stroke-dasharray:4 3,color:#757575" if not state else ""
        lines.append(f"  classDef {name} fill:{fill},stroke:{stroke}{dashes}")
        lines.append(f"  class {','.join(keys)} {name}")
    return "\n".join(lines) + "\n"


def _dot_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


def to_dot(graph: Graph) -> str:
    lines = [
        f'digraph "{_dot_text(graph.title)}" {{',
        f'  label="{_dot_text(graph.title)}"; labelloc=t; fontname="Helvetica"; rankdir=TB;',
        '  node [shape=box, style="rounded,filled", fillcolor="#ffffff", '
        'fontname="Helvetica", fontsize=11];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    lines += [f"  // {' '.join(note.split())}" for note in graph.notes]
    for node in graph.nodes:
        label = _dot_text(node.label) + (f"\\n{_dot_text(node.detail)}" if node.detail else "")
        attributes = [f'label="{label}"']
        if node.shape == "join":
            attributes.append("shape=hexagon")
        elif node.shape in ("command", "start"):
            attributes += ["shape=circle" if node.shape == "start" else "shape=oval",
                           f'fillcolor="{COMMAND_FILL}"', f'color="{QUIET_COLOUR}"']  # fmt: skip
        if node.state is not None and node.shape in ("task", "join"):
            fill, stroke = COLOURS.get(node.state, COLOURS[""])
            attributes += [f'fillcolor="{fill}"', f'color="{stroke}"']
            if not node.state:
                attributes += ['style="rounded,filled,dashed"', 'fontcolor="#757575"']
        lines.append(f"  {node.key} [{', '.join(attributes)}];")
    for edge in graph.edges:
        attributes = [f'label="{_dot_text(edge.label)}"'] if edge.label else []
        if edge.fired:
            attributes += [f'color="{FIRED_COLOUR}"', "penwidth=2.5"]
        elif edge.fired is False:
            attributes += [f'color="{QUIET_COLOUR}"', "style=dashed"]
        suffix = f" [{', '.join(attributes)}]" if attributes else ""
        lines.append(f"  {edge.source} -> {edge.target}{suffix};")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- I/O: dot, the command


def render(dot_text: str, image_format: Literal["svg", "png"]) -> bytes:
    """Graphviz's drawing of ``dot_text``; GraphvizError when ``dot`` is missing or fails."""
    dot = shutil.which("dot")
    if dot is None:
        raise GraphvizError(
            f"--format {image_format} needs Graphviz's `dot`, which is not installed "
            "(Debian: apt-get install graphviz); --format dot or mermaid works without it"
        )
    done = subprocess.run([dot, f"-T{image_format}"], input=dot_text.encode(),
                          capture_output=True, timeout=120, check=False)  # fmt: skip
    if done.returncode != 0:
        raise GraphvizError(f"dot failed: {done.stderr.decode(errors='replace').strip()}")
    return done.stdout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``levante graph`` arguments (the CLI adds --engine and the connection options)."""
    parser.add_argument("target", metavar="FILE.yaml|EXECUTION_ID",
                        help="a workflow file, or an execution's id")  # fmt: skip
    parser.add_argument("-w", "--workflow", default=None,
                        help="which workflow of the file (when it defines several)")  # fmt: skip
    parser.add_argument("--file", type=Path, default=None, metavar="FILE.yaml",
                        help="with an EXECUTION_ID: draw over this YAML rather than the "
                        "definition the engine registered for the execution")  # fmt: skip
    parser.add_argument("--format", choices=FORMATS, default="mermaid",
                        help="mermaid (default) or dot text; svg or png via Graphviz")  # fmt: skip
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="PATH",
                        help="write here instead of standard output")  # fmt: skip


def _pick(text: str, wanted: str | None, where: str) -> WorkflowSpec:
    workflows = parse_document(text).workflows
    if wanted is not None:
        found = workflows.get(wanted)
        if found is None:
            raise SystemExit(f"levante: {where} has no workflow {wanted!r}; "
                             f"it defines {sorted(workflows)}")  # fmt: skip
        return found
    if len(workflows) == 1:
        return next(iter(workflows.values()))
    raise SystemExit(f"levante: {where} defines several workflows {sorted(workflows)}; "
                     "choose one with -w")  # fmt: skip


def _is_file_target(target: str) -> bool:
    if Path(target).is_file():
        return True
    if re.search(r"\.ya?ml$", target, re.IGNORECASE):
        raise SystemExit(f"levante: {target}: no such file")
    return False


async def command(args: argparse.Namespace, connect: Callable[[], Client]) -> int:
    """``levante graph``: print (or write) the graph in the chosen format."""
    if _is_file_target(args.target):
        graph = workflow_graph(_pick(Path(args.target).read_text(), args.workflow, args.target))
    else:
        async with connect() as client:
            status: ExecutionInfo = await client.get_status(args.target, include_definition=True)
            history = await client.history(args.target)
        spec = None
        if args.file is not None:
            spec = _pick(args.file.read_text(), args.workflow or status.workflow, str(args.file))
        elif status.definition:  # the document the engine registered for this execution
            spec = _pick(status.definition, status.workflow, f"execution {status.id}")
        graph = execution_graph(spec, status, history)
    return _emit(graph, args.format, args.output)


def _emit(graph: Graph, fmt: str, output: Path | None) -> int:
    if fmt in ("mermaid", "dot"):
        text = to_mermaid(graph) if fmt == "mermaid" else to_dot(graph)
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text)
        return 0
    image = render(to_dot(graph), "svg" if fmt == "svg" else "png")
    if output is not None:
        output.write_bytes(image)
    elif fmt == "png" and sys.stdout.isatty():
        raise SystemExit("levante: a PNG is not for a terminal: write it with -o FILE.png")
    else:
        sys.stdout.buffer.write(image)
        sys.stdout.flush()
    return 0

