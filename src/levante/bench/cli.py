"""``python -m levante.bench``: options, the loop over stores, scenarios and runs, the report.

A scenario that fails (a deadline passed, a process died, an execution did not
succeed) is reported with the engine's and workers' last output lines, its remaining
runs are skipped, the other scenarios still run, and the exit status is 1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import os
import pstats
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from levante.bench.report import Failure, Result, format_value, machine, table, write_json
from levante.bench.scenarios import FULL, QUICK, QUICK_DEADLINE_SECONDS, SCENARIOS, RunContext
from levante.bench.stores import STORE_KINDS, postgres_problem

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m levante.bench",
        description="Benchmark a real levante serve + levante worker setup on 127.0.0.1.",
    )
    p.add_argument("--runs", type=int, default=3, help="runs of each scenario (default 3)")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    p.add_argument(
        "--store",
        action="append",
        choices=STORE_KINDS,
        help="store to benchmark (repeatable; default sqlite)",
    )
    p.add_argument(
        "--only",
        action="append",
        choices=list(SCENARIOS),
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument(
        "--replicas", type=int, default=1,
        help="engine processes sharing the store, workers spread over them (default 1); "
        "the engine CPU figures are those of the first replica",
    )  # fmt: skip
    p.add_argument("--concurrency", type=int, default=50, help="per worker (default 50)")
    p.add_argument(
        "--profile-engine",
        type=Path,
        metavar="DIR",
        help="run the engine under cProfile; write DIR/SCENARIO-STORE-runN.prof, print its top",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    p.add_argument(
        "--taskflow-path",
        type=Path,
        metavar="DIR",
        help="append DIR to sys.path to find taskflow (e.g. pip install --target DIR taskflow)",
    )
    return p


def _unique(values: Sequence[str] | None, default: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values or default))


def _terminate(signum: int, frame: FrameType | None) -> None:
    # Unwind normally, so that every started process is stopped by its PID.
    raise SystemExit(128 + signum)


def _profile_top(path: Path, n: int = 12) -> str:
    if not path.exists():
        return f"(no profile written to {path})"
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out)
    stats.strip_dirs().sort_stats("tottime").print_stats(n)
    text = out.getvalue()
    start = text.find("   ncalls")
    return text[start:].rstrip() if start >= 0 else text.rstrip()


async def _bench(args: argparse.Namespace, command: str) -> int:
    stores = _unique(args.store, ["sqlite"])
    names = _unique(args.only, list(SCENARIOS))
    workdir = Path(tempfile.mkdtemp(prefix="levante-bench-"))
    info = machine()
    print(f"levante bench: {command}")
    print(f"machine: {info['cores']} cores, {info['cpu_model']}, Python {info['python']}")
    print(
        f"stores: {', '.join(stores)}; scenarios: {', '.join(names)}; runs: {args.runs}"
        f"{'; quick sizes' if args.quick else ''}; work dir {workdir}",
        flush=True,
    )
    results: dict[tuple[str, str, str, str], Result] = {}
    failures: list[Failure] = []
    notes: list[str] = []
    run_log: list[dict[str, Any]] = []
    began = time.monotonic()
    if args.profile_engine is not None:
        args.profile_engine.mkdir(parents=True, exist_ok=True)
    try:
        for store in stores:
            if store == "postgresql":
                problem = await postgres_problem()
                if problem is not None:
                    notes.append(f"postgresql skipped: {problem}")
                    print(f"postgresql skipped: {problem}", flush=True)
                    continue
            for name in names:
                scenario = SCENARIOS[name]
                limit = QUICK_DEADLINE_SECONDS if args.quick else scenario.deadline_seconds
                for run in range(1, args.runs + 1):
                    ctx = RunContext(
                        scenario=name,
                        store=store,
                        run=run,
                        run_dir=workdir / f"{name}-{store}-{run}",
                        quick=args.quick,
                        workers=args.workers,
                        replicas=args.replicas,
                        concurrency=args.concurrency,
                        profile_dir=args.profile_engine if scenario.uses_server else None,
                        notes=notes,
                        deadline=time.monotonic() + limit,
                    )
                    ctx.run_dir.mkdir(parents=True)
                    run_began = time.monotonic()
                    load = os.getloadavg()[0]
                    try:
                        samples = await asyncio.wait_for(scenario.run(ctx), limit + 120)
                    except Exception as e:
                        error = f"{type(e).__name__}: {e}" if str(e) else repr(e)
                        failures.append(Failure(name, store, run, error))
                        print(f"FAILED {scenario.title} [{store}] run {run}: {error}", flush=True)
                        break
                    for s in samples:
                        key = (name, store, s.figure, s.size)
                        if key not in results:
                            results[key] = Result(name, store, s.figure, s.unit, s.size)
                        results[key].values.append(s.value)
                    shown = ", ".join(
                        f"{s.figure} {format_value(s.value)} {s.unit}"
                        for s in samples
                        if "CPU" not in s.figure
                    )
                    seconds = time.monotonic() - run_began
                    print(
                        f"{scenario.title} [{store}] run {run}/{args.runs} ({seconds:.1f} s, "
                        f"load {load:.1f}): {shown}",
                        flush=True,
                    )
                    run_log.append(
                        {
                            "scenario": name,
                            "store": store,
                            "run": run,
                            "seconds": round(seconds, 1),
                            "loadavg_1min": load,
                        }
                    )
                    if ctx.profile_dir is not None:
                        path = ctx.profile_dir / f"{name}-{store}-run{run}.prof"
                        print(
                            f"engine profile {path} (main thread, by own time):\n"
                            + _profile_top(path),
                            flush=True,
                        )
    finally:
        if args.keep or failures:
            print(f"work directory kept (logs, stores): {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    ordered = list(results.values())
    print()
    print(table(ordered))
    for note in notes:
        print(f"note: {note}")
    for failure in failures:
        print(
            f"FAILED: {failure.scenario} [{failure.store}] run {failure.run}: "
            f"{failure.error.splitlines()[0] if failure.error else ''}"
        )
    print(f"total {time.monotonic() - began:.0f} s", flush=True)
    if args.json is not None:
        payload: dict[str, Any] = {
            "command": command,
            "started_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": info,
            "options": {
                "runs": args.runs,
                "quick": args.quick,
                "stores": stores,
                "scenarios": names,
                "workers": args.workers,
                "concurrency": args.concurrency,
            },
            "sizes": QUICK if args.quick else FULL,
            "results": [r.as_dict() for r in ordered],
            "failures": [f.as_dict() for f in failures],
            "run_log": run_log,
            "notes": notes,
            "seconds": round(time.monotonic() - began, 1),
        }
        write_json(args.json, payload)
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.runs < 1 or args.workers < 1 or args.concurrency < 1:
        print(
            "levante bench: --runs, --workers and --concurrency must be at least 1", file=sys.stderr
        )
        return 2
    if args.taskflow_path is not None:
        sys.path.append(str(args.taskflow_path))
    words = list(sys.argv[1:] if argv is None else argv)
    command = "python -m levante.bench " + shlex.join(words) if words else "python -m levante.bench"
    with contextlib.suppress(ValueError):  # not in the main thread: leave signals alone
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return asyncio.run(_bench(args, command.strip()))
    except KeyboardInterrupt:
        return 130
