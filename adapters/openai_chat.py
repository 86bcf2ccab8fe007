"""Top-k log-probs of the first answer token from any OpenAI-compatible Chat Completions endpoint.

One request per prompt: ``max_tokens=1`` (never 0: llama.cpp reads 0 as unlimited), ``temperature=0``,
``logprobs=True`` and ``top_logprobs=k``. Works with OpenAI, vLLM, llama.cpp and others through the
official ``openai`` client; every request goes through :class:`~blackbox_proxy.transport.Transport`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..types import TopLogprobs
from .base import OPENAI_CHAT_MAX_TOP_LOGPROBS, Prompt
from .openai_common import (
    check_k,
    first_choice,
    no_logprobs_error,
    parse_chat_position,
    to_messages,
    usage_of,
)
from .openai_provider import OpenAIProviderBase

ENDPOINT = "chat.completions"


class OpenAIChatProvider(OpenAIProviderBase):
    """A black-box chat model: top-k log-probs of its first generated token.

    Configuration as :class:`~blackbox_proxy.adapters.openai_provider.OpenAIProviderBase`; ``max_k``
    defaults to 20, OpenAI's limit for ``top_logprobs``.
    """

    kind = "openai-chat"
    default_max_k = OPENAI_CHAT_MAX_TOP_LOGPROBS

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
        where = self._where
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
