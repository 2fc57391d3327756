"""examples/node: a worker and a client in JavaScript, written against protos/ only.

A real ``levante serve`` and the Node worker (``node worker.js``) run as processes on
127.0.0.1; workflows whose every action is a ``js.*`` action run through the Node
client and through the Python client. Skipped when ``node`` is not installed; when
``examples/node/node_modules`` is absent, ``npm ci`` installs the locked packages first.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.processes import ROOT, EngineServer, wait_for

from levante.client import ExecutionInfo, SyncClient

NODE_DIR = ROOT / "examples" / "node"
WORKFLOW = NODE_DIR / "workflow.yaml"
LEASE_SECONDS = 2  # short, so that a missing heartbeat would show within the test
HEARTBEAT_SECONDS = 0.25


@pytest.fixture(scope="module")
def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.skip("node is not installed: the JavaScript example (examples/node) needs Node 20+")
    if not (NODE_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        npm = shutil.which("npm")
        if npm is None:
            pytest.skip("npm is not installed: cannot install examples/node's packages")
        done = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True,
            text=True, timeout=600, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"npm ci failed in {NODE_DIR}:\n{done.stdout}\n{done.stderr}"
    return found


class NodeProcess:
    """``node SCRIPT ...`` in examples/node, its output lines collected in the background."""

    def __init__(self, node: str, args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [node, *args], cwd=NODE_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, text=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line.rstrip("\n"))

    def wait_for_line(self, text: str, timeout: float = 30.0) -> str:
        """The first line containing ``text``, old or new."""
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if text in line:
                return line
        while (remaining := deadline - time.monotonic()) > 0:
            if self.proc.poll() is not None and self._new.empty():
                break
            try:
                line = self._new.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if text in line:
                return line
        raise TimeoutError(f"no line with {text!r} from node {self.args}; output:\n"
                           + "\n".join(self.lines[-50:]))  # fmt: skip

    def output(self) -> str:
        return "\n".join(self.lines)

    def terminate(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
        return self.proc.wait(timeout=30)


def start_worker(node: str, engine: str) -> NodeProcess:
    worker = NodeProcess(node, ["worker.js", "--engine", engine,
                                "--heartbeat-seconds", str(HEARTBEAT_SECONDS)])  # fmt: skip
    worker.wait_for_line("levante node worker attached")
    return worker


def node_client(node: str, engine: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, "client.js", *args, "--engine", engine], cwd=NODE_DIR, capture_output=True,
        text=True, timeout=120, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineServer]:
    store = tmp_path_factory.mktemp("node") / "levante.db"
    server = EngineServer(f"sqlite:///{store}", extra=["--lease-seconds", str(LEASE_SECONDS)])
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def worker(node: str, engine: EngineServer) -> Iterator[NodeProcess]:
    started = start_worker(node, engine.address)
    try:
        yield started
    finally:
        assert started.terminate() == 0, started.output()


def run_with_python(engine: str, workflow: str, workflow_input: dict[str, object]) -> ExecutionInfo:
    with SyncClient(engine) as client:
        client.register_workflows(WORKFLOW.read_text())
        execution_id = client.run(workflow, workflow_input)
        return client.wait(execution_id, timeout=60)


def test_the_node_client_runs_a_workflow_the_node_worker_serves(
    node: str, engine: EngineServer, worker: NodeProcess
) -> None:
    done = node_client(node, engine.address, "run", "workflow.yaml", "-w", "greet_and_add",
                       "-i", '{"name": "Ada", "a": 40, "b": 2}')  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"greeting": "HELLO, ADA", "sum": 42, "problem": None}
    assert "SUCCESS" in done.stderr.splitlines()[-1]


def test_a_javascript_exception_is_the_tasks_error_and_on_error_routes_it(
    engine: EngineServer, worker: NodeProcess
) -> None:
    info = run_with_python(engine.address, "greet_and_add", {"name": "Bo", "a": "x"})
    assert info.state == "SUCCESS", info.state_info
    states = {t.name: t.state for t in info.tasks}
    assert states == {"greet": "SUCCESS", "add": "ERROR", "explain": "SUCCESS"}
    add = info.tasks_named("add")[0]
    assert add.action == "js.add"
    assert add.result == {"type": "TypeError",
                          "message": 'js.add needs two numbers, got "x" and 3'}  # fmt: skip
    problem = 'TYPEERROR: JS.ADD NEEDS TWO NUMBERS, GOT "X" AND 3'
    assert info.output == {"greeting": "HELLO, BO", "sum": None, "problem": problem}


def test_a_deferred_task_is_completed_later_by_the_node_client(
    node: str, engine: EngineServer, worker: NodeProcess
) -> None:
    with SyncClient(engine.address) as client:
        client.register_workflows(WORKFLOW.read_text())
        execution_id = client.run("wait_for_approval", {})

        def assignment_id() -> str:
            tasks = client.get_status(execution_id).tasks
            return tasks[0].assignment_id if tasks else ""

        task_id = wait_for(assignment_id, what="the ask task's assignment")
        # Printed once the engine acknowledged the deferral: the task now waits for
        # TaskComplete, and the worker's capacity is free again.
        worker.wait_for_line(f"deferred {task_id}")
        assert client.get_status(execution_id).state == "RUNNING"
        done = node_client(node, engine.address, "complete", task_id,
                           "--result", '{"approved": true}')  # fmt: skip
        assert done.returncode == 0, done.stderr
        info = client.wait(execution_id, timeout=60)
        assert (info.state, info.output) == ("SUCCESS", {"approved": True})
        # A different outcome for the same task is refused and changes nothing.
        again = node_client(node, engine.address, "complete", task_id,
                            "--result", '{"approved": false}')  # fmt: skip
        assert again.returncode == 2
        assert "FAILED_PRECONDITION" in again.stderr
        assert client.get_status(execution_id).output == {"approved": True}


def test_heartbeats_keep_an_action_longer_than_the_lease(
    engine: EngineServer, worker: NodeProcess
) -> None:
    definition = """
version: '2.0'
node_slow:
  tasks:
    slow:
      action: js.sleep ms=4000 result=done
"""
    with SyncClient(engine.address) as client:
        client.register_workflows(definition)
        info = client.wait(client.run("node_slow", {}), timeout=60)
    assert info.state == "SUCCESS", info.state_info
    slow = info.tasks[0]
    # Twice the lease: only the worker's heartbeats kept it from a second attempt.
    assert (slow.result, slow.attempt) == ("done", 1)
    assert f"{slow.assignment_id}: cancelled" not in worker.output()


def test_the_node_worker_reconnects_and_delivers_across_an_engine_restart(
    node: str, tmp_path: Path
) -> None:
    server = EngineServer(f"sqlite:///{tmp_path / 'levante.db'}").start()
    worker = start_worker(node, server.address)
    try:
        definition = """
version: '2.0'
node_restart:
  tasks:
    slow:
      action: js.sleep ms=1500 result=survived
"""
        with SyncClient(server.address) as client:
            client.register_workflows(definition)
            execution_id = client.run("node_restart", {})
        line = worker.wait_for_line("running js.sleep")
        server.kill()  # kill -9 while the action runs: its outcome cannot be delivered now
        server.start()  # same port, same store
        with SyncClient(server.address) as client:
            info = client.wait(execution_id, timeout=60)
        assert info.state == "SUCCESS", info.state_info
        assert (info.tasks[0].result, info.tasks[0].attempt) == ("survived", 1)
        task_id = line.split("]", 1)[1].split(":", 1)[0].strip()
        assert task_id == info.tasks[0].assignment_id
        # The worker said hello again holding that assignment, and the outcome got through.
        assert "holding 1" in worker.output()
        worker.wait_for_line(f"{task_id}: js.sleep succeeded")
        result = run_with_python(server.address, "greet_and_add", {"name": "again"})
        assert result.output == {"greeting": "HELLO, AGAIN", "sum": 5, "problem": None}
    finally:
        assert worker.terminate() == 0, worker.output()
        for process in server.history:
            process.terminate()

