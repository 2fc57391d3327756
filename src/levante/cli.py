"""The ``levante`` command: serve, worker, run, status. A thin layer over the library."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from levante import settings
from levante.client import Client, ExecutionInfo, TaskInfo
from levante.errors import LevanteError
from levante.observability import logs

DEFAULT_STORE = "sqlite:///levante.db"
DEFAULT_LISTEN = "127.0.0.1:50051"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="levante", description="A lazy, persistent workflow engine.")
    p.add_argument(
        "--log-level",
        default=os.environ.get("LEVANTE_LOG_LEVEL"),
        help="DEBUG, INFO, WARNING... (default: INFO for serve and worker, WARNING otherwise)",
    )
    sub = p.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve", help="run the engine's gRPC server",
        description="Run the engine's gRPC server. Each setting comes from its flag, else its "
        "environment variable, else the --config file, else its default.",
    )  # fmt: skip
    serve.add_argument("--store", default=DEFAULT_STORE,
                       help="sqlite:///PATH, postgresql://USER@HOST:PORT/DB or memory://")
    serve.add_argument("--listen", default=DEFAULT_LISTEN,
                       help="HOST:PORT of the gRPC server; port 0 picks a free one")
    serve.add_argument(
        "--lease-seconds", type=float, default=60.0,
        help="how long a worker holds an assignment without a heartbeat",
    )  # fmt: skip
    serve.add_argument(
        "--poll-seconds", type=float, default=1.0,
        help="how often to look for work queued by other replicas sharing the store; "
        "0 when this server is the store's only engine",
    )
    serve.add_argument(
        "--grace-seconds", type=float, default=5.0,
        help="on SIGTERM, how long calls in flight (workers' streams too) may go on",
    )  # fmt: skip
    serve.add_argument(
        "--metrics-listen", default="", metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics",
    )  # fmt: skip
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="text for people, json for one JSON object per line")  # fmt: skip
    serve.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    _add_security_and_limit_options(serve)
    settings.layer(serve, env={"auth_tokens": "LEVANTE_AUTH_TOKENS_FILE"})  # after every option

    worker = sub.add_parser("worker", help="run a worker serving the std actions and yours")
    worker.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(worker)
    worker.add_argument(
        "--actions", action="append", default=[], metavar="MODULE",
        help="a module whose @action functions to serve (repeatable)",
    )  # fmt: skip
    worker.add_argument("--concurrency", type=int, default=10)
    worker.add_argument("--worker-id", default=None)
    worker.add_argument("--heartbeat-seconds", type=float, default=10.0)
    worker.add_argument(
        "--target", action="append", default=[], metavar="NAME",
        help="also take tasks whose `target:` is NAME (repeatable)",
    )  # fmt: skip

    run = sub.add_parser("run", help="run a workflow file and print its output")
    run.add_argument("file", type=Path)
    run.add_argument("-w", "--workflow", default=None)
    run.add_argument("-i", "--input", default="{}", help="JSON, or @file.json")
    run.add_argument("--params", default="{}", help="JSON start params (env, task_name)")
    run.add_argument("--engine", default=None, help="HOST:PORT of a server; embedded if absent")
    _add_connection_options(run)
    run.add_argument(
        "--store", default=DEFAULT_STORE, help="store of the embedded engine (default %(default)s)"
    )
    run.add_argument("--actions", action="append", default=[], metavar="MODULE")
    run.add_argument("--timeout", type=float, default=3600.0)

    status = sub.add_parser("status", help="show an execution and its tasks")
    status.add_argument("execution_id")
    status.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(status)
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")

    listing = sub.add_parser("list", help="list executions, newest first")
    listing.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(listing)
    listing.add_argument("--state", default="", help="only executions in this state")
    listing.add_argument("--workflow", default="", help="only executions of this workflow")
    listing.add_argument("--limit", type=int, default=50)

    watch = sub.add_parser("watch", help="a live view of an execution's tasks until it ends")
    watch.add_argument("execution_id")
    watch.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(watch)

    history = sub.add_parser("history", help="every state change of an execution")
    history.add_argument("execution_id")
    history.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(history)

    for verb, text in (("pause", "pause an execution: running actions finish, nothing new starts"),
                       ("resume", "resume a paused execution"),
                       ("cancel", "cancel an execution")):  # fmt: skip
        lifecycle = sub.add_parser(verb, help=text)
        lifecycle.add_argument("execution_id")
        lifecycle.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
        _add_connection_options(lifecycle)
        if verb == "cancel":
            lifecycle.add_argument("--reason", default="")

    rerun = sub.add_parser("rerun", help="run a failed task again and carry the execution on")
    rerun.add_argument("execution_id")
    rerun.add_argument("task_name")
    rerun.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(rerun)

    token = sub.add_parser("token", help="make bearer tokens for levante serve --auth-tokens")
    token_sub = token.add_subparsers(dest="token_command", required=True)
    token_sub.add_parser("new", help="print a new random token")
    token_hash = token_sub.add_parser(
        "hash", help="read a token from stdin; print its SHA-256 (as ROLE:HASH with a role)"
    )
    token_hash.add_argument("role", nargs="?", choices=("client", "worker", "admin"))

    from levante import graph as graphs

    graph = sub.add_parser("graph", help="draw a workflow file or an execution as a graph")
    graphs.add_arguments(graph)
    graph.add_argument("--engine", default=os.environ.get("LEVANTE_ENGINE", DEFAULT_LISTEN))
    _add_connection_options(graph)
    return p


def _add_connection_options(command: argparse.ArgumentParser) -> None:
    """How a client command or a worker reaches a server that wants a token or TLS."""
    command.add_argument(
        "--token", default=os.environ.get("LEVANTE_TOKEN"),
        help="bearer token sent with every call (env LEVANTE_TOKEN)",
    )  # fmt: skip
    command.add_argument(
        "--tls-ca", default=os.environ.get("LEVANTE_TLS_CA"), metavar="PEM",
        help="CA certificate that signed the server's; turns TLS on (env LEVANTE_TLS_CA)",
    )  # fmt: skip
    command.add_argument(
        "--tls-cert", default=os.environ.get("LEVANTE_TLS_CERT"), metavar="PEM",
        help="client certificate, for a server that requires one (env LEVANTE_TLS_CERT)",
    )  # fmt: skip
    command.add_argument(
        "--tls-key", default=os.environ.get("LEVANTE_TLS_KEY"), metavar="PEM",
        help="the client certificate's private key (env LEVANTE_TLS_KEY)",
    )  # fmt: skip


def _add_security_and_limit_options(serve: argparse.ArgumentParser) -> None:
    from levante.limits import Limits

    serve.add_argument(
        "--auth-tokens", default=None, metavar="FILE",
        help="file of ROLE:SHA256HEX lines (roles client, worker, admin; see levante token); "
        "entries in env LEVANTE_AUTH_TOKENS are added. No entries: authentication is off",
    )  # fmt: skip
    serve.add_argument("--tls-cert", default=None, metavar="PEM",
                       help="server certificate: serve TLS (with --tls-key)")  # fmt: skip
    serve.add_argument("--tls-key", default=None, metavar="PEM",
                       help="the server certificate's private key")  # fmt: skip
    serve.add_argument(
        "--tls-ca", default=None, metavar="PEM",
        help="CA of client certificates: with it, every client must present one (mutual TLS)",
    )  # fmt: skip
    for name, flag, default, text in Limits.options():
        serve.add_argument(f"--{flag}", dest=f"max_{name}", type=int, default=default,
                           metavar="N", help=f"limit: {text} (default %(default)s)")  # fmt: skip


def _security_and_limits(args: argparse.Namespace) -> dict[str, Any]:
    """ServerConfig fields from the serve flags of _add_security_and_limit_options."""
    from levante.limits import Limits
    from levante.rpc.auth import load_tokens

    if bool(args.tls_cert) != bool(args.tls_key):
        raise SystemExit("levante: --tls-cert and --tls-key go together")
    if args.tls_ca and not args.tls_cert:
        raise SystemExit("levante: --tls-ca (client certificates) needs --tls-cert and --tls-key")
    try:
        tokens = load_tokens(args.auth_tokens, os.environ.get("LEVANTE_AUTH_TOKENS"))
        limits = Limits(**{name: getattr(args, f"max_{name}") for name, *_ in Limits.options()})
    except (OSError, ValueError) as e:
        raise SystemExit(f"levante: {e}") from None
    return {
        "auth_tokens": tokens, "limits": limits,
        "tls_cert": args.tls_cert or "", "tls_key": args.tls_key or "", "tls_ca": args.tls_ca or "",
    }  # fmt: skip


def _client(args: argparse.Namespace) -> Client:
    """A Client for ``args.engine`` with the command's token and TLS options."""
    try:
        return Client(
            args.engine,
            token=getattr(args, "token", None),
            tls_ca=getattr(args, "tls_ca", None),
            tls_cert=getattr(args, "tls_cert", None),
            tls_key=getattr(args, "tls_key", None),
        )
    except (OSError, ValueError) as e:
        raise SystemExit(f"levante: {e}") from None


_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _startup_done() -> None:
    """A long-lived process has started: what exists now (modules, the expression
    grammars, protobuf descriptors, the user's action modules) lives as long as it.
    gc.freeze() takes it out of the collector's sight, so that a full collection walks
    only what came after instead of stalling every stream for tens of milliseconds."""
    if os.environ.get("LEVANTE_GC_FREEZE", "1") != "0":
        gc.freeze()


def _run_service(main: Coroutine[Any, Any, int]) -> int:
    """Run a long-lived process (``serve``, ``worker``) on uvloop where it is installed:
    its event loop costs a fraction of asyncio's, which a process that handles thousands
    of messages a second spends much of its time in (chain steps 1.2 -> 1.0 ms in
    scripts/bench). LEVANTE_EVENT_LOOP=asyncio keeps the standard loop."""
    if os.environ.get("LEVANTE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:  # not on this platform (Windows): the standard loop
            pass
        else:
            return uvloop.run(main)
    return asyncio.run(main)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = args.log_level or ("INFO" if args.command in ("serve", "worker") else "WARNING")
    if level.upper() not in _LOG_LEVELS:
        raise SystemExit(f"levante: --log-level: {level!r} is not one of {', '.join(_LOG_LEVELS)}")
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        command: Callable[[argparse.Namespace], Coroutine[Any, Any, int]] = {
            "serve": _serve,
            "worker": _worker,
            "run": _run,
            "status": _status,
            "list": _list,
            "watch": _watch,
            "history": _history,
            "pause": _lifecycle,
            "resume": _lifecycle,
            "cancel": _lifecycle,
            "rerun": _lifecycle,
            "token": _token,
            "graph": _graph,
        }[args.command]
        if args.command in ("serve", "worker"):
            return _run_service(command(args))
        return asyncio.run(command(args))
    except LevanteError as e:
        print(f"levante: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------- serve / worker


async def _serve(args: argparse.Namespace) -> int:
    from levante.observability.metrics import split_host_port
    from levante.rpc.server import LevanteServer, ServerConfig, serve

    try:
        settings.resolve(args)
        logs.configure(args.log_format, args.log_level)
        if args.metrics_listen:
            split_host_port(args.metrics_listen)
    except ValueError as e:
        raise SystemExit(f"levante: {e}") from None

    def ready(server: LevanteServer) -> None:
        _startup_done()
        if server.metrics_url:
            print(f"levante metrics on {server.metrics_url}", flush=True)
        print(f"levante listening on {server.address}", flush=True)

    config = ServerConfig(store=args.store, listen=args.listen, lease_seconds=args.lease_seconds,
                          poll_seconds=args.poll_seconds, grace_seconds=args.grace_seconds,
                          metrics_listen=args.metrics_listen)  # fmt: skip
    config = dataclasses.replace(config, **_security_and_limits(args))
    try:
        await serve(config, ready)
    except OSError as e:  # an address in use, a port that cannot be bound
        raise SystemExit(f"levante: {e}") from None
    return 0


async def _worker(args: argparse.Namespace) -> int:
    import signal

    from levante.worker import default_registry, load_action_modules, serve_worker
    from levante.worker.std import std_actions

    load_action_modules(args.actions)
    registry = std_actions().include(default_registry)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"levante worker serving {len(registry)} actions for {args.engine}", flush=True)
    _startup_done()
    await serve_worker(
        args.engine,
        registry,
        capacity=args.concurrency,
        worker_id=args.worker_id,
        stop=stop,
        heartbeat_seconds=args.heartbeat_seconds,
        targets=args.target,
        token=args.token,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        on_attached=lambda: print(f"levante worker attached to {args.engine}", flush=True),
    )
    # serve_worker has delivered what it could within its grace period. A plain
    # (thread-run) action that never returns cannot be interrupted and would keep the
    # interpreter alive for ever: leave now. Its assignment's lease runs out and it
    # is tried again elsewhere.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


# ---------------------------------------------------------------- run / status


def _read_json_arg(text: str, what: str) -> Any:
    if text.startswith("@"):
        text = Path(text[1:]).read_text()
    try:
        return json.loads(text)
    except ValueError as e:
        raise SystemExit(f"levante: {what} is not valid JSON: {e}") from None


def _pick_workflow(names: list[str], wanted: str | None) -> str:
    if wanted:
        return wanted
    if len(names) == 1:
        return names[0]
    raise SystemExit(f"levante: the file defines several workflows {names}; choose one with -w")


async def _run(args: argparse.Namespace) -> int:
    definition = args.file.read_text()
    workflow_input = _read_json_arg(args.input, "--input")
    params = _read_json_arg(args.params, "--params")
    if args.engine:
        async with _client(args) as client:
            names = await client.register_workflows(definition)
            workflow = _pick_workflow(names, args.workflow)
            execution_id = await client.run(workflow, workflow_input, params=params)
            print(f"execution {execution_id} of {workflow}", flush=True)
            info = await _follow(client.get_status, execution_id, args.timeout)
    else:
        from levante.runner import LocalEngine
        from levante.worker import default_registry, load_action_modules

        load_action_modules(args.actions)
        async with LocalEngine(store=args.store, actions=default_registry) as local:
            names = await local.register(definition)
            workflow = _pick_workflow(names, args.workflow)
            execution_id = await local.start(workflow, workflow_input, params=params)
            print(f"execution {execution_id} of {workflow} (embedded, {args.store})", flush=True)
            info = await _follow(local.status, execution_id, args.timeout)
    if info.state_info:
        print(f"{info.state}: {info.state_info}", flush=True)
    print(json.dumps(info.output, indent=2, sort_keys=True), flush=True)
    return 0 if info.state == "SUCCESS" else 1


async def _follow(
    get_status: Callable[[str], Awaitable[ExecutionInfo]], execution_id: str, timeout: float
) -> ExecutionInfo:
    """Print each task's state changes as they happen until the execution ends."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while True:
        info = await get_status(execution_id)
        for task in info.tasks:
            if seen.get(task.id) != task.state:
                seen[task.id] = task.state
                print(f"  {task.name:<24} {task.state:<16} {_short(task)}", flush=True)
        if info.is_final:
            print(f"execution {execution_id} {info.state}", flush=True)
            return info
        if time.monotonic() > deadline:
            raise SystemExit(f"levante: gave up after {timeout}s; execution is {info.state}")
        await asyncio.sleep(0.05)


def _short(task: TaskInfo) -> str:
    if task.state == "ERROR":
        return task.state_info[:80]
    if task.state == "SUCCESS" and task.result is not None:
        return json.dumps(task.result)[:80]
    return task.action


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        info = await client.get_status(args.execution_id)
    if args.json:
        print(json.dumps(_info_dict(info), indent=2, sort_keys=True))
        return 0
    print(f"execution  {info.id}")
    print(f"workflow   {info.workflow}")
    print(f"state      {info.state}")
    if info.state_info:
        print(f"state_info {info.state_info}")
    print(f"input      {json.dumps(info.input)}")
    if info.is_final:
        print(f"output     {json.dumps(info.output)}")
    print()
    rows = [("TASK", "STATE", "ACTION", "ATTEMPT", "ID")]
    rows += [(t.name, t.state, t.action, str(t.attempt), t.id) for t in info.tasks]
    _print_table(rows)
    return 0


async def _list(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        found, _ = await client.list_executions(
            state=args.state, workflow=args.workflow, page_size=args.limit
        )
    rows = [("EXECUTION", "WORKFLOW", "STATE", "CREATED")]
    rows += [(e.id, e.workflow, e.state, time.strftime("%Y-%m-%d %H:%M:%S",
                                                       time.localtime(e.created_at)))
             for e in found]  # fmt: skip
    _print_table(rows)
    return 0


async def _lifecycle(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        if args.command == "pause":
            info = await client.pause(args.execution_id)
        elif args.command == "resume":
            info = await client.resume(args.execution_id)
        elif args.command == "cancel":
            info = await client.cancel(args.execution_id, args.reason)
        else:
            info = await client.rerun(args.execution_id, args.task_name)
    print(f"execution {info.id} {info.state}")
    return 0


async def _history(args: argparse.Namespace) -> int:
    async with _client(args) as client:
        events = await client.history(args.execution_id)
    rows = [("SEQ", "AT", "WHAT", "STATE", "CAUSE", "INFO")]
    for e in events:
        at = time.strftime("%H:%M:%S", time.localtime(e.at)) + f".{int(e.at % 1 * 1000):03d}"
        info = e.state_info.splitlines()[0][:60] if e.state_info else ""
        rows.append((str(e.seq), at, e.task_name or "(execution)", e.state, e.cause, info))
    _print_table(rows)
    return 0


async def _watch(args: argparse.Namespace) -> int:
    """Redraw the task table on every change, until the execution ends."""
    tasks: dict[str, tuple[str, str, str]] = {}
    state = "?"
    interactive = sys.stdout.isatty()
    async with _client(args) as client:
        async for event in client.watch(args.execution_id):
            if event.kind == "execution":
                state = event.state
            else:
                tasks[event.task_id] = (event.task_name, event.state, event.state_info)
            if interactive:
                print("\x1b[2J\x1b[H", end="")
                print(f"execution {args.execution_id}  {state}\n")
                rows = [("TASK", "STATE", "INFO")]
                rows += [(n, s, i.splitlines()[0][:60] if i else "") for n, s, i in tasks.values()]
                _print_table(rows)
            else:
                what = event.task_name or "(execution)"
                print(f"{what:<24} {event.state:<16} {event.cause}", flush=True)
    print(f"execution {args.execution_id} {state}")
    return 0 if state == "SUCCESS" else 1


async def _graph(args: argparse.Namespace) -> int:
    from levante import graph

    return await graph.command(args, lambda: _client(args))


async def _token(args: argparse.Namespace) -> int:
    from levante.rpc.auth import hash_token, new_token

    if args.token_command == "new":
        print(new_token())
        return 0
    token = sys.stdin.readline().strip()
    if not token:
        raise SystemExit("levante: token hash reads the token from stdin; got nothing")
    digest = hash_token(token)
    print(f"{args.role}:{digest}" if args.role else digest)
    return 0


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _info_dict(info: ExecutionInfo) -> dict[str, Any]:
    return {
        "execution_id": info.id,
        "workflow": info.workflow,
        "state": info.state,
        "state_info": info.state_info,
        "input": info.input,
        "output": info.output,
        "tasks": [t.__dict__ for t in info.tasks],
    }


if __name__ == "__main__":
    sys.exit(main())
