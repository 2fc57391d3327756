"""Batches on the worker stream: whatever is already waiting goes as one message.

Shared by the engine's side of ``Workers.Subscribe`` (EngineBatch) and the worker
runtime (WorkerBatch). An outbox is an asyncio.Queue of messages where None means: end
the stream.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeVar

MAX_BATCH_MESSAGES = 500
MAX_BATCH_BYTES = 1024 * 1024  # a batch stops growing past this (messages may be 16 MiB)


class _Message(Protocol):
    def ByteSize(self) -> int: ...


M = TypeVar("M", bound=_Message)


def take_ready(first: M, outbox: asyncio.Queue[M | None]) -> tuple[list[M], bool]:
    """``first`` and the messages already in ``outbox`` after it, up to the caps.

    Returns them in order, and whether the end-of-stream None was taken meanwhile.
    """
    batch = [first]
    size = first.ByteSize()
    while len(batch) < MAX_BATCH_MESSAGES and size < MAX_BATCH_BYTES and not outbox.empty():
        more = outbox.get_nowait()
        if more is None:
            return batch, True
        batch.append(more)
        size += more.ByteSize()
    return batch, False
