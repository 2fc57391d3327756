"""What the benchmark measures. Each scenario runs once per call on a fresh store.

Every server scenario starts its own ``levante serve`` (fresh store, temporary
directory) and workers (2 x concurrency 50 by default), registers its workflow, takes
the time, starts the executions through ``levante.Client``, and takes each end from the
engine's clock (see ``driver``). Besides its headline figure each one reports the CPU
the engine, the workers and the benchmark's own client used during the measured
window, as a share of one core: on a 2-core machine that says what the figure is
bound by.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from levante.bench import workflows
from levante.bench.driver import (
    STALL_SECONDS,
    BenchClient,
    start_many,
    wait_final,
    wait_workflow,
)
from levante.bench.processes import BenchError, Cluster
from levante.bench.report import Sample
from levante.bench.stores import CommitCounter, StorePlace, count_deferred

__all__ = ["SCENARIOS", "RunContext", "Scenario"]

FULL: dict[str, int] = {
    "throughput": 500,  # executions of a 10-task chain
    "chain": 1000,
    "fanout": 1000,
    "with_items": 1000,
    "growth_small": 100,
    "growth_large": 10_000,
    "idle": 10_000,
    "idle_seconds": 5,
    "inprocess": 100,
}
QUICK: dict[str, int] = {
    "throughput": 20,
    "chain": 50,
    "fanout": 50,
    "with_items": 50,
    "growth_small": 20,
    "growth_large": 200,
    "idle": 100,
    "idle_seconds": 1,
    "inprocess": 20,
}
THROUGHPUT_CHAIN = 10
WITH_ITEMS_CONCURRENCY = 100
RUNS_IN_FLIGHT = 64  # the idle scenario's 10,000 Run calls, this many at a time
MIB = 1024 * 1024


@dataclass
class RunContext:
    scenario: str
    store: str
    run: int
    run_dir: Path
    quick: bool = False
    workers: int = 2
    concurrency: int = 50
    replicas: int = 1  # engine processes sharing the store; workers spread over them
    profile_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    deadline: float = 0.0  # time.monotonic() past which the run fails

    def size(self, key: str) -> int:
        return (QUICK if self.quick else FULL)[key]

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    def check_deadline(self, what: str) -> None:
        if time.monotonic() > self.deadline:
            raise BenchError(f"{self.scenario}: deadline passed while {what}")

    @asynccontextmanager
    async def cluster(self) -> AsyncIterator[tuple[Cluster, BenchClient, StorePlace]]:
        """A fresh store, an engine on it, workers attached, and a client."""
        place = await StorePlace.create(self.store, self.run_dir)
        profile = None
        if self.profile_dir is not None:
            profile = self.profile_dir / f"{self.scenario}-{self.store}-run{self.run}.prof"
        cluster = Cluster(
            place.url,
            self.run_dir,
            workers=self.workers,
            concurrency=self.concurrency,
            profile=profile,
            replicas=self.replicas,
        )
        try:
            await cluster.start()
            async with BenchClient(cluster.address) as client:
                await _warm_up(client, cluster, self.deadline)
                yield cluster, client, place
        except BenchError as e:
            raise BenchError(f"{e}\n{cluster.diagnostics()}") from None
        except Exception as e:
            raise BenchError(f"{type(e).__name__}: {e}\n{cluster.diagnostics()}") from e
        finally:
            await asyncio.to_thread(cluster.stop)
            await place.dispose()


async def _warm_up(client: BenchClient, cluster: Cluster, deadline: float) -> None:
    """One small execution through the engine and both workers' connections, so that the
    measured ones do not pay for first-time work (lazy imports, caches, connections)."""
    await client.register_workflows(workflows.fan_out("warmup", 4))
    execution = await client.run("warmup")
    await wait_workflow(
        client,
        "warmup",
        [execution],
        started=time.time(),
        deadline=deadline,
        what="warm-up",
        cluster=cluster,
    )


class Window:
    """CPU used by the engine, the workers and this process from now on."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.engine = cluster.engine_cpu()
        self.workers = cluster.workers_cpu()
        self.client = time.process_time()

    def samples(self, seconds: float, size: str = "") -> list[Sample]:
        share = 100.0 / seconds
        return [
            Sample("engine CPU", (self.cluster.engine_cpu() - self.engine) * share, "% core", size),
            Sample(
                "workers CPU", (self.cluster.workers_cpu() - self.workers) * share, "% core", size
            ),
            Sample("client CPU", (time.process_time() - self.client) * share, "% core", size),
        ]


def _n(count: int) -> str:
    return f"{count:,}"


# ---------------------------------------------------------------- the scenarios


async def throughput(ctx: RunContext) -> list[Sample]:
    """N executions of a 10-task std.noop chain started at once: task completions/s."""
    n = ctx.size("throughput")
    size = f"{_n(n)} x {THROUGHPUT_CHAIN}"
    async with ctx.cluster() as (cluster, client, _):
        await client.register_workflows(workflows.chain("chain10", THROUGHPUT_CHAIN))
        window = Window(cluster)
        started = time.time()
        ids = await start_many(client, "chain10", n)
        ended = await wait_workflow(
            client,
            "chain10",
            ids,
            started=started,
            deadline=ctx.deadline,
            what="throughput",
            cluster=cluster,
        )
        seconds = ended - started
        cpu = window.samples(seconds, size)
    return [
        Sample("task completions", n * THROUGHPUT_CHAIN / seconds, "tasks/s", size),
        Sample("executions", n / seconds, "executions/s", size),
        *cpu,
    ]


async def chain(ctx: RunContext) -> list[Sample]:
    """One execution of N sequential std.noop tasks: milliseconds per step."""
    n = ctx.size("chain")
    async with ctx.cluster() as (cluster, client, _):
        await client.register_workflows(workflows.chain("chain", n))
        window = Window(cluster)
        started = time.time()
        execution = await client.run("chain")
        ended = await wait_workflow(
            client,
            "chain",
            [execution],
            started=started,
            deadline=ctx.deadline,
            what="chain",
            cluster=cluster,
        )
        seconds = ended - started
        return [
            Sample("latency", seconds * 1000 / n, "ms/step", _n(n)),
            *window.samples(seconds, _n(n)),
        ]


async def fanout(ctx: RunContext) -> list[Sample]:
    """One task, N parallel tasks, one ``join: all`` task: wall time."""
    n = ctx.size("fanout")
    size = f"1+{_n(n)}+1"
    async with ctx.cluster() as (cluster, client, _):
        await client.register_workflows(workflows.fan_out("fanout", n))
        window = Window(cluster)
        started = time.time()
        execution = await client.run("fanout")
        ended = await wait_workflow(
            client,
            "fanout",
            [execution],
            started=started,
            deadline=ctx.deadline,
            what="fan-out",
            cluster=cluster,
        )
        seconds = ended - started
        return [Sample("wall", seconds, "s", size), *window.samples(seconds, size)]


async def with_items(ctx: RunContext) -> list[Sample]:
    """One task over N items, ``concurrency: 100``: wall time."""
    n = ctx.size("with_items")
    size = f"{_n(n)} items"
    async with ctx.cluster() as (cluster, client, _):
        await client.register_workflows(workflows.with_items("items", WITH_ITEMS_CONCURRENCY))
        window = Window(cluster)
        started = time.time()
        execution = await client.run("items", {"items": list(range(n))})
        ended = await wait_workflow(
            client,
            "items",
            [execution],
            started=started,
            deadline=ctx.deadline,
            what="with-items",
            cluster=cluster,
        )
        seconds = ended - started
        return [Sample("wall", seconds, "s", size), *window.samples(seconds, size)]


async def growth(ctx: RunContext) -> list[Sample]:
    """Milliseconds per step of a short and a long chain, and their ratio."""
    small, large = ctx.size("growth_small"), ctx.size("growth_large")
    per_step: dict[int, float] = {}
    samples: list[Sample] = []
    async with ctx.cluster() as (cluster, client, _):
        for n in (small, large):
            await client.register_workflows(workflows.chain(f"chain{n}", n))
        for n in (small, large):
            window = Window(cluster)
            started = time.time()
            execution = await client.run(f"chain{n}")
            ended = await wait_workflow(
                client,
                f"chain{n}",
                [execution],
                started=started,
                deadline=ctx.deadline,
                what=f"growth ({n}-task chain)",
                cluster=cluster,
            )
            per_step[n] = (ended - started) * 1000 / n
            samples.append(Sample("latency", per_step[n], "ms/step", _n(n)))
            if n == large:
                samples += window.samples(ended - started, _n(n))
    ratio = per_step[large] / per_step[small]
    samples.insert(2, Sample("ratio", ratio, "x", f"{_n(large)} vs {_n(small)}"))
    return samples


async def _wait_settled(ctx: RunContext, cluster: Cluster, place: StorePlace, n: int) -> bool:
    """Until all ``n`` tasks are deferred: counted in the store where it can be read from
    outside (SQLite, PostgreSQL; returns True), else until the engine's CPU has been still
    for a second (returns False: the moment is not exact)."""
    last, changed = -1, time.monotonic()
    while True:
        count = await count_deferred(place)
        if count is None:
            break
        if count >= n:
            return True
        if count != last:
            last, changed = count, time.monotonic()
        if time.monotonic() - changed > STALL_SECONDS:
            raise BenchError(f"idle: no new deferral for {STALL_SECONDS:.0f} s ({count} of {n})")
        cluster.check_alive()
        ctx.check_deadline(f"waiting for deferrals ({count} of {n})")
        await asyncio.sleep(0.1)
    ctx.note(
        "idle on memory://: 'all waiting' is when the engine's CPU went still "
        "(the memory store cannot be read from outside)"
    )
    still = 0
    while still < 2:
        before = cluster.engine_cpu()
        await asyncio.sleep(0.5)
        still = still + 1 if cluster.engine_cpu() - before < 0.02 else 0
        cluster.check_alive()
        ctx.check_deadline("waiting for the engine to go still")
    return False


async def idle(ctx: RunContext) -> list[Sample]:
    """N executions each waiting on a deferred task; then memory, and idle CPU."""
    n = ctx.size("idle")
    idle_seconds = ctx.size("idle_seconds")
    size = f"{_n(n)} waiting"
    async with ctx.cluster() as (cluster, client, place):
        await client.register_workflows(workflows.waiter("waiter"))
        rss_before = cluster.engine_rss()
        started = time.time()
        ids = await start_many(client, "waiter", n, in_flight=RUNS_IN_FLIGHT)
        runs_done = time.time()
        exact = await _wait_settled(ctx, cluster, place, n)
        settled = time.time()
        last = await client.status_message(ids[-1])
        if last.state != "RUNNING" or [t.state for t in last.tasks] != ["RUNNING"]:
            raise BenchError(
                f"idle: execution {last.execution_id} is {last.state}, "
                f"tasks {[t.state for t in last.tasks]}; expected RUNNING"
            )
        rss_after = cluster.engine_rss()
        counter = CommitCounter(place.sqlite_path) if place.sqlite_path else None
        if counter:
            counter.start()
        window = Window(cluster)
        window_started = time.monotonic()
        # The measured idle window: sleeping is what is measured here, not a wait for work.
        await asyncio.sleep(idle_seconds)
        window_seconds = time.monotonic() - window_started
        cpu = window.samples(window_seconds, f"{idle_seconds} s idle")
        commits = counter.stop() if counter else None
        # The engine still answers: finish one of the waiting executions.
        await client.task_complete(last.tasks[0].assignment_id, result="done")
        await wait_final(
            client,
            [last.execution_id],
            started=time.time(),
            deadline=ctx.deadline,
            what="idle: completing a deferred task",
        )
    samples = [Sample("Run calls", n / (runs_done - started), "executions/s", _n(n))]
    if exact:
        samples.append(Sample("all waiting", settled - started, "s", _n(n)))
    samples += [
        Sample("engine RSS", rss_after / MIB, "MiB", size),
        Sample("RSS growth", (rss_after - rss_before) / n / 1024, "KiB/execution", size),
        *(Sample(f"idle {s.figure}", s.value * 10, "ms CPU/s", s.size) for s in cpu[:2]),
    ]
    if commits is not None:
        samples.append(
            Sample(
                "idle store commits",
                commits / window_seconds,
                "commits/s",
                f"{idle_seconds} s idle",
            )
        )
    return samples


def _taskflow_times(n: int) -> tuple[float, float] | None:
    """Seconds for TaskFlow's (serial, in-memory) engine to run the same chain and fan-out;
    None when the taskflow package is not importable."""
    try:
        engines: Any = importlib.import_module("taskflow.engines")
        task: Any = importlib.import_module("taskflow.task")
        linear: Any = importlib.import_module("taskflow.patterns.linear_flow")
        unordered: Any = importlib.import_module("taskflow.patterns.unordered_flow")
    except ImportError:
        return None

    def execute(self: Any) -> None:
        return None

    noop: Any = type("Noop", (task.Task,), {"execute": execute})
    began = time.perf_counter()
    engines.run(linear.Flow("chain").add(*(noop(name=f"t{i}") for i in range(n))))
    chain_seconds = time.perf_counter() - began
    began = time.perf_counter()
    branches = unordered.Flow("branches").add(*(noop(name=f"p{i}") for i in range(n)))
    engines.run(linear.Flow("fanout").add(noop(name="start"), branches, noop(name="join")))
    return chain_seconds, time.perf_counter() - began


async def inprocess(ctx: RunContext) -> list[Sample]:
    """The chain and the fan-out through ``levante.run_workflow`` in this process (and
    through TaskFlow's engine when ``taskflow`` is importable)."""
    from levante.runner import run_workflow

    n = ctx.size("inprocess")
    timeout = max(ctx.deadline - time.monotonic(), 1.0)
    samples: list[Sample] = []
    for label, definition in (
        ("chain", workflows.chain("chain", n)),
        ("fan-out", workflows.fan_out("fanout", n)),
    ):
        place = await StorePlace.create(ctx.store, ctx.run_dir / label)
        try:
            began = time.perf_counter()
            result = await asyncio.to_thread(
                run_workflow, definition, store=place.url, timeout=timeout
            )
            seconds = time.perf_counter() - began
        finally:
            await place.dispose()
        if not result.ok:
            raise BenchError(f"in-process {label}: {result.state}: {result.state_info}")
        if label == "chain":
            samples.append(Sample("levante chain", seconds * 1000 / n, "ms/step", _n(n)))
        else:
            samples.append(Sample("levante fan-out", seconds, "s", f"1+{_n(n)}+1"))
    taskflow = await asyncio.to_thread(_taskflow_times, n)
    if taskflow is None:
        ctx.note("taskflow not installed: no TaskFlow figures")
    else:
        samples.append(Sample("taskflow chain", taskflow[0] * 1000 / n, "ms/step", _n(n)))
        samples.append(Sample("taskflow fan-out", taskflow[1], "s", f"1+{_n(n)}+1"))
    return samples


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    run: Callable[[RunContext], Awaitable[list[Sample]]]
    deadline_seconds: float
    uses_server: bool = True


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario("throughput", "throughput", throughput, 900),
        Scenario("chain", "chain latency", chain, 600),
        Scenario("fanout", "fan-out/fan-in", fanout, 600),
        Scenario("with_items", "with-items", with_items, 600),
        Scenario("growth", "growth", growth, 1800),
        Scenario("idle", "idle and memory", idle, 1200),
        Scenario("inprocess", "in-process runner", inprocess, 600, uses_server=False),
    )
}
QUICK_DEADLINE_SECONDS = 180.0
