"""The conformance corpus's action mocks, and a worker process that serves them.

The mocks (see the corpus README, "Cases that need a mock") are used twice: in process,
where each case gets a registry of its own (``case_actions``), and by the real worker
process that serves every case run through ``levante serve``::

    python tests/support/conformance_worker.py --engine HOST:PORT --mocks DIR [--concurrency N]

That process serves the std actions with three replacements: ``std.http`` always fails
(no test has a network), ``sleep_echo`` echoes after a random pause, and ``std.echo``
answers as the mock of the case its execution belongs to says, or as the real echo.
``levante worker --actions`` cannot replace a std action (a second registration under a
taken name is refused), hence this small entry point over the public worker SDK
(``std_actions`` + ``serve_worker``).

How the worker learns which case an execution belongs to: the harness writes
``DIR/<execution id>.json`` (the case's mock) right after Run returns, and keeps a marker
``DIR/pending/<case>`` from before Run until that file exists. A std.echo call whose root
execution has no file waits while markers exist, then behaves as the real echo. The root
of a subworkflow's execution is the part of its id before the first dot (task ids are
``<execution id>.<seq>`` and a child execution takes its assignment's id; see
``levante.ids.task_id_for``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from levante.worker import ActionContext, ActionRegistry, serve_worker
from levante.worker.registry import ActionException
from levante.worker.std import std_actions

MOCKED_ACTIONS = ("std.echo", "std.http", "sleep_echo")
# How long a std.echo call waits for the harness to say whether its execution is mocked.
MOCK_LOOKUP_SECONDS = 30.0


# ------------------------------------------------------------------ the mocks


def fail_http(
    url: str,
    method: str = "GET",
    params: Any = None,
    body: Any = None,
    json: Any = None,
    headers: Any = None,
    cookies: Any = None,
    auth: Any = None,
    timeout: Any = None,
    allow_redirects: Any = None,
    proxies: Any = None,
    verify: Any = None,
) -> None:
    raise ActionException(f"Failed to send HTTP request to {url!r}: no network (conformance mock)")


class EchoMock:
    """std.echo replaced as a case's ``mock`` says; counts calls across the whole case."""

    def __init__(self, mock: Mapping[str, Any]) -> None:
        self.results = mock.get("results_by_call")
        self.fail_on = mock.get("fail_on_calls")
        self.error = mock.get("error_on_all_calls")
        self.calls = 0

    def __call__(self, output: Any = None, delay: Any = 0) -> Any:
        self.calls += 1
        if self.fail_on == "all" or (
            isinstance(self.fail_on, list) and self.calls in self.fail_on
        ):
            raise ActionException(f"std.echo mock: failing on call {self.calls}")
        if self.error is not None:
            raise ActionException("std.echo mock: error result", error_data=self.error)
        if isinstance(self.results, list) and self.calls <= len(self.results):
            return self.results[self.calls - 1]
        return output


async def sleep_echo(output: Any = None) -> Any:
    await asyncio.sleep(random.uniform(0.0, 1.0))
    return output


def case_actions(mock: Mapping[str, Any] | None, stem: str = "") -> dict[str, Callable[..., Any]]:
    """The actions that replace or add to the std actions for one case (in process)."""
    actions: dict[str, Callable[..., Any]] = {"std.http": fail_http}
    if mock is not None:
        name = mock.get("action")
        if name == "std.echo":
            actions["std.echo"] = EchoMock(mock)
        elif name == "sleep_echo":
            actions["sleep_echo"] = sleep_echo
        elif name != "std.http":
            raise ValueError(f"{stem}: unknown mock {mock!r}")
    return actions


def is_echo_mock(mock: Mapping[str, Any] | None) -> bool:
    """Whether a case's mock is per-case state the shared worker must be told about."""
    return mock is not None and mock.get("action") == "std.echo"


# ------------------------------------------------------------------ the shared worker's echo


def root_execution(execution_id: str) -> str:
    return execution_id.split(".", 1)[0]


class MockBook:
    """Which executions belong to a case with a std.echo mock, as the harness writes it."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pending = folder / "pending"
        self._mocks: dict[str, EchoMock | None] = {}

    def _read(self, root: str) -> EchoMock | None:
        path = self.folder / f"{root}.json"
        if not path.exists():
            return None
        return EchoMock(json.loads(path.read_text(encoding="utf-8")))

    async def mock_for(self, execution_id: str) -> EchoMock | None:
        root = root_execution(execution_id)
        if root in self._mocks:
            return self._mocks[root]
        deadline = time.monotonic() + MOCK_LOOKUP_SECONDS
        while True:
            mock = self._read(root)
            if mock is None and not any(self.pending.iterdir()):
                mock = self._read(root)  # its file is written before its marker goes
                if mock is None:
                    # A mocked case's marker exists before its execution does and goes
                    # only after its file is written: with no marker and no file, this
                    # execution is not mocked, for good.
                    self._mocks[root] = None
                    return None
            if mock is not None:
                return self._mocks.setdefault(root, mock)
            if time.monotonic() > deadline:
                raise ActionException(
                    f"conformance worker: no word from the harness about execution {root}"
                )
            await asyncio.sleep(0.01)


def shared_registry(book: MockBook) -> ActionRegistry:
    """The std actions with the mocks every case shares, and a per-case std.echo."""
    registry = std_actions()
    real_echo = registry.get("std.echo")
    assert real_echo is not None

    async def echo(output: Any, delay: Any = 0, context: ActionContext | None = None) -> Any:
        assert context is not None
        mock = await book.mock_for(context.execution_id)
        if mock is not None:
            return mock(output, delay)
        return await real_echo.fn(output, delay)

    for name in ("std.echo", "std.http"):
        registry.unregister(name)
    registry.register("std.echo", echo)
    registry.register("std.http", fail_http)
    registry.register("sleep_echo", sleep_echo)
    return registry


async def _serve(engine: str, mocks: Path, concurrency: int) -> None:
    (mocks / "pending").mkdir(parents=True, exist_ok=True)
    registry = shared_registry(MockBook(mocks))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"levante worker serving {len(registry)} actions for {engine}", flush=True)
    await serve_worker(
        engine, registry, capacity=concurrency, stop=stop, grace_seconds=2.0,
        on_attached=lambda: print(f"levante worker attached to {engine}", flush=True),
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--engine", required=True)
    parser.add_argument("--mocks", required=True, type=Path)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.engine, args.mocks, args.concurrency))
    sys.stdout.flush()
    os._exit(0)  # as `levante worker` does: a stuck thread-run action must not keep us


if __name__ == "__main__":
    raise SystemExit(main())
