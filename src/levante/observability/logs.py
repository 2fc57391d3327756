"""Structured logs: every record carries the execution, task and worker it concerns.

Ids reach a record in one of two ways:
- ``extra={"task_id": ..., "worker_id": ...}`` on the logging call, where the caller
  has them at hand;
- ``bind(worker_id=...)``, which attaches ids to everything logged afterwards in the
  current asyncio task and the tasks it starts (a context variable: a worker's stream
  binds its worker id once, and every line about that stream carries it).

``task_id`` is the id a worker sees (an assignment's id, ``EXECUTION.SEQ[/ITEM][#ATTEMPT]``,
see ``levante.ids``), so a line from the server and one from the worker that ran the task
can be matched; a record with a task id and no execution id gets the execution id the
task id starts with.

Two formats: ``text`` (the default, for people: the ids follow the message in brackets)
and ``json`` (one JSON object per line, for log collectors).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from contextvars import ContextVar
from types import MappingProxyType
from typing import Any, TextIO

__all__ = ["FORMATS", "IDS", "IdsFilter", "JsonFormatter", "TextFormatter", "bind", "configure"]

IDS = ("execution_id", "task_id", "worker_id")
FORMATS = ("text", "json")

_NONE: Mapping[str, str] = MappingProxyType({})
_bound: ContextVar[Mapping[str, str]] = ContextVar("levante_log_ids", default=_NONE)


def bind(**ids: str | None) -> None:
    """Attach ids to every record logged from now on in this task and the tasks it starts."""
    unknown = set(ids) - set(IDS)
    if unknown:
        raise ValueError(f"not a log id: {sorted(unknown)}")
    _bound.set({**_bound.get(), **{k: v for k, v in ids.items() if v}})


def execution_of(task_id: str) -> str | None:
    """The execution a task or assignment id belongs to (ids are ``EXECUTION.SEQ...``)."""
    execution_id, dot, _ = task_id.rpartition(".")
    return execution_id if dot and execution_id else None


class IdsFilter(logging.Filter):
    """Completes each record's ids from the bound context (never overriding ``extra``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _bound.get().items():
            if getattr(record, key, None) is None:
                setattr(record, key, value)
        task_id = getattr(record, "task_id", None)
        if task_id and getattr(record, "execution_id", None) is None:
            record.execution_id = execution_of(str(task_id))
        return True


def _ids(record: logging.LogRecord) -> dict[str, str]:
    found = {}
    for key in IDS:
        value = getattr(record, key, None)
        if value:
            found[key] = str(value)
    return found


class TextFormatter(logging.Formatter):
    """``TIME LEVEL LOGGER: MESSAGE [execution_id=... task_id=... worker_id=...]``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = _ids(record)
        if ids:
            line += " [" + " ".join(f"{k}={v}" for k, v in ids.items()) + "]"
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, the ids
    that are known, and ``exception`` with the traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{seconds}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **_ids(record),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


def configure(log_format: str = "text", level: str = "INFO", stream: TextIO | None = None) -> None:
    """Send every record at ``level`` or above to ``stream`` (stderr), in ``log_format``."""
    if log_format not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, not {log_format!r}")
    numeric = logging.getLevelName(level.upper())
    if not isinstance(numeric, int):
        raise ValueError(f"unknown log level {level!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(IdsFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(numeric)
