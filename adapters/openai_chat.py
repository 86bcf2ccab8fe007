"""Top-k log-probs of the first answer token from any OpenAI-compatible Chat Completions endpoint.

One request per prompt: ``max_tokens=1`` (never 0: llama.cpp reads 0 as unlimited), ``temperature=0``,
``logprobs=True`` and ``top_logprobs=k``. Works with OpenAI, vLLM, llama.cpp and others through the
official ``openai`` client; every request goes through :class:`~blackbox_proxy.transport.Transport`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..cache import ResponseCache
from ..transport import Transport
from ..types import TopLogprobs
from .base import OPENAI_CHAT_MAX_TOP_LOGPROBS, Prompt
from .openai_common import (
    check_k,
    check_model,
    first_choice,
    no_logprobs_error,
    parse_chat_position,
    to_messages,
    usage_of,
)

ENDPOINT = "chat.completions"


class OpenAIChatProvider:
    """A black-box chat model: top-k log-probs of its first generated token.

    ``base_url`` / ``api_key`` come from the arguments, else OPENAI_BASE_URL / OPENAI_API_KEY; a local
    server without a key gets a dummy one. ``max_k`` is the largest k accepted (20, OpenAI's limit;
    None for servers without a limit such as llama.cpp). ``extra_params`` are sent with every request.
    """

    kind = "openai-chat"

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
        max_k: int | None = OPENAI_CHAT_MAX_TOP_LOGPROBS,
        extra_params: Mapping[str, Any] | None = None,
        backoff_initial: float = 0.5,
        backoff_max: float = 20.0,
    ) -> None:
        self.model = check_model(model, self.kind)
        self.max_k = max_k
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
        )

    @property
    def base_url(self) -> str:
        return self.transport.base_url

    def close(self) -> None:
        """Release HTTP connections and the cache handle."""
        self.transport.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model={self.model!r}, base_url={self.base_url!r}, api_key='***')"

    def request_params(self, prompt: Prompt, k: int) -> dict[str, Any]:
        """The JSON request for the top-k log-probs of the first token after ``prompt``."""
        check_k(k, self.max_k, self.kind)
        params: dict[str, Any] = {
            "model": self.model,
            "messages": to_messages(prompt),
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": k,
        }
        params.update(self.extra_params)
        return params

    def parse(self, body: Mapping[str, Any], k: int, *, cached: bool = False) -> TopLogprobs:
        """TopLogprobs from a response body; MissingLogprobsError when it carries none."""
        where = f"model {self.model!r} at {self.base_url}"
        choice = first_choice(body, where)
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, Mapping):
            raise no_logprobs_error(where)
        entries, chosen = parse_chat_position(logprobs, where)
        return TopLogprobs(
            entries=tuple(entries),
            k=k,
            chosen=chosen,
            model=self.model,
            provider=self.kind,
            usage=usage_of(body, cached),
        )

    def _check(self, k: int) -> Any:
        """A body is cached only if it parses (a `logprobs: null` answer is not remembered)."""
        return lambda body: self.parse(body, k)

    def top_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Top-k log-probs of the first token the model generates after ``prompt``."""
        params = self.request_params(prompt, k)
        body, cached = self.transport.call(
            ENDPOINT,
            self.model,
            params,
            lambda client, p: client.chat.completions.create(**p),
            self._check(k),
        )
        return self.parse(body, k, cached=cached)

    async def atop_logprobs(self, prompt: Prompt, k: int = 5) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs` (bounded by the transport's concurrency limit)."""
        params = self.request_params(prompt, k)

        async def send(client: Any, p: dict[str, Any]) -> Any:
            return await client.chat.completions.create(**p)

        body, cached = await self.transport.acall(ENDPOINT, self.model, params, send, self._check(k))
        return self.parse(body, k, cached=cached)
