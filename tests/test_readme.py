"""README.md's Python client example runs as written against a real server."""

from __future__ import annotations

import re
import subprocess
import sys

from support.processes import ROOT, EngineServer, Worker


def client_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### The Python client", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no python block under 'The Python client'"
    return match.group(1)


def test_the_readme_client_example_runs(server: EngineServer, worker_env: dict[str, str]) -> None:
    worker = Worker(server.address, env=worker_env)
    try:
        code = client_example().replace("127.0.0.1:50051", server.address)
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
            env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"},
        )  # fmt: skip
    finally:
        worker.stop()
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "SUCCESS {'greeting': 'Hello, Ada!'}" in out, out
    assert "not found:" in out
    assert re.search(r"\[\('[0-9a-f]+', 'SUCCESS'\)\]", out), out
