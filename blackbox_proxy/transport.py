"""The one place every network call goes through: retries, timeouts, concurrency limits, caching.

Providers hand a :class:`Transport` a request (endpoint, model, JSON params), a function that sends
it with an official ``openai`` client, and a ``check`` that parses the body. The transport

* retries what can pass, with one policy (tenacity: exponential backoff with jitter, honouring
  ``Retry-After`` / ``retry-after-ms``): 429, 408, 409, 5xx, timeouts, lost connections, a 200 whose
  body is truncated or not the JSON promised (:class:`~blackbox_proxy.errors.MalformedResponseError`),
  and a 200 without the log-probs asked for (a transient
  :class:`~blackbox_proxy.errors.MissingLogprobsError` raised by ``check``);
* never pays twice for a slow answer: an attempt with no answer after ``timeout`` seconds is *late*,
  not failed; the transport keeps the connection open for up to ``late_wait`` more seconds and uses
  the late answer (re-sending while the server still works on the first request would pay for both).
  Only an attempt that outlasts ``timeout + late_wait`` is abandoned and re-sent;
* bounds each request, all attempts and waits together, by ``deadline`` seconds;
* bounds the number of requests in flight (a threading semaphore for sync calls, an asyncio one
  per event loop for async calls);
* serves and fills an optional :class:`~blackbox_proxy.cache.ResponseCache`: every usable body is
  stored the moment it arrives, before anyone uses it;
* ends in one error class per outcome, one line each, the API key redacted and no client exception
  chained (it may hold a key a server echoed): :class:`~blackbox_proxy.errors.TransientProviderError`
  (retries ran out on a fault that can pass: redo the question later),
  :class:`~blackbox_proxy.errors.RequestRejectedError` (this request is refused: 400, 422...),
  :class:`~blackbox_proxy.errors.FatalProviderError` (bad key, unknown model, unreachable or hanging
  server, no log-probs ever: stop the run).

The ``openai`` clients are built here with ``max_retries=0`` so that tenacity alone owns retries.
The API key lives only inside those clients and a private field of :class:`Endpoint`: it is
redacted from ``repr``, ``dataclasses.asdict``, error messages and logs, and never reaches the cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import openai
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    Retrying,
    retry_if_exception,
    wait_exponential_jitter,
)

from .cache import ResponseCache
from .errors import (
    BlackboxProxyError,
    FatalProviderError,
    InputError,
    LogprobsUnsupportedError,
    MalformedResponseError,
    MissingLogprobsError,
    ProviderError,
    RequestRejectedError,
    TransientMissingLogprobsError,
    TransientProviderError,
)

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
#: key sent to servers that need none (llama.cpp, vLLM without --api-key): the client insists on one
DUMMY_API_KEY = "sk-no-key-required"

#: statuses worth asking again (besides every 5xx)
_RETRY_STATUS = frozenset({408, 409, 429})
#: connect attempts are bounded separately: an unreachable host should fail in seconds
MAX_CONNECT_TIMEOUT = 10.0
#: shortest run of key characters redacted when it shows up in a message (a server may echo a part)
_MIN_SECRET_RUN = 8

# reasons carried by ProviderError.reason
RATE_LIMITED = "rate-limited"
SERVER_ERROR = "server-error"
TIMEOUT = "timeout"
CONNECTION_LOST = "connection-lost"
MALFORMED = "malformed"
MISSING_LOGPROBS = "missing-logprobs"
UNREACHABLE = "unreachable"
HANGING = "hanging"
AUTH = "auth"
NOT_FOUND = "not-found"
REJECTED = "rejected"
NO_LOGPROBS = "no-logprobs"
_TRANSIENT = frozenset({RATE_LIMITED, SERVER_ERROR, TIMEOUT, CONNECTION_LOST, MALFORMED, MISSING_LOGPROBS})


class _Secret:
    """A string that shows as ``***`` in str, repr, logs and copies of dataclass fields."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself (only for the HTTP client)."""
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, init=False, eq=False)
class Endpoint:
    """Where requests go (``base_url``) and with which key (``api_key``, kept outside the dataclass fields).

    ``dataclasses.asdict``, ``repr`` and ``str`` show only the URL; the key is read through the
    ``api_key`` property.
    """

    base_url: str

    def __init__(self, base_url: str, api_key: str) -> None:
        object.__setattr__(self, "base_url", base_url)
        object.__setattr__(self, "_secret", _Secret(api_key))

    @property
    def api_key(self) -> str:
        """The API key (sent only as the client's bearer token)."""
        return self._secret.reveal()  # type: ignore[attr-defined, no-any-return]

    def __repr__(self) -> str:
        return f"Endpoint(base_url={self.base_url!r}, api_key='***')"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Endpoint):
            return NotImplemented
        return (other.base_url, other.api_key) == (self.base_url, self.api_key)

    def __hash__(self) -> int:
        return hash((self.base_url, self.api_key))

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
    if key is not None and not isinstance(key, str):
        raise InputError(f"api_key must be a string, got {type(key).__name__}")
    if not key:
        if parts.netloc.endswith("api.openai.com"):
            raise InputError(f"no API key for {url}: pass api_key=... or set OPENAI_API_KEY")
        key = DUMMY_API_KEY
    return Endpoint(url, key)


def redact(text: str, secret: str | None) -> str:
    """``text`` with ``secret`` (and its JSON- or URL-escaped forms, and any run of 8+ of its characters) as ***."""
    if not secret or len(secret) < 4 or not text:
        return text
    for form in {secret, json.dumps(secret)[1:-1], quote(secret, safe="")}:
        text = text.replace(form, "***")
    if len(secret) >= _MIN_SECRET_RUN:
        spans: list[tuple[int, int]] = []
        for i in range(len(secret) - _MIN_SECRET_RUN + 1):
            run = secret[i : i + _MIN_SECRET_RUN]
            start = text.find(run)
            while start != -1:
                spans.append((start, start + _MIN_SECRET_RUN))
                start = text.find(run, start + 1)
        if spans:
            spans.sort()
            merged = [list(spans[0])]
            for a, b in spans[1:]:
                if a <= merged[-1][1]:
                    merged[-1][1] = max(merged[-1][1], b)
                else:
                    merged.append([a, b])
            for a, b in reversed(merged):
                text = text[:a] + "***" + text[b:]
    return text


def _retry_after_seconds(exc: BaseException) -> float | None:
    """Seconds the server asked us to wait (Retry-After in seconds or HTTP date, or retry-after-ms)."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value_ms = float(ms) / 1000.0
            if math.isfinite(value_ms):
                return max(value_ms, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(seconds, 0.0) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


def _cause_names(exc: BaseException) -> set[str]:
    """Class names of the exception's direct cause and its bases (httpx or httpx2, whichever openai uses)."""
    cause = exc.__cause__ or exc.__context__
    return {c.__name__ for c in type(cause).__mro__} if cause is not None else set()


def classify(exc: BaseException) -> str | None:
    """The reason of a failed attempt (see ProviderError.reason), or None when it is not the transport's.

    Transient reasons are retried; ``unreachable`` is retried too (a server may be starting) but is
    fatal once retries run out.
    """
    if isinstance(exc, openai.APIStatusError):
        s = exc.status_code
        if s == 429:
            return RATE_LIMITED
        if s in _RETRY_STATUS or s >= 500:
            return SERVER_ERROR
        if s in (401, 403):
            return AUTH
        if s == 404:
            return NOT_FOUND
        return REJECTED
    if isinstance(exc, openai.APITimeoutError):  # a connect timeout means no server answered at all
        return UNREACHABLE if "ConnectTimeout" in _cause_names(exc) else TIMEOUT
    if isinstance(exc, openai.APIConnectionError):
        names = _cause_names(exc)
        return UNREACHABLE if names & {"ConnectError", "ConnectTimeout"} else CONNECTION_LOST
    if isinstance(exc, MissingLogprobsError):
        return MISSING_LOGPROBS if getattr(exc, "transient", True) else None
    if isinstance(exc, (MalformedResponseError, json.JSONDecodeError, openai.APIResponseValidationError)):
        return MALFORMED
    return None


def is_retryable(exc: BaseException) -> bool:
    """True for failures that asking again can mend (and for an unreachable host, a few times)."""
    reason = classify(exc)
    return reason in _TRANSIENT or reason == UNREACHABLE


class _Wait:
    """Tenacity wait: the server's Retry-After when given (capped), else exponential backoff with jitter."""

    def __init__(self, initial: float, maximum: float, max_retry_after: float) -> None:
        try:  # tenacity >= 9.2 names the first wait `multiplier`; older ones only know `initial`
            self._backoff = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        except TypeError:
            self._backoff = wait_exponential_jitter(initial=initial, max=maximum, jitter=initial)
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
        raise MalformedResponseError(f"the response is not JSON (body starts {response[:120]!r})")
    raise MalformedResponseError(f"the response is a JSON {type(response).__name__}, not an object")


def _positive(name: str, value: object, *, allow_none: bool = False) -> float | None:
    """A finite positive float setting, or an InputError naming it."""
    if value is None and allow_none:
        return None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
        raise InputError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


class _Call:
    """Book-keeping of one request across its attempts."""

    __slots__ = ("started", "deadline_at", "attempts", "reasons", "limit", "sent_at")

    def __init__(self) -> None:
        self.started: float | None = None
        self.deadline_at = math.inf
        self.attempts = 0
        self.reasons: list[str] = []
        #: the HTTP timeout of the latest attempt
        self.limit = 0.0
        #: when the latest attempt was sent
        self.sent_at = 0.0


class Transport:
    """Sends OpenAI-protocol requests for one server with retries, timeouts, a concurrency cap and a cache.

    ``timeout``: seconds after which an attempt's answer is late (default 30); ``late_wait``: how
    much longer a late answer is waited for instead of paying for a second request (default: as long
    again); ``deadline``: seconds one request may take, all attempts and waits together (default
    ``2 * (timeout + late_wait)``). ``max_retries``: attempts after the first.
    """

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
        late_wait: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.timeout = _positive("timeout", timeout)
        late = _positive("late_wait", late_wait, allow_none=True)
        self.late_wait = self.timeout if late is None else late
        total = _positive("deadline", deadline, allow_none=True)
        self.deadline = 2.0 * (self.timeout + self.late_wait) if total is None else total
        if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
            raise InputError(f"max_retries must be an integer >= 0, got {max_retries!r}")
        if isinstance(max_concurrency, bool) or not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise InputError(f"max_concurrency must be an integer >= 1, got {max_concurrency!r}")
        backoff_initial = _positive("backoff_initial", backoff_initial)  # type: ignore[assignment]
        backoff_max = _positive("backoff_max", backoff_max)  # type: ignore[assignment]
        max_retry_after = _positive("max_retry_after", max_retry_after)  # type: ignore[assignment]
        self._endpoint = resolve_endpoint(base_url, api_key)
        self.base_url = self._endpoint.base_url
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
        #: answers that came after ``timeout`` but within ``late_wait``, and were used (not bought twice)
        self.late_answers = 0
        #: attempts given up after ``timeout + late_wait`` (the server may still have answered them)
        self.abandoned = 0
        #: bodies received that ``check`` refused (paid for, unusable: truncated, no log-probs...)
        self.spoiled = 0
        self._last_heard = -math.inf
        self._ever_usable = False

    def __repr__(self) -> str:
        return (
            f"Transport(base_url={self.base_url!r}, api_key='***', timeout={self.timeout:g}, "
            f"late_wait={self.late_wait:g}, deadline={self.deadline:g}, "
            f"max_retries={self.max_retries}, max_concurrency={self.max_concurrency})"
        )

    def stats(self) -> dict[str, int]:
        """Counters: HTTP attempts, late answers used, attempts abandoned, unusable bodies received."""
        with self._count_lock:
            return {
                "attempts": self.attempts,
                "late_answers": self.late_answers,
                "abandoned": self.abandoned,
                "spoiled": self.spoiled,
            }

    # -- clients ---------------------------------------------------------------------------------
    def _timeout(self, seconds: float) -> openai.Timeout:
        return openai.Timeout(seconds, connect=min(MAX_CONNECT_TIMEOUT, self.timeout, seconds))

    @property
    def client(self) -> openai.OpenAI:
        """The sync ``openai`` client (built once, ``max_retries=0``)."""
        with self._client_lock:
            if self._client is None:
                self._client = openai.OpenAI(
                    base_url=self.base_url,
                    api_key=self._endpoint.api_key,
                    timeout=self._timeout(self.timeout + self.late_wait),
                    max_retries=0,
                )
            return self._client

    def _async_state(self) -> tuple[openai.AsyncOpenAI, asyncio.Semaphore]:
        """An async client and semaphore for the running event loop (they cannot cross loops)."""
        loop = asyncio.get_running_loop()
        state = self._loop_state.get(loop)
        if state is None:
            client = openai.AsyncOpenAI(
                base_url=self.base_url,
                api_key=self._endpoint.api_key,
                timeout=self._timeout(self.timeout + self.late_wait),
                max_retries=0,
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
    def _cache_lookup(self, endpoint: str, model: str, params: Mapping[str, Any]) -> tuple[str | None, Any]:
        if self.cache is None:
            return None, None
        key = self.cache.key(self.base_url, endpoint, model, params)
        return key, self.cache.get(key)

    def _begin(self, call: _Call, queued_since: float) -> float:
        """Count an attempt and return its HTTP timeout (clamped to what is left of the deadline).

        Time spent waiting for a concurrency slot does not count against the deadline: the
        request was not in flight.
        """
        now = time.monotonic()
        if call.started is None:
            call.started = now
            call.deadline_at = now + self.deadline
        else:
            call.deadline_at += now - queued_since
        call.attempts += 1
        with self._count_lock:
            self.attempts += 1
        call.limit = max(min(self.timeout + self.late_wait, call.deadline_at - now), 0.05)
        call.sent_at = time.monotonic()
        return call.limit

    @contextlib.contextmanager
    def _attempt(self, call: _Call, queued_since: float) -> Iterator[openai.Timeout]:
        """One attempt, inside its concurrency slot: yields its HTTP timeout; a failure is noted and re-raised."""
        seconds = self._begin(call, queued_since)
        try:
            yield self._timeout(seconds)
        except Exception as exc:
            self._failed(call, exc)
            raise

    def _heard(self) -> None:
        with self._count_lock:
            self._last_heard = time.monotonic()

    def _failed(self, call: _Call, exc: BaseException) -> None:
        """Note why an attempt failed (the server answering at all counts as a sign of life)."""
        reason = classify(exc)
        call.reasons.append(reason or type(exc).__name__)
        if isinstance(exc, openai.APIStatusError):
            self._heard()
        elif reason == TIMEOUT:
            with self._count_lock:
                self.abandoned += 1
        elif reason in (MALFORMED, MISSING_LOGPROBS):
            self._heard()
            with self._count_lock:
                self.spoiled += 1

    def _finish(
        self,
        call: _Call,
        raw: Any,
        cache_key: str | None,
        endpoint: str,
        model: str,
        check: Callable[[dict[str, Any]], object] | None,
    ) -> dict[str, Any]:
        """A fresh answer: parse, check, store in the cache (before anyone uses it), count a late one;
        a body ``check`` refuses is noted as a failed attempt and re-raised."""
        try:
            self._heard()
            elapsed = time.monotonic() - call.sent_at
            if elapsed > self.timeout:
                with self._count_lock:
                    self.late_answers += 1
                log.info(
                    "%s %s (model %r) answered after %.1f s, past timeout %g s: used the late answer "
                    "rather than paying for a second request",
                    self.base_url,
                    endpoint,
                    model,
                    elapsed,
                    self.timeout,
                )
            body = _to_dict(raw)
            if check is not None:
                check(body)
            self._ever_usable = True
            if self.cache is not None and cache_key is not None:
                self.cache.put(cache_key, self._scrub(body), endpoint=endpoint, model=model)
            return body
        except Exception as exc:
            self._failed(call, exc)
            raise

    def call(
        self,
        endpoint: str,
        model: str,
        params: Mapping[str, Any],
        send: Callable[[openai.OpenAI, dict[str, Any]], Any],
        check: Callable[[dict[str, Any]], object] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Send one request through ``send(client, params)``; returns (JSON body, served from cache).

        ``check(body)`` runs on every fresh body before it is cached; a transient
        MissingLogprobsError or a MalformedResponseError from it is retried like a 500, anything
        else it raises is passed on and nothing is stored.
        """
        key, hit = self._cache_lookup(endpoint, model, params)
        if hit is not None:
            return hit, True
        call = _Call()

        def once() -> dict[str, Any]:
            queued = time.monotonic()
            with self._sync_sem, self._attempt(call, queued) as timeout:
                raw = send(self.client.with_options(timeout=timeout), dict(params))
            return self._finish(call, raw, key, endpoint, model, check)

        failure: BlackboxProxyError | None = None
        try:
            body = Retrying(**self._retry_policy(endpoint, model, call))(once)
        except Exception as exc:  # noqa: BLE001 - turned into one redacted error below
            failure = self._final(exc, endpoint, model, call)
        if failure is not None:
            raise failure  # outside the except block: nothing from the HTTP client is chained
        return body, False

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
        call = _Call()

        async def once() -> dict[str, Any]:
            queued = time.monotonic()
            async with sem:
                with self._attempt(call, queued) as timeout:
                    raw = await send(client.with_options(timeout=timeout), dict(params))
            return self._finish(call, raw, key, endpoint, model, check)

        failure: BlackboxProxyError | None = None
        try:
            body = await AsyncRetrying(**self._retry_policy(endpoint, model, call))(once)
        except Exception as exc:  # noqa: BLE001 - turned into one redacted error below
            failure = self._final(exc, endpoint, model, call)
        if failure is not None:
            raise failure
        return body, False

    def _retry_policy(self, endpoint: str, model: str, call: _Call) -> dict[str, Any]:
        """tenacity settings shared by the sync and async paths."""

        def stop(state: RetryCallState) -> bool:
            if state.attempt_number > self.max_retries:
                return True
            upcoming = float(getattr(state, "upcoming_sleep", 0.0) or 0.0)
            # give up rather than start an attempt with (almost) no time left
            left = call.deadline_at - time.monotonic() - upcoming
            return left < min(1.0, 0.1 * self.timeout)

        return {
            "stop": stop,
            "wait": self._wait,
            "retry": retry_if_exception(is_retryable),
            "before_sleep": self._log_retry(endpoint, model),
            "reraise": True,
        }

    def _scrub(self, body: dict[str, Any]) -> dict[str, Any]:
        """The body to store: the key never reaches the cache, even if a server put it in a 200."""
        text = json.dumps(body, ensure_ascii=False)
        clean = redact(text, self._endpoint.api_key)
        return body if clean == text else json.loads(clean)

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
        return redact(text, self._endpoint.api_key)

    def _final(self, exc: BaseException, endpoint: str, model: str, call: _Call) -> BlackboxProxyError:
        """The one error a failed request ends in (redacted, one line), or ``exc`` itself when it is not ours."""
        reason = classify(exc)
        if reason is None and not isinstance(exc, openai.OpenAIError):
            if isinstance(exc, BlackboxProxyError):  # e.g. check() refusing a body for good
                exc.args = (self._redact(" ".join(str(exc).split())),)
                exc.__cause__ = exc.__context__ = None
                exc.__suppress_context__ = True
                return exc
            raise exc  # a programming error (TypeError in send ...): keep its traceback
        return self.error(exc, endpoint, model, call.attempts, reason=reason, call=call)

    def error(
        self,
        exc: BaseException,
        endpoint: str,
        model: str,
        attempts: int,
        *,
        reason: str | None = None,
        call: _Call | None = None,
    ) -> ProviderError:
        """The ProviderError subclass for a final failure: server, model, status and what to check."""
        reason = reason if reason is not None else classify(exc)
        where = f"{self.base_url} ({endpoint}, model {model!r})"
        tries = f"after {attempts} attempt{'s' if attempts != 1 else ''}"
        status: int | None = exc.status_code if isinstance(exc, openai.APIStatusError) else None
        cls: type[ProviderError] = TransientProviderError
        hard = self.timeout + self.late_wait
        if reason == TIMEOUT:
            started = call.started if call is not None and call.started is not None else -math.inf
            if self._last_heard < started:
                cls, reason = FatalProviderError, HANGING
                msg = (
                    f"server at {self.base_url} has answered nothing for {time.monotonic() - started:.0f} s "
                    f"({tries} at {endpoint}, model {model!r}, each waited up to {hard:g} s): it is hanging "
                    "or overloaded; check it, then run again (finished work is kept)"
                )
            elif call is not None and call.limit < 0.9 * hard:
                msg = (
                    f"request to {where} used up its {self.deadline:g} s deadline {tries} (the last one had "
                    f"{call.limit:.1f} s left and got no answer): is the server overloaded? raise "
                    "deadline= or timeout=, or lower max_concurrency="
                )
            else:
                msg = (
                    f"request to {where} timed out after {hard:g} s ({self.timeout:g} s timeout + "
                    f"{self.late_wait:g} s waiting for a late answer), {tries}: is the server overloaded? "
                    "raise timeout= or lower max_concurrency="
                )
        elif reason == UNREACHABLE:
            cls = FatalProviderError
            names = _cause_names(exc) & {"ConnectError", "ConnectTimeout"}
            detail = f" ({sorted(names)[0]})" if names else ""
            msg = f"cannot reach server at {self.base_url}{detail} {tries}: is it running, and is base_url right?"
        elif reason == CONNECTION_LOST:
            msg = f"the connection to {where} was lost {tries} ({_describe(exc.__cause__ or exc)})"
        elif isinstance(exc, openai.APIStatusError):
            assert status is not None
            fatal = {AUTH: FatalProviderError, NOT_FOUND: FatalProviderError, REJECTED: RequestRejectedError}
            cls = fatal.get(reason or "", TransientProviderError)
            msg = f"{where} answered HTTP {status} {tries}: {_body_snippet(exc)}; {_status_hint(status)}"
        elif reason == MALFORMED:
            msg = (
                f"{where} returned a malformed response {tries} ({_describe(exc)}): a truncated or non-JSON "
                "body; if every answer is like this, is it an OpenAI-compatible server?"
            )
        elif reason == MISSING_LOGPROBS:
            every = call is not None and call.reasons and all(r == MISSING_LOGPROBS for r in call.reasons)
            if every and not self._ever_usable:
                cls, reason = LogprobsUnsupportedError, NO_LOGPROBS
                msg = (
                    f"{where} answered {attempts} time{'s' if attempts != 1 else ''} without the log-probs "
                    f"asked for and never with them ({exc}): does this server or model return log-probs?"
                )
            else:
                cls = TransientMissingLogprobsError
                msg = f"{exc} ({tries}; asking again later may help)"
        else:
            cls = FatalProviderError if isinstance(exc, openai.OpenAIError) else ProviderError
            msg = f"request to {where} failed {tries}: {_describe(exc)}"
        err = cls(self._redact(" ".join(msg.split())))
        err.status = status
        err.attempts = attempts
        err.base_url = self.base_url
        err.model = model
        err.reason = reason or ""
        return err


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "unknown error"
    text = " ".join(str(exc).split())
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
