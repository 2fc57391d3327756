"""Start, kill and restart real Levante processes for tests.

Each process is started with ``python -m levante`` from this checkout, talks only to
127.0.0.1, and is ended by its own PID (SIGKILL for fault tests, SIGTERM otherwise).
Nothing here sleeps for a fixed time: waiting is always for an event, with a deadline.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[2]
SUPPORT = Path(__file__).resolve().parent

T = TypeVar("T")


def wait_for(predicate: Callable[[], T], timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something truthy, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


class LevanteProcess:
    """A `python -m levante ...` child whose output lines are collected in the background."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.args = args
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(SUPPORT), str(ROOT / "src"), full_env.get("PYTHONPATH", "")]
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "levante", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            cwd=str(ROOT),
            text=True,
        )
        self.lines: list[str] = []
        self._new_lines: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new_lines.put(line.rstrip("\n"))

    def wait_for_line(self, prefix: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        for line in list(self.lines):
            if line.startswith(prefix):
                return line
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._new_lines.empty()):
                if os.environ.get("LEVANTE_DEBUG_DUMP") and self.proc.poll() is None:
                    subprocess.run(["py-spy", "dump", "--native", "--pid", str(self.proc.pid)],
                                   check=False)
                raise TimeoutError(
                    f"no line starting {prefix!r} from levante {self.args}; output:\n"
                    + "\n".join(self.lines[-50:])
                )
            try:
                line = self._new_lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line.startswith(prefix):
                return line

    def kill(self) -> None:
        """kill -9, and reap."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                return self.proc.wait(timeout=30)
        return self.proc.returncode

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return "\n".join(self.lines)


class EngineServer:
    """`levante serve` on 127.0.0.1; restartable on the same port and store."""

    def __init__(self, store: str, port: int = 0, extra: list[str] | None = None) -> None:
        self.store = store
        self.port = port
        self.extra = extra or []
        self.process: LevanteProcess | None = None
        self.history: list[LevanteProcess] = []

    def start(self) -> EngineServer:
        self.process = LevanteProcess(
            ["serve", "--store", self.store, "--listen", f"127.0.0.1:{self.port}", *self.extra]
        )
        self.history.append(self.process)
        line = self.process.wait_for_line("levante listening on ", timeout=60)
        self.port = int(line.rsplit(":", 1)[1])
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()


class Worker:
    """`levante worker` with the test actions module."""

    def __init__(
        self,
        engine: str,
        concurrency: int = 4,
        worker_id: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        args = ["worker", "--engine", engine, "--actions", "levante_test_actions",
                "--concurrency", str(concurrency)]  # fmt: skip
        if worker_id:
            args += ["--worker-id", worker_id]
        self.process = LevanteProcess(args, env=env)
        # Attached: its actions are in the engine's catalogue, so work for them is taken.
        self.process.wait_for_line("levante worker attached", timeout=60)

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> None:
        self.process.terminate()
