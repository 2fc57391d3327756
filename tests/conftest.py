"""Shared fixtures: a real engine server and real worker processes on 127.0.0.1."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))

from support.processes import EngineServer, Worker

from levante.client import Client


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'levante.db'}"


@pytest.fixture
def action_log(tmp_path: Path) -> Path:
    return tmp_path / "actions.log"


@pytest.fixture
def gates(tmp_path: Path) -> Path:
    path = tmp_path / "gates"
    path.mkdir()
    return path


@pytest.fixture
def worker_env(action_log: Path, gates: Path) -> dict[str, str]:
    return {"LEVANTE_TEST_LOG": str(action_log), "LEVANTE_TEST_GATES": str(gates)}


@pytest.fixture
def server(store_url: str) -> Iterator[EngineServer]:
    engine = EngineServer(store_url).start()
    try:
        yield engine
    finally:
        for process in engine.history:
            process.terminate()


@pytest.fixture
def workers(server: EngineServer, worker_env: dict[str, str]) -> Iterator[list[Worker]]:
    started = [Worker(server.address, env=worker_env) for _ in range(2)]
    try:
        yield started
    finally:
        for w in started:
            w.stop()


@pytest.fixture
async def client(server: EngineServer) -> AsyncIterator[Client]:
    async with Client(server.address) as c:
        yield c


def read_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []
