"""Tests for levante.lang.parser: Mistral v2 YAML to the frozen spec model."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from levante.errors import DefinitionError
from levante.lang.parser import MAX_NODES, parse_document
from levante.lang.spec import (
    Document,
    InputParam,
    RetrySpec,
    TaskSpec,
    Transition,
    WorkflowSpec,
)

# The corpus lives beside the checkout (never copied in); LEVANTE_CONFORMANCE overrides.
CONFORMANCE = Path(
    os.environ.get(
        "LEVANTE_CONFORMANCE",
        Path(__file__).resolve().parents[1].parent / "shared" / "conformance" / "mistral",
    )
)


def parse(text: str) -> Document:
    return parse_document(textwrap.dedent(text))


def workflow(text: str, name: str = "wf") -> WorkflowSpec:
    return parse(text).workflows[name]


def task(text: str, name: str, wf: str = "wf") -> TaskSpec:
    return workflow(text, wf).tasks[name]


def one_task(body: str, *, wf_type: str = "direct") -> TaskSpec:
    """A workflow with a single task ``t`` whose keys are ``body``."""
    text = f"version: '2.0'\nwf:\n  type: {wf_type}\n  tasks:\n    t:\n"
    text += textwrap.indent(textwrap.dedent(body), "      ")
    return parse_document(text).workflows["wf"].tasks["t"]


def rejected(text: str) -> DefinitionError:
    with pytest.raises(DefinitionError) as caught:
        parse(text)
    return caught.value


def assert_rejected(text: str, line: int, *fragments: str) -> DefinitionError:
    error = rejected(text)
    assert error.line == line, str(error)
    for fragment in fragments:
        assert fragment in str(error), str(error)
    assert str(error).startswith(f"line {line}: ")
    return error


# ------------------------------------------------------------------ conformance


def _conformance_cases() -> list[Path]:
    return sorted(CONFORMANCE.glob("*.yaml"))


def test_conformance_corpus_is_there() -> None:
    if not CONFORMANCE.is_dir():
        pytest.skip(f"no Mistral conformance corpus at {CONFORMANCE}: its cases are skipped")
    assert len(_conformance_cases()) > 100, f"the corpus at {CONFORMANCE} looks truncated"


@pytest.mark.parametrize("path", _conformance_cases(), ids=lambda p: p.stem)
def test_conformance_definition(path: Path) -> None:
    case = yaml.safe_load(path.read_text(encoding="utf-8"))
    expect = case.get("expect") or {}
    if expect.get("definition_rejected") is True:
        with pytest.raises(DefinitionError) as caught:
            parse_document(case["definition"])
        assert caught.value.line is not None
        return
    document = parse_document(case["definition"])
    assert case["workflow"] in document.workflows
    if case["definition_kind"] == "workbook":
        assert document.workbook is not None
        assert case["workflow"].startswith(document.workbook + ".")
    else:
        assert document.workbook is None


# --------------------------------------------------------------- documents


def test_minimal_workflow() -> None:
    doc = parse(
        """\
        version: '2.0'
        wf:
          tasks:
            t1:
              action: std.noop
        """
    )
    assert doc.workbook is None
    assert doc.actions == {}
    wf = doc.workflows["wf"]
    assert wf.name == "wf"
    assert wf.type == "direct"
    assert wf.line == 2
    t1 = wf.tasks["t1"]
    assert t1 == TaskSpec(name="t1", action="std.noop", line=4)


@pytest.mark.parametrize("version", ["'2.0'", "2.0", "2", '"2.0"'])
def test_version_forms(version: str) -> None:
    doc = parse_document(f"version: {version}\nwf:\n  tasks:\n    t: {{action: std.noop}}\n")
    assert list(doc.workflows) == ["wf"]


def test_workflow_attributes() -> None:
    wf = workflow(
        """\
        ---
        version: '2.0'
        wf:
          type: reverse
          description: does things
          tags: [a, b]
          input:
            - x
            - y: 3
            - z: null
          output:
            result: <% $.x %>
          output-on-error:
            failed: true
          vars:
            v: {{ _.x }}
          tasks:
            t:
              action: std.noop
        """.replace("{{ _.x }}", "'{{ _.x }}'")
    )
    assert wf.type == "reverse"
    assert wf.description == "does things"
    assert wf.tags == ("a", "b")
    assert wf.input == (
        InputParam("x"),
        InputParam("y", has_default=True, default=3),
        InputParam("z", has_default=True, default=None),
    )
    assert wf.output == {"result": "<% $.x %>"}
    assert wf.output_on_error == {"failed": True}
    assert wf.vars == {"v": "{{ _.x }}"}


def test_several_workflows_keep_document_order() -> None:
    doc = parse(
        """\
        version: '2.0'
        b:
          tasks: {t: {action: std.noop}}
        a:
          tasks: {t: {workflow: b}}
        """
    )
    assert list(doc.workflows) == ["b", "a"]
    assert doc.workflows["a"].tasks["t"].workflow == "b"


def test_tasks_keep_document_order_and_lines() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          tasks:
            zeta:
              action: std.noop
            alpha:
              action: std.noop
        """
    )
    assert list(wf.tasks) == ["zeta", "alpha"]
    assert [t.line for t in wf.tasks.values()] == [4, 6]


def test_task_attributes() -> None:
    t = one_task(
        """\
        description: a task
        tags: [t1]
        action: std.echo
        input:
          output: {a: [1, 2]}
        publish:
          x: <% task().result %>
        publish-on-error:
          err: <% task().result %>
        keep-result: false
        safe-rerun: true
        target: worker-1
        timeout: 30
        wait-before: <% $.w %>
        wait-after: 2
        pause-before: true
        fail-on: <% $.bad %>
        concurrency: 4
        with-items: i in [1, 2]
        """
    )
    assert t.description == "a task"
    assert t.tags == ("t1",)
    assert t.input == {"output": {"a": [1, 2]}}
    assert t.publish == {"x": "<% task().result %>"}
    assert t.publish_on_error == {"err": "<% task().result %>"}
    assert t.keep_result is False
    assert t.safe_rerun is True
    assert t.target == "worker-1"
    p = t.policies
    assert (p.timeout, p.wait_before, p.wait_after) == (30, "<% $.w %>", 2)
    assert (p.pause_before, p.fail_on, p.concurrency) == (True, "<% $.bad %>", 4)
    assert p.retry is None
    assert t.with_items is not None
    assert t.with_items.variables == (("i", [1, 2]),)


def test_task_without_action_runs_noop() -> None:
    t = one_task("description: nothing to run\n")
    assert t.runs_noop
    assert t.action is None and t.workflow is None


def test_action_and_workflow_may_be_expressions() -> None:
    assert one_task("action: <% $.action_name %>\n").action == "<% $.action_name %>"
    t = one_task("workflow: '{{ _.wf_name }}'\n")
    assert t.workflow == "{{ _.wf_name }}"
    assert t.input == {}


def test_input_may_be_an_expression() -> None:
    t = one_task("workflow: <% $.wf %>\ninput: <% $.params %>\n")
    assert t.input_expression == "<% $.params %>"
    assert t.input == {}


# ------------------------------------------------------------ inline parameters


def test_inline_parameters() -> None:
    t = one_task(
        """\
        action: >-
          std.http url="http://site.com?q=<% $.query %>" params="" n=32 ok=true
          nothing=null f=1.5 neg=-2 single='a b' list=[1, null, "str"]
          expr=<% $.a + $.b %> jinja={{ _.x }} empty_list=[]
        """
    )
    assert t.action == "std.http"
    assert t.input == {
        "url": "http://site.com?q=<% $.query %>",
        "params": "",
        "n": 32,
        "ok": True,
        "nothing": None,
        "f": 1.5,
        "neg": -2,
        "single": "a b",
        "list": [1, None, "str"],
        "expr": "<% $.a + $.b %>",
        "jinja": "{{ _.x }}",
        "empty_list": [],
    }


def test_inline_list_that_is_not_json_stays_text_like_mistral() -> None:
    t = one_task("action: std.echo output=['a', 'b']\n")
    assert t.input == {"output": "['a', 'b']"}


def test_inline_parameters_win_over_input_as_in_mistral() -> None:
    t = one_task(
        """\
        action: std.echo output="inline" other=1
        input:
          output: from input
          extra: 2
        """
    )
    assert t.input == {"output": "inline", "extra": 2, "other": 1}


def test_inline_parameters_of_a_subworkflow() -> None:
    t = one_task("workflow: sub x=1 y='two' z=<% $.z %>\n")
    assert (t.workflow, t.action) == ("sub", None)
    assert t.input == {"x": 1, "y": "two", "z": "<% $.z %>"}


def test_inline_parameter_with_blank_after_equals() -> None:
    t = one_task('action: std.echo output= "Task 1.<% $.i %>"\n')
    assert t.input == {"output": "Task 1.<% $.i %>"}


def test_bare_words_are_text() -> None:
    t = one_task("action: std.echo output=hello path=tmp/x n=3\n")
    assert t.input == {"output": "hello", "path": "tmp/x", "n": 3}


def test_expression_action_with_inline_parameters() -> None:
    t = one_task("action: <% $.name %> a=1\n")
    assert t.action == "<% $.name %>"
    assert t.input == {"a": 1}


@pytest.mark.parametrize(
    ("action", "fragment"),
    [
        ("std.echo output=hel<lo", "'hel<lo' is not a number"),
        ('std.echo output="unterminated', "unterminated quote"),
        ("std.echo output=<% $.x", "closing '%>'"),
        ("std.echo output=[1, 2", "never closed"),
        ("std.echo output=", "has no value"),
        ("std.echo just words", "expected key=value"),
        ("std.echo a=1 a=2", "given twice"),
        ("std.echo a='x'b", "unexpected"),
    ],
)
def test_bad_inline_parameters(action: str, fragment: str) -> None:
    text = f"version: '2.0'\nwf:\n  tasks:\n    t:\n      action: {action}\n"
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == 5
    assert "task 't'" in str(caught.value)
    assert fragment in str(caught.value)


def test_input_expression_refuses_inline_parameters() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t:
              action: std.echo output=1
              input: <% $.x %>
        """,
        5,
        "inline parameters",
    )


# ----------------------------------------------------------------- transitions


CLAUSES = """\
version: '2.0'
wf:
  tasks:
    a:
      on-success: b
      on-error:
        - b
        - c: <% $.x > 1 %>
        - fail(msg="boom"): <% $.y %>
        - fail(msg=<% $.why %>)
        - succeed msg='done' code=3
        - pause
        - noop
      on-complete:
        publish:
          branch:
            x: 1
          global:
            g: <% $.x %>
          atomic:
            ignored: 1
        next:
          - c
    b:
      on-skip: [c]
    c:
      on-complete:
        publish:
          global: {done: true}
"""


def test_clause_forms() -> None:
    wf = parse_document(CLAUSES).workflows["wf"]
    a = wf.tasks["a"]
    assert a.on_success is not None
    assert a.on_success.transitions == (Transition("b", line=5),)
    assert a.on_success.line == 5
    assert a.on_error is not None
    assert a.on_error.transitions == (
        Transition("b", line=7),
        Transition("c", condition="<% $.x > 1 %>", line=8),
        Transition("fail", condition="<% $.y %>", params={"msg": "boom"}, line=9),
        Transition("fail", params={"msg": "<% $.why %>"}, line=10),
        Transition("succeed", params={"msg": "done", "code": 3}, line=11),
        Transition("pause", line=12),
        Transition("noop", line=13),
    )
    assert [t.is_engine_command for t in a.on_error.transitions] == [False, False] + [True] * 5
    assert a.on_complete is not None
    assert a.on_complete.publish == {"x": 1}
    assert a.on_complete.publish_global == {"g": "<% $.x %>"}
    assert a.on_complete.transitions == (Transition("c", line=23),)
    assert a.next_task_names() == ("b", "c")
    b = wf.tasks["b"]
    assert b.on_skip is not None and b.on_skip.transitions == (Transition("c", line=25),)
    c = wf.tasks["c"]
    assert c.on_complete is not None
    assert c.on_complete.transitions == ()
    assert c.on_complete.publish_global == {"done": True}
    assert wf.start_task_names() == ("a",)


def test_advanced_next_forms() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              on-success:
                next: b
              on-error:
                next: {b: <% $.x %>}
            b: {}
        """.replace("b: {}", "b: {action: std.noop}")
    )
    a = wf.tasks["a"]
    assert a.on_success is not None and a.on_success.transitions == (Transition("b", line=6),)
    assert a.on_error is not None
    assert a.on_error.transitions == (Transition("b", condition="<% $.x %>", line=8),)


def test_task_names_with_punctuation() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          tasks:
            task1:
              on-success: [t2-task]
            t2-task:
              on-success: ['t3.task']
            t3.task:
              on-success: ['t(4)']
            t(4):
              action: std.noop
        """
    )
    assert wf.tasks["t3.task"].next_task_names() == ("t(4)",)


def test_transition_to_missing_task() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              action: std.noop
              on-success:
                - b
                - nope
            b:
              action: std.noop
        """,
        8,
        "task 'a': on-success refers to task 'nope' which does not exist",
    )


def test_conditional_transition_to_missing_task() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              on-error:
                next:
                  - ghost: <% true %>
        """,
        7,
        "on-error refers to task 'ghost'",
    )


def test_condition_must_be_an_expression() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              on-success:
                - b: yes please
            b: {action: std.noop}
        """,
        6,
        "must be an expression",
    )


@pytest.mark.parametrize(
    ("clause", "line", "fragment"),
    [
        ("on-success: []", 5, "must not be an empty list"),
        ("on-success:", 5, "entries must be task names"),
        ("on-success: [b, b]", 5, "same transition twice"),
        ("on-success: [12]", 5, "entries must be task names"),
        ("on-success: {b: <% $.x %>}", 5, "'next'"),
        ("on-success: {publish: {x: 1}}", 5, "'branch', 'global'"),
        ("on-success: {next: b, then: c}", 5, "unknown key 'then'"),
        ("on-success: [{b: <% 1 %>, c: <% 2 %>}]", 5, "exactly one key"),
        ("on-success: ['']", 5, "empty task name"),
    ],
)
def test_bad_clauses(clause: str, line: int, fragment: str) -> None:
    text = (
        "version: '2.0'\nwf:\n  tasks:\n    a:\n      "
        + clause
        + "\n    b: {action: std.noop}\n    c: {action: std.noop}\n"
    )
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert fragment in str(caught.value)


def test_no_start_task() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t1:
              on-complete: t2
            t2:
              on-complete: t1
        """,
        3,
        "no start task",
    )


def test_direct_workflows_may_loop() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          tasks:
            start:
              on-success: loop
            loop:
              on-success:
                - loop: <% $.again %>
        """
    )
    assert wf.inbound_task_names("loop") == ("start", "loop")


# ------------------------------------------------------------------------ join


def test_join_values() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              on-success: [all, one, two]
            b:
              on-success: [all, one, two]
            all:
              join: all
            one:
              join: one
            two:
              join: 2
        """
    )
    assert [wf.tasks[n].join for n in ("a", "all", "one", "two")] == [None, "all", "one", 2]


@pytest.mark.parametrize(
    ("join", "fragment"),
    [("3", "needs at least 3"), ("'3'", "must be 'all', 'one'"), ("-1", "must be 'all', 'one'")],
)
def test_bad_join(join: str, fragment: str) -> None:
    text = (
        "version: '2.0'\nwf:\n  tasks:\n    a: {on-success: j}\n    b: {on-success: j}\n"
        f"    j:\n      join: {join}\n"
    )
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == 7
    assert "task 'j'" in str(caught.value) and fragment in str(caught.value)


def test_join_all_needs_an_inbound_task() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a: {action: std.noop}
            j:
              join: all
        """,
        6,
        "'join: all' needs at least 1",
    )


# ------------------------------------------------------------------ with-items


def test_with_items_forms() -> None:
    t = one_task(
        """\
        with-items:
          - x in <% $.xs %>
          - y in {{ _.ys }}
          - z in [1, "two", null]
        action: std.echo output=<% $.x %>
        """.replace("{{ _.ys }}", "'{{ _.ys }}'").replace("- y in '", "- 'y in ")
    )
    assert t.with_items is not None
    assert t.with_items.variables == (
        ("x", "<% $.xs %>"),
        ("y", "{{ _.ys }}"),
        ("z", [1, "two", None]),
    )
    single = one_task("with-items: item-1 in <% $.items %>\n")
    assert single.with_items is not None
    assert single.with_items.variables == (("item-1", "<% $.items %>"),)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("i in [1,,3]", "Invalid array in 'with-items'"),
        ("i in y", "after 'in'"),
        ("<% $.y %>", "wrong format"),
        ("''", "non-empty text"),
        ("12345", "non-empty text"),
        ("[]", "must not be empty"),
        ("['i in [1]', 'i in [2]']", "declares 'i' twice"),
    ],
)
def test_bad_with_items(value: str, fragment: str) -> None:
    text = f"version: '2.0'\nwf:\n  tasks:\n    t:\n      with-items: {value}\n"
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == 5
    assert fragment in str(caught.value)


# ----------------------------------------------------------------------- retry


def test_retry_mapping() -> None:
    t = one_task(
        """\
        retry:
          count: <% $.n %>
          delay: 2
          break-on: <% $.stop %>
          continue-on: <% $.more %>
        """
    )
    assert t.policies.retry == RetrySpec(
        count="<% $.n %>", delay=2, break_on="<% $.stop %>", continue_on="<% $.more %>"
    )


def test_retry_one_line() -> None:
    t = one_task("retry: count=3 delay=1 break-on=<% $.foo = 'bar' %>\n")
    assert t.policies.retry == RetrySpec(count=3, delay=1, break_on="<% $.foo = 'bar' %>")


@pytest.mark.parametrize(
    ("retry", "line", "fragment"),
    [
        ("retry: coun=3 delay=1", 5, "unknown parameter 'coun'"),
        ("retry: count=3", 5, "needs 'delay'"),
        ("retry:\n        count: 3", 6, "needs 'delay'"),
        ("retry:\n        count: -3\n        delay: 1", 6, "'retry: count' must be an integer"),
        ("retry:\n        count: '3'\n        delay: 1", 6, "'retry: count' must be an integer"),
        ("retry:\n        count: 3\n        delay: 1\n        retries: 2", 8, "unknown key"),
        ("retry:\n        count: 3\n        delay: 1\n        break-on: yes", 8, "expression"),
        ("retry:", 5, "must be a mapping"),
    ],
)
def test_bad_retry(retry: str, line: int, fragment: str) -> None:
    text = f"version: '2.0'\nwf:\n  tasks:\n    t:\n      {retry}\n"
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert fragment in str(caught.value)


# -------------------------------------------------------------------- policies


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ("wait-before: -1", "'wait-before' must be an integer >= 0 or an expression"),
        ("wait-after: -1.5", "'wait-after' must be an integer"),
        ("timeout: '300'", "'timeout' must be an integer"),
        ("concurrency: true", "'concurrency' must be an integer"),
        ("pause-before: 'False'", "'pause-before' must be true, false or an expression"),
        ("fail-on: 1", "'fail-on' must be true, false"),
        ("keep-result: asd", "'keep-result' must be true, false"),
        ("safe-rerun: null", "'safe-rerun' must be true, false"),
        ("target: ''", "'target' must be non-empty text"),
        ("publish: {}", "'publish' must not be empty"),
        ("publish: [a]", "'publish' must be a mapping"),
        ("input: {}", "'input' must not be empty"),
        ("input: plain text", "'input' must be an expression"),
        ("tags: [a, a]", "lists 'a' twice"),
    ],
)
def test_bad_task_values(policy: str, fragment: str) -> None:
    text = f"version: '2.0'\nwf:\n  tasks:\n    t:\n      {policy}\n"
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == 5, str(caught.value)
    assert "task 't'" in str(caught.value) and fragment in str(caught.value)


# --------------------------------------------------------------- task-defaults


DEFAULTS = """\
version: '2.0'
wf:
  task-defaults:
    on-error:
      - handler
    on-complete: [report]
    retry: count=2 delay=1
    wait-before: 5
    timeout: 10
    safe-rerun: true
  tasks:
    main:
      action: std.noop
      timeout: 60
      wait-before: 0
      on-error: [main_fixup]
      on-complete:
        publish:
          branch: {x: 1}
    main_fixup:
      safe-rerun: false
      retry:
        count: 5
        delay: 0
    handler:
      action: std.noop
    report:
      action: std.noop
"""


def test_task_defaults_are_applied_the_mistral_way() -> None:
    wf = parse_document(DEFAULTS).workflows["wf"]
    main = wf.tasks["main"]
    # The task's own clause wins.
    assert main.on_error is not None
    assert [t.target for t in main.on_error.transitions] == ["main_fixup"]
    # A clause with publishing but no transitions takes the default transitions.
    assert main.on_complete is not None
    assert main.on_complete.publish == {"x": 1}
    assert [t.target for t in main.on_complete.transitions] == ["report"]
    assert main.on_complete.transitions[0].line == 6
    # Policies: the task's own values, the defaults where the task sets none (or 0).
    assert main.policies.timeout == 60
    assert main.policies.wait_before == 5
    assert main.policies.retry == RetrySpec(count=2, delay=1)
    assert main.safe_rerun is True

    fixup = wf.tasks["main_fixup"]
    assert fixup.safe_rerun is False
    assert fixup.policies.retry == RetrySpec(count=5, delay=0)
    assert fixup.policies.timeout == 10
    assert fixup.on_error is not None
    assert [t.target for t in fixup.on_error.transitions] == ["handler"]

    # A task never transitions to itself through a default.
    handler = wf.tasks["handler"]
    assert handler.on_error is None
    assert handler.on_complete is not None
    assert [t.target for t in handler.on_complete.transitions] == ["report"]
    report = wf.tasks["report"]
    assert report.on_complete is None
    assert report.on_error is not None
    assert [t.target for t in report.on_error.transitions] == ["handler"]
    assert wf.start_task_names() == ("main",)


def test_task_defaults_requires_for_reverse_workflows() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          type: reverse
          task-defaults:
            requires: [setup]
          tasks:
            setup:
              action: std.noop
            work:
              requires: prepare
            prepare:
              action: std.noop
        """
    )
    assert wf.tasks["setup"].requires == ()
    assert wf.tasks["work"].requires == ("prepare", "setup")
    assert wf.tasks["prepare"].requires == ("setup",)


def test_task_defaults_errors() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          task-defaults:
            on-success: [missing]
          tasks:
            t: {action: std.noop}
        """,
        4,
        "task-defaults: on-success refers to task 'missing'",
    )
    assert_rejected(
        """\
        version: '2.0'
        wf:
          task-defaults:
            action: std.noop
          tasks:
            t: {action: std.noop}
        """,
        4,
        "task-defaults: unknown key 'action'",
    )
    assert_rejected(
        """\
        version: '2.0'
        wf:
          type: reverse
          task-defaults:
            requires: missing
          tasks:
            t: {action: std.noop}
        """,
        5,
        "task-defaults: requires task 'missing' which does not exist",
    )


# ---------------------------------------------------------------------- reverse


def test_reverse_workflow() -> None:
    wf = workflow(
        """\
        version: '2.0'
        wf:
          type: reverse
          tasks:
            a:
              action: std.noop
            b:
              requires: a
            c:
              requires: [a, b, c]
        """
    )
    assert wf.tasks["b"].requires == ("a",)
    assert wf.tasks["c"].requires == ("a", "b")  # Mistral drops a task's own name


def test_reverse_requires_missing_task() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          type: reverse
          tasks:
            task2:
              action: std.noop
            task3:
              action: std.noop
              requires: [task1]
        """,
        9,
        "task 'task3': requires task 'task1' which does not exist",
    )


def test_reverse_cycle() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          type: reverse
          tasks:
            a:
              requires: c
            b:
              requires: [a]
            c:
              requires: [b]
        """,
        6,
        "cycle: 'a' -> 'c' -> 'b' -> 'a'",
    )


def test_keys_of_the_other_workflow_type() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              requires: [b]
            b: {action: std.noop}
        """,
        5,
        "task 'a': 'requires' is only for tasks of reverse workflows",
    )
    assert_rejected(
        """\
        version: '2.0'
        wf:
          type: reverse
          tasks:
            a:
              action: std.noop
              on-success: b
            b: {action: std.noop}
        """,
        7,
        "'on-success' is only for tasks of direct workflows",
    )


# --------------------------------------------------------------------- workbook


WORKBOOK = """\
---
version: '2.0'
name: my_wb
description: A workbook
tags: [test]

actions:
  greet:
    description: says hello
    base: std.echo output="Hello <% $.name %>!" extra=1
    base-input:
      output: overridden by the inline parameter
      other: 2
    input:
      - name
      - greeting: hi
    output: <% $ %>
  plain:
    base: std.noop

workflows:
  version: '2.0'
  wf1:
    type: reverse
    tasks:
      t1:
        action: greet name=<% $.name %>
  wf2:
    tasks:
      t:
        workflow: wf1
"""


def test_workbook() -> None:
    doc = parse_document(WORKBOOK)
    assert doc.workbook == "my_wb"
    assert list(doc.workflows) == ["my_wb.wf1", "my_wb.wf2"]
    assert doc.workflows["my_wb.wf1"].name == "my_wb.wf1"
    assert doc.workflows["my_wb.wf1"].type == "reverse"
    assert doc.workflows["my_wb.wf2"].tasks["t"].workflow == "wf1"
    assert list(doc.actions) == ["my_wb.greet", "my_wb.plain"]
    greet = doc.actions["my_wb.greet"]
    assert greet.name == "my_wb.greet"
    assert greet.base == "std.echo"
    assert greet.base_input == {"output": "Hello <% $.name %>!", "other": 2, "extra": 1}
    assert greet.input == (InputParam("name"), InputParam("greeting", True, "hi"))
    assert greet.output == "<% $ %>"
    assert greet.description == "says hello"
    assert greet.line == 8
    assert doc.actions["my_wb.plain"].base == "std.noop"


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("version: '2.0'\nname: wb\nworkflow:\n  wf: {}\n", 3, "unknown key 'workflow'"),
        ("version: '2.0'\nname: ''\n", 2, "'name' must be non-empty text"),
        ("name: wb\nworkflows:\n  wf: {tasks: {t: {}}}\n", 1, "'version' is required"),
        ("version: '1.0'\nname: wb\n", 1, "only '2.0'"),
        (
            "version: '2.0'\nname: wb\nworkflows:\n  my wf:\n    tasks: {t: {action: a}}\n",
            4,
            "name 'my wf'",
        ),
        ("version: '2.0'\nname: wb\nactions:\n  a:\n    base-input: {x: 1}\n", 4, "'base'"),
        ("version: '2.0'\nname: wb\nactions:\n  a:\n    base: std.echo\n    x: 1\n", 6, "'x'"),
        ("version: '2.0'\nname: wb\nworkflows: {}\n", 3, "must not be empty"),
        ("version: '2.0'\nworkflows:\n  wf:\n    tasks: {t: {action: a}}\n", 2, "'name'"),
    ],
)
def test_bad_workbooks(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert fragment in str(caught.value)


# --------------------------------------------------------------- key checking


def test_unknown_task_key_names_key_and_line() -> None:
    error = assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            task1:
              action: std.noop
            task2:
              acton: std.noop
        """,
        7,
    )
    assert str(error) == "line 7: task 'task2': unknown key 'acton' (did you mean 'action'?)"


def test_unknown_workflow_key() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          typ: direct
          tasks:
            t: {action: std.noop}
        """,
        3,
        "workflow 'wf': unknown key 'typ'",
    )


def test_unsupported_publish_on_skip() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t:
              publish-on-skip: {x: 1}
        """,
        5,
        "not supported",
    )


def test_action_and_workflow_together() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t:
              action: std.noop
              workflow: other
        """,
        6,
        "task 't': a task has either 'action' or 'workflow', not both",
    )


def test_duplicate_task_names() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t:
              action: std.noop
            t:
              action: std.echo
        """,
        6,
        "duplicate key 't' (first given at line 4)",
    )


def test_duplicate_keys_anywhere() -> None:
    assert_rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            t:
              action: std.echo
              input:
                output: 1
                output: 2
        """,
        8,
        "duplicate key 'output'",
    )


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("version: '2.0'\nwf:\n  tasks: {}\n", 3, "'tasks' must not be empty"),
        ("version: '2.0'\nwf:\n  type: direct\n", 2, "'tasks' is required"),
        ("version: '2.0'\nwf:\n  type: circular\n  tasks: {t: {}}\n", 3, "'type' must be"),
        ("version: '2.0'\nwf:\n  tasks:\n    t:\n", 4, "non-empty mapping"),
        ("version: '2.0'\nwf:\n  tasks:\n    t: {}\n", 4, "non-empty mapping"),
        ("version: '2.0'\nwf:\n  tasks:\n    fail: {action: a}\n", 4, "engine command"),
        ("version: '2.0'\nwf: [a]\n", 2, "a workflow must be a mapping"),
        ("version: '2.0'\n", 1, "no workflow"),
        ("wf:\n  tasks: {t: {action: a}}\n", 1, "'version' is required"),
        ("version: '3.0'\nwf:\n  tasks: {t: {action: a}}\n", 1, "only '2.0'"),
        ("version: true\nwf:\n  tasks: {t: {action: a}}\n", 1, "only '2.0'"),
        ("version: '2.0'\ndescription: x\nwf:\n  tasks: {t: {action: a}}\n", 2, "workbooks"),
        (
            "version: '2.0'\nb98180ba-48a0-4e26-ab2e-50dc224f6fd1:\n  tasks: {t: {action: a}}\n",
            2,
            "UUID",
        ),
        ("version: '2.0'\nwf:\n  input: [a, a]\n  tasks: {t: {action: a}}\n", 3, "twice"),
        ("version: '2.0'\nwf:\n  input: []\n  tasks: {t: {action: a}}\n", 3, "non-empty list"),
        (
            "version: '2.0'\nwf:\n  input:\n    - {a: 1, b: 2}\n  tasks: {t: {action: a}}\n",
            4,
            "exactly one key",
        ),
        ("version: '2.0'\nwf:\n  output: whatever\n  tasks: {t: {action: a}}\n", 3, "mapping"),
        ("version: '2.0'\nwf:\n  vars: {}\n  tasks: {t: {action: a}}\n", 3, "not be empty"),
        ("version: '2.0'\nwf:\n  tags: [x, x]\n  tasks: {t: {action: a}}\n", 3, "twice"),
        ("version: '2.0'\nwf:\n  tasks:\n    t:\n      action: ''\n", 5, "non-empty text"),
        ("version: '2.0'\nwf:\n  tasks:\n    t:\n      action: 123\n", 5, "non-empty text"),
    ],
)
def test_bad_workflows(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert fragment in str(caught.value)


def test_task_name_length() -> None:
    long_name = "t" * 256
    with pytest.raises(DefinitionError) as caught:
        parse_document(f"version: '2.0'\nwf:\n  tasks:\n    {long_name}: {{action: a}}\n")
    assert caught.value.line == 4 and "255" in str(caught.value)
    join_name = "j" * 209
    with pytest.raises(DefinitionError) as caught:
        parse_document(
            "version: '2.0'\nwf:\n  tasks:\n    a: {on-success: "
            f"{join_name}}}\n    {join_name}:\n      join: all\n"
        )
    assert caught.value.line == 5 and "208" in str(caught.value)


# ------------------------------------------------------------------------ YAML


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("version: '2.0'\nwf:\n  tasks:\n    t: [unclosed\n", 5),
        ("version: '2.0'\nwf:\n  tasks:\n   t:\n  bad: indent\n    x: 1\n", 6),
        ("version: '2.0'\nwf: {tasks: {t: {action: 'a}}}\n", 3),
        ("version: '2.0'\n---\nwf: {}\n", 2),
    ],
)
def test_malformed_yaml(text: str, line: int) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert "invalid YAML" in str(caught.value)


@pytest.mark.parametrize(
    ("text", "line", "fragment"),
    [
        ("", 1, "empty"),
        ("# nothing\n", 1, "empty"),
        ("- a\n- b\n", 1, "must be a mapping"),
        ("just text\n", 1, "must be a mapping"),
        ("version: '2.0'\n? [a]\n: 1\n", 2, "mapping keys must be plain"),
        ("version: '2.0'\n1: {tasks: {t: {action: a}}}\n", 2, "top-level keys"),
    ],
)
def test_bad_top_level(text: str, line: int, fragment: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == line, str(caught.value)
    assert fragment in str(caught.value)


def test_non_utf8_bytes() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(b"version: '2.0'\nwf:\n  description: caf\xe9\n")
    assert caught.value.line == 3
    assert "UTF-8" in str(caught.value)


def test_utf8_bytes_are_accepted() -> None:
    text = "version: '2.0'\nwf:\n  description: café\n  tasks: {t: {action: a}}\n"
    doc = parse_document(text.encode())
    assert doc.workflows["wf"].description == "café"


def test_unprintable_character() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document("version: '2.0'\nwf:\n  description: a\x00b\n")
    assert caught.value.line == 3


@pytest.mark.parametrize(
    "value",
    [
        "!!python/object/apply:os.system ['true']",
        "!!python/name:os.system",
        "!!binary aGVsbG8=",
        "!custom x",
        "!!set {a, b}",
    ],
)
def test_only_safe_yaml_tags(value: str) -> None:
    text = f"version: '2.0'\nwf:\n  tasks:\n    t:\n      input:\n        x: {value}\n"
    with pytest.raises(DefinitionError) as caught:
        parse_document(text)
    assert caught.value.line == 6
    assert "unsupported YAML tag" in str(caught.value)


def test_anchors_and_aliases_are_plain_text_as_in_mistral() -> None:
    t = one_task("input:\n  a: &anchor value\n  b: *anchor\n  c: '@home'\n  d: @home\n")
    assert t.input == {"a": "&anchor value", "b": "*anchor", "c": "@home", "d": "@home"}


def test_alias_bomb_is_harmless() -> None:
    lines = ["version: '2.0'", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]")
    with pytest.raises(DefinitionError) as caught:
        parse_document("\n".join(lines) + "\n")
    assert "mapping" in str(caught.value)  # the "workflows" are text, not a node explosion


def test_too_many_nodes() -> None:
    items = ", ".join(["1"] * (MAX_NODES + 1))
    with pytest.raises(DefinitionError) as caught:
        parse_document(f"version: '2.0'\nwf:\n  vars:\n    big: [{items}]\n")
    assert "too large" in str(caught.value)
    assert caught.value.line == 4


def test_too_deep() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document("version: '2.0'\nwf:\n  vars:\n    deep: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "deeper" in str(caught.value)


def test_merge_keys_and_timestamps() -> None:
    t = one_task(
        """\
        input:
          <<: {a: 1, b: 2}
          b: 3
          when: 2024-01-02
        """
    )
    assert t.input == {"b": 3, "when": "2024-01-02", "a": 1}


def test_error_message_format() -> None:
    error = rejected(
        """\
        version: '2.0'
        wf:
          tasks:
            a:
              on-success: nope
        """
    )
    assert error.line == 5
    assert error.reason == "task 'a': on-success refers to task 'nope' which does not exist"
    assert str(error) == f"line 5: {error.reason}"


def test_result_is_immutable() -> None:
    doc = parse(CLAUSES)
    t = doc.workflows["wf"].tasks["a"]
    with pytest.raises(AttributeError):
        t.name = "other"  # type: ignore[misc]
    values: list[Any] = [t.input, t.publish]
    assert all(isinstance(v, dict) for v in values)


def test_workflow_may_be_named_like_a_workbook_section() -> None:
    doc = parse_document("version: '2.0'\nworkflows:\n  tasks: {t: {action: std.noop}}\n")
    assert list(doc.workflows) == ["workflows"]
    assert doc.workbook is None


def test_ad_hoc_actions_need_a_workbook() -> None:
    with pytest.raises(DefinitionError) as caught:
        parse_document(
            "version: '2.0'\nactions:\n  a:\n    base: std.noop\nwf:\n  tasks: {t: {action: a}}\n"
        )
    assert caught.value.line == 2
    assert "'actions:' belongs to a workbook" in str(caught.value)
