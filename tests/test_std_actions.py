"""Tests of std.test_dict, std.http, std.mistral_http and std.email.

Every action is called through ``invoke_action`` (argument binding, errors as data),
against servers started here on 127.0.0.1: a raw HTTP/1.1 server and a small SMTP
server, both on ``asyncio.start_server``. No external network, no fixed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email
import email.policy
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from http import HTTPStatus
from pathlib import Path
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

import pytest

from levante.worker import DEFERRED, ActionContext
from levante.worker.invoke import Invocation, invoke_action
from levante.worker.std import std_actions

DEADLINE = 10.0  # seconds any single wait may take before the test fails

CONTEXT = ActionContext(task_id="as-123", execution_id="ex-456", task_name="call", attempt=1)

HTTP_RESULT_KEYS = {
    "content", "status", "headers", "url", "history", "encoding", "reason", "cookies", "elapsed",
}

# A throwaway CA and a certificate for 127.0.0.1/localhost that it signed (valid
# 2000-2100), made for these tests only: they let std.email's STARTTLS and
# std.http's ``verify`` run against real TLS on 127.0.0.1.
TEST_CA_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBaDCCAQ6gAwIBAgICEAAwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPTGV2YW50
ZSB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAaMRgw
FgYDVQQDDA9MZXZhbnRlIHRlc3QgQ0EwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNC
AARfwxsNkO99uGYyea8ueAHsYhVy6t8N6/MHsMRpBNJHyZqjBePTGk2zH/1AlG+T
DDg5yjHxbETxnTFcxu2cdbKgo0IwQDAPBgNVHRMBAf8EBTADAQH/MA4GA1UdDwEB
/wQEAwIBBjAdBgNVHQ4EFgQU5/AR72A9Zkob/0A1AD+VFnXI6O4wCgYIKoZIzj0E
AwIDSAAwRQIhAIbc11u2B+m4h2aNDesVQnL1E27BMqk+47MXKxsdKXndAiAP7WbE
ij3WgIno9OPDaz2Q3CSN5bIK6IYvZSkP5WingQ==
-----END CERTIFICATE-----
"""
TEST_SERVER_PEM = """\
-----BEGIN CERTIFICATE-----
MIIBtDCCAVmgAwIBAgICEAEwCgYIKoZIzj0EAwIwGjEYMBYGA1UEAwwPTGV2YW50
ZSB0ZXN0IENBMCAXDTAwMDEwMTAwMDAwMFoYDzIxMDAwMTAxMDAwMDAwWjAUMRIw
EAYDVQQDDAlsb2NhbGhvc3QwWTATBgcqhkjOPQIBBggqhkjOPQMBBwNCAAQifUCb
LBA8e0amKnvDgRDWY1ExYefciwpQOVe11P1BnDpQ2uB5gIRVUwvHL4h3Tus2O80c
BInbtAS/ARE6azhBo4GSMIGPMAwGA1UdEwEB/wQCMAAwDgYDVR0PAQH/BAQDAgeA
MBMGA1UdJQQMMAoGCCsGAQUFBwMBMBoGA1UdEQQTMBGHBH8AAAGCCWxvY2FsaG9z
dDAdBgNVHQ4EFgQUCg4ZZNuK+oZHitP7aTnwGu+H7cIwHwYDVR0jBBgwFoAU5/AR
72A9Zkob/0A1AD+VFnXI6O4wCgYIKoZIzj0EAwIDSQAwRgIhAMBDVABq6c3erlWK
Gnc/dbpdLjs8i1CqGhqTRQB1VJRQAiEAlfwWc94lVOB7DykgT4PtT8zKemib7WH0
QMcnAYgXa4Q=
-----END CERTIFICATE-----
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg4T9dAWGbc37SAPv/
E6m1iBDAs2XE9vAKxFENAxA4z4WhRANCAAQifUCbLBA8e0amKnvDgRDWY1ExYefc
iwpQOVe11P1BnDpQ2uB5gIRVUwvHL4h3Tus2O80cBInbtAS/ARE6azhB
-----END PRIVATE KEY-----
"""


async def within(awaitable: Awaitable[Any], timeout: float = DEADLINE) -> Any:
    return await asyncio.wait_for(awaitable, timeout)


async def run(action: str, action_input: Any, context: ActionContext = CONTEXT) -> Invocation:
    """The full invocation path, as the worker runtime takes it."""
    invocation: Invocation = await within(
        invoke_action(std_actions(), action, action_input, context)
    )
    return invocation


def failure(invocation: Invocation) -> dict[str, Any]:
    assert not invocation.ok, invocation
    assert isinstance(invocation.value, dict), invocation
    return invocation.value


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """httpx honours *_PROXY variables; requests to 127.0.0.1 must go straight there."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture
def tls_files(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(CA bundle, server certificate chain and key) as files."""
    ca = tmp_path / "ca.pem"
    ca.write_text(TEST_CA_PEM)
    server = tmp_path / "server.pem"
    server.write_text(TEST_SERVER_PEM)
    yield ca, server


def server_tls(server_pem: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(server_pem)
    return context


# ---------------------------------------------------------------- local servers


class LocalServer:
    """``asyncio.start_server`` on 127.0.0.1:0 that ends its connections on exit."""

    def __init__(
        self,
        handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._handle = handle
        self._tls = tls
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._tls)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class Request:
    """One HTTP request as the server read it."""

    method: str
    target: str  # as on the request line: a path, or an absolute URL through a proxy
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)


def response(
    status: int,
    body: bytes | str = b"",
    *,
    content_type: str | None = None,
    headers: tuple[tuple[str, str], ...] = (),
) -> bytes:
    data = body.encode() if isinstance(body, str) else body
    lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"Content-Length: {len(data)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + data


def json_response(status: int, value: Any) -> bytes:
    return response(status, json.dumps(value), content_type="application/json")


def echo(request: Request) -> bytes:
    return json_response(200, {
        "method": request.method,
        "target": request.target,
        "path": request.path,
        "query": request.query,
        "headers": request.headers,
        "body": request.body.decode("utf-8", errors="replace"),
    })


HANG = None  # a route's answer: read the request, never respond


def routes(request: Request) -> bytes | None:
    match request.path:
        case "/echo":
            return echo(request)
        case "/text":
            return response(200, "hello, world", content_type="text/plain; charset=utf-8")
        case "/json-as-text":  # JSON sent as text/plain: Mistral parses it all the same
            return response(200, '{"a": [1, 2]}', content_type="text/plain")
        case "/latin1":
            return response(200, "café".encode("latin-1"),
                            content_type="text/plain; charset=iso-8859-1")
        case "/empty":
            return response(204)
        case "/not-found":
            return response(404, "no such thing", content_type="text/plain")
        case "/boom":
            return json_response(500, {"error": "boom"})
        case "/redirect":
            return response(302, headers=(("Location", "/echo?from=redirect"),))
        case "/temporary-redirect":
            return response(307, headers=(("Location", "/echo"),))
        case "/cookie":
            return response(200, "ok", content_type="text/plain",
                            headers=(("Set-Cookie", "session=abc123; Path=/"),
                                     ("X-Multi", "one"), ("X-Multi", "two")))
        case "/big":
            return response(200, b"x" * 4096, content_type="application/octet-stream")
        case "/chunked":  # no Content-Length: the size shows only while reading
            chunk = b"y" * 2048
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n"
                    b"Connection: close\r\n\r\n"
                    + (b"800\r\n" + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
        case "/hang":
            return HANG
    return response(404, "unknown route", content_type="text/plain")


class HttpServer(LocalServer):
    """A raw HTTP/1.1 server: one request per connection, answered by ``routes``."""

    def __init__(self, tls: ssl.SSLContext | None = None) -> None:
        super().__init__(self._http, tls)
        self.requests: list[Request] = []
        self.scheme = "https" if tls else "http"

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        request_line, *header_lines = head.split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for line in filter(None, header_lines):
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        request = Request(method, target, headers, body)
        self.requests.append(request)
        answer = routes(request)
        if answer is HANG:
            await asyncio.Event().wait()  # until the server closes
            return
        if method == "HEAD":  # the headers only
            answer = answer.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        writer.write(answer)
        await writer.drain()


@pytest.fixture
async def http_server() -> AsyncIterator[HttpServer]:
    async with HttpServer() as server:
        yield server


@dataclass
class Mail:
    """One message as the SMTP server took it."""

    mail_from: str
    rcpt_to: list[str]
    data: bytes

    @property
    def message(self) -> EmailMessage:
        unix = self.data.replace(b"\r\n", b"\n")  # as a mailbox would store it
        parsed = email.message_from_bytes(unix, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class SmtpServer(LocalServer):
    """Enough of an SMTP server for smtplib: EHLO/HELO, [STARTTLS, AUTH PLAIN,]
    MAIL, RCPT, DATA, RSET, NOOP, QUIT."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        super().__init__(self._smtp)
        self.tls_context = tls_context  # given: STARTTLS, then AUTH, are offered
        self.refuse: set[str] = set()  # recipients answered 550
        self.mails: list[Mail] = []
        self.commands: list[str] = []  # verbs, in order
        self.logins: list[tuple[str, str]] = []

    async def _smtp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def reply(*lines: str) -> None:
            *first, last = lines
            code = last[:3]
            text = "".join(f"{code}-{line[4:]}\r\n" for line in first) + f"{last}\r\n"
            writer.write(text.encode())
            await writer.drain()

        await reply("220 127.0.0.1 test ESMTP")
        secure = False
        sender: str | None = None
        recipients: list[str] = []
        while line := await reader.readline():
            command = line.decode().rstrip("\r\n")
            verb = command.split(" ", 1)[0].upper()
            self.commands.append(verb)
            if verb == "EHLO":
                offers = ["250-127.0.0.1", "250-8BITMIME"]
                if self.tls_context is not None and not secure:
                    offers.append("250-STARTTLS")
                if secure:
                    offers.append("250-AUTH PLAIN")
                await reply(*offers, "250 HELP")
            elif verb == "HELO":
                await reply("250 127.0.0.1")
            elif verb == "STARTTLS" and self.tls_context is not None:
                await reply("220 go ahead")
                await writer.start_tls(self.tls_context)
                secure = True
            elif verb == "AUTH" and secure:
                _, mechanism, initial = command.split(" ", 2)
                assert mechanism.upper() == "PLAIN"
                _, user, password = base64.b64decode(initial).decode().split("\0")
                self.logins.append((user, password))
                await reply("235 authenticated")
            elif verb == "MAIL":
                sender = command.partition(":")[2].split()[0].strip("<>")
                recipients = []
                await reply("250 sender ok")
            elif verb == "RCPT":
                recipient = command.partition(":")[2].split()[0].strip("<>")
                if recipient in self.refuse:
                    await reply("550 no such mailbox")
                else:
                    recipients.append(recipient)
                    await reply("250 recipient ok")
            elif verb == "DATA":
                await reply("354 end with <CRLF>.<CRLF>")
                data = bytearray()
                while (chunk := await reader.readline()) != b".\r\n":
                    if not chunk:
                        return
                    data += chunk[1:] if chunk.startswith(b"..") else chunk
                assert sender is not None
                self.mails.append(Mail(sender, recipients, bytes(data)))
                await reply("250 queued")
            elif verb in ("RSET", "NOOP"):
                await reply("250 ok")
            elif verb == "QUIT":
                await reply("221 bye")
                return
            else:
                await reply("502 not implemented")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def smtp_server() -> AsyncIterator[SmtpServer]:
    async with SmtpServer() as server:
        yield server


# ---------------------------------------------------------------- std.test_dict


async def test_test_dict_shape() -> None:
    made = await run("std.test_dict", {"size": 3, "key_prefix": "key_", "val": "v"})
    assert made.ok and made.value == {"key_0": "v", "key_1": "v", "key_2": "v"}
    assert (await run("std.test_dict", {})).value == {}  # Mistral's defaults: size=0
    assert (await run("std.test_dict", {"size": 2})).value == {"0": "", "1": ""}
    nested = await run("std.test_dict", {"size": 1, "val": {"a": [1, None]}})
    assert nested.value == {"0": {"a": [1, None]}}
    assert (await run("std.test_dict", {"size": "2", "key_prefix": 7})).value == {
        "70": "", "71": ""}
    bad = failure(await run("std.test_dict", {"size": "many"}))
    assert bad["type"] == "ActionException" and "size" in bad["message"]
    unknown = failure(await run("std.test_dict", {"length": 3}))
    assert unknown["type"] == "TypeError"


# ---------------------------------------------------------------- std.http


async def test_http_get_with_params(http_server: HttpServer) -> None:
    called = await run("std.http", {
        "url": http_server.url("/echo"),
        "params": {"q": "a b", "n": 3, "flag": True, "many": ["x", "y"], "skipped": None},
    })
    assert called.ok, called
    result = called.value
    assert set(result) == HTTP_RESULT_KEYS
    assert result["status"] == 200 and result["reason"] == "OK"
    assert result["content"]["method"] == "GET"  # JSON body parsed
    assert result["content"]["query"] == {
        "q": ["a b"], "n": ["3"], "flag": ["True"], "many": ["x", "y"]}
    assert result["url"].startswith(http_server.url("/echo?"))
    assert result["headers"]["Content-Type"] == "application/json"  # the server's casing
    assert result["history"] == [] and result["cookies"] == {}
    assert result["encoding"] is None  # no charset declared
    assert isinstance(result["elapsed"], float) and result["elapsed"] >= 0

    as_string = await run("std.http", {"url": http_server.url("/echo"), "params": "a=1&b=2"})
    assert as_string.value["content"]["query"] == {"a": ["1"], "b": ["2"]}


async def test_http_post_json_and_body(http_server: HttpServer) -> None:
    url = http_server.url("/echo")
    posted = await run("std.http", {"url": url, "method": "post", "json": {"x": [1, "é"]}})
    assert posted.ok, posted
    seen = posted.value["content"]
    assert seen["method"] == "POST"
    assert seen["headers"]["content-type"] == "application/json"
    assert json.loads(seen["body"]) == {"x": [1, "é"]}

    text = await run("std.http", {"url": url, "method": "PUT", "body": "plain words"})
    assert text.value["content"]["method"] == "PUT"
    assert text.value["content"]["body"] == "plain words"

    # An object as body is sent as JSON text (as Mistral), without a JSON content type.
    as_body = await run("std.http", {"url": url, "method": "POST", "body": {"k": "v"}})
    assert json.loads(as_body.value["content"]["body"]) == {"k": "v"}
    assert "content-type" not in as_body.value["content"]["headers"]

    both = failure(await run("std.http", {"url": url, "body": "b", "json": {"j": 1}}))
    assert both == {"type": "ActionException",
                    "message": "Only one of the parameters 'json' and 'body' can be passed"}
    assert len(http_server.requests) == 3  # the refused call sent nothing


async def test_http_sends_headers_and_cookies(http_server: HttpServer) -> None:
    called = await run("std.http", {
        "url": http_server.url("/echo"),
        "headers": {"X-Trace": "t-1", "X-Count": 5, "X-Ratio": 0.5, "X-None": None},
        "cookies": {"session": "s1"},
    })
    sent = called.value["content"]["headers"]
    assert sent["x-trace"] == "t-1"
    assert sent["x-count"] == "5" and sent["x-ratio"] == "0.5"  # numbers as strings
    assert "x-none" not in sent
    assert sent["cookie"] == "session=s1"

    bad = failure(await run("std.http", {"url": http_server.url("/echo"),
                                         "headers": {"X-List": [1]}}))
    assert "X-List" in bad["message"]


async def test_http_response_cookies_and_repeated_headers(http_server: HttpServer) -> None:
    result = (await run("std.http", {"url": http_server.url("/cookie")})).value
    assert result["cookies"] == {"session": "abc123"}
    assert result["headers"]["X-Multi"] == "one, two"


async def test_http_content_json_or_text(http_server: HttpServer) -> None:
    async def content(path: str) -> Any:
        called = await run("std.http", {"url": http_server.url(path)})
        assert called.ok, called
        return called.value

    text = await content("/text")
    assert text["content"] == "hello, world" and text["encoding"] == "utf-8"
    assert (await content("/json-as-text"))["content"] == {"a": [1, 2]}
    latin = await content("/latin1")
    assert latin["content"] == "café" and latin["encoding"] == "iso-8859-1"
    empty = await content("/empty")
    assert empty["status"] == 204 and empty["content"] == ""


@pytest.mark.parametrize(
    ("path", "status", "reason", "content"),
    [
        ("/not-found", 404, "Not Found", "no such thing"),
        ("/boom", 500, "Internal Server Error", {"error": "boom"}),
    ],
)
async def test_http_error_status_fails_with_the_result(
    http_server: HttpServer, path: str, status: int, reason: str, content: Any
) -> None:
    error = failure(await run("std.http", {"url": http_server.url(path)}))
    assert set(error) == HTTP_RESULT_KEYS  # the error data is the whole result
    assert error["status"] == status and error["reason"] == reason
    assert error["content"] == content
    assert error["url"] == http_server.url(path)


async def test_http_redirects_as_mistral(http_server: HttpServer) -> None:
    # Mistral passes allow_redirects=None to requests, which then follows none; a 3xx
    # below 307 is a success, 307 and above a failure (Mistral's range(200, 307)).
    kept = await run("std.http", {"url": http_server.url("/redirect")})
    assert kept.ok and kept.value["status"] == 302
    assert kept.value["headers"]["Location"] == "/echo?from=redirect"
    failed = failure(await run("std.http", {"url": http_server.url("/temporary-redirect")}))
    assert failed["status"] == 307

    followed = await run("std.http", {"url": http_server.url("/redirect"),
                                      "allow_redirects": True})
    result = followed.value
    assert result["status"] == 200
    assert result["url"] == http_server.url("/echo?from=redirect")
    assert result["content"]["query"] == {"from": ["redirect"]}
    assert [(hop["status"], hop["url"]) for hop in result["history"]] == [
        (302, http_server.url("/redirect"))]


async def test_http_basic_auth(http_server: HttpServer) -> None:
    url = http_server.url("/echo")

    async def authorization(auth: Any) -> str:
        called = await run("std.http", {"url": url, "auth": auth})
        assert called.ok, called
        header: str = called.value["content"]["headers"]["authorization"]
        return header

    expected = "Basic " + base64.b64encode(b"alice:s3:cret").decode()
    assert await authorization("alice:s3:cret") == expected  # split at the first colon
    assert await authorization(["alice", "s3:cret"]) == expected
    bad = failure(await run("std.http", {"url": url, "auth": "just-a-token"}))
    assert bad["type"] == "ActionException" and "user:password" in bad["message"]


async def test_http_timeout(http_server: HttpServer) -> None:
    error = failure(await run("std.http", {"url": http_server.url("/hang"), "timeout": 0.2}))
    assert error["type"] == "ActionException"
    assert error["message"].startswith(
        f"Failed to send HTTP request GET {http_server.url('/hang')}: ReadTimeout")
    assert [r.path for r in http_server.requests] == ["/hang"]  # it did reach the server

    for bad in (0, -1, "soon", True, [1, 2, 3]):
        invalid = failure(await run("std.http", {"url": http_server.url("/echo"),
                                                 "timeout": bad}))
        assert "timeout must be" in invalid["message"], bad
    pair = await run("std.http", {"url": http_server.url("/echo"), "timeout": [1, 2]})
    assert pair.ok


async def test_http_connection_refused() -> None:
    url = f"http://127.0.0.1:{closed_port()}/anything"
    error = failure(await run("std.http", {"url": url}))
    assert error["type"] == "ActionException"
    assert error["message"].startswith(f"Failed to send HTTP request GET {url}: ConnectError")
    assert "ConnectionRefusedError" in error["message"]  # the cause httpx wraps


async def test_http_bad_urls() -> None:
    for url, fragment in [
        ("ftp://127.0.0.1/file", "UnsupportedProtocol"),
        ("", "url must be"),
        (5, "url must be"),
    ]:
        error = failure(await run("std.http", {"url": url}))
        assert fragment in error["message"], (url, error)
    missing = failure(await run("std.http", {}))
    assert missing["type"] == "TypeError" and "url" in missing["message"]


async def test_http_credentials_stay_out_of_messages() -> None:
    url = f"http://bob:hunter2@127.0.0.1:{closed_port()}/x?token=abc"
    error = failure(await run("std.http", {"url": url}))
    assert "hunter2" not in error["message"] and "token" not in error["message"]


async def test_http_response_size_limit(
    http_server: HttpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("levante.worker.std.HTTP_MAX_RESPONSE_BYTES", 1000)
    error = failure(await run("std.http", {"url": http_server.url("/big")}))
    assert error["message"] == (
        "HTTP response is too large (Content-Length=4096, limit=1000 bytes)")
    streamed = failure(await run("std.http", {"url": http_server.url("/chunked")}))
    assert streamed["message"] == "HTTP response is too large (over 1000 bytes)"
    head = await run("std.http", {"url": http_server.url("/big"), "method": "HEAD"})
    assert head.ok and head.value["content"] == ""  # no body: nothing too large
    assert head.value["headers"]["Content-Length"] == "4096"
    monkeypatch.setattr("levante.worker.std.HTTP_MAX_RESPONSE_BYTES", 0)  # 0: no limit
    assert (await run("std.http", {"url": http_server.url("/big")})).value["content"] == "x" * 4096
    assert (await run("std.http", {"url": http_server.url("/chunked")})).value["content"] == (
        "y" * 4096)


async def test_http_through_a_proxy(http_server: HttpServer) -> None:
    # The local server plays the proxy: it gets the absolute URL on the request line.
    called = await run("std.http", {
        "url": "http://service.invalid/echo?via=proxy",
        "proxies": {"http": f"http://127.0.0.1:{http_server.port}"},
    })
    assert called.ok, called
    assert called.value["content"]["target"] == "http://service.invalid/echo?via=proxy"
    bad = failure(await run("std.http", {"url": http_server.url("/echo"), "proxies": "x"}))
    assert "proxies must be" in bad["message"]


async def test_http_verify(tls_files: tuple[Path, Path]) -> None:
    ca, server_pem = tls_files
    async with HttpServer(tls=server_tls(server_pem)) as server:
        url = server.url("/text")
        untrusted = failure(await run("std.http", {"url": url}))  # verified by default
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted["message"]
        trusted = await run("std.http", {"url": url, "verify": str(ca)})
        assert trusted.ok and trusted.value["content"] == "hello, world"
        unverified = await run("std.http", {"url": url, "verify": False})
        assert unverified.ok
    missing = failure(await run("std.http", {"url": url, "verify": str(ca) + ".missing"}))
    assert "cannot load CA bundle" in missing["message"]


# ---------------------------------------------------------------- std.mistral_http


async def test_mistral_http_names_the_task_and_defers(http_server: HttpServer) -> None:
    called = await run("std.mistral_http", {
        "url": http_server.url("/echo"),
        "method": "POST",
        "json": {"work": 1},
        "headers": {"X-Own": "kept", "levante-task-id": "overridden"},
    })
    assert called == Invocation(True, None, deferred=True)
    [request] = http_server.requests
    assert request.headers["levante-task-id"] == CONTEXT.task_id
    assert request.headers["mistral-task-id"] == CONTEXT.task_id
    assert request.headers["mistral-action-execution-id"] == CONTEXT.task_id
    assert request.headers["levante-execution-id"] == CONTEXT.execution_id
    assert request.headers["mistral-workflow-execution-id"] == CONTEXT.execution_id
    assert request.headers["x-own"] == "kept"
    assert json.loads(request.body) == {"work": 1}


async def test_mistral_http_fails_on_error_status(http_server: HttpServer) -> None:
    error = failure(await run("std.mistral_http", {"url": http_server.url("/boom")}))
    assert error["status"] == 500 and error["content"] == {"error": "boom"}
    refused = failure(await run("std.mistral_http",
                                {"url": f"http://127.0.0.1:{closed_port()}/"}))
    assert refused["message"].startswith("Failed to send HTTP request")


async def test_mistral_http_returns_the_deferred_marker(http_server: HttpServer) -> None:
    spec = std_actions().get("std.mistral_http")
    assert spec is not None and spec.wants_context and spec.is_async
    value = await within(spec.fn(url=http_server.url("/echo"), context=CONTEXT))
    assert value is DEFERRED
    refused = failure(await run("std.mistral_http",
                                {"url": http_server.url("/echo"), "context": {}}))
    assert refused["type"] == "InvalidInput"


# ---------------------------------------------------------------- std.email


def mail_input(server: SmtpServer, **extra: Any) -> dict[str, Any]:
    return {
        "from_addr": "workflows@example.org",
        "to_addrs": ["ann@example.org", "bob@example.org"],
        "smtp_server": server.address,
        "subject": "Grüße from Levante",
        "body": "Line one.\n.starts with a dot\nHé!",
        **extra,
    }


async def test_email_plain(smtp_server: SmtpServer) -> None:
    sent = await run("std.email", mail_input(
        smtp_server,
        cc_addrs=["carol@example.org"],
        bcc_addrs=["dave@example.org"],
        reply_to=["replies@example.org"],
    ))
    assert sent == Invocation(True, None)
    [mail] = smtp_server.mails
    assert mail.mail_from == "workflows@example.org"
    assert mail.rcpt_to == ["ann@example.org", "bob@example.org", "carol@example.org",
                            "dave@example.org"]
    message = mail.message
    assert message["Subject"] == "Grüße from Levante"
    assert message["From"] == "workflows@example.org"
    assert message["To"] == "ann@example.org, bob@example.org"
    assert message["Cc"] == "carol@example.org"
    assert message["Reply-To"] == "replies@example.org"
    assert "Bcc" not in message and b"dave@" not in mail.data  # bcc: envelope only
    assert not message.is_multipart() and message.get_content_type() == "text/plain"
    assert message.get_content().rstrip("\n") == "Line one.\n.starts with a dot\nHé!"
    assert "STARTTLS" not in smtp_server.commands and "AUTH" not in smtp_server.commands
    assert smtp_server.commands[-1] == "QUIT"


async def test_email_html_is_multipart(smtp_server: SmtpServer) -> None:
    sent = await run("std.email", mail_input(
        smtp_server, to_addrs="ann@example.org", html_body="<p>Hello <b>Ann</b></p>"))
    assert sent.ok, sent
    [mail] = smtp_server.mails
    message = mail.message
    assert mail.rcpt_to == ["ann@example.org"]
    assert message.get_content_type() == "multipart/alternative"
    parts = [part.get_content_type() for part in message.iter_parts()]
    assert parts == ["text/plain", "text/html"]
    plain = message.get_body(("plain",))
    html = message.get_body(("html",))
    assert plain is not None and html is not None
    assert isinstance(plain, EmailMessage) and isinstance(html, EmailMessage)
    assert "Hé!" in plain.get_content()
    assert html.get_content().strip() == "<p>Hello <b>Ann</b></p>"


async def test_email_defaults_as_mistral(smtp_server: SmtpServer) -> None:
    sent = await run("std.email", {"from_addr": "a@example.org", "to_addrs": ["b@example.org"],
                                   "smtp_server": smtp_server.address})
    assert sent.ok, sent
    message = smtp_server.mails[0].message
    assert message["Subject"] == "<No subject>"
    assert message.get_content().strip() == "<No body>"
    assert "Reply-To" not in message and "Cc" not in message


async def test_email_with_password_uses_starttls_and_login(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, server_pem = tls_files
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))  # the default trust store, for this test
    async with SmtpServer(tls_context=server_tls(server_pem)) as server:
        sent = await run("std.email", mail_input(server, smtp_password="pa ss"))
        assert sent.ok, sent
        assert server.commands[:3] == ["EHLO", "STARTTLS", "EHLO"]
        assert server.logins == [("workflows@example.org", "pa ss")]
        [mail] = server.mails
        assert mail.message["Subject"] == "Grüße from Levante"


async def test_email_password_without_starttls_fails(smtp_server: SmtpServer) -> None:
    error = failure(await run("std.email", mail_input(smtp_server, smtp_password="secret")))
    assert error["type"] == "ActionException"
    assert error["message"] == ("Failed to send an email message: SMTPNotSupportedError: "
                                "STARTTLS extension not supported by server.")
    assert "AUTH" not in smtp_server.commands and not smtp_server.mails


async def test_email_untrusted_certificate_fails(tls_files: tuple[Path, Path]) -> None:
    _, server_pem = tls_files
    async with SmtpServer(tls_context=server_tls(server_pem)) as server:
        error = failure(await run("std.email", mail_input(server, smtp_password="secret")))
        assert "CERTIFICATE_VERIFY_FAILED" in error["message"]
        assert not server.logins


async def test_email_failures(smtp_server: SmtpServer) -> None:
    smtp_server.refuse = {"ann@example.org", "bob@example.org"}
    refused = failure(await run("std.email", mail_input(smtp_server)))
    assert refused["message"].startswith(
        "Failed to send an email message: SMTPRecipientsRefused")
    assert not smtp_server.mails

    smtp_server.refuse = {"bob@example.org"}  # some refused: sent, as Mistral counts it
    assert (await run("std.email", mail_input(smtp_server))).ok
    assert smtp_server.mails[0].rcpt_to == ["ann@example.org"]

    closed = failure(await run("std.email", mail_input(
        smtp_server, smtp_server=f"127.0.0.1:{closed_port()}")))
    assert closed["message"].startswith("Failed to send an email message: ConnectionRefused")

    bad_inputs: list[tuple[dict[str, Any], str]] = [
        ({"to_addrs": []}, "to_addrs"),
        ({"to_addrs": [1]}, "to_addrs"),
        ({"smtp_server": "host:port"}, "smtp_server"),
        ({"smtp_server": ""}, "smtp_server"),
        ({"cc_addrs": {"a": 1}}, "cc_addrs"),
        ({"subject": "two\nlines"}, "Cannot build the email message"),
    ]
    for bad_input, fragment in bad_inputs:
        error = failure(await run("std.email", mail_input(smtp_server, **bad_input)))
        assert error["type"] == "ActionException" and fragment in error["message"], bad_input
    missing = failure(await run("std.email", {"to_addrs": ["a@example.org"]}))
    assert missing["type"] == "TypeError"
