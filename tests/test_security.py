"""Bearer tokens with roles, TLS and mutual TLS, and the configurable limits, through
real `levante serve`, `levante worker` and CLI processes on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from conftest import read_log
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support.processes import ROOT, SUPPORT, EngineServer, LevanteProcess, Worker, wait_for

from levante.client import Client
from levante.errors import (
    LevanteError,
    LimitExceededError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from levante.limits import Limits, check_json_text, check_json_value, json_text_depth_exceeds
from levante.rpc.auth import AuthInterceptor, hash_token, load_tokens, parse_tokens, roles_for
from levante.v1 import levante_pb2 as pb
from levante.v1 import levante_pb2_grpc as pb_grpc

TOKENS = {
    "client": "client-token-7f3a9c",
    "worker": "worker-token-51d2e8",
    "admin": "admin-token-c04b61",
}

ECHO = """
version: '2.0'
echo:
  input: [word]
  output:
    said: <% $.said %>
  tasks:
    say:
      action: std.echo output=<% $.word %>
      publish:
        said: <% task().result %>
"""


def levante(*args: str, env: dict[str, str] | None = None,
            stdin: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LEVANTE_")}
    full_env["PYTHONPATH"] = os.pathsep.join([str(SUPPORT), str(ROOT / "src")])
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "levante", "--log-level", "WARNING", *args],
        capture_output=True, text=True, timeout=120, cwd=ROOT, env=full_env, input=stdin,
    )  # fmt: skip


def bearer(role: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {TOKENS[role]}"),)


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as e:
        return e.code()
    return grpc.StatusCode.OK


async def stream_code(stub: pb_grpc.WorkersStub, metadata: Any) -> tuple[grpc.StatusCode, str]:
    """The status of a Subscribe refused on its metadata alone.

    No message is sent: a hello racing the refusal can end the call on the client's side
    with INTERNAL ("Failed execute_batch") instead of the server's code.
    """
    call = stub.Subscribe(metadata=metadata)
    code = await asyncio.wait_for(call.code(), 30)
    return code, await call.details() or ""


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.txt"
    lines = ["# role:sha256 of the token"]
    lines += [f"{role}:{hash_token(token)}" for role, token in TOKENS.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def auth_server(store_url: str, tokens_file: Path) -> Iterator[EngineServer]:
    engine = EngineServer(store_url, extra=["--auth-tokens", str(tokens_file)]).start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
async def channel(auth_server: EngineServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(auth_server.address) as ch:
        yield ch


# ---------------------------------------------------------------- tokens, pure


def test_token_table_parsing_and_errors(tmp_path: Path) -> None:
    digest = hash_token("s3cret")
    assert digest == hashlib.sha256(b"s3cret").hexdigest()
    entries = parse_tokens(f"# comment\n\nclient:{digest}  # ci\nadmin:{digest.upper()}\n", "f")
    assert [(e.role, e.digest) for e in entries] == [("client", digest), ("admin", digest)]
    assert len(parse_tokens(f"worker:{digest}, client:{digest}", "env")) == 2
    with pytest.raises(ValueError, match="line 2: role 'root'"):
        parse_tokens(f"client:{digest}\nroot:{digest}", "f")
    with pytest.raises(ValueError, match="not the token itself"):
        parse_tokens("client:s3cret", "f")
    path = tmp_path / "t.txt"
    path.write_text(f"client:{digest}\n")
    both = load_tokens(path, f"worker:{digest}")
    assert [e.role for e in both] == ["client", "worker"]


def test_roles_by_method() -> None:
    assert roles_for("/levante.v1.Engine/Run") == {"client", "admin"}
    assert roles_for("/levante.v1.Engine/TaskComplete") == {"client", "worker", "admin"}
    assert roles_for("/levante.v1.Workers/Subscribe") == {"worker", "admin"}
    assert roles_for("/grpc.health.v1.Health/Check") == frozenset()  # no token needed
    assert roles_for("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") == {
        "client", "worker", "admin"}  # fmt: skip
    assert roles_for("/some.Other/Method") == {"admin"}
    interceptor = AuthInterceptor(parse_tokens(f"worker:{hash_token('w')}", "t"))
    assert isinstance(interceptor.check("/levante.v1.Engine/Run", ()), UnauthenticatedError)
    refused = interceptor.check("/levante.v1.Engine/Run", [("authorization", "Bearer w")])
    assert isinstance(refused, PermissionDeniedError)
    assert interceptor.check("/levante.v1.Workers/Subscribe", [("authorization", "bearer w")]) \
        is None  # fmt: skip
    assert AuthInterceptor(()).check("/levante.v1.Engine/Run", ()) is None  # auth off


def test_token_commands() -> None:
    made = levante("token", "new")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert len(token) >= 40
    hashed = levante("token", "hash", "worker", stdin=token + "\n")
    assert hashed.returncode == 0, hashed.stderr
    assert hashed.stdout.strip() == f"worker:{hashlib.sha256(token.encode()).hexdigest()}"
    plain = levante("token", "hash", stdin=token)
    assert plain.stdout.strip() == hashlib.sha256(token.encode()).hexdigest()


# ---------------------------------------------------------------- auth, served


async def test_no_or_unknown_token_is_unauthenticated(channel: grpc.aio.Channel) -> None:
    engine = pb_grpc.EngineStub(channel)
    request = pb.GetStatusRequest(execution_id="x")
    assert await code_of(engine.GetStatus(request)) == grpc.StatusCode.UNAUTHENTICATED
    unknown = (("authorization", "Bearer not-a-token"),)
    assert await code_of(engine.GetStatus(request, metadata=unknown)) == (
        grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
    basic = (("authorization", f"Basic {TOKENS['client']}"),)
    assert await code_of(engine.GetStatus(request, metadata=basic)) == (
        grpc.StatusCode.UNAUTHENTICATED)  # fmt: skip
    # With the token, the call reaches the engine: an unknown execution.
    assert await code_of(engine.GetStatus(request, metadata=bearer("client"))) == (
        grpc.StatusCode.NOT_FOUND)  # fmt: skip
    code, details = await stream_code(pb_grpc.WorkersStub(channel), None)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in details


async def test_roles_decide_what_a_token_may_call(channel: grpc.aio.Channel) -> None:
    engine = pb_grpc.EngineStub(channel)
    workers = pb_grpc.WorkersStub(channel)
    run = pb.RunRequest(workflow="echo", definition=ECHO, input_json='{"word": "x"}')
    assert await code_of(engine.Run(run, metadata=bearer("worker"))) == (
        grpc.StatusCode.PERMISSION_DENIED)  # fmt: skip
    code, details = await stream_code(workers, bearer("client"))
    assert code == grpc.StatusCode.PERMISSION_DENIED and "client" in details, details
    # A worker may finish a deferred task: TaskComplete reaches the engine.
    complete = pb.TaskCompleteRequest(task_id="no-such-task", result_json="1")
    assert await code_of(engine.TaskComplete(complete, metadata=bearer("worker"))) == (
        grpc.StatusCode.NOT_FOUND)  # fmt: skip
    # admin may do everything.
    assert await code_of(engine.Run(run, metadata=bearer("admin"))) == grpc.StatusCode.OK
    listed = await engine.ListExecutions(pb.ListExecutionsRequest(), metadata=bearer("client"))
    assert len(listed.executions) == 1  # the refused Run stored nothing
    # Health checks need no token; reflection needs one of any role.
    health = health_pb2_grpc.HealthStub(channel)
    answer = await health.Check(health_pb2.HealthCheckRequest())
    assert answer.status == health_pb2.HealthCheckResponse.SERVING
    watch = health.Watch(health_pb2.HealthCheckRequest())
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def services(metadata: Any) -> list[str]:
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        async for response in reflect.ServerReflectionInfo(iter([ask]), metadata=metadata):
            return [s.name for s in response.list_services_response.service]
        return []

    # Refused before any message: send none (a request racing the refusal can end the
    # call client-side with INTERNAL "Failed execute_batch" instead of the server's code).
    refused = reflect.ServerReflectionInfo(metadata=None)
    assert await refused.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "levante.v1.Engine" in await services(bearer("worker"))


async def test_client_worker_and_cli_send_their_tokens(
    auth_server: EngineServer, worker_env: dict[str, str]
) -> None:
    # Started by hand: Worker() waits for an attachment that never comes.
    wrong = LevanteProcess(["worker", "--engine", auth_server.address],
                           env={**worker_env, "LEVANTE_TOKEN": TOKENS["client"]})  # fmt: skip
    worker = Worker(auth_server.address, env={**worker_env, "LEVANTE_TOKEN": TOKENS["worker"]})
    try:
        async with Client(auth_server.address, token=TOKENS["client"]) as client:
            execution_id = await client.run("echo", {"word": "hi"}, definition=ECHO)
            info = await client.wait(execution_id)
        assert info.state == "SUCCESS" and info.output == {"said": "hi"}
        wait_for(lambda: "PERMISSION_DENIED" in wrong.output(),
                 what="the worker holding a client token to be refused")  # fmt: skip
        async with Client(auth_server.address) as anonymous:
            with pytest.raises(UnauthenticatedError, match="bearer token"):
                await anonymous.get_status(execution_id)
        async with Client(auth_server.address, token=TOKENS["worker"]) as as_worker:
            with pytest.raises(PermissionDeniedError):
                await as_worker.get_status(execution_id)
    finally:
        worker.stop()
        wrong.terminate()
    shown = levante("status", execution_id, "--engine", auth_server.address,
                    "--token", TOKENS["admin"])  # fmt: skip
    assert shown.returncode == 0, shown.stderr
    assert "SUCCESS" in shown.stdout
    from_env = levante("history", execution_id, "--engine", auth_server.address,
                       env={"LEVANTE_TOKEN": TOKENS["client"]})  # fmt: skip
    assert from_env.returncode == 0 and "SUCCESS" in from_env.stdout, from_env.stderr
    refused = levante("status", execution_id, "--engine", auth_server.address)
    assert refused.returncode == 2 and "bearer token" in refused.stderr, refused.stderr


def test_tokens_from_the_environment(store_url: str) -> None:
    entries = f"client:{hash_token(TOKENS['client'])},admin:{hash_token(TOKENS['admin'])}"
    server = LevanteProcess(["serve", "--store", store_url, "--listen", "127.0.0.1:0"],
                            env={"LEVANTE_AUTH_TOKENS": entries})  # fmt: skip
    try:
        address = server.wait_for_line("levante listening on ", timeout=60).rsplit(" ", 1)[1]
        listed = levante("list", "--engine", address, "--token", TOKENS["client"])
        assert listed.returncode == 0, listed.stderr
        refused = levante("list", "--engine", address, "--token", TOKENS["worker"])
        assert refused.returncode == 2 and "not known" in refused.stderr, refused.stderr
    finally:
        server.terminate()
    bad = levante("serve", "--store", "memory://", "--listen", "127.0.0.1:0",
                  env={"LEVANTE_AUTH_TOKENS": "client:plaintext-token"})  # fmt: skip
    assert bad.returncode != 0 and "LEVANTE_AUTH_TOKENS" in bad.stderr, bad.stderr


# ---------------------------------------------------------------- TLS


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A throwaway CA, a server certificate for IP 127.0.0.1 and a client certificate."""
    where = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
             "-subj", "/CN=levante test CA", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=where)  # fmt: skip
    for name, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        (where / f"{name}.ext").write_text(
            f"subjectAltName=IP:127.0.0.1\nextendedKeyUsage={usage}\n"
            "basicConstraints=CA:FALSE\n"
        )
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN=levante test {name}", cwd=where)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "2",
                 "-extfile", f"{name}.ext", cwd=where)  # fmt: skip
    # A second CA that signed nothing here: trusting it must not be enough.
    _openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2",
             "-subj", "/CN=other CA", cwd=where)  # fmt: skip
    return where


def _tls_server(store_url: str, pki: Path, *extra: str) -> EngineServer:
    return EngineServer(store_url, extra=["--tls-cert", str(pki / "server.pem"),
                                          "--tls-key", str(pki / "server.key"), *extra]).start()


async def test_tls_server_and_client(store_url: str, pki: Path) -> None:
    server = _tls_server(store_url, pki)
    try:
        async with Client(server.address, tls_ca=pki / "ca.pem") as client:
            execution_id = await client.run("echo", {"word": "tls"}, definition=ECHO)
            assert (await client.get_status(execution_id)).workflow == "echo"
        async with Client(server.address) as plaintext:
            with pytest.raises(LevanteError):
                await plaintext.list_executions()
        async with Client(server.address, tls_ca=pki / "other.pem") as untrusting:
            with pytest.raises(LevanteError):
                await untrusting.list_executions()
        listed = levante("list", "--engine", server.address, "--tls-ca", str(pki / "ca.pem"))
        assert listed.returncode == 0 and execution_id in listed.stdout, listed.stderr
    finally:
        server.stop()


async def test_mutual_tls_with_tokens(store_url: str, pki: Path, tokens_file: Path,
                                      worker_env: dict[str, str]) -> None:  # fmt: skip
    server = _tls_server(store_url, pki, "--tls-ca", str(pki / "ca.pem"),
                         "--auth-tokens", str(tokens_file))  # fmt: skip
    tls_env = {"LEVANTE_TLS_CA": str(pki / "ca.pem"), "LEVANTE_TLS_CERT": str(pki / "client.pem"),
               "LEVANTE_TLS_KEY": str(pki / "client.key")}  # fmt: skip
    worker = Worker(server.address, env={**worker_env, **tls_env,
                                         "LEVANTE_TOKEN": TOKENS["worker"]})  # fmt: skip
    try:
        async with Client(server.address, tls_ca=pki / "ca.pem") as no_certificate:
            with pytest.raises(LevanteError):
                await no_certificate.list_executions()
        async with Client(server.address, token=TOKENS["client"], tls_ca=pki / "ca.pem",
                          tls_cert=pki / "client.pem", tls_key=pki / "client.key") as client:
            execution_id = await client.run("echo", {"word": "mtls"}, definition=ECHO)
            info = await client.wait(execution_id)
            assert info.state == "SUCCESS" and info.output == {"said": "mtls"}
        shown = levante("status", execution_id, "--engine", server.address,
                        "--token", TOKENS["client"], env=tls_env)  # fmt: skip
        assert shown.returncode == 0 and "SUCCESS" in shown.stdout, shown.stderr
        no_cert = levante("status", execution_id, "--engine", server.address,
                          "--token", TOKENS["client"], "--tls-ca", str(pki / "ca.pem"))
        assert no_cert.returncode != 0
    finally:
        worker.stop()
        server.stop()


def test_tls_flags_are_checked(pki: Path) -> None:
    half = levante("serve", "--store", "memory://", "--listen", "127.0.0.1:0",
                   "--tls-cert", str(pki / "server.pem"))  # fmt: skip
    assert half.returncode != 0 and "--tls-key" in half.stderr


# ---------------------------------------------------------------- limits


def test_limit_checks_pure() -> None:
    limits = Limits(input_bytes=100, result_bytes=200, json_depth=3)
    check_json_text('{"a": [[1]]}', "input_json", "input_bytes", limits)
    with pytest.raises(LimitExceededError, match=r"input_json: nested too deep.*max-json-depth=3"):
        check_json_text('{"a": [[[1]]]}', "input_json", "input_bytes", limits)
    # Brackets inside strings do not count.
    check_json_text('{"a": "[[[[[[[[", "b": "\\"[[[["}', "input_json", "input_bytes", limits)
    assert json_text_depth_exceeds("[" * 100_000, 64)
    with pytest.raises(LimitExceededError, match=r"params_json: 101 bytes.*max-input-bytes=100"):
        check_json_text('"' + "x" * 99 + '"', "params_json", "input_bytes", limits)
    with pytest.raises(LimitExceededError, match="max-result-bytes=200"):
        check_json_value({"r": "é" * 100}, "result_json", "result_bytes", limits)
    deep: Any = 1
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(LimitExceededError, match="max-json-depth"):
        check_json_value(deep, "result_json", "result_bytes", limits)
    with pytest.raises(ValueError, match="--max-with-items"):
        Limits(with_items=0)
    flags = [flag for _, flag, _, _ in Limits.options()]
    assert flags == ["max-definition-bytes", "max-tasks-per-workflow", "max-input-bytes",
                     "max-result-bytes", "max-json-depth", "max-with-items"]  # fmt: skip


@pytest.fixture
def small_limits(store_url: str) -> Iterator[EngineServer]:
    engine = EngineServer(store_url, extra=[
        "--max-definition-bytes", "2000", "--max-tasks-per-workflow", "3",
        "--max-input-bytes", "1000", "--max-result-bytes", "1000", "--max-json-depth", "5",
        "--max-with-items", "4",
    ]).start()  # fmt: skip
    try:
        yield engine
    finally:
        engine.stop()


ITEMS = """
version: '2.0'
items:
  input: [xs]
  tasks:
    each:
      with-items: x in <% $.xs %>
      action: std.echo output=<% $.x %>
"""

RESULTS = """
version: '2.0'
big_result:
  tasks:
    big:
      action: std.echo
      input:
        output: "{{ 'r' * 1200 }}"
deferred:
  tasks:
    later:
      action: test.wait_deferred
"""


async def test_configured_limits_refuse_with_their_names(
    small_limits: EngineServer, worker_env: dict[str, str], action_log: Path
) -> None:
    worker = Worker(small_limits.address, env=worker_env)
    try:
        async with Client(small_limits.address) as client:
            await _limits_refuse(client, action_log)
    finally:
        worker.stop()


async def _limits_refuse(client: Client, action_log: Path) -> None:
    too_long = ECHO + "# " + "x" * 2000 + "\n"
    with pytest.raises(LimitExceededError, match=r"definition: \d+ bytes.*max-definition-b"):
        await client.register_workflows(too_long)
    four = "version: '2.0'\nfour:\n  tasks:\n" + "".join(
        f"    t{i}:\n      action: std.noop\n" for i in range(4))
    with pytest.raises(LimitExceededError, match=r"workflow 'four' \(line 2\): 4 tasks.*"
                                                 r"max-tasks-per-workflow=3"):  # fmt: skip
        await client.register_workflows(four)
    assert await client.register_workflows(ECHO) == ["echo"]
    with pytest.raises(LimitExceededError, match=r"input_json.*max-input-bytes=1000"):
        await client.run("echo", {"word": "x" * 1000})
    with pytest.raises(LimitExceededError, match=r"params_json.*max-input-bytes=1000"):
        await client.run("echo", {"word": "x"}, params={"env": {"pad": "y" * 1000}})
    nested: Any = "x"
    for _ in range(6):
        nested = [nested]
    with pytest.raises(LimitExceededError, match=r"input_json: nested too deep.*depth=5"):
        await client.run("echo", {"word": nested})
    assert (await client.list_executions())[0] == []

    # with-items beyond the limit: the task fails, saying which limit.
    execution_id = await client.run("items", {"xs": [1, 2, 3, 4, 5]}, definition=ITEMS)
    failed = await client.wait(execution_id)
    assert failed.state == "ERROR"
    assert "with-items: 5 items, more than the limit max-with-items=4" in failed.state_info
    assert failed.tasks[0].state == "ERROR"
    ok = await client.wait(await client.run("items", {"xs": [1, 2, 3, 4]}))
    assert ok.state == "SUCCESS" and ok.tasks[0].result == [1, 2, 3, 4]

    # A worker's result over the limit fails its task (the worker cannot send less).
    await client.register_workflows(RESULTS)
    big = await client.wait(await client.run("big_result"))
    assert big.state == "ERROR"
    assert big.tasks[0].result["type"] == "LimitExceeded"
    assert "max-result-bytes=1000" in big.tasks[0].result["message"]

    # TaskComplete over the limit is refused and changes nothing; a smaller one is taken.
    execution_id = await client.run("deferred")
    task_id = wait_for(lambda: [line.split()[1] for line in read_log(action_log)
                                if line.startswith("deferred")], what="the deferral")[0]
    waiting = await client.get_status(execution_id)
    with pytest.raises(LimitExceededError, match=r"result_json.*max-result-bytes=1000"):
        await client.task_complete(task_id, result="z" * 1000)
    with pytest.raises(LimitExceededError, match="error_json: nested too deep"):
        await client.task_complete(task_id, error=[[[[[["deep"]]]]]])
    assert await client.get_status(execution_id) == waiting
    await client.task_complete(task_id, result="small")
    assert (await client.wait(execution_id)).state == "SUCCESS"

