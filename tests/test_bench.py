"""The benchmark runs end to end: a real engine and workers, one quick scenario, JSON out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_chain_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "levante.bench",
            "--quick",
            "--runs",
            "1",
            "--only",
            "chain",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    assert {"command", "machine", "options", "sizes", "results", "failures", "notes"} <= set(report)
    assert report["failures"] == []
    assert report["machine"]["cores"] >= 1 and report["machine"]["python"]
    [latency] = [r for r in report["results"] if r["figure"] == "latency"]
    assert latency["scenario"] == "chain" and latency["store"] == "sqlite"
    assert latency["unit"] == "ms/step" and latency["runs"] == 1
    assert 0 < latency["min"] <= latency["median"] <= latency["max"]
    assert "latency" in done.stdout and "median" in done.stdout  # the printed table
