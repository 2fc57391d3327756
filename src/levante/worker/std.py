"""The standard actions (``std.*``) that every bundled worker can serve.

Their behaviour follows Mistral's standard actions of the same names:

* ``std.noop``: does nothing, returns ``None``;
* ``std.echo output=... [delay=0]``: returns ``output`` (after ``delay`` seconds;
  a negative or unparseable delay means none);
* ``std.fail [error_data=...]``: always fails; with truthy ``error_data`` the
  error *is* that data, otherwise an ``ActionException`` with the message
  ``"Fail action expected exception."``;
* ``std.sleep [seconds=1]``: sleeps without blocking the worker, returns ``None``
  (negative, infinite or unparseable means 0; fractions are honoured, unlike Mistral's
  whole seconds);
* ``std.async_noop``: deferred; its outcome comes later through
  ``Engine.TaskComplete``;
* ``std.test_dict [size=0] [key_prefix=""] [val=""]``: returns
  ``{key_prefix + "0": val, ..., key_prefix + str(size - 1): val}``;
* ``std.http url=... [method=GET] ...``: sends one HTTP request (httpx) and returns
  ``{content, status, headers, url, history, encoding, reason, cookies, elapsed}``;
  a status outside 200..306 fails with that same dict as the error data;
* ``std.mistral_http``: ``std.http`` plus headers naming the task
  (``Levante-Task-Id``, ``Mistral-Task-Id``, ...), then deferred: the called
  service reports the outcome through ``Engine.TaskComplete``;
* ``std.email``: sends a message through SMTP (STARTTLS and login only when
  ``smtp_password`` is given), returns ``None``.

They live in a registry of their own; :func:`std_actions` returns a copy to
serve or to merge with ``ActionRegistry.include``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import smtplib
import ssl
import time
from collections.abc import Iterable, Mapping
from email.message import EmailMessage
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import httpx

from levante.worker.registry import DEFERRED, ActionContext, ActionException, ActionRegistry

__all__ = [
    "FAIL_MESSAGE",
    "HTTP_DEFAULT_TIMEOUT",
    "HTTP_MAX_RESPONSE_BYTES",
    "SMTP_TIMEOUT",
    "std_actions",
]

logger = logging.getLogger("levante.worker")

FAIL_MESSAGE = "Fail action expected exception."

_STD = ActionRegistry()


def _seconds(value: Any) -> float:
    """Mistral's lenient parsing of a duration: negative or unparseable -> 0."""
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return 0.0
    return seconds if math.isfinite(seconds) and seconds > 0 else 0.0


# Actions that never block are coroutines: they run on the worker's event loop, not in
# its thread pool (a hop there and back costs more than they do). Those that never wait
# at all are immediate: run where the assignment arrives, without a task of their own.
@_STD.action("std.noop", immediate=True)
async def noop() -> None:
    """Does nothing."""
    return None


@_STD.action("std.echo")
async def echo(output: Any, delay: Any = 0) -> Any:
    """Returns ``output``, after ``delay`` seconds."""
    seconds = _seconds(delay)
    if seconds:
        await asyncio.sleep(seconds)
    return output


@_STD.action("std.fail", immediate=True)
async def fail(error_data: Any = None) -> None:
    """Always fails; with ``error_data`` the error is that data."""
    if error_data:
        raise ActionException(FAIL_MESSAGE, error_data=error_data)
    raise ActionException(FAIL_MESSAGE)


@_STD.action("std.sleep")
async def sleep(seconds: Any = 1) -> None:
    """Sleeps for ``seconds``."""
    await asyncio.sleep(_seconds(seconds))
    return None


@_STD.action("std.async_noop")
async def async_noop() -> object:
    """Completes later, through Engine.TaskComplete."""
    return DEFERRED


@_STD.action("std.test_dict")
def make_test_dict(size: Any = 0, key_prefix: Any = "", val: Any = "") -> dict[str, Any]:
    """``size`` entries ``{key_prefix + str(i): val}``, i = 0 .. size - 1."""
    count = _integer("size", size)
    prefix = "" if key_prefix is None else str(key_prefix)
    return {f"{prefix}{i}": val for i in range(count)}


def _integer(name: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ActionException(f"{name} must be an integer, not {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ActionException(f"{name} must be an integer, not {value!r}")


# ---------------------------------------------------------------- std.http

HTTP_DEFAULT_TIMEOUT = 60.0
"""Seconds a request may wait (to connect, per read, per write) when the action sets
no ``timeout``; Mistral's ``[action_std_http] default_timeout``. Read at call time."""

HTTP_MAX_RESPONSE_BYTES = 5 * 1024 * 1024
"""Largest response body (after content decoding) kept in a result, 0 for no limit;
Mistral's ``[action_std_http] max_response_size_bytes``, which Mistral checks against
Content-Length only. Read at call time."""

_SUCCESS = range(200, 307)  # Mistral's: any other final status fails the action

LEVANTE_EXECUTION_HEADER: Final = "Levante-Execution-Id"
LEVANTE_TASK_HEADER: Final = "Levante-Task-Id"


def _http_method(method: Any) -> str:
    if not isinstance(method, str) or not method.strip():
        raise ActionException(f"method must be an HTTP method name, not {method!r}")
    return method.strip().upper()


def _http_auth(auth: Any) -> tuple[str, str] | None:
    """Basic auth from ``"user:password"`` (split at the first colon) or ``[user, password]``."""
    if auth is None or auth == "":
        return None
    if isinstance(auth, str) and ":" in auth:
        user, _, password = auth.partition(":")
        return user, password
    if (
        isinstance(auth, list | tuple)
        and len(auth) == 2
        and all(isinstance(part, str) for part in auth)
    ):
        return auth[0], auth[1]
    raise ActionException("auth must be 'user:password' or [user, password] (basic auth)")


def _http_headers(headers: Any) -> dict[str, str]:
    """Numbers become strings (as Mistral does); ``None`` values are left out (as requests)."""
    if headers is None:
        return {}
    if not isinstance(headers, dict):
        raise ActionException(f"headers must be an object, not {type(headers).__name__}")
    result: dict[str, str] = {}
    for name, value in headers.items():
        if value is None:
            continue
        if isinstance(value, bool | int | float):
            value = str(value)
        if not isinstance(value, str):
            raise ActionException(f"header {name!r} must be a string, not {value!r}")
        result[str(name)] = value
    return result


def _query_value(value: Any) -> str:
    return value if isinstance(value, str) else str(value)  # True -> "True", as requests


def _http_params(params: Any) -> str | list[tuple[str, str]] | None:
    """A query string as is, or an object whose list values repeat the key; ``None`` dropped."""
    if params is None or isinstance(params, str):
        return params
    if not isinstance(params, dict):
        raise ActionException(
            f"params must be an object or a query string, not {type(params).__name__}"
        )
    pairs: list[tuple[str, str]] = []
    for key, value in params.items():
        values = value if isinstance(value, list) else [value]
        pairs.extend((str(key), _query_value(item)) for item in values if item is not None)
    return pairs


def _http_body(body: Any, json_body: Any) -> dict[str, Any]:
    """What httpx sends: ``content`` (body; an object is sent as JSON text) or ``json``."""
    if body and json_body:
        raise ActionException("Only one of the parameters 'json' and 'body' can be passed")
    if json_body is not None and not body:
        return {"json": json_body}
    if body is None:
        return {}
    if isinstance(body, str):
        return {"content": body.encode("utf-8")}
    return {"content": json.dumps(body).encode("utf-8")}


def _positive_seconds(value: Any) -> float | None:
    if value is None:
        return None
    if not isinstance(value, bool):
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            pass
        else:
            if math.isfinite(seconds) and seconds > 0:
                return seconds
    raise ActionException(
        f"timeout must be a positive number of seconds or [connect, read], not {value!r}"
    )


def _http_timeout(timeout: Any) -> httpx.Timeout:
    if timeout is None:
        return httpx.Timeout(HTTP_DEFAULT_TIMEOUT)
    if isinstance(timeout, list | tuple) and len(timeout) == 2:  # requests' (connect, read)
        connect, read = (_positive_seconds(part) for part in timeout)
        return httpx.Timeout(read, connect=connect)
    return httpx.Timeout(_positive_seconds(timeout))


@functools.cache
def _default_ssl_context(verify: bool) -> ssl.SSLContext:
    """Built once (SSL_CERT_FILE/SSL_CERT_DIR as they are then): loading the CA bundle
    takes longer than a local request."""
    return httpx.create_ssl_context(verify=verify)


def _http_verify(verify: Any) -> ssl.SSLContext:
    """``None``/``True``: verify; ``False``: don't; a path: the CA bundle (file or directory)."""
    if verify is None or isinstance(verify, bool):
        return _default_ssl_context(verify is not False)
    if isinstance(verify, str) and verify:
        try:
            if os.path.isdir(verify):
                return ssl.create_default_context(capath=verify)
            return ssl.create_default_context(cafile=verify)
        except (OSError, ssl.SSLError) as exc:
            raise ActionException(f"verify: cannot load CA bundle {verify!r}: {exc}") from exc
    raise ActionException(f"verify must be true, false or a CA bundle path, not {verify!r}")


def _http_mounts(
    proxies: Any, verify: ssl.SSLContext
) -> dict[str, httpx.AsyncBaseTransport | None] | None:
    """requests' ``{"http": url, "https": url, "all": url}`` as httpx transports."""
    if proxies is None:
        return None
    if not isinstance(proxies, dict):
        raise ActionException(f"proxies must be an object, not {type(proxies).__name__}")
    mounts: dict[str, httpx.AsyncBaseTransport | None] = {}
    for key, proxy in proxies.items():
        pattern = key if "://" in key else f"{key}://"
        if proxy is None:
            mounts[pattern] = None
            continue
        if not isinstance(proxy, str):
            raise ActionException(f"proxies[{key!r}] must be a URL, not {proxy!r}")
        try:
            mounts[pattern] = httpx.AsyncHTTPTransport(proxy=proxy, verify=verify)
        except (ValueError, TypeError, httpx.InvalidURL) as exc:
            raise ActionException(f"proxies[{key!r}]: {exc}") from exc
    return mounts


def _without_userinfo(url: str) -> str:
    """The URL for messages: no credentials, no query string."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<invalid URL>"


def _header_dict(headers: httpx.Headers) -> dict[str, str]:
    """Headers as sent (names in their received case); repeated names joined by ", "."""
    result: dict[str, str] = {}
    names: dict[str, str] = {}
    for raw_name, raw_value in headers.raw:
        name = raw_name.decode(headers.encoding)
        value = raw_value.decode(headers.encoding)
        key = names.setdefault(name.lower(), name)
        result[key] = f"{result[key]}, {value}" if key in result else value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _content(data: bytes, charset: str | None) -> Any:
    """The body parsed as JSON when it is JSON (whatever its Content-Type), else text."""
    try:
        text = data.decode(charset or "utf-8", errors="replace")
    except LookupError:  # a charset Python does not know
        text = data.decode("utf-8", errors="replace")
    if text.strip():
        try:
            return json.loads(text, parse_constant=_reject_constant)
        except ValueError:
            pass
    return text


async def _read_body(response: httpx.Response, limit: int) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if response.request.method == "HEAD":  # the length of a body that is not sent
        declared = ""
    if limit and declared.isdigit() and int(declared) > limit:
        raise ActionException(
            f"HTTP response is too large (Content-Length={declared}, limit={limit} bytes)"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if limit and size > limit:
            raise ActionException(f"HTTP response is too large (over {limit} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def _describe(exc: BaseException) -> str:
    """``Type: message``, plus the innermost cause when it says more (httpx wraps the
    OSError of a refused connection in "All connection attempts failed")."""
    detail = str(exc) or (
        "timed out" if isinstance(exc, httpx.TimeoutException) else repr(exc)
    )
    root = exc
    for _ in range(10):
        inner = root.__cause__ or root.__context__
        if inner is None:
            break
        root = inner
    if root is not exc and str(root) and str(root) not in detail:
        detail = f"{detail} ({type(root).__name__}: {root})"
    return f"{type(exc).__name__}: {detail}"


async def _http(
    url: Any,
    method: Any,
    params: Any,
    body: Any,
    json_body: Any,
    headers: Any,
    cookies: Any,
    auth: Any,
    timeout: Any,
    allow_redirects: Any,
    proxies: Any,
    verify: Any,
    extra_headers: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One request; the result (success or not) as Mistral's std.http shapes it."""
    if not isinstance(url, str) or not url:
        raise ActionException(f"url must be a non-empty string, not {url!r}")
    verb = _http_method(method)
    extra = dict(extra_headers or {})
    overridden = {name.lower() for name in extra}
    sent_headers = {
        name: value
        for name, value in _http_headers(headers).items()
        if name.lower() not in overridden
    }
    sent_headers.update(extra)
    if cookies is not None and not isinstance(cookies, dict):
        raise ActionException(f"cookies must be an object, not {type(cookies).__name__}")
    ssl_context = _http_verify(verify)
    client_options: dict[str, Any] = {
        "auth": _http_auth(auth),
        "cookies": {str(k): str(v) for k, v in (cookies or {}).items() if v is not None},
        "timeout": _http_timeout(timeout),
        # requests, as Mistral calls it (allow_redirects=None), follows no redirect
        "follow_redirects": bool(allow_redirects),
        "verify": ssl_context,
        "mounts": _http_mounts(proxies, ssl_context),
    }
    request_options: dict[str, Any] = {
        "params": _http_params(params),
        "headers": sent_headers,
        **_http_body(body, json_body),
    }
    where = f"{verb} {_without_userinfo(url)}"
    limit = HTTP_MAX_RESPONSE_BYTES
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(**client_options) as client:
            request = client.build_request(verb, url, **request_options)
            response = await client.send(request, stream=True)
            try:
                data = await _read_body(response, limit)
            finally:
                await response.aclose()
    except ActionException:
        raise
    except Exception as exc:
        logger.debug("std.http %s failed", where, exc_info=True)
        raise ActionException(f"Failed to send HTTP request {where}: {_describe(exc)}") from exc
    elapsed = time.monotonic() - started
    logger.debug("std.http %s -> %s in %.3fs", where, response.status_code, elapsed)
    return {
        "content": _content(data, response.charset_encoding),
        "status": response.status_code,
        "headers": _header_dict(response.headers),
        "url": str(response.url),
        "history": [
            {
                "status": hop.status_code,
                "url": str(hop.url),
                "reason": hop.reason_phrase,
                "headers": _header_dict(hop.headers),
            }
            for hop in response.history
        ],
        "encoding": response.charset_encoding,
        "reason": response.reason_phrase,
        "cookies": {cookie.name: cookie.value or "" for cookie in response.cookies.jar},
        "elapsed": round(elapsed, 6),
    }


def _http_failed(result: dict[str, Any]) -> ActionException:
    return ActionException(f"HTTP {result['status']} {result['reason']}", error_data=result)


@_STD.action("std.http")
async def http(
    url: Any,
    method: Any = "GET",
    params: Any = None,
    body: Any = None,
    json: Any = None,
    headers: Any = None,
    cookies: Any = None,
    auth: Any = None,
    timeout: Any = None,
    allow_redirects: Any = None,
    proxies: Any = None,
    verify: Any = None,
) -> dict[str, Any]:
    """Sends one HTTP request; a status outside 200..306 fails with the result as data."""
    result = await _http(
        url, method, params, body, json, headers, cookies, auth, timeout,
        allow_redirects, proxies, verify,
    )
    if result["status"] not in _SUCCESS:
        raise _http_failed(result)
    return result


@_STD.action("std.mistral_http")
async def mistral_http(
    url: Any,
    context: ActionContext,
    method: Any = "GET",
    params: Any = None,
    body: Any = None,
    json: Any = None,
    headers: Any = None,
    cookies: Any = None,
    auth: Any = None,
    timeout: Any = None,
    allow_redirects: Any = None,
    proxies: Any = None,
    verify: Any = None,
) -> object:
    """``std.http`` naming the task in headers; then deferred until Engine.TaskComplete."""
    task_headers = {
        LEVANTE_EXECUTION_HEADER: context.execution_id,
        LEVANTE_TASK_HEADER: context.task_id,
        "Mistral-Workflow-Execution-Id": context.execution_id,
        "Mistral-Task-Id": context.task_id,
        # In Mistral the called service completes the action execution by this id;
        # here the task_id is what Engine.TaskComplete takes.
        "Mistral-Action-Execution-Id": context.task_id,
    }
    result = await _http(
        url, method, params, body, json, headers, cookies, auth, timeout,
        allow_redirects, proxies, verify, task_headers,
    )
    if result["status"] not in _SUCCESS:
        raise _http_failed(result)
    return DEFERRED


# ---------------------------------------------------------------- std.email

SMTP_TIMEOUT = 60.0
"""Seconds any one SMTP socket operation may take (Mistral sets none). Read at call time."""


def _addresses(name: str, value: Any, *, required: bool = False) -> list[str]:
    """One address as a string, or a list of them."""
    if value is None or value == "":
        addresses: list[str] = []
    elif isinstance(value, str):
        addresses = [value]
    elif isinstance(value, list) and all(isinstance(item, str) and item for item in value):
        addresses = list(value)
    else:
        raise ActionException(f"{name} must be an address or a list of addresses, not {value!r}")
    if required and not addresses:
        raise ActionException(f"{name}: at least one address is required")
    return addresses


def _smtp_endpoint(server: Any) -> tuple[str, int]:
    """``"host"``, ``"host:port"`` or ``"[v6]:port"``; port 25 by default."""
    if not isinstance(server, str) or not server.strip():
        raise ActionException(f"smtp_server must be 'host' or 'host:port', not {server!r}")
    server = server.strip()
    host, port = server, "25"
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        if rest:
            port = rest.removeprefix(":")
    elif server.count(":") == 1:
        host, _, port = server.partition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ActionException(f"smtp_server must be 'host' or 'host:port', not {server!r}")
    return host, int(port)


def _unique(addresses: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(addresses))


@_STD.action("std.email")
def email(
    from_addr: Any,
    to_addrs: Any,
    smtp_server: Any,
    reply_to: Any = None,
    cc_addrs: Any = None,
    bcc_addrs: Any = None,
    smtp_password: Any = None,
    subject: Any = None,
    body: Any = None,
    html_body: Any = None,
) -> None:
    """Sends one message through ``smtp_server``; returns ``None``.

    With ``smtp_password`` the session is upgraded with STARTTLS and logs in as
    ``from_addr``; without, it sends in the clear without logging in (as Mistral).
    Runs on the worker's executor (a plain function), not on the event loop.
    """
    if not isinstance(from_addr, str) or not from_addr:
        raise ActionException(f"from_addr must be an address, not {from_addr!r}")
    to = _addresses("to_addrs", to_addrs, required=True)
    cc = _addresses("cc_addrs", cc_addrs)
    bcc = _addresses("bcc_addrs", bcc_addrs)
    replies = _addresses("reply_to", reply_to)
    host, port = _smtp_endpoint(smtp_server)
    if smtp_password is not None and not isinstance(smtp_password, str):
        raise ActionException("smtp_password must be a string")

    message = EmailMessage()
    try:
        message["Subject"] = "<No subject>" if subject in (None, "") else str(subject)
        message["From"] = from_addr
        message["To"] = ", ".join(to)
        if cc:
            message["Cc"] = ", ".join(cc)
        if replies:
            message["Reply-To"] = ", ".join(replies)
        message.set_content("<No body>" if body in (None, "") else str(body))
        if html_body:
            message.add_alternative(str(html_body), subtype="html")
    except (ValueError, TypeError) as exc:  # e.g. a line break in a header
        raise ActionException(f"Cannot build the email message: {exc}") from exc
    recipients = _unique([*to, *cc, *bcc])

    try:
        with smtplib.SMTP(host, port, timeout=SMTP_TIMEOUT) as smtp:
            if smtp_password is not None:
                smtp.ehlo()
                smtp.starttls(context=ssl.create_default_context())
                smtp.ehlo()
                smtp.login(from_addr, smtp_password)
            refused = smtp.send_message(message, from_addr=from_addr, to_addrs=recipients)
    except (smtplib.SMTPException, OSError, ValueError) as exc:
        raise ActionException(f"Failed to send an email message: {_describe(exc)}") from exc
    if refused:  # some (not all) recipients refused: sent, as Mistral counts it
        logger.warning("std.email: the server refused %s", ", ".join(sorted(refused)))
    return None


def std_actions() -> ActionRegistry:
    """A new registry holding the standard actions."""
    return ActionRegistry().include(_STD)
