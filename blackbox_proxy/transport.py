"""The one place every network call goes through: retries, timeouts, concurrency limits, caching.

Providers hand a :class:`Transport` a request (endpoint, model, JSON params) and a function that sends
it with an official ``openai`` client. The transport

* retries 429, 5xx, timeouts and connection errors with exponential backoff and jitter (tenacity),
  honouring a ``Retry-After`` / ``retry-after-ms`` header, and never retries other 4xx;
* bounds the number of requests in flight (a threading semaphore for sync calls, an asyncio one
  per event loop for async calls);
* serves and fills an optional :class:`~blackbox_proxy.cache.ResponseCache`;
* turns the final failure into one :class:`~blackbox_proxy.errors.ProviderError` naming the server,
  model, HTTP status and what to check.

The ``openai`` clients are built here with ``max_retries=0`` so that tenacity alone owns retries.
The API key lives only inside those clients: it is redacted from ``repr`` and error messages and
never reaches the cache or logs.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from .cache import ResponseCache
from .errors import BlackboxProxyError, InputError, ProviderError

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: key sent to servers that need none (llama.cpp, vLLM without --api-key): the client insists on one
DUMMY_API_KEY = "sk-no-key-required"

_RETRY_STATUS = frozenset({408, 409, 429})


@dataclass(frozen=True)
class Endpoint:
    """Where requests go and with which key, resolved from arguments first, then the environment."""

    base_url: str
    api_key: str

    def __repr__(self) -> str:
        return f"Endpoint(base_url={self.base_url!r}, api_key='***')"

    @property
    def host(self) -> str:
        return urlsplit(self.base_url).netloc or self.base_url


def resolve_endpoint(base_url: str | None = None, api_key: str | None = None) -> Endpoint:
    """Base URL and key: arguments, then OPENAI_BASE_URL / OPENAI_API_KEY, then OpenAI's URL.

    A server other than api.openai.com gets a dummy key when none is configured (local servers
    ignore it); OpenAI itself without a key is an InputError.
    """
    url = (base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL).strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InputError(f"base_url {url!r} is not an http(s) URL (expected e.g. http://127.0.0.1:8000/v1)")
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
    if not key:
        if parts.netloc.endswith("api.openai.com"):
            raise InputError(f"no API key for {url}: pass api_key=... or set OPENAI_API_KEY")
        key = DUMMY_API_KEY
    return Endpoint(url, key)


def _retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After in seconds or HTTP date, or retry-after-ms)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def is_retryable(exc: BaseException) -> bool:
    """True for 429 / 408 / 409 / 5xx responses, timeouts and connection errors; False otherwise."""
    if isinstance(exc, openai.APIStatusError):
        return exc.status_code in _RETRY_STATUS or exc.status_code >= 500
    return isinstance(exc, openai.APIConnectionError)  # includes APITimeoutError


class _Wait:
    """Tenacity wait: the server's Retry-After when given (capped), else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float, max_retry_after: float) -> None:
        self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self._max_retry_after = max_retry_after

    def __call__(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        after = _retry_after_seconds(exc) if exc is not None else None
        if after is not None:
            return min(after, self._max_retry_after)
        return float(self._backoff(state))


def _to_dict(response: Any) -> dict[str, Any]:
    """The JSON body of a parsed ``openai`` response (extra, non-standard fields included)."""
    if isinstance(response, Mapping):
        return dict(response)
    if hasattr(response, "to_dict"):
        return response.to_dict(mode="json", exclude_unset=False)
    if isinstance(response, str):
        snippet = response[:200]
        raise ValueError(f"the response is not JSON (body starts {snippet!r})")
    raise ValueError(f"unexpected response type {type(response).__name__}")


class Transport:
    """Sends OpenAI-protocol requests for one server with retries, timeouts, a concurrency cap and a cache."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        max_concurrency: int = 8,
        cache: ResponseCache | str | os.PathLike[str] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 20.0,
        max_retry_after: float = 60.0,
    ) -> None:
        if timeout <= 0:
            raise InputError(f"timeout must be positive, got {timeout!r}")
        if max_retries < 0:
            raise InputError(f"max_retries must be >= 0, got {max_retries!r}")
        if max_concurrency < 1:
            raise InputError(f"max_concurrency must be >= 1, got {max_concurrency!r}")
        self._endpoint = resolve_endpoint(base_url, api_key)
        self.base_url = self._endpoint.base_url
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.max_concurrency = int(max_concurrency)
        self.cache = ResponseCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        self._wait = _Wait(backoff_initial, backoff_max, max_retry_after)
        self._sync_sem = threading.Semaphore(self.max_concurrency)
        self._client: openai.OpenAI | None = None
        self._client_lock = threading.Lock()
        self._loop_state: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[openai.AsyncOpenAI, asyncio.Semaphore]
        ] = weakref.WeakKeyDictionary()
        self._count_lock = threading.Lock()
        #: HTTP attempts sent (retries included), for diagnostics and tests
        self.attempts = 0

    def __repr__(self) -> str:
        return (
            f"Transport(base_url={self.base_url!r}, api_key='***', timeout={self.timeout}, "
            f"max_retries={self.max_retries}, max_concurrency={self.max_concurrency})"
        )

    # -- clients ---------------------------------------------------------------------------------
    @property
    def client(self) -> openai.OpenAI:
        """The sync ``openai`` client (built once, ``max_retries=0``)."""
        with self._client_lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._endpoint.api_key,
                    timeout=self.timeout,
                    max_retries=0,
                )
            return self._client

    def _async_state(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """An async client and semaphore for the running event loop (they cannot cross loops)."""
        loop = asyncio.get_running_loop()
        state = self._loop_state.get(loop)
        if state is None:
            client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._endpoint.api_key, timeout=self.timeout, max_retries=0
            )
            state = (client, asyncio.Semaphore(self.max_concurrency))
            self._loop_state[loop] = state
        return state

    def close(self) -> None:
        """Close the sync client's connections and the cache (async clients close with their loop)."""
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()
        if self.cache is not None:
            self.cache.close()

    # -- requests --------------------------------------------------------------------------------
    def _count(self) -> None:
        with self._count_lock:
            self.attempts += 1

    def _cache_lookup(self, endpoint: str, model: str, params: Mapping[str, Any]) -> tuple[str | None, Any]:
        if self.cache is None:
            return None, None
        key = self.cache.key(self.base_url, endpoint, model, params)
        return key, self.cache.get(key)

    def call(
        self,
        endpoint: str,
        model: str,
        params: Mapping[str, Any],
        send: Callable[[openai.OpenAI, dict[str, Any]], Any],
        check: Callable[[dict[str, Any]], object] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Send one request through ``send(client, params)``; returns (JSON body, served from cache).

        ``check(body)`` runs on a fresh body before it is cached; if it raises, nothing is stored.
        """
        key, hit = self._cache_lookup(endpoint, model, params)
        if hit is not None:
            return hit, True
        attempts = 0

        def once() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            self._count()
            with self._sync_sem:
                return _to_dict(send(self.client, dict(params)))

        retrying = Retrying(**self._retry_policy(endpoint, model))
        try:
            body = retrying(once)
        except BlackboxProxyError:
            raise
        except Exception as exc:
            raise self.error(exc, endpoint, model, attempts) from exc
        return self._accept(key, body, check, endpoint, model)

    async def acall(
        self,
        endpoint: str,
        model: str,
        params: Mapping[str, Any],
        send: Callable[[openai.AsyncOpenAI, dict[str, Any]], Awaitable[Any]],
        check: Callable[[dict[str, Any]], object] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Async twin of :meth:`call`; ``send`` awaits the async client."""
        key, hit = self._cache_lookup(endpoint, model, params)
        if hit is not None:
            return hit, True
        client, sem = self._async_state()
        attempts = 0

        async def once() -> dict[str, Any]:
            nonlocal attempts
            attempts += 1
            self._count()
            async with sem:
                return _to_dict(await send(client, dict(params)))

        retrying = AsyncRetrying(**self._retry_policy(endpoint, model))
        try:
            body = await retrying(once)
        except BlackboxProxyError:
            raise
        except Exception as exc:
            raise self.error(exc, endpoint, model, attempts) from exc
        return self._accept(key, body, check, endpoint, model)

    def _retry_policy(self, endpoint: str, model: str) -> dict[str, Any]:
        """tenacity settings shared by the sync and async paths."""
        return {
            "stop": stop_after_attempt(self.max_retries + 1),
            "wait": self._wait,
            "retry": retry_if_exception(is_retryable),
            "before_sleep": self._log_retry(endpoint, model),
            "reraise": True,
        }

    def _accept(
        self,
        key: str | None,
        body: dict[str, Any],
        check: Callable[[dict[str, Any]], object] | None,
        endpoint: str,
        model: str,
    ) -> tuple[dict[str, Any], bool]:
        """Check a fresh body (raising if unusable), then cache it: bad answers are never remembered."""
        if check is not None:
            check(body)
        if self.cache is not None and key is not None:
            self.cache.put(key, body, endpoint=endpoint, model=model)
        return body, False

    def _log_retry(self, endpoint: str, model: str) -> Callable[[RetryCallState], None]:
        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome is not None else None
            wait = state.next_action.sleep if state.next_action is not None else 0.0
            log.warning(
                "%s %s (model %r) failed on attempt %d (%s); retrying in %.2f s",
                self.base_url,
                endpoint,
                model,
                state.attempt_number,
                self._redact(_describe(exc)),
                wait,
            )

        return before_sleep

    # -- errors ----------------------------------------------------------------------------------
    def _redact(self, text: str) -> str:
        key = self._endpoint.api_key
        return text.replace(key, "***") if key and len(key) >= 4 else text

    def error(self, exc: BaseException, endpoint: str, model: str, attempts: int) -> ProviderError:
        """A ProviderError that names server, model, status and what to check (the key redacted)."""
        where = f"{self.base_url} ({endpoint}, model {model!r})"
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        status: int | None = None
        if isinstance(exc, openai.APITimeoutError):
            msg = (
                f"request to {where} timed out after {self.timeout:g} s, {tries}: "
                "is the server overloaded or hanging? raise timeout= or lower max_concurrency="
            )
        elif isinstance(exc, openai.APIConnectionError):
            cause = exc.__cause__ or exc.__context__
            detail = f" ({type(cause).__name__})" if cause is not None else ""
            msg = f"cannot reach server at {self.base_url}{detail} {tries}: is it running, and is base_url right?"
        elif isinstance(exc, openai.APIStatusError):
            status = exc.status_code
            body = _body_snippet(exc)
            hint = _status_hint(status)
            msg = f"{where} answered HTTP {status} {tries}: {body}; {hint}"
        elif isinstance(exc, (json.JSONDecodeError, ValueError, openai.APIResponseValidationError)):
            msg = f"{where} returned a malformed response ({_describe(exc)}): is it an OpenAI-compatible server?"
        else:
            msg = f"request to {where} failed {tries}: {_describe(exc)}"
        err = ProviderError(self._redact(msg))
        err.status = status  # type: ignore[attr-defined]
        err.attempts = attempts  # type: ignore[attr-defined]
        err.base_url = self.base_url  # type: ignore[attr-defined]
        err.model = model  # type: ignore[attr-defined]
        return err


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def _body_snippet(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, Mapping):
        inner = body.get("error", body)
        if isinstance(inner, Mapping) and "message" in inner:
            body = inner["message"]
    text = body if isinstance(body, str) else json.dumps(body, default=str) if body is not None else ""
    text = " ".join(str(text).split())
    return repr(text[:300]) if text else "(empty body)"


def _status_hint(status: int) -> str:
    if status in (401, 403):
        return "check the API key (api_key= or OPENAI_API_KEY) and its permissions"
    if status == 404:
        return "check the model name and that base_url ends with /v1"
    if status == 429:
        return "rate limited: lower max_concurrency=, or raise max_retries="
    if status >= 500:
        return "the server failed: check its log (llama.cpp reports bad requests as 500 too)"
    return "the server rejected the request: check the parameters (model, k, prompt)"
