"""``levante serve``: the gRPC server around one Engine, one Dispatcher and one Store.

Shutdown is graceful: stop accepting calls, let calls in flight finish within the
grace period, stop the dispatcher (workers' leased assignments stay leased in the
store and are resent or requeued when they reconnect), then close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from levante.dispatch import DEFAULT_LEASE_SECONDS, Dispatcher
from levante.engine import Engine
from levante.rpc.engine_service import ChangeFeed, EngineService
from levante.rpc.workers_service import WorkersService
from levante.store import store_for
from levante.store.base import Store
from levante.timers import Timekeeper
from levante.v1 import levante_pb2_grpc as pb_grpc

log = logging.getLogger("levante.server")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class ServerConfig:
    store: str = "sqlite:///levante.db"
    listen: str = "127.0.0.1:50051"
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    grace_seconds: float = 5.0
    poll_seconds: float = 1.0  # notice work other replicas queued (0: this is the only one)


class LevanteServer:
    """A started server; ``port`` is the bound port (useful with ``--listen HOST:0``)."""

    def __init__(self, config: ServerConfig, store: Store | None = None) -> None:
        self.config = config
        self.store = store or store_for(config.store)
        self.engine = Engine(self.store)
        self.dispatcher = Dispatcher(
            self.store, self.engine, lease_seconds=config.lease_seconds,
            poll_seconds=config.poll_seconds or None,
        )  # fmt: skip
        self.engine.set_dispatch_listener(self.dispatcher.notify)
        self.timekeeper = Timekeeper(self.store, self.engine)
        self.engine.listeners.on_timer = self.timekeeper.scheduled
        self.engine.listeners.on_voided = self.dispatcher.voided
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        await self.store.open()
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
        )
        changes = ChangeFeed()
        self.engine.listeners.on_changed = changes.publish
        pb_grpc.add_EngineServicer_to_server(EngineService(self.engine, changes), server)
        pb_grpc.add_WorkersServicer_to_server(WorkersService(self.dispatcher), server)
        self.port = server.add_insecure_port(self.config.listen)
        if self.port == 0:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        await self.dispatcher.start()
        self.timekeeper.start()
        self._server = server

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds)
            self._server = None
        await self.timekeeper.close()
        await self.dispatcher.close()
        await self.store.close()


async def serve(config: ServerConfig, ready: Callable[[LevanteServer], None] | None = None) -> None:
    """Run until SIGINT or SIGTERM."""
    server = LevanteServer(config)
    await server.start()
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
