"""The levante command as a user runs it: embedded, against a server, and status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.processes import ROOT, SUPPORT, EngineServer

EXAMPLES = ROOT / "examples"


def levante(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "src")])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "levante", "--log-level", "WARNING", *args],
        capture_output=True, text=True, timeout=120, cwd=cwd, env=full_env,
    )  # fmt: skip


def output_json(stdout: str) -> object:
    """The output JSON is printed last."""
    start = stdout.rindex("\n{") + 1 if "\n{" in stdout else stdout.index("{")
    return json.loads(stdout[start:])


def test_run_embedded(tmp_path: Path) -> None:
    done = levante("run", str(EXAMPLES / "hello.yaml"), "-i", '{"name": "Ada"}',
                   "--store", f"sqlite:///{tmp_path / 'x.db'}")  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert "greet" in done.stdout and "SUCCESS" in done.stdout
    assert output_json(done.stdout) == {"greeting": "Hello, Ada!"}


def test_run_embedded_failure_exits_1(tmp_path: Path) -> None:
    flow = tmp_path / "fails.yaml"
    flow.write_text("version: '2.0'\nfails:\n  tasks:\n    bad:\n      action: std.fail\n")
    input_file = tmp_path / "in.json"
    input_file.write_text("{}")
    done = levante("run", str(flow), "-i", f"@{input_file}", cwd=tmp_path)
    assert done.returncode == 1, done.stderr + done.stdout
    assert "ERROR" in done.stdout and "bad" in done.stdout
    assert (tmp_path / "levante.db").exists()  # the embedded default store


@pytest.mark.usefixtures("workers")
def test_run_against_a_server_then_status(server: EngineServer) -> None:
    done = levante("run", str(EXAMPLES / "orders.yaml"), "-i", '{"amount": 250}',
                   "--engine", server.address)  # fmt: skip
    assert done.returncode == 0, done.stderr + done.stdout
    assert output_json(done.stdout) == {"outcome": "charged 250", "approved": True}
    execution_id = done.stdout.split()[1]
    status = levante("status", execution_id, "--engine", server.address)
    assert status.returncode == 0, status.stderr
    for name in ("validate", "review", "charge"):
        assert name in status.stdout
    assert "SUCCESS" in status.stdout
    as_json = json.loads(levante("status", execution_id, "--engine", server.address,
                                 "--json").stdout)  # fmt: skip
    assert as_json["state"] == "SUCCESS"
    assert [t["name"] for t in as_json["tasks"]] == ["validate", "review", "charge"]

    compensated = levante("run", str(EXAMPLES / "orders.yaml"), "-i",
                          '{"amount": 20, "fail_charge": true}', "--engine", server.address)
    assert compensated.returncode == 0, compensated.stdout
    assert output_json(compensated.stdout) == {"outcome": "refunded", "approved": True}


def test_status_of_unknown_execution(server: EngineServer) -> None:
    done = levante("status", "nope", "--engine", server.address)
    assert done.returncode == 2
    assert "not found" in done.stderr


HELD = """
version: '2.0'
held:
  input: [gate]
  tasks:
    wait:
      action: test.gate name=<% $.gate %>
      on-success: [after]
    after:
      action: std.echo output=done
"""


@pytest.mark.usefixtures("workers")
def test_lifecycle_commands(server: EngineServer, gates: Path) -> None:
    import asyncio

    from levante.client import Client

    async def start(gate: str) -> str:
        async with Client(server.address) as client:
            return await client.run("held", {"gate": gate}, definition=HELD)

    execution_id = asyncio.run(start("cli"))
    engine = ["--engine", server.address]
    paused = levante("pause", execution_id, *engine)
    assert paused.returncode == 0 and "PAUSED" in paused.stdout, paused.stderr
    again = levante("pause", execution_id, *engine)
    assert again.returncode == 2 and "PAUSED" in again.stderr
    listing = levante("list", "--state", "PAUSED", *engine)
    assert execution_id in listing.stdout
    resumed = levante("resume", execution_id, *engine)
    assert resumed.returncode == 0 and "RUNNING" in resumed.stdout
    (gates / "cli").touch()
    watched = levante("watch", execution_id, *engine)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "after" in watched.stdout and watched.stdout.rstrip().endswith("SUCCESS")
    history = levante("history", execution_id, *engine)
    assert "ExecutionStarted" in history.stdout and "AssignmentCompleted" in history.stdout

    cancelled_id = asyncio.run(start("never"))
    cancelled = levante("cancel", cancelled_id, "--reason", "not today", *engine)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
    status = levante("status", cancelled_id, *engine)
    assert "not today" in status.stdout
    rerun = levante("rerun", cancelled_id, "wait", *engine)
    assert rerun.returncode == 2 and "CANCELLED" in rerun.stderr


def test_an_unknown_log_level_is_a_clear_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "levante", "--log-level", "LOUD", "list", "--engine", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )  # fmt: skip
    assert done.returncode != 0
    assert "--log-level: 'LOUD' is not one of" in done.stderr
    assert "Traceback" not in done.stderr
