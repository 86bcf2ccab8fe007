"""What the OpenAI-protocol providers share: configuration, the transport, repr without the key."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from ..cache import ResponseCache
from ..transport import Transport
from ..types import TopLogprobs
from .base import Prompt
from .openai_common import check_model


def _resource(client: Any, api: str) -> Any:
    """The client resource of an API name: ``client.chat.completions`` or ``client.completions``."""
    return client.chat.completions if api == "chat.completions" else client.completions


class OpenAIProviderBase:
    """Base of the Chat and Completions providers; subclasses set ``kind`` and ``default_max_k``.

    ``base_url`` / ``api_key`` come from the arguments, else OPENAI_BASE_URL / OPENAI_API_KEY; a local
    server without a key gets a dummy one. ``timeout``, ``late_wait``, ``deadline``, ``max_retries``
    and the backoff settings go to :class:`~blackbox_proxy.transport.Transport` (see there).
    ``max_k`` is the largest k accepted (``"default"`` = the endpoint's OpenAI limit; None for
    servers without a limit such as llama.cpp). ``extra_params`` are sent with every request.
    """

    kind = "openai"
    #: the API the requests go to: "chat.completions" or "completions" (the transport's cache key too)
    api = "chat.completions"
    #: the prompt form: "chat" messages or "completions" text (set by each subclass)
    endpoint = "chat"
    default_max_k: int | None = None
    #: optional features (see adapters/base.py); subclasses extend it
    capabilities: frozenset[str] = frozenset()

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        max_retries: int = 5,
        max_concurrency: int = 8,
        cache: ResponseCache | str | os.PathLike[str] | None = None,
        max_k: int | None | Literal["default"] = "default",
        extra_params: Mapping[str, Any] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 20.0,
        late_wait: float | None = None,
        deadline: float | None = None,
    ) -> None:
        self.model = check_model(model, self.kind)
        self.max_k = self.default_max_k if max_k == "default" else max_k
        self.extra_params = dict(extra_params or {})
        self.transport = Transport(
            base_url,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            max_concurrency=max_concurrency,
            cache=cache,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            late_wait=late_wait,
            deadline=deadline,
        )

    @property
    def max_concurrency(self) -> int:
        """Requests the transport lets run at once."""
        return self.transport.max_concurrency

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    @property
    def _where(self) -> str:
        return f"model {self.model!r} at {self.base_url}"

    def close(self) -> None:
        """Release HTTP connections and the cache handle."""
        self.transport.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, api_key='***')"

    # -- requests ---------------------------------------------------------------------------------
    def request_params(self, prompt: Prompt, k: int) -> dict[str, Any]:
        """The JSON request for the top-k log-probs of the next token after ``prompt`` (subclasses)."""
        raise NotImplementedError

    def parse(self, body: Mapping[str, Any], k: int, *, cached: bool = False) -> TopLogprobs:
        """TopLogprobs from a response body (subclasses); MissingLogprobsError when it carries none."""
        raise NotImplementedError

    def _post(self, params: dict[str, Any], check: Any = None) -> tuple[dict[str, Any], bool]:
        """One request to :attr:`api` through the transport; ``check`` accepts a fresh body before it is cached."""
        return self.transport.call(
            self.api, self.model, params, lambda client, p: _resource(client, self.api).create(**p), check
        )

    async def _apost(self, params: dict[str, Any], check: Any = None) -> tuple[dict[str, Any], bool]:
        """Async twin of :meth:`_post` (bounded by the transport's concurrency limit)."""

        async def send(client: Any, p: dict[str, Any]) -> Any:
            return await _resource(client, self.api).create(**p)

        return await self.transport.acall(self.api, self.model, params, send, check)

    def top_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Top-k log-probs of the first token the model generates after ``prompt``.

        A body is cached only if it parses (a ``logprobs: null`` answer is not remembered).
        """
        body, cached = self._post(self.request_params(prompt, k), lambda b: self.parse(b, k))
        return self.parse(body, k, cached=cached)

    async def atop_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs`."""
        body, cached = await self._apost(self.request_params(prompt, k), lambda b: self.parse(b, k))
        return self.parse(body, k, cached=cached)


def openai_max_k(options: Any, default: int | None) -> int | None:
    """The k limit for ``options``: explicit (0 = none), else OpenAI's own at api.openai.com, none elsewhere."""
    if options.max_k != "default":
        return options.max_k or None
    url = options.resolved_base_url() or "https://api.openai.com/v1"
    return default if "api.openai.com" in url else None


def openai_provider_kwargs(options: Any) -> dict[str, Any]:
    """Constructor arguments of an OpenAI-protocol provider from ProviderOptions (key read from the env)."""
    return {
        "base_url": options.resolved_base_url(),
        "api_key": options.api_key(),
        "timeout": options.timeout,
        "late_wait": getattr(options, "late_wait", None),  # None: the transport's defaults
        "deadline": getattr(options, "deadline", None),
        "max_retries": options.max_retries,
        "max_concurrency": options.max_concurrency,
        "cache": options.cache,
        "extra_params": dict(options.extra) or None,
    }
