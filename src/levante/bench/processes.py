"""The benchmark's child processes: ``levante serve`` and ``levante worker`` on 127.0.0.1.

Every process is started with this interpreter (``python -m levante ...``), its output
is read by a thread (so a chatty child never blocks on a full pipe) and kept in a log
file of its run directory, and it is ended by its own PID: SIGTERM, then SIGKILL if it
has not exited in time. An ``atexit`` hook kills, by PID, any child still alive when
the benchmark exits for whatever reason. Nothing here sleeps for a fixed time to wait
for something: every wait polls for an event and fails loudly at a deadline.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

__all__ = ["BenchError", "ChildProcess", "Cluster", "cpu_seconds", "rss_bytes"]

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
HEAD_LINES = 200  # lines kept from the start of a child's output (where readiness shows)
TAIL_LINES = 200  # and from its end (for error reports)
STOP_SECONDS = 30.0

_started: list[subprocess.Popen[str]] = []


class BenchError(Exception):
    """A scenario failed: a deadline passed, a process died, an execution did not succeed."""


def _kill_leftovers() -> None:
    for proc in _started:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)


atexit.register(_kill_leftovers)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads, from /proc/PID/stat."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """Resident set size of a process (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS for process {pid}")


class ChildProcess:
    """``python -m levante ARGS``, its output collected by a reader thread."""

    def __init__(
        self, name: str, args: list[str], log_dir: Path, *, profile: Path | None = None
    ) -> None:
        self.name = name
        command = [sys.executable]
        if profile is not None:
            command += ["-m", "cProfile", "-o", str(profile)]
        command += ["-m", "levante", *args]
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.log_path = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(log_dir),
            text=True,
        )
        _started.append(self.proc)
        self._head: list[str] = []
        self._tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        with self.log_path.open("w", buffering=1) as log:
            for raw in self.proc.stdout:
                line = raw.rstrip("\n")
                log.write(raw)
                with self._lock:
                    if len(self._head) < HEAD_LINES:
                        self._head.append(line)
                    else:
                        self._tail.append(line)

    def lines(self) -> list[str]:
        with self._lock:
            return [*self._head, *self._tail]

    def last_lines(self, n: int = 30) -> str:
        return "\n".join(self.lines()[-n:])

    def find_line(self, text: str) -> str | None:
        for line in self.lines():
            if text in line:
                return line
        return None

    async def wait_for_line(self, text: str, deadline: float) -> str:
        """The first output line containing ``text``; BenchError if the process ends first
        or ``deadline`` (time.monotonic) passes."""
        while True:
            line = self.find_line(text)
            if line is not None:
                return line
            if not self.alive:
                self._reader.join(timeout=5)
                line = self.find_line(text)
                if line is not None:
                    return line
                raise BenchError(
                    f"{self.name} exited with {self.proc.returncode} before printing {text!r}:\n"
                    + self.last_lines()
                )
            if time.monotonic() > deadline:
                raise BenchError(
                    f"{self.name} did not print {text!r} in time; its output:\n" + self.last_lines()
                )
            await asyncio.sleep(0.02)

    def signal_stop(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGTERM)

    def wait_stopped(self, timeout: float = STOP_SECONDS) -> int:
        """Wait for the process to exit after signal_stop; SIGKILL it past ``timeout``."""
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGKILL)
            code = self.proc.wait(timeout=STOP_SECONDS)
        self._reader.join(timeout=5)
        if self.proc in _started:
            _started.remove(self.proc)
        return code


class Cluster:
    """One ``levante serve`` on ``store_url`` and ``workers`` workers attached to it."""

    def __init__(
        self,
        store_url: str,
        run_dir: Path,
        *,
        workers: int = 2,
        concurrency: int = 50,
        profile: Path | None = None,
        replicas: int = 1,
    ) -> None:
        self.replicas = replicas
        self.extra_servers: list[ChildProcess] = []  # replicas 2..N on the same store
        self.store_url = store_url
        self.run_dir = run_dir
        self.worker_count = workers
        self.concurrency = concurrency
        self.profile = profile
        self.server: ChildProcess | None = None
        self.workers: list[ChildProcess] = []
        self.address = ""

    async def start(self, timeout: float = 60.0) -> Cluster:
        deadline = time.monotonic() + timeout
        self.server = ChildProcess(
            "engine",
            ["serve", "--store", self.store_url, "--listen", "127.0.0.1:0"],
            self.run_dir,
            profile=self.profile,
        )
        line = await self.server.wait_for_line("levante listening on ", deadline)
        self.address = line.rsplit(" ", 1)[1].strip()
        if not self.address.startswith("127.0.0.1:"):
            raise BenchError(f"the engine listens on {self.address}, not on 127.0.0.1")
        addresses = [self.address]
        for r in range(1, self.replicas):
            replica = ChildProcess(
                f"engine-{r}",
                ["serve", "--store", self.store_url, "--listen", "127.0.0.1:0"],
                self.run_dir,
            )
            self.extra_servers.append(replica)
            line = await replica.wait_for_line("levante listening on ", deadline)
            addresses.append(line.rsplit(" ", 1)[1].strip())
        servers = [self.server, *self.extra_servers]
        for i in range(self.worker_count):
            self.workers.append(
                ChildProcess(
                    f"worker-{i}",
                    [
                        "worker",
                        "--engine",
                        addresses[i % len(addresses)],
                        "--concurrency",
                        str(self.concurrency),
                        "--worker-id",
                        f"bench-w{i}",
                    ],
                    self.run_dir,
                )
            )
        # The dispatcher logs each worker's attachment; measure only once all are there.
        for i, worker in enumerate(self.workers):
            await worker.wait_for_line("levante worker serving", deadline)
            await servers[i % len(servers)].wait_for_line(f"worker bench-w{i} attached", deadline)
        return self

    @property
    def engine_pid(self) -> int:
        assert self.server is not None
        return self.server.pid

    def check_alive(self) -> None:
        for child in [self.server, *self.extra_servers, *self.workers]:
            if child is not None and not child.alive:
                raise BenchError(
                    f"{child.name} (pid {child.pid}) exited with {child.proc.returncode}:\n"
                    + child.last_lines()
                )

    def engine_cpu(self) -> float:
        return cpu_seconds(self.engine_pid)

    def workers_cpu(self) -> float:
        return sum(cpu_seconds(w.pid) for w in self.workers)

    def engine_rss(self) -> int:
        return rss_bytes(self.engine_pid)

    def diagnostics(self) -> str:
        parts = []
        for child in [self.server, *self.workers]:
            if child is not None:
                parts.append(
                    f"--- {child.name} (pid {child.pid}), last lines:\n" + child.last_lines(15)
                )
        return "\n".join(parts)

    def stop(self) -> None:
        """Workers first (they finish and close their streams), then the engine."""
        for worker in self.workers:
            worker.signal_stop()
        for worker in self.workers:
            worker.wait_stopped()
        for server in [self.server, *self.extra_servers]:
            if server is not None:
                server.signal_stop()
                server.wait_stopped()
