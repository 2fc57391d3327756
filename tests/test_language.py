"""The language beyond plain transitions, through the in-process engine (same core).

with-items, retry, wait-before / wait-after, timeout, fail-on, subworkflows, reverse
workflows, ad-hoc actions, advanced publishing, keep-result.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from levante.client import ExecutionInfo
from levante.core.model import Outcome
from levante.errors import ConflictError, InvalidInputError
from levante.runner import ExecutionResult, LocalEngine


async def run(definition: str, workflow: str | None = None, input: dict[str, Any] | None = None,
              actions: dict[str, Any] | None = None, params: dict[str, Any] | None = None,
              ) -> ExecutionResult:  # fmt: skip
    async with LocalEngine(actions=actions or {}) as local:
        names = await local.register(definition)
        return await asyncio.wait_for(
            local.run(workflow or names[0], input or {}, params=params), timeout=60
        )


# ---------------------------------------------------------------- with-items


async def test_with_items_results_in_item_order_under_concurrency() -> None:
    running = 0
    peak = 0

    async def slow_square(x: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01 * (10 - x))  # later items finish first
        running -= 1
        return x * x

    result = await run("""
version: '2.0'
squares:
  input: [numbers]
  tasks:
    square:
      with-items: n in <% $.numbers %>
      concurrency: 3
      action: math.square x=<% $.n %>
      publish: {squares: <% task().result %>}
""", input={"numbers": list(range(10))}, actions={"math.square": slow_square})
    assert result.ok, result.state_info
    assert result.output == {"squares": [n * n for n in range(10)]}
    assert peak == 3


async def test_with_items_lockstep_lists_and_empty_list() -> None:
    result = await run("""
version: '2.0'
pairs:
  input: [names, ages, nothing]
  tasks:
    pair:
      with-items:
        - name in <% $.names %>
        - age in <% $.ages %>
      action: std.echo output="<% $.name %> is <% $.age %>"
      publish: {pairs: <% task().result %>}
      on-success: [none]
    none:
      with-items: x in <% $.nothing %>
      action: std.echo output=<% $.x %>
      publish: {empty: <% task().result %>}
""", input={"names": ["ann", "bob"], "ages": [30, 40], "nothing": []})
    assert result.ok, result.state_info
    assert result.output == {"pairs": ["ann is 30", "bob is 40"], "empty": []}


async def test_with_items_fails_when_an_item_fails() -> None:
    def check(x: int) -> int:
        if x == 2:
            raise ValueError("two is bad")
        return x

    result = await run("""
version: '2.0'
items:
  tasks:
    each:
      with-items: x in [1, 2, 3]
      action: check x=<% $.x %>
""", actions={"check": check})
    assert result.state == "ERROR"
    assert "two is bad" in result.task("each").state_info


# ---------------------------------------------------------------- retry and policies


async def test_retry_until_success() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise RuntimeError(f"attempt {len(calls)} failed")
        return "finally"

    result = await run("""
version: '2.0'
retrying:
  tasks:
    t:
      action: flaky
      retry: count=5 delay=0
      publish: {r: <% task().result %>}
""", actions={"flaky": flaky})
    assert result.ok, result.state_info
    assert result.output == {"r": "finally"}
    assert len(calls) == 3 and result.task("t").attempt == 3


async def test_retry_exhausted_and_break_on() -> None:
    def always() -> None:
        raise RuntimeError("nope")

    exhausted = await run("""
version: '2.0'
wf:
  tasks:
    t:
      action: always
      retry: {count: 2, delay: 0.05}
""", actions={"always": always})
    assert exhausted.state == "ERROR" and exhausted.task("t").attempt == 3

    broken = await run("""
version: '2.0'
wf:
  tasks:
    t:
      action: always
      retry:
        count: 5
        delay: 0
        break-on: <% task().result.message = 'nope' %>
""", actions={"always": always})
    assert broken.state == "ERROR" and broken.task("t").attempt == 1


async def test_continue_on_retries_a_success_while_it_holds() -> None:
    seen = iter(range(100))

    def count() -> int:
        return next(seen)

    result = await run("""
version: '2.0'
wf:
  tasks:
    t:
      action: count
      retry:
        count: 10
        delay: 0
        continue-on: <% task().result < 3 %>
      publish: {last: <% task().result %>}
""", actions={"count": count})
    assert result.ok and result.output == {"last": 3}


async def test_wait_before_and_wait_after_delay_the_task() -> None:
    started = time.monotonic()
    result = await run("""
version: '2.0'
wf:
  tasks:
    t:
      action: std.echo output=1
      wait-before: 0.3
      wait-after: 0.3
      on-success: [u]
    u:
      action: std.noop
""")
    assert result.ok
    assert time.monotonic() - started >= 0.6


async def test_timeout_fails_the_task_and_on_error_routes_it() -> None:
    async def forever() -> None:
        await asyncio.sleep(3600)

    result = await run("""
version: '2.0'
wf:
  tasks:
    slow:
      action: forever
      timeout: 0.2
      on-error: [handled]
    handled:
      action: std.echo output="timed out"
      publish: {said: <% task().result %>}
""", actions={"forever": forever})
    assert result.ok, result.state_info
    assert result.output == {"said": "timed out"}
    assert "timed out" in result.task("slow").state_info


async def test_fail_on() -> None:
    result = await run("""
version: '2.0'
wf:
  tasks:
    t:
      action: std.echo output=5
      fail-on: <% task().result > 3 %>
""")
    assert result.state == "ERROR"
    assert result.task("t").state == "ERROR"


# ---------------------------------------------------------------- subworkflows


SUB = """
version: '2.0'
parent:
  input: [n]
  tasks:
    call:
      workflow: child x=<% $.n %>
      publish: {got: <% task().result.doubled %>}
      on-error: [rescue]
    rescue:
      action: std.echo output=rescued
      publish: {got: rescued}
child:
  input: [x]
  output:
    doubled: <% $.d %>
    region: <% env().region %>
  tasks:
    double:
      action: std.echo output=<% $.x * 2 %>
      publish: {d: <% task().result %>}
      on-success:
        - boom: <% $.d > 100 %>
    boom:
      action: std.fail
"""


async def test_subworkflow_output_becomes_the_task_result_and_env_is_inherited() -> None:
    async with LocalEngine() as local:
        await local.register(SUB)
        result = await local.run("parent", {"n": 21}, params={"env": {"region": "eu"}})
        assert result.ok, result.state_info
        assert result.output == {"got": 42}
        call = result.task("call")
        assert call.result == {"doubled": 42, "region": "eu"}
        child = await local.status(call.assignment_id)
        assert child.workflow == "child" and child.state == "SUCCESS"


async def test_subworkflow_error_propagates_to_the_parent_task() -> None:
    result = await run(SUB, "parent", {"n": 500}, params={"env": {"region": "eu"}})
    assert result.ok, result.state_info
    assert result.task("call").state == "ERROR"
    assert result.output == {"got": "rescued"}


# ---------------------------------------------------------------- reverse workflows


async def test_reverse_workflow_runs_only_what_the_target_requires() -> None:
    definition = """
version: '2.0'
build:
  type: reverse
  tasks:
    fetch:
      action: std.echo output=src
      publish: {src: <% task().result %>}
    compile:
      requires: [fetch]
      action: std.echo output="bin from <% $.src %>"
      publish: {bin: <% task().result %>}
    docs:
      requires: [fetch]
      action: std.echo output=docs
    package:
      requires: [compile]
      action: std.echo output="pkg of <% $.bin %>"
      publish: {pkg: <% task().result %>}
"""
    result = await run(definition, params={"task_name": "package"})
    assert result.ok, result.state_info
    assert [t.name for t in result.tasks] == ["fetch", "compile", "package"]
    assert result.output["pkg"] == "pkg of bin from src"
    with pytest.raises(InvalidInputError, match="task_name"):
        await run(definition)


# ---------------------------------------------------------------- ad-hoc actions


async def test_adhoc_actions_nest_and_transform_output() -> None:
    result = await run("""
version: '2.0'
name: wb
actions:
  greet:
    base: std.echo
    base-input:
      output: "Hello, <% $.who %>"
    input: [who]
    output: <% $ + "!" %>
  shout:
    base: greet
    base-input:
      who: <% $.name %>
    input:
      - name: world
    output:
      loud: <% $ %>
workflows:
  wf:
    tasks:
      t:
        action: shout name=Ada
        publish: {r: <% task().result %>}
      u:
        action: shout
        publish: {d: <% task().result.loud %>}
""", "wb.wf")
    assert result.ok, result.state_info
    assert result.output == {"r": {"loud": "Hello, Ada!"}, "d": "Hello, world!"}


async def test_adhoc_missing_input_fails_the_task() -> None:
    result = await run("""
version: '2.0'
name: wb
actions:
  needs:
    base: std.echo
    base-input: {output: <% $.x %>}
    input: [x]
workflows:
  wf:
    tasks:
      t:
        action: needs
""", "wb.wf")
    assert result.state == "ERROR"
    assert "missing=['x']" in result.state_info


# ---------------------------------------------------------------- publishing


async def test_branch_and_global_publish_and_keep_result() -> None:
    result = await run("""
version: '2.0'
wf:
  output:
    seen: <% $.seen %>
    total: <% global(total) %>
    dropped: <% task(quiet).result %>
  tasks:
    first:
      action: std.echo output=7
      on-success:
        publish:
          branch: {seen: <% task().result %>}
          global: {total: <% task().result * 10 %>}
        next: [quiet]
    quiet:
      action: std.echo output=secret
      keep-result: false
""")
    assert result.ok, result.state_info
    assert result.output == {"seen": 7, "total": 70, "dropped": None}


async def wait_state(local: LocalEngine, execution_id: str, *states: str) -> ExecutionInfo:
    deadline = time.monotonic() + 30
    while True:
        info = await local.status(execution_id)
        if info.state in states:
            return info
        assert time.monotonic() < deadline, f"still {info.state}, wanted {states}"
        await asyncio.sleep(0.01)


async def test_pause_command_and_resume_carry_on_with_the_rest() -> None:
    async with LocalEngine() as local:
        await local.register("""
version: '2.0'
wf:
  tasks:
    a:
      action: std.echo output=1
      on-success:
        - b
        - pause(msg="check b first")
        - c
    b:
      action: std.echo output=2
    c:
      action: std.echo output=3
""")
        execution_id = await local.start("wf")
        paused = await wait_state(local, execution_id, "PAUSED")
        assert paused.state_info == "check b first"
        await local.resume(execution_id)
        result = await local.wait(execution_id)
        assert result.ok and sorted(t.name for t in result.tasks) == ["a", "b", "c"]


async def test_operator_pause_holds_new_work_until_resume() -> None:
    gate = asyncio.Event()
    ran: list[str] = []

    async def step(name: str) -> str:
        ran.append(name)
        if name == "first":
            await gate.wait()
        return name

    async with LocalEngine(actions={"step": step}) as local:
        await local.register("""
version: '2.0'
wf:
  tasks:
    first:
      action: step name=first
      on-success: [second]
    second:
      action: step name=second
""")
        execution_id = await local.start("wf")
        while ran != ["first"]:
            await asyncio.sleep(0.005)
        await local.pause(execution_id)
        gate.set()  # 'first' finishes while paused: 'second' must not start
        info = await wait_state(local, execution_id, "PAUSED")
        while info.tasks[0].state != "SUCCESS":
            info = await local.status(execution_id)
            await asyncio.sleep(0.005)
        assert [t.name for t in info.tasks] == ["first"] and ran == ["first"]
        await local.resume(execution_id)
        result = await local.wait(execution_id)
        assert result.ok and ran == ["first", "second"]


async def test_cancel_marks_waiting_tasks_and_refuses_late_outcomes() -> None:
    async with LocalEngine() as local:
        await local.register("""
version: '2.0'
wf:
  tasks:
    waits:
      action: std.async_noop
""")
        execution_id = await local.start("wf")
        info = await wait_state(local, execution_id, "RUNNING")
        while not info.tasks:
            info = await local.status(execution_id)
        await local.cancel(execution_id, "no longer needed")
        result = await local.wait(execution_id)
        assert result.state == "CANCELLED" and result.state_info == "no longer needed"
        assert result.task("waits").state == "CANCELLED"
        with pytest.raises(ConflictError):
            await local.complete(result.task("waits").assignment_id, Outcome.success(1))
        with pytest.raises(ConflictError, match="CANCELLED"):
            await local.resume(execution_id)


async def test_rerun_a_failed_task_carries_the_execution_on() -> None:
    attempts: list[int] = []

    def shaky() -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first time fails")
        return "fixed"

    async with LocalEngine(actions={"shaky": shaky}) as local:
        await local.register("""
version: '2.0'
wf:
  tasks:
    t:
      action: shaky
      publish: {r: <% task().result %>}
      on-success: [after]
    after:
      action: std.echo output=<% $.r %>
""")
        failed = await local.run("wf")
        assert failed.state == "ERROR"
        await local.rerun(failed.execution_id, "t")
        result = await local.wait(failed.execution_id)
        assert result.ok, result.state_info
        assert result.output == {"r": "fixed"}
        assert result.task("t").attempt == 2


async def test_output_after_succeed_sees_what_the_task_published() -> None:
    result = await run("""
version: '2.0'
wf:
  output: {b: <% $.b %>}
  tasks:
    t:
      action: std.echo output=2
      publish: {b: <% task().result %>}
      on-success: [succeed]
""")
    assert result.ok and result.output == {"b": 2}


async def test_a_policy_value_that_is_not_a_number_fails_the_task() -> None:
    result = await run("""
version: '2.0'
wf:
  input: [delay]
  tasks:
    t:
      action: test.boom
      retry:
        count: 2
        delay: <% $.delay %>
""", input={"delay": "soon"}, actions={"test.boom": lambda: 1 / 0})
    assert result.state == "ERROR"
    assert "Invalid data type in RetryPolicy" in result.state_info


async def test_target_routes_tasks_to_workers_that_declared_it() -> None:
    definition = """
version: '2.0'
wf:
  tasks:
    t:
      action: std.echo output=routed
      target: gpu
      publish: {r: <% task().result %>}
"""
    async with LocalEngine(targets=["gpu"]) as local:
        await local.register(definition)
        result = await asyncio.wait_for(local.run("wf"), 30)
        assert result.ok and result.output == {"r": "routed"}
    async with LocalEngine() as untargeted:
        await untargeted.register(definition)
        execution_id = await untargeted.start("wf")
        for _ in range(20):
            await asyncio.sleep(0.01)
        info = await untargeted.status(execution_id)
        assert info.state == "RUNNING" and info.tasks[0].state == "RUNNING"


async def test_subworkflows_follow_their_parent_through_pause_and_cancel() -> None:
    async with LocalEngine() as local:
        await local.register("""
version: '2.0'
parent:
  tasks:
    call:
      workflow: child
child:
  tasks:
    hold:
      action: std.async_noop
""")
        execution_id = await local.start("parent")
        info = await wait_state(local, execution_id, "RUNNING")
        while not info.tasks or not info.tasks[0].assignment_id:
            info = await local.status(execution_id)
            await asyncio.sleep(0.005)
        child_id = info.tasks[0].assignment_id
        await wait_state(local, child_id, "RUNNING")
        await local.pause(execution_id)
        assert (await local.status(child_id)).state == "PAUSED"
        await local.resume(execution_id)
        assert (await local.status(child_id)).state == "RUNNING"
        await local.cancel(execution_id)
        child = await local.status(child_id)
        assert child.state == "CANCELLED"
        assert [t.state for t in child.tasks] == ["CANCELLED"]


# ---------------------------------------------------------------- tasks() and the work limit


async def test_tasks_function_lists_the_executions_tasks() -> None:
    result = await run("""
version: '2.0'
wf:
  tasks:
    first:
      action: std.echo output=1
      on-success: [report]
    broken:
      action: std.fail
      on-error: [report]
    report:
      join: all
      publish:
        names: <% tasks(execution().id).select($.name) %>
        failed: <% tasks(state => ERROR).select($.name) %>
        failed_jinja: "{{ tasks(None, false, 'ERROR') | map(attribute='name') | list }}"
        first: <% tasks().where($.name = first).first() %>
""")
    assert result.ok, result.state_info
    published = result.task("report").published
    assert published["names"] == ["first", "broken", "report"]
    assert published["failed"] == ["broken"] == published["failed_jinja"]
    first = published["first"]
    assert first["result"] == 1 and first["state"] == "SUCCESS" and first["type"] == "ACTION"
    assert first["workflow_execution_id"] == result.execution_id
    assert first["id"] == result.task("first").id and first["spec"]["action"] == "std.echo"
    assert {"state_info", "published", "created_at", "updated_at"} <= set(first)


@pytest.fixture
def small_work_limit(monkeypatch: pytest.MonkeyPatch) -> int:
    from levante.lang import expressions

    monkeypatch.setattr(expressions, "MAX_WORK_STEPS", 20_000)
    return 20_000


async def test_an_expression_over_the_work_limit_fails_its_task(small_work_limit: int) -> None:
    in_publish = await run("""
version: '2.0'
wf:
  tasks:
    spin:
      action: std.echo output=1
      publish:
        total: <% range(0, 1000000000).sum() %>
""")
    in_input = await run("""
version: '2.0'
wf:
  tasks:
    loop:
      action: std.echo
      input:
        output: "{% for a in range(1000) %}{% for b in range(1000) %}{% endfor %}{% endfor %}"
""")
    for result, expression in ((in_publish, "range(0, 1000000000).sum()"),
                               (in_input, "{% for a in range(1000) %}")):  # fmt: skip
        task = result.tasks[0]
        assert result.state == "ERROR" and task.state == "ERROR"
        assert f"needs more than {small_work_limit} steps of work" in task.state_info
        assert f"[expression={expression}" in task.state_info


async def test_an_output_over_the_work_limit_fails_the_workflow(small_work_limit: int) -> None:
    result = await run("""
version: '2.0'
wf:
  output:
    total: <% range(0, 1000000000).sum() %>
  tasks:
    only:
      action: std.noop
""")
    assert result.state == "ERROR"
    assert result.state_info.startswith("Failed to evaluate the workflow output: ")
    assert f"needs more than {small_work_limit} steps of work" in result.state_info


def test_policies_may_read_tasks_that_nothing_else_names() -> None:
    """A policy, a target or with-items reading task('x') loads x's row, even when no
    other expression of the workflow names x."""
    definition = """
version: '2.0'
policies_read:
  tasks:
    zero:
      action: std.echo output=[1, 2]
      on-success: [one]
    one:
      action: std.echo output=<% $.item %>
      with-items: item in <% task(zero).result %>
      timeout: <% len(task(zero).result) + 5 %>
      wait-before: <% len(task(zero).result) * 0 %>
"""
    from levante import run_workflow

    result = run_workflow(definition)
    assert result.state == "SUCCESS", result.state_info
