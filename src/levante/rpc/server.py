"""``levante serve``: the gRPC server around one Engine, one Dispatcher and one Store.

Besides the Engine and Workers services it serves the standard health service
(``grpc.health.v1.Health``: SERVING once the store is open, its schema migrated and
the dispatcher running; NOT_SERVING from the moment shutdown begins) and server
reflection, so that generic tools (grpcurl, grpc_health_probe) need no proto file.
With ``metrics_listen`` set it measures itself (``levante.observability.metrics``)
and serves Prometheus metrics over HTTP on that address.

Shutdown is graceful (SIGTERM or SIGINT): health turns NOT_SERVING; the dispatcher
stops claiming work; the server stops accepting calls and lets calls in flight,
workers' streams included, go on for the grace period (results that arrive are
recorded); then the streams are cancelled. Assignments claimed for a worker but never
sent are handed back to the queue at once; the ones sent stay leased to the worker,
which may be running them: it tells the next engine it reaches (another replica, or
this one restarted) what it still holds, and the rest is requeued then, or when their
leases run out. So no assignment runs twice at once because of a shutdown, and none
is lost. Then timers stop and the store is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from levante.dispatch import DEFAULT_LEASE_SECONDS, Dispatcher
from levante.engine import Engine
from levante.ids import DefinitionId
from levante.limits import DEFAULT_LIMITS, Limits
from levante.observability import metrics
from levante.rpc.auth import AuthInterceptor, TokenEntry, server_credentials
from levante.rpc.engine_service import ChangeFeed, EngineService
from levante.rpc.interceptors import RpcMetricsInterceptor
from levante.rpc.status import DecodeErrorInterceptor
from levante.rpc.workers_service import WorkersService
from levante.store import store_for
from levante.store.base import Store
from levante.store.stats import queue_depth
from levante.timers import Timekeeper
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

log = logging.getLogger("levante.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024

STORE_PROBE_SECONDS = 2.0  # how often health checks that the store answers

# The services health reports on: "" is the server as a whole.
HEALTH_SERVICES = ("", *(s.full_name for s in pb.DESCRIPTOR.services_by_name.values()))


@dataclass(frozen=True)
class ServerConfig:
    store: str = "sqlite:///levante.db"
    listen: str = "127.0.0.1:50051"
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    grace_seconds: float = 5.0
    poll_seconds: float = 1.0  # notice work other replicas queued (0: this is the only one)
    auth_tokens: tuple[TokenEntry, ...] = ()  # none: authentication is off
    tls_cert: str = ""  # PEM files; with tls_ca, clients must present a certificate
    tls_key: str = ""
    tls_ca: str = ""
    limits: Limits = DEFAULT_LIMITS
    metrics_listen: str = ""  # HOST:PORT of the Prometheus endpoint; empty: no metrics


class LevanteServer:
    """A started server; ``port`` is the bound port (useful with ``--listen HOST:0``)."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or store_for(config.store)
        self.engine = Engine(self.store, limits=config.limits)
        self.dispatcher = Dispatcher(
            self.store, self.engine, lease_seconds=config.lease_seconds,
            poll_seconds=config.poll_seconds or None,
        )  # fmt: skip
        self.engine.set_dispatch_listener(self.dispatcher.notify)
        self.timekeeper = Timekeeper(self.store, self.engine)
        self.engine.listeners.on_timer = self.timekeeper.scheduled
        self.engine.listeners.on_voided = self.dispatcher.voided
        self._server: grpc.aio.Server | None = None
        self._store_watch: asyncio.Task[None] | None = None
        self.port = 0
        self.health = health_aio.HealthServicer()
        self.metrics: metrics.Metrics | None = None
        self._metrics_endpoint: metrics.MetricsEndpoint | None = None
        if config.metrics_listen:
            self.metrics = metrics.enable()
            metrics.instrument_store(self.store, self.metrics)
            self.metrics.connected_workers.set_function(lambda: self.dispatcher.connected_workers)

    async def start(self) -> None:
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.store.open()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
            # Refused before decoding; then undecodable requests get INVALID_ARGUMENT.
            # Counted first, so that refused calls are counted too.
            interceptors=[
                *([RpcMetricsInterceptor(self.metrics)] if self.metrics is not None else []),
                AuthInterceptor(self.config.auth_tokens), DecodeErrorInterceptor(),
            ],
        )
        changes = ChangeFeed()
        self.engine.listeners.on_changed = changes.publish
        pb_grpc.add_EngineServicer_to_server(EngineService(self.engine, changes), server)
        pb_grpc.add_WorkersServicer_to_server(WorkersService(self.dispatcher), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (*HEALTH_SERVICES[1:], health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        if self.config.tls_cert or self.config.tls_key:
            credentials = server_credentials(
                self.config.tls_cert, self.config.tls_key, self.config.tls_ca or None
            )
            self.port = server.add_secure_port(self.config.listen, credentials)
        else:
            self.port = server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server = server
        await self.dispatcher.start()
        self.timekeeper.start()
        if self.metrics is not None:
            self._metrics_endpoint = await metrics.start_endpoint(
                self.metrics, self.config.metrics_listen, self._refresh_metrics
            )
        for service in HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        self._store_watch = asyncio.create_task(self._watch_store(), name="store-health")

    async def _watch_store(self) -> None:
        """Health follows the store: NOT_SERVING while a probe read fails (the database
        went away, its connections are refused), SERVING again once one succeeds."""
        serving = True
        while True:
            await asyncio.sleep(STORE_PROBE_SECONDS)
            try:
                await asyncio.wait_for(self.store.get_definition(DefinitionId(0)),
                                       STORE_PROBE_SECONDS)  # fmt: skip
                healthy = True
            except asyncio.CancelledError:
                raise
            except Exception as e:
                healthy = False
                if serving:
                    log.error("the store does not answer (%s): health NOT_SERVING", e)
            if healthy != serving:
                serving = healthy
                if serving:
                    log.info("the store answers again: health SERVING")
                status = (health_pb2.HealthCheckResponse.SERVING if serving
                          else health_pb2.HealthCheckResponse.NOT_SERVING)  # fmt: skip
                for service in HEALTH_SERVICES:
                    await self.health.set(service, status)

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        return None if self._metrics_endpoint is None else self._metrics_endpoint.url

    async def _refresh_metrics(self) -> None:
        if self.metrics is not None:
            self.metrics.set_queue_depth(await queue_depth(self.store))

    async def stop(self) -> None:
        """Shut down gracefully (see the module docstring)."""
        if self._store_watch is not None:
            self._store_watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._store_watch
            self._store_watch = None
        await self.health.enter_graceful_shutdown()
        self.dispatcher.drain()
        if self._server is not None:
            log.info("stopping: health NOT_SERVING, letting calls in flight finish (up to %gs)",
                     self.config.grace_seconds)  # fmt: skip
            await self._server.stop(self.config.grace_seconds)
            self._server = None
        await self.dispatcher.close()
        await self.timekeeper.close()
        if self._metrics_endpoint is not None:
            await self._metrics_endpoint.close()
            self._metrics_endpoint = None
        await self.store.close()


async def serve(config: ServerConfig, ready: Callable[[LevanteServer], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM."""
    server = LevanteServer(config)
    try:
        await server.start()
    except BaseException:
        with contextlib.suppress(Exception):  # what started is stopped; the cause is raised
            await server.stop()
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    log.info("levante serving on %s (store %s)", server.address, config.store)
    if ready is not None:
        ready(server)
    try:
        await stop.wait()
    finally:
        log.info("shutting down")
        await server.stop()
        log.info("stopped")
