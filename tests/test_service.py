"""The engine service end to end: real `levante serve` and `levante worker` processes."""

from __future__ import annotations

import asyncio
import time

import pytest

from levante.client import Client

pytestmark = pytest.mark.usefixtures("workers")

BRANCHES = """
version: '2.0'
branches:
  input:
    - n
    - label: none
  output:
    path: <% $.path %>
    label: <% $.label %>
    doubled: '{{ _.value * 2 }}'
  tasks:
    check:
      action: std.echo output=<% $.n %>
      publish:
        value: <% task(check).result %>
      on-success:
        - big: <% $.value > 10 %>
        - small: <% $.value <= 10 %>
    big:
      action: std.echo
      input:
        output: big
      publish: {path: <% task().result %>}
    small:
      action: std.echo output="small"
      publish: {path: '{{ task("small").result }}'}
"""


@pytest.mark.parametrize(("n", "path", "not_run"), [(3, "small", "big"), (42, "big", "small")])
async def test_conditional_branches_both_ways(client: Client, n: int, path: str, not_run: str
                                              ) -> None:  # fmt: skip
    assert await client.register_workflows(BRANCHES) == ["branches"]
    execution_id = await client.run("branches", {"n": n})
    info = await client.wait(execution_id)
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {"path": path, "label": "none", "doubled": n * 2}
    names = [t.name for t in info.tasks]
    assert names == ["check", path]
    assert not_run not in names
    check = info.tasks_named("check")[0]
    assert check.result == n and check.published == {"value": n}
    assert check.action == "std.echo" and check.attempt == 1


ON_ERROR = """
version: '2.0'
routed:
  tasks:
    risky:
      action: test.boom message="disk on fire"
      publish-on-error:
        failure: <% task().result %>
      on-error:
        - recover
      on-success:
        - never
    recover:
      action: std.echo output=<% $.failure.message %>
      publish:
        recovered_from: <% task().result %>
    never:
      action: std.noop
"""


async def test_error_routed_by_on_error(client: Client) -> None:
    execution_id = await client.run("routed", definition=ON_ERROR)
    info = await client.wait(execution_id)
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {
        "failure": {"type": "ValueError", "message": "disk on fire"},
        "recovered_from": "disk on fire",
    }
    assert {t.name: t.state for t in info.tasks} == {"risky": "ERROR", "recover": "SUCCESS"}
    assert "disk on fire" in info.tasks_named("risky")[0].state_info


UNHANDLED = """
version: '2.0'
unhandled:
  tasks:
    first:
      action: std.echo output=1
      on-success: [breaks]
    breaks:
      action: std.fail
      on-success: [after]
    after:
      action: std.noop
"""


async def test_unhandled_error_ends_the_workflow_in_error(client: Client) -> None:
    execution_id = await client.run("unhandled", definition=UNHANDLED)
    info = await client.wait(execution_id)
    assert info.state == "ERROR"
    assert "breaks" in info.state_info
    assert info.tasks_named("breaks")[0].state_info in info.state_info
    assert [t.name for t in info.tasks] == ["first", "breaks"]


PUBLISH = """
version: '2.0'
publishing:
  input:
    - who
  vars:
    greeting: Hello
  output:
    message: <% $.message %>
    length: <% len($.message) %>
    env_name: <% env().name %>
  tasks:
    greet:
      action: std.echo output="<% $.greeting %>, <% $.who %>"
      publish:
        message: <% task().result %>
      on-success:
        - shout
    shout:
      action: std.echo
      input:
        output: '{{ _.message | upper }}'
      publish:
        loud: <% task().result %>
"""


async def test_publish_vars_env_and_output(client: Client) -> None:
    execution_id = await client.run(
        "publishing", {"who": "Ada"}, params={"env": {"name": "prod"}}, definition=PUBLISH
    )
    info = await client.wait(execution_id)
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {"message": "Hello, Ada", "length": 10, "env_name": "prod"}
    assert info.tasks_named("shout")[0].published == {"loud": "HELLO, ADA"}
    assert info.input == {"who": "Ada"}


async def test_same_request_id_starts_one_execution(client: Client) -> None:
    env = {"env": {"name": "dev"}}
    first = await client.run("publishing", {"who": "x"}, params=env, definition=PUBLISH,
                             request_id="req-1")
    second = await client.run("publishing", {"who": "x"}, params=env, request_id="req-1")
    assert first == second
    info = await client.wait(first)
    assert info.state == "SUCCESS", info.state_info
    assert len(info.tasks_named("greet")) == 1


async def test_without_output_the_final_context_is_returned(client: Client) -> None:
    definition = """
version: '2.0'
ctx:
  input: [a]
  tasks:
    t1:
      action: std.echo output=2
      publish: {b: <% task().result %>}
"""
    info = await client.wait(await client.run("ctx", {"a": 1}, definition=definition))
    assert info.state == "SUCCESS"
    # As in Mistral: the final context holds what tasks published, not the input.
    assert info.output == {"b": 2}


POLICY_VALUES = """
version: '2.0'
retry_count:
  input: [v]
  output-on-error: {seen: <% $.get(seen) %>}
  tasks:
    first:
      action: std.echo output=1
      publish: {seen: <% task().result %>}
      on-success: [t]
    t:
      action: test.boom
      retry:
        count: <% $.v %>
        delay: 0
      on-error: [handler]
    handler:
      action: std.noop
wait_after:
  input: [v]
  tasks:
    t:
      action: std.echo output=1
      wait-after: <% $.v %>
pause_before:
  input: [v]
  tasks:
    t:
      action: std.echo output=1
      pause-before: <% $.v %>
"""


async def test_policy_values_of_the_wrong_type_fail_the_task_through_the_service(
    client: Client,
) -> None:
    await client.register_workflows(POLICY_VALUES)
    cases = {
        "retry_count": ("many", "Failed to handle action completion [error=Invalid data type "
                        "in RetryPolicy: retry count must be a whole number >= 0, not 'many'"),
        "wait_after": (-2, "Failed to handle action completion [error=Invalid data type in "
                       "WaitAfterPolicy: wait-after must be a number of seconds >= 0, not -2"),
        "pause_before": ("yes", "Failed to run task [error=Invalid data type in "
                         "PauseBeforePolicy: pause-before must be true or false, not 'yes'"),
    }  # fmt: skip
    started = {name: await client.run(name, {"v": v}) for name, (v, _) in cases.items()}
    for name, (_, message) in cases.items():
        info = await client.wait(started[name])
        assert info.state == "ERROR", (name, info.state)
        assert info.state_info.startswith(message), info.state_info
        t = info.tasks_named("t")[0]
        assert t.state == "ERROR" and t.state_info == info.state_info
        assert not info.tasks_named("handler")  # Mistral: no on-error after a forced failure
    retried = await client.wait(started["retry_count"])
    assert retried.output == {"result": retried.state_info, "seen": 1}


ENDED_BY_COMMANDS = """
version: '2.0'
failing:
  output-on-error: {up: <% $.get(up) %>, why: <% $.get(why) %>}
  tasks:
    first:
      action: std.echo output=1
      publish: {up: <% task().result %>}
      on-success: [t]
    t:
      action: test.boom message="disk full"
      publish-on-error: {why: <% task().result.message %>}
      on-error: [fail]
pausing:
  output: {mine: <% $.get(mine) %>}
  tasks:
    t:
      action: std.echo output=2
      publish: {mine: <% task().result %>}
      on-success: [pause, succeed]
"""


async def test_output_sees_the_task_that_ran_fail_or_pause_through_the_service(
    client: Client,
) -> None:
    await client.register_workflows(ENDED_BY_COMMANDS)
    failed = await client.wait(await client.run("failing"))
    assert failed.state == "ERROR"
    assert failed.output == {"result": "", "up": 1, "why": "disk full"}

    execution_id = await client.run("pausing")
    deadline = time.monotonic() + 30
    while (await client.get_status(execution_id)).state != "PAUSED":
        assert time.monotonic() < deadline, "never paused"
        await asyncio.sleep(0.02)
    await client.resume(execution_id)
    resumed = await client.wait(execution_id)
    assert resumed.state == "SUCCESS", resumed.state_info
    assert resumed.output == {"mine": 2}
