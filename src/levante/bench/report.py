"""Figures over runs (median, min, max), the printed table, the machine, the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Failure", "Result", "Sample", "format_value", "machine", "table", "write_json"]


@dataclass(frozen=True)
class Sample:
    """One figure measured in one run."""

    figure: str
    value: float
    unit: str
    size: str = ""


@dataclass
class Result:
    """One figure of one scenario on one store, over all runs."""

    scenario: str
    store: str
    figure: str
    unit: str
    size: str
    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "store": self.store,
            "figure": self.figure,
            "size": self.size,
            "unit": self.unit,
            "runs": len(self.values),
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": self.values,
        }


@dataclass(frozen=True)
class Failure:
    scenario: str
    store: str
    run: int
    error: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "store": self.store,
            "run": self.run,
            "error": self.error,
        }


def format_value(value: float) -> str:
    magnitude = abs(value)
    if magnitude >= 1000:
        return f"{value:,.0f}"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 10:
        return f"{value:.1f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(results: list[Result]) -> str:
    rows = [("scenario", "store", "figure", "median", "min", "max", "unit")]
    for r in results:
        rows.append(
            (
                r.scenario,
                r.store,
                f"{r.figure} ({r.size})" if r.size else r.figure,
                format_value(r.median),
                format_value(r.min),
                format_value(r.max),
                r.unit,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    numeric = {3, 4, 5}
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.rjust(w) if i in numeric and n else c.ljust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _source_version() -> str:
    """The checkout's commit, with ``+dirty`` if its files differ from it."""
    root = Path(__file__).resolve().parents[3]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if commit.returncode != 0:
        return "unknown"
    return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> dict[str, Any]:
    return {
        "levante": _source_version(),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "executable": sys.executable,
    }


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
