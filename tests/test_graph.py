"""``levante graph``: workflows and executions as Mermaid and DOT text (levante/graph.py).

The text is checked for the workflows of examples/ (direct, reverse, a join); which
transitions fired is checked on histories shaped like the engine's, and end to end on
an execution run by a real server and real workers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import ROOT, SUPPORT, EngineServer, Worker

from levante import graph
from levante.client import ExecutionEvent, ExecutionInfo, SyncClient, TaskInfo
from levante.lang.parser import parse_document
from levante.lang.spec import WorkflowSpec

EXAMPLES = ROOT / "examples"


def spec_of(name: str, workflow: str | None = None) -> WorkflowSpec:
    workflows = parse_document((EXAMPLES / name).read_text()).workflows
    return workflows[workflow] if workflow else next(iter(workflows.values()))


def edges(text: str) -> list[str]:
    """The edge lines of Mermaid or DOT text."""
    return [line.strip() for line in text.splitlines() if "->" in line or "==>" in line]


# ---------------------------------------------------------------- workflows


def test_a_direct_workflow_in_mermaid() -> None:
    assert graph.to_mermaid(graph.workflow_graph(spec_of("orders.yaml"))) == """\
flowchart TD
  %% workflow orders (direct)
  s0(("start"))
  t1["validate<br/>std.echo"]
  t2["review<br/>std.echo"]
  t3["charge<br/>std.echo"]
  t4["fail_if_asked<br/>std.fail"]
  t5["compensate<br/>std.echo"]
  s0 --> t1
  t1 -->|"on-success: $.approved"| t3
  t1 -->|"on-success: not $.approved"| t2
  t2 -->|"on-success"| t3
  t3 -->|"on-success: $.fail_charge"| t4
  t4 -->|"on-error"| t5
  classDef command fill:#eceff1,stroke:#9e9e9e
  class s0 command
"""


def test_a_reverse_workflow_draws_requires_without_a_start() -> None:
    text = graph.to_mermaid(graph.workflow_graph(spec_of("reverse_build.yaml")))
    assert "%% workflow build (reverse)" in text
    assert "s0" not in text  # a reverse workflow starts from its goal, given at run time
    keys = {"checkout": "t1", "fetch_deps": "t2", "compile": "t3", "unit_tests": "t4",
            "package": "t5", "docs": "t6", "release": "t7"}  # fmt: skip
    for name, key in keys.items():
        assert f'  {key}["{name}<br/>std.echo"]' in text
    required = {("checkout", "fetch_deps"), ("checkout", "compile"), ("fetch_deps", "compile"),
                ("compile", "unit_tests"), ("compile", "package"), ("unit_tests", "package"),
                ("checkout", "docs"), ("package", "release"), ("docs", "release")}  # fmt: skip
    assert sorted(edges(text)) == sorted(f"{keys[a]} --> {keys[b]}" for a, b in required)


def test_a_join_is_marked_and_both_start_tasks_lead_to_it() -> None:
    text = graph.to_mermaid(graph.workflow_graph(spec_of("fan_out.yaml")))
    assert '  t1["thumbnails<br/>std.echo, with-items"]' in text
    assert '  t3{{"report<br/>std.echo, join: all"}}' in text  # hexagon: a join
    assert edges(text) == ["s0 --> t1", "s0 --> t2", 't1 -->|"on-success"| t3',
                           't2 -->|"on-success"| t3']  # fmt: skip


def test_engine_commands_guards_and_awkward_names() -> None:
    spec = parse_document("""
version: '2.0'
w:
  tasks:
    end:
      action: std.echo output='say "hi" | <b>'
      on-success:
        - fail msg="no": <% $.x > 1 and $.y < 2 %>
        - succeed: <% $.items.where($.name = 'a long name that goes on and on').len() > 0 %>
      on-complete:
        - pause
""").workflows["w"]
    mermaid = graph.to_mermaid(graph.workflow_graph(spec))
    # Task names are labels, never node ids ("end" would end a Mermaid block).
    assert '  t1["end<br/>std.echo"]' in mermaid
    assert '  cmd_fail(["fail"])' in mermaid and '  cmd_pause(["pause"])' in mermaid
    assert 't1 -->|"on-success: $.x #gt; 1 and $.y #lt; 2"| cmd_fail' in mermaid
    assert "t1 -->|\"on-success: $.items.where($.name = 'a long name tha…\"| cmd_succeed" in mermaid
    assert 't1 -->|"on-complete"| cmd_pause' in mermaid
    assert graph.shorten('<% "a" | "b" %>') == '"a" | "b"'
    assert graph._mermaid_text('"a" | #b') == "#quot;a#quot; #124; #35;b"
    dot = graph.to_dot(graph.workflow_graph(spec))
    assert '  t1 -> cmd_fail [label="on-success: $.x > 1 and $.y < 2"];' in dot
    assert '  cmd_fail [label="fail", shape=oval' in dot


def test_dot_text_and_what_graphviz_makes_of_it() -> None:
    dot = graph.to_dot(graph.workflow_graph(spec_of("fan_out.yaml")))
    assert dot.startswith('digraph "workflow fan_out (direct)" {\n')
    assert '  t3 [label="report\\nstd.echo, join: all", shape=hexagon];' in dot
    assert '  t1 -> t3 [label="on-success"];' in dot
    assert dot.endswith("}\n")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz is not installed: the SVG and PNG drawings are not checked")
    assert b"<svg" in graph.render(dot, "svg")
    assert graph.render(dot, "png").startswith(b"\x89PNG")


def test_svg_without_graphviz_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from levante.cli import main

    monkeypatch.setattr(graph.shutil, "which", lambda _name: None)
    assert main(["graph", str(EXAMPLES / "hello.yaml"), "--format", "svg"]) == 2
    err = capsys.readouterr().err
    assert "needs Graphviz's `dot`, which is not installed" in err
    assert main(["graph", str(EXAMPLES / "hello.yaml"), "--format", "dot"]) == 0
    assert capsys.readouterr().out.startswith('digraph "workflow hello (direct)"')


# ---------------------------------------------------------------- executions


def task(name: str, state: str, seq: int) -> TaskInfo:
    return TaskInfo(id=f"e.{seq}", name=name, state=state, state_info="", action="std.echo",
                    published={}, result=None, attempt=1, assignment_id=f"e.{seq}")  # fmt: skip


def execution(workflow: str, state: str, *tasks: TaskInfo) -> ExecutionInfo:
    return ExecutionInfo(id="e", workflow=workflow, state=state, state_info="", input={},
                         output=None, tasks=tasks)  # fmt: skip


def history(*entries: tuple[float, str, int, str]) -> list[ExecutionEvent]:
    """(time of the transaction, cause, task seq and name as "3:name", state) entries."""
    events = []
    for seq, (at, cause, which, state) in enumerate(entries, 1):
        number, name = which.split(":")
        events.append(ExecutionEvent(seq=seq, at=at, kind="task", execution_id="e",
                                     task_id=f"e.{number}", task_name=name, state=state,
                                     state_info="", cause=cause))  # fmt: skip
    return events


def test_fired_transitions_follow_the_branch_that_ran() -> None:
    spec = spec_of("orders.yaml")
    status = execution("orders", "SUCCESS", task("validate", "SUCCESS", 1),
                       task("review", "SUCCESS", 2), task("charge", "SUCCESS", 3))  # fmt: skip
    events = history(
        (1.0, "ExecutionStarted", "1:validate", "RUNNING"),
        (2.0, "AssignmentCompleted", "1:validate", "SUCCESS"),
        (2.0, "AssignmentCompleted", "2:review", "RUNNING"),
        (3.0, "AssignmentCompleted", "2:review", "SUCCESS"),
        (3.0, "AssignmentCompleted", "3:charge", "RUNNING"),
        (4.0, "AssignmentCompleted", "3:charge", "SUCCESS"),
    )
    assert graph.fired_transitions(spec, status, events) == {
        ("validate", "review", "on-success"), ("review", "charge", "on-success")}  # fmt: skip
    text = graph.to_mermaid(graph.execution_graph(spec, status, events))
    assert "%% execution e of orders: SUCCESS" in text
    assert edges(text) == [
        "s0 ==> t1",
        't1 -.->|"on-success: $.approved"| t3',  # validate -> charge was not taken
        't1 ==>|"on-success: not $.approved"| t2',
        't2 ==>|"on-success"| t3',
        't3 -.->|"on-success: $.fail_charge"| t4',
        't4 -.->|"on-error"| t5',
    ]
    assert "  linkStyle 0,2,3 stroke:#2e7d32,stroke-width:3px" in text
    assert "  class t1,t2,t3 state_success" in text
    assert "  class t4,t5 not_run" in text


def test_a_join_all_had_every_arrival_once_it_ran() -> None:
    spec = parse_document("""
version: '2.0'
w:
  tasks:
    a:
      on-success: [j]
    b:
      on-complete: [j]
    c:
      on-error: [j]
    j:
      join: all
""").workflows["w"]
    status = execution("w", "SUCCESS", task("a", "SUCCESS", 1), task("b", "SUCCESS", 2),
                       task("c", "ERROR", 3), task("j", "SUCCESS", 4))  # fmt: skip
    # The middle arrival (c) changes no state, so it leaves nothing in the history.
    events = history(
        (1.0, "ExecutionStarted", "1:a", "RUNNING"),
        (1.0, "ExecutionStarted", "2:b", "RUNNING"),
        (1.0, "ExecutionStarted", "3:c", "RUNNING"),
        (2.0, "AssignmentCompleted", "1:a", "SUCCESS"),
        (2.0, "AssignmentCompleted", "4:j", "WAITING"),
        (3.0, "AssignmentCompleted", "3:c", "ERROR"),
        (4.0, "AssignmentCompleted", "2:b", "SUCCESS"),
        (4.0, "AssignmentCompleted", "4:j", "RUNNING"),
        (5.0, "AssignmentCompleted", "4:j", "SUCCESS"),
    )
    assert graph.fired_transitions(spec, status, events) == {
        ("a", "j", "on-success"), ("b", "j", "on-complete"), ("c", "j", "on-error")}
    # Without the join's action having run, only the arrivals that show are marked.
    waiting = execution("w", "RUNNING", task("a", "SUCCESS", 1), task("b", "RUNNING", 2),
                        task("c", "ERROR", 3), task("j", "WAITING", 4))  # fmt: skip
    assert graph.fired_transitions(spec, waiting, events[:6]) == {("a", "j", "on-success")}


def test_transitions_inside_one_transaction_are_told_apart() -> None:
    # a finishes; b (no action) runs inline and leads to c and d in the same transaction.
    spec = parse_document("""
version: '2.0'
w:
  tasks:
    a:
      action: std.echo output=1
      on-success: [b, c]
    b:
      on-success: [d]
    c:
      action: std.noop
    d:
      action: std.noop
""").workflows["w"]
    status = execution("w", "SUCCESS", task("a", "SUCCESS", 1), task("b", "SUCCESS", 2),
                       task("c", "SUCCESS", 3), task("d", "SUCCESS", 4))  # fmt: skip
    events = history(
        (1.0, "ExecutionStarted", "1:a", "RUNNING"),
        (2.0, "AssignmentCompleted", "1:a", "SUCCESS"),
        (2.0, "AssignmentCompleted", "2:b", "RUNNING"),
        (2.0, "AssignmentCompleted", "3:c", "RUNNING"),
        (2.0, "TaskFinished", "2:b", "SUCCESS"),
        (2.0, "TaskFinished", "4:d", "RUNNING"),
        (2.0, "TaskFinished", "3:c", "SUCCESS"),
        (2.0, "TaskFinished", "4:d", "SUCCESS"),
    )
    assert graph.fired_transitions(spec, status, events) == {
        ("a", "b", "on-success"), ("a", "c", "on-success"), ("b", "d", "on-success")}
    # Without the definition: the same edges, between the tasks that ran.
    text = graph.to_mermaid(graph.execution_graph(None, status, events))
    assert "add --file FILE.yaml to draw the whole workflow" in text
    assert edges(text) == ["s0 ==> t1", "t1 ==> t2", "t1 ==> t3", "t2 ==> t4"]


def test_a_reverse_execution_marks_the_requirements_met() -> None:
    spec = spec_of("reverse_build.yaml")
    status = execution("build", "RUNNING", task("checkout", "SUCCESS", 1),
                       task("fetch_deps", "RUNNING", 2), task("compile", "WAITING", 3))  # fmt: skip
    assert graph.fired_transitions(spec, status, []) == {
        ("checkout", "fetch_deps", "requires"), ("checkout", "compile", "requires")}
    dot = graph.to_dot(graph.execution_graph(spec, status, []))
    assert '  t1 -> t3 [color="#2e7d32", penwidth=2.5];' in dot
    assert '  t2 -> t3 [color="#9e9e9e", style=dashed];' in dot
    assert 'label="compile\\nstd.echo", fillcolor="#fff9c4"' in dot
    assert "style=\"rounded,filled,dashed\"" in dot  # the tasks that never ran


# ---------------------------------------------------------------- the command


def levante(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "src")])
    return subprocess.run([sys.executable, "-m", "levante", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env=env, check=False)  # fmt: skip


def test_graph_of_an_execution_on_a_real_server(
    server: EngineServer, workers: list[Worker], tmp_path: Path
) -> None:
    orders = EXAMPLES / "orders.yaml"
    with SyncClient(server.address) as client:
        client.register_workflows(orders.read_text())
        execution_id = client.run("orders", {"amount": 20, "fail_charge": True})
        assert client.wait(execution_id, timeout=60).state == "SUCCESS"

    done = levante("graph", execution_id, "--engine", server.address, "--file", str(orders))
    assert done.returncode == 0, done.stderr
    assert f"%% execution {execution_id} of orders: SUCCESS" in done.stdout
    # The small order skipped review; the failed charge check was routed to compensate.
    assert edges(done.stdout) == [
        "s0 ==> t1",
        't1 ==>|"on-success: $.approved"| t3',
        't1 -.->|"on-success: not $.approved"| t2',
        't2 -.->|"on-success"| t3',
        't3 ==>|"on-success: $.fail_charge"| t4',
        't4 ==>|"on-error"| t5',
    ]
    assert "  class t1,t3,t5 state_success" in done.stdout
    assert "  class t4 state_error" in done.stdout
    assert "  class t2 not_run" in done.stdout

    # Without --file the engine's registered definition is drawn: the same graph.
    registered = levante("graph", execution_id, "--engine", server.address)
    assert registered.returncode == 0, registered.stderr
    assert registered.stdout == done.stdout

    as_dot = levante("graph", execution_id, "--engine", server.address, "--format", "dot",
                     "-o", str(tmp_path / "run.dot"))  # fmt: skip
    assert as_dot.returncode == 0, as_dot.stderr
    dot = (tmp_path / "run.dot").read_text()
    assert "add --file FILE.yaml" not in dot
    assert len([line for line in dot.splitlines() if "->" in line]) == 6

    unknown = levante("graph", "no-such-execution", "--engine", server.address)
    assert unknown.returncode == 2
    assert "not found" in unknown.stderr
