"""Prometheus metrics of one server process, and the HTTP endpoint that serves them.

Off unless ``enable()`` is called (``levante serve --metrics-listen HOST:PORT``); the
hooks below then cost nothing but a global lookup. What is measured, and where:

- from the store, wrapped once by ``instrument_store`` when the server is built: the
  latency of each transaction; executions started and finished, tasks reaching a
  final state and their durations, all read from the history a transaction appends;
  the queued-to-claimed latency of each assignment a worker claims (alone, or inside
  the transaction that records its previous result); all counted only once the
  transaction has committed; assignments put back in the queue (redeliveries);
- from the dispatcher: lease expiries (``lease_expired()``);
- from the gRPC server: RPCs by method and status code (``levante.rpc.interceptors``);
- at scrape time: connected workers, and queue depth by action (one store query).

Metric names follow Prometheus conventions (``_total`` on counters, base units).
One process holds one set of metrics: servers sharing a process share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from contextvars import ContextVar
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from levante.core.model import (
    AssignmentRecord,
    ExecutionState,
    HistoryEntry,
    TaskRecord,
    TaskState,
)
from levante.ids import AssignmentId
from levante.store.base import Store, StoreTransaction

__all__ = ["Metrics", "MetricsEndpoint", "current", "disable", "enable", "instrument_store",
           "lease_expired", "redelivered", "start_endpoint"]  # fmt: skip

log = logging.getLogger("levante.metrics")

_FINAL_TASK_STATES = {s.value for s in TaskState if s.is_final}
_FINAL_EXECUTION_STATES = {s.value for s in ExecutionState if s.is_final}


class Metrics:
    """Every metric of a server, in a registry of its own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.executions_started = Counter(
            "levante_executions_started", "Executions started (subworkflows included).",
            registry=r,
        )  # fmt: skip
        self.executions_finished = Counter(
            "levante_executions_finished",
            "Executions that reached a final state, by that state (a rerun execution that "
            "ends again counts again).",
            ["state"], registry=r,
        )  # fmt: skip
        self.task_completions = Counter(
            "levante_task_completions", "Tasks that reached a final state, by that state.",
            ["state"], registry=r,
        )  # fmt: skip
        self.assignment_latency = Histogram(
            "levante_assignment_latency_seconds",
            "From an assignment's creation (queued) to a worker claiming it (started).",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                     300, 1800),
            registry=r,
        )  # fmt: skip
        self.task_duration = Histogram(
            "levante_task_duration_seconds",
            "From a task's creation to its final state.",
            buckets=(0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 14400,
                     86400),
            registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "levante_queue_depth", "Assignments queued (ready, waiting for a worker), by action.",
            ["action"], registry=r,
        )  # fmt: skip
        self.connected_workers = Gauge(
            "levante_connected_workers", "Workers with a stream open to this server.", registry=r
        )
        self.lease_expiries = Counter(
            "levante_lease_expiries",
            "Assignments whose worker went silent until the lease ran out (tried again).",
            registry=r,
        )  # fmt: skip
        self.redeliveries = Counter(
            "levante_redeliveries",
            "Leased assignments put back in the queue to be delivered again (a worker's "
            "stream ended, or this server shut down before sending them).",
            registry=r,
        )  # fmt: skip
        self.store_transaction = Histogram(
            "levante_store_transaction_seconds", "Store transactions, from begin to commit.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )  # fmt: skip
        self.rpcs = Counter(
            "levante_rpcs", "RPCs handled, by service, method and status code.",
            ["service", "method", "code"], registry=r,
        )  # fmt: skip

    def record_history(
        self, entries: Sequence[HistoryEntry], created: dict[str, float]
    ) -> None:
        """Count the state changes of one committed transaction.

        ``created`` maps the ids of the task rows the transaction saved to their creation
        times (every task whose state changed was saved in the same transaction).
        """
        for entry in entries:
            if entry.kind == "execution":
                if entry.cause == "ExecutionStarted":
                    self.executions_started.inc()
                if entry.state in _FINAL_EXECUTION_STATES:
                    self.executions_finished.labels(entry.state).inc()
            elif entry.kind == "task" and entry.state in _FINAL_TASK_STATES:
                self.task_completions.labels(entry.state).inc()
                started = created.get(entry.task_id or "")
                if started is not None:
                    self.task_duration.observe(max(0.0, entry.at - started))

    def set_queue_depth(self, depth: dict[str, int]) -> None:
        self.queue_depth.clear()
        for action, n in depth.items():
            self.queue_depth.labels(action).set(n)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


_current: Metrics | None = None


def enable() -> Metrics:
    """Start measuring (idempotent); returns the process's metrics."""
    global _current
    if _current is None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created: noise here
        _current = Metrics()
    return _current


def disable() -> None:
    global _current
    _current = None


def current() -> Metrics | None:
    return _current


# ---------------------------------------------------------------- hooks


def lease_expired() -> None:
    if _current is not None:
        _current.lease_expiries.inc()


def redelivered(n: int) -> None:
    if _current is not None and n > 0:
        _current.redeliveries.inc(n)


# ---------------------------------------------------------------- the store, measured


# Set while Store.claim_assignments runs: a backend may claim inside a transaction of
# its own, and those claims must not be counted twice.
_claiming: ContextVar[bool] = ContextVar("levante_claiming", default=False)


class _MeteredTransaction:
    """A store transaction that notes the task rows and history it writes, and the
    assignments it claims (a worker reporting a result gets its next work in the same
    transaction)."""

    def __init__(self, tx: StoreTransaction, clock: Callable[[], float]) -> None:
        self._tx = tx
        self._clock = clock
        self.created: dict[str, float] = {}
        self.history: list[HistoryEntry] = []
        self.waited: list[float] = []  # queued-to-claimed of each claimed assignment

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tx, name)

    async def save_tasks(self, tasks: Sequence[TaskRecord]) -> None:
        await self._tx.save_tasks(tasks)
        for task in tasks:
            self.created[task.id] = task.created_at

    async def append_history(self, entries: Sequence[HistoryEntry]) -> None:
        await self._tx.append_history(entries)
        self.history.extend(entries)

    async def claim_assignments(
        self, worker_id: str, actions: Collection[str], limit: int, lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:  # fmt: skip
        claimed = await self._tx.claim_assignments(worker_id, actions, limit, lease_until, targets)
        if not _claiming.get():  # else the store-level claim around it counts them
            now = self._clock()
            self.waited.extend(max(0.0, now - a.created_at) for a in claimed)
        return claimed


def instrument_store(
    store: Store, metrics: Metrics, clock: Callable[[], float] = time.time
) -> None:
    """Measure ``store`` from now on: its transactions, claims and releases.

    The methods are replaced on this one instance (the class and other instances are
    untouched), so a server without metrics runs the store's code and nothing else.
    """
    transaction = store.transaction
    claim = store.claim_assignments
    release = store.release_assignments

    @asynccontextmanager
    async def metered_transaction() -> AsyncIterator[StoreTransaction]:
        started = time.perf_counter()
        metered: _MeteredTransaction | None = None
        try:
            async with transaction() as tx:
                metered = _MeteredTransaction(tx, clock)
                yield metered  # a StoreTransaction by delegation
        finally:
            metrics.store_transaction.observe(time.perf_counter() - started)
        # Reached only when the transaction committed.
        if metered is not None:
            metrics.record_history(metered.history, metered.created)
            for waited in metered.waited:
                metrics.assignment_latency.observe(waited)

    async def metered_claim(
        worker_id: str, actions: Collection[str], limit: int, lease_until: float,
        targets: Collection[str] = (),
    ) -> list[AssignmentRecord]:  # fmt: skip
        token = _claiming.set(True)
        try:
            claimed = await claim(worker_id, actions, limit, lease_until, targets)
        finally:
            _claiming.reset(token)
        now = clock()
        for assignment in claimed:
            metrics.assignment_latency.observe(max(0.0, now - assignment.created_at))
        return claimed

    async def metered_release(worker_id: str, keep: Collection[AssignmentId] = ()) -> int:
        released = await release(worker_id, keep)
        metrics.redeliveries.inc(released)
        return released

    def metered() -> AbstractAsyncContextManager[StoreTransaction]:
        return metered_transaction()

    store.transaction = metered  # type: ignore[method-assign]
    store.claim_assignments = metered_claim  # type: ignore[method-assign]
    store.release_assignments = metered_release  # type: ignore[method-assign]


# ---------------------------------------------------------------- the HTTP endpoint


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPV6]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"not HOST:PORT: {address!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


class MetricsEndpoint:
    """``GET /metrics`` over plain HTTP/1.1 on the server's event loop.

    ``refresh`` runs before each scrape, on the loop, so that gauges read from the store
    (queue depth) are current; if it fails the scrape still answers with the rest.
    """

    def __init__(self, metrics: Metrics, refresh: Callable[[], Awaitable[None]]) -> None:
        self._metrics = metrics
        self._refresh = refresh
        self._server: asyncio.Server | None = None
        self.host = ""
        self.port = 0

    async def start(self, listen: str) -> None:
        host, port = split_host_port(listen)
        self._server = await asyncio.start_server(self._handle, host, port)
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if method not in ("GET", "HEAD"):
                status, body, kind = "405 Method Not Allowed", b"GET only\n", "text/plain"
            elif path.split("?", 1)[0] not in ("/metrics", "/"):
                status, body, kind = "404 Not Found", b"see /metrics\n", "text/plain"
            else:
                try:
                    await self._refresh()
                except Exception:
                    log.warning("refreshing the metrics read from the store failed",
                                exc_info=True)
                status, body, kind = "200 OK", self._metrics.exposition(), CONTENT_TYPE_LATEST
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, ValueError, ConnectionError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError):  # fmt: skip
            pass  # a client that cannot speak HTTP gets nothing
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


async def start_endpoint(
    metrics: Metrics, listen: str, refresh: Callable[[], Awaitable[None]]
) -> MetricsEndpoint:
    endpoint = MetricsEndpoint(metrics, refresh)
    await endpoint.start(listen)
    return endpoint
