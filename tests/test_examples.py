"""The workflows of examples/, run through the real service, and the YAML of docs/language.md.

Each example is registered with a real `levante serve` and run by real `levante worker`
processes (the `server`, `workers` and `client` fixtures of conftest.py); the tests check
each run's final state, output and tasks. approval.yaml's deferred task is completed from
outside through Engine.TaskComplete, as its comments tell a user to do.

Every ```yaml block of docs/language.md must be a whole document that Levante accepts.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import pytest

from levante.client import Client, ExecutionInfo, TaskInfo
from levante.errors import DefinitionError, InvalidArgumentError
from levante.lang.parser import parse_document

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
LANGUAGE_DOC = ROOT / "docs" / "language.md"

# Every file in examples/ and the test(s) below that run it.
COVERED = {
    "hello.yaml",
    "orders.yaml",
    "provision_vm.yaml",
    "fan_out.yaml",
    "approval.yaml",
    "reverse_build.yaml",
}

service = pytest.mark.usefixtures("workers")


def example(name: str) -> str:
    return (EXAMPLES / name).read_text(encoding="utf-8")


async def run_example(
    client: Client, name: str, workflow: str, input: dict[str, Any] | None = None,
    params: dict[str, Any] | None = None,
) -> ExecutionInfo:  # fmt: skip
    assert await client.register_workflows(example(name)) == [workflow]
    execution_id = await client.run(workflow, input or {}, params=params)
    return await client.wait(execution_id, timeout=60)


def states(info: ExecutionInfo) -> dict[str, str]:
    return {t.name: t.state for t in info.tasks}


def one(info: ExecutionInfo, name: str) -> TaskInfo:
    found = info.tasks_named(name)
    assert len(found) == 1, f"{name}: {len(found)} task executions"
    return found[0]


def test_every_example_is_covered() -> None:
    assert {p.name for p in EXAMPLES.glob("*.yaml")} == COVERED


# ---------------------------------------------------------------- hello, orders


@service
async def test_hello(client: Client) -> None:
    info = await run_example(client, "hello.yaml", "hello", {"name": "Ada"})
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {"greeting": "Hello, Ada!"}

    info = await run_example(client, "hello.yaml", "hello")
    assert info.output == {"greeting": "Hello, world!"}


@service
@pytest.mark.parametrize(
    ("input", "tasks", "output"),
    [
        ({"amount": 20}, ["validate", "charge"], {"outcome": "charged 20", "approved": True}),
        ({"amount": 250}, ["validate", "review", "charge"],
         {"outcome": "charged 250", "approved": True}),
        ({"amount": 20, "fail_charge": True},
         ["validate", "charge", "fail_if_asked", "compensate"],
         {"outcome": "refunded", "approved": True}),
    ],
    ids=["small", "needs-review", "charge-fails"],
)  # fmt: skip
async def test_orders(
    client: Client, input: dict[str, Any], tasks: list[str], output: dict[str, Any]
) -> None:
    info = await run_example(client, "orders.yaml", "orders", input)
    assert info.state == "SUCCESS", info.state_info
    assert [t.name for t in info.tasks] == tasks
    assert info.output == output


# ---------------------------------------------------------------- provision_vm


@service
async def test_provision_vm_happy_path(client: Client) -> None:
    info = await run_example(client, "provision_vm.yaml", "provision_vm", {"vm_name": "web-1"})
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {
        "vm_id": "vm-web-1",
        "address": "10.0.0.7",
        "status": "ACTIVE",
        "registered": True,
    }
    assert [t.name for t in info.tasks] == ["allocate", "boot", "configure", "register"]
    assert set(states(info).values()) == {"SUCCESS"}
    assert one(info, "boot").attempt == 1
    assert one(info, "register").action == "std.noop"


@service
async def test_provision_vm_failure_path_retries_then_cleans_up(client: Client) -> None:
    started = time.monotonic()
    info = await run_example(
        client, "provision_vm.yaml", "provision_vm", {"vm_name": "web-2", "fail_boot": True}
    )
    assert info.state == "ERROR"
    assert states(info) == {
        "allocate": "SUCCESS",
        "boot": "ERROR",
        "cleanup": "SUCCESS",
        "give_up": "ERROR",
    }
    boot = one(info, "boot")
    assert boot.attempt == 3  # the first try and 2 retries
    assert boot.state_info == "Failed by fail-on policy"
    assert boot.published == {"status": "ERROR"}
    assert time.monotonic() - started >= 0.35  # two retry delays of 0.2 s
    assert one(info, "cleanup").result == "released vm-web-2"
    reason = "ProvisioningFailed: vm-web-2 did not boot (status ERROR); it was released"
    assert one(info, "give_up").state_info == reason
    assert "give_up" in info.state_info and reason in info.state_info
    assert info.output == {
        "result": info.state_info,
        "vm_id": "vm-web-2",
        "status": "ERROR",
        "cleaned_up": True,
    }


# ---------------------------------------------------------------- fan_out


@service
async def test_fan_out_with_items_and_join_all(client: Client) -> None:
    images = ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png", "g.png"]
    info = await run_example(client, "fan_out.yaml", "fan_out", {"images": images, "width": 3})
    assert info.state == "SUCCESS", info.state_info
    thumbs = [f"thumb-{image}" for image in images]
    assert info.output == {
        "thumbnails": thumbs,
        "catalog": "catalog of 7 images",
        "report": "7 thumbnails; catalog of 7 images",
    }
    assert states(info) == {"thumbnails": "SUCCESS", "catalog": "SUCCESS", "report": "SUCCESS"}
    assert one(info, "thumbnails").result == thumbs  # item order, whatever finished first
    assert info.tasks[-1].name == "report"  # the join runs once, after both branches


@service
async def test_fan_out_defaults_and_an_empty_list(client: Client) -> None:
    info = await run_example(client, "fan_out.yaml", "fan_out")
    assert info.state == "SUCCESS", info.state_info
    assert info.output["report"] == "5 thumbnails; catalog of 5 images"

    info = await run_example(client, "fan_out.yaml", "fan_out", {"images": []})
    assert info.state == "SUCCESS", info.state_info
    assert info.output == {
        "thumbnails": [],
        "catalog": "catalog of 0 images",
        "report": "0 thumbnails; catalog of 0 images",
    }


# ---------------------------------------------------------------- approval


async def waiting_task(client: Client, execution_id: str, name: str,
                       timeout: float = 30.0) -> TaskInfo:  # fmt: skip
    """Poll GetStatus until task ``name`` runs with an assignment (or fail at the deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        info = await client.get_status(execution_id)
        assert not info.is_final, f"execution ended {info.state}: {info.state_info}"
        found = [t for t in info.tasks_named(name) if t.state == "RUNNING" and t.assignment_id]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"{name} is not waiting: {states(info)}"
        await asyncio.sleep(0.02)


@service
@pytest.mark.parametrize(
    ("outcome", "ran", "output"),
    [
        ({"result": {"decision": "approve", "by": "alice"}}, "apply",
         {"decision": "approve", "decided_by": "alice", "outcome": "applied resize db-1"}),
        ({"result": {"decision": "reject", "by": "bob"}}, "reject",
         {"decision": "reject", "decided_by": "bob", "outcome": "left resize db-1 as it was"}),
        ({"result": {"decision": "approve", "by": "mallory"}}, "reject",
         {"decision": "approve", "decided_by": "mallory",
          "outcome": "left resize db-1 as it was"}),
        ({"error": {"type": "Expired", "message": "nobody answered"}}, "reject",
         {"decision": "failed", "decided_by": None, "outcome": "left resize db-1 as it was"}),
    ],
    ids=["approved", "rejected", "not-an-approver", "failed"],
)  # fmt: skip
async def test_approval_completed_through_task_complete(
    client: Client, outcome: dict[str, Any], ran: str, output: dict[str, Any]
) -> None:
    assert await client.register_workflows(example("approval.yaml")) == ["approval"]
    execution_id = await client.run("approval", {"change": "resize db-1"})

    task = await waiting_task(client, execution_id, "wait_for_approval")
    assert task.action == "std.async_noop"
    assert task.assignment_id == task.id  # a first try: what `levante status` shows as ID
    # The worker deferred it: nothing moves until TaskComplete (the status stays RUNNING).
    info = await client.get_status(execution_id)
    assert info.state == "RUNNING"
    assert [t.name for t in info.tasks] == ["request", "wait_for_approval"]

    await client.task_complete(task.assignment_id, **outcome)
    info = await client.wait(execution_id, timeout=60)
    assert info.state == "SUCCESS", info.state_info
    assert [t.name for t in info.tasks] == ["request", "wait_for_approval", ran]
    assert info.output == {"change": "resize db-1", **output}
    approval = one(info, "wait_for_approval")
    assert approval.state == ("ERROR" if "error" in outcome else "SUCCESS")
    assert approval.result == outcome.get("result", outcome.get("error"))


# ---------------------------------------------------------------- reverse_build


@service
@pytest.mark.parametrize(
    ("goal", "ran", "output"),
    [
        ("package", {"checkout", "fetch_deps", "compile", "unit_tests", "package"},
         {"goal": "package", "artifact": "app-2.1.0.tar.gz", "tests": "42 passed",
          "site": None}),
        ("docs", {"checkout", "docs"},
         {"goal": "docs", "artifact": None, "tests": None, "site": "site for src-2.1.0"}),
        ("release", {"checkout", "fetch_deps", "compile", "unit_tests", "package", "docs",
                     "release"},
         {"goal": "release", "artifact": "app-2.1.0.tar.gz", "tests": "42 passed",
          "site": "site for src-2.1.0"}),
    ],
    ids=["package", "docs", "release"],
)  # fmt: skip
async def test_reverse_build_runs_what_the_goal_requires(
    client: Client, goal: str, ran: set[str], output: dict[str, Any]
) -> None:
    info = await run_example(
        client, "reverse_build.yaml", "build", {"version": "2.1.0"}, params={"task_name": goal}
    )
    assert info.state == "SUCCESS", info.state_info
    assert {t.name for t in info.tasks} == ran
    assert all(len(info.tasks_named(name)) == 1 for name in ran)
    assert info.output == output
    names = [t.name for t in info.tasks]
    assert names.index("checkout") == 0
    if "package" in ran:
        assert one(info, "package").result == "app-2.1.0.tar.gz"
        assert names.index("compile") < names.index("unit_tests")


@service
async def test_reverse_build_needs_a_task_name(client: Client) -> None:
    assert await client.register_workflows(example("reverse_build.yaml")) == ["build"]
    for params in ({}, {"task_name": "deploy"}):
        with pytest.raises(InvalidArgumentError, match="task_name"):
            await client.run("build", {}, params=params)


# ---------------------------------------------------------------- docs/language.md

_YAML_BLOCK = re.compile(r"^```yaml[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def language_doc_blocks() -> list[tuple[int, str]]:
    """Each ```yaml block of docs/language.md with the line its text starts on."""
    text = LANGUAGE_DOC.read_text(encoding="utf-8")
    return [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in _YAML_BLOCK.finditer(text)]


def test_language_doc_has_yaml_examples() -> None:
    blocks = language_doc_blocks()
    assert len(blocks) >= 30, f"only {len(blocks)} yaml blocks found in {LANGUAGE_DOC}"
    # an unclosed or oddly fenced block would be skipped silently: count the fences too
    text = LANGUAGE_DOC.read_text(encoding="utf-8")
    assert len(re.findall(r"^```yaml", text, re.MULTILINE)) == len(blocks)


@pytest.mark.parametrize(("line", "block"), language_doc_blocks(),
                         ids=lambda v: f"line{v}" if isinstance(v, int) else None)  # fmt: skip
def test_language_doc_yaml_parses(line: int, block: str) -> None:
    try:
        document = parse_document(block)
    except DefinitionError as e:
        pytest.fail(f"docs/language.md line {line + (e.line or 1) - 1}: {e.reason}")
    assert document.workflows, f"docs/language.md line {line}: no workflow"
