"""Top-k log-probs of the first answer token from any OpenAI-compatible Chat Completions endpoint.

One request per prompt: ``max_tokens=1`` (never 0: llama.cpp reads 0 as unlimited), ``temperature=0``,
``logprobs=True`` and ``top_logprobs=k``. Works with OpenAI, vLLM, llama.cpp and others through the
official ``openai`` client; every request goes through :class:`~blackbox_proxy.transport.Transport`.

Continuing a partial assistant message (open-ended black-box generation) is not possible on
OpenAI's own Chat Completions (:meth:`OpenAIChatProvider.continue_prefix` says what to use instead);
:class:`ContinueChatProvider` does it on servers with vLLM's ``continue_final_message``.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import InputError, ProviderError
from ..types import TopLogprobs
from .base import (
    OPENAI_CHAT_MAX_TOP_LOGPROBS,
    OPENAI_COMPLETIONS_MAX_LOGPROBS,
    Prompt,
    ProviderOptions,
    register_provider,
)
from .continuation import (
    CONTINUE,
    CapabilityError,
    Continuation,
    check_block,
    check_block_size,
    parse_chat_positions,
)
from .openai_common import (
    check_k,
    first_choice,
    no_logprobs_error,
    parse_chat_position,
    position_result,
    to_messages,
    usage_of,
)
from .openai_provider import OpenAIProviderBase, openai_max_k, openai_provider_kwargs

ENDPOINT = "chat.completions"


class OpenAIChatProvider(OpenAIProviderBase):
    """A black-box chat model: top-k log-probs of its first generated token.

    Configuration as :class:`~blackbox_proxy.adapters.openai_provider.OpenAIProviderBase`; ``max_k``
    defaults to 20, OpenAI's limit for ``top_logprobs``.
    """

    kind = "openai-chat"
    endpoint = "chat"
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
        return position_result(self, entries, chosen, k, usage_of(body, cached))

    # -- continuing a partial assistant message -----------------------------------------------------
    def continue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """Not possible on plain Chat Completions: always raises :class:`CapabilityError`."""
        raise self._no_continue_error()

    def _no_continue_error(self) -> CapabilityError:
        return CapabilityError(
            f"{self.kind} ({self._where}) cannot continue a partial assistant message: OpenAI's Chat "
            "Completions always starts a new assistant turn. Use the Completions endpoint (--endpoint "
            "completions, OpenAICompletionsProvider) or a server with continue_final_message (vLLM: "
            "ContinueChatProvider)"
        )

    async def acontinue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """Async twin of :meth:`continue_prefix` (always raises)."""
        return self.continue_prefix(prefix, n, k, messages=messages)


class ContinueChatProvider(OpenAIChatProvider):
    """Chat Completions on a server that continues a partial assistant message (vLLM).

    ``continue_prefix(prefix, n, k, messages=...)`` sends ``messages`` followed by an assistant
    message holding ``prefix``, with ``continue_final_message: true`` and ``add_generation_prompt:
    false`` (vLLM's request fields, sent as ``extra_body``). Servers that do not know the field
    silently ignore it and open a new turn, so support is probed once: asking for both
    ``continue_final_message`` and ``add_generation_prompt`` is a 400 on a server that knows them
    and a 200 on one that ignores them (then :class:`CapabilityError`).
    """

    kind = "openai-chat-continue"
    capabilities: frozenset[str] = frozenset({CONTINUE})

    def __init__(
        self, model: str, base_url: str | None = None, api_key: str | None = None, **options: Any
    ) -> None:
        super().__init__(model, base_url, api_key, **options)
        if "api.openai.com" in self.base_url:
            raise self._no_continue_error()
        self._supported: bool | None = None
        self._probe_lock = threading.Lock()

    def _extra_body(self, fields: Mapping[str, Any]) -> dict[str, Any]:
        extra = dict(self.extra_params.get("extra_body") or {})
        extra.update(fields)
        return extra

    def continue_params(self, prefix: str, n: int, k: int, messages: Prompt) -> dict[str, Any]:
        """The request: the conversation, then the partial assistant message to continue."""
        check_k(k, self.max_k, self.kind)
        if not isinstance(prefix, str):
            raise InputError(f"{self.kind} continues text only, not token ids")
        msgs = to_messages(messages)
        params: dict[str, Any] = {
            "model": self.model,
            "max_tokens": check_block_size(n, self.kind),
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": k,
        }
        params.update(self.extra_params)
        if prefix:
            params["messages"] = [*msgs, {"role": "assistant", "content": prefix}]
            params["extra_body"] = self._extra_body(
                {"continue_final_message": True, "add_generation_prompt": False}
            )
        else:  # nothing generated yet: a plain request opens the assistant turn
            params["messages"] = msgs
        return params

    def check_continue_support(self) -> None:
        """Probe once whether the server honours continue_final_message (CapabilityError if not)."""
        with self._probe_lock:
            if self._supported is None:
                params = {
                    "model": self.model,
                    "messages": [
                        {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"},
                    ],
                    "max_tokens": 1,
                    "temperature": 0,
                    "extra_body": self._extra_body(
                        {"continue_final_message": True, "add_generation_prompt": True}
                    ),
                }
                try:
                    self._post(params)
                    self._supported = False
                except ProviderError as exc:
                    self._supported = getattr(exc, "status", None) == 400 and "continue_final_message" in str(
                        exc
                    )
                    if not self._supported and getattr(exc, "status", None) != 400:
                        raise
            if not self._supported:
                raise CapabilityError(
                    f"{self._where} ignores continue_final_message (it accepted a request that vLLM "
                    "rejects), so it cannot continue a partial assistant message; use the Completions "
                    "endpoint (--endpoint completions) or a vLLM server"
                )

    def parse_continuation(
        self, body: Mapping[str, Any], n: int, k: int, *, cached: bool = False
    ) -> Continuation:
        """Every generated position of a chat answer (chat-style ``logprobs.content``)."""
        where = self._where
        choice = first_choice(body, where)
        finish = choice.get("finish_reason")
        message = choice.get("message") or {}
        text = message.get("content") if isinstance(message, Mapping) else None
        text = text if isinstance(text, str) else ""
        usage = usage_of(body, cached)
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, Mapping) or logprobs.get("content") is None:
            if not text and finish == "stop" and usage.completion_tokens == 0:
                positions: tuple[TopLogprobs, ...] = ()
            else:
                raise no_logprobs_error(where)
        else:
            positions = parse_chat_positions(logprobs.get("content"), k, where, self.model, self.kind)
        check_block(positions, n, finish, where)
        return Continuation(positions, finish, n, k, text, usage, self.model, self.kind, False)

    def _continue_request(
        self, prefix: str | Sequence[int], n: int, k: int, messages: Prompt | None
    ) -> dict[str, Any]:
        if messages is None:
            raise InputError(f"{self.kind}: continue_prefix needs the conversation (messages=...)")
        return self.continue_params(prefix, n, k, messages)  # type: ignore[arg-type]

    def continue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """``n`` greedy tokens continuing the partial assistant message ``prefix`` after ``messages``."""
        params = self._continue_request(prefix, n, k, messages)
        if prefix:
            self.check_continue_support()
        body, cached = self._post(params, lambda b: self.parse_continuation(b, n, k))
        return self.parse_continuation(body, n, k, cached=cached)

    async def acontinue_prefix(
        self, prefix: str | Sequence[int], n: int, k: int = 5, *, messages: Prompt | None = None
    ) -> Continuation:
        """Async twin of :meth:`continue_prefix` (the one-time support probe runs in a thread)."""
        import asyncio

        params = self._continue_request(prefix, n, k, messages)
        if prefix:
            await asyncio.to_thread(self.check_continue_support)
        body, cached = await self._apost(params, lambda b: self.parse_continuation(b, n, k))
        return self.parse_continuation(body, n, k, cached=cached)


@register_provider("openai-chat")
def _openai_chat(options: ProviderOptions) -> OpenAIChatProvider:
    """OpenAI Chat Completions (or any compatible server at ``base_url``)."""
    return OpenAIChatProvider(
        options.model,
        max_k=openai_max_k(options, OPENAI_CHAT_MAX_TOP_LOGPROBS),
        **openai_provider_kwargs(options),
    )


@register_provider("openai")
def _openai(options: ProviderOptions) -> Any:
    """The OpenAI protocol: Chat Completions or legacy Completions, by ``options.endpoint``."""
    if options.endpoint == "completions":
        from .openai_completions import OpenAICompletionsProvider

        return OpenAICompletionsProvider(
            options.model,
            max_k=openai_max_k(options, OPENAI_COMPLETIONS_MAX_LOGPROBS),
            **openai_provider_kwargs(options),
        )
    return _openai_chat(options)


@register_provider("openai-chat-continue")
def _openai_chat_continue(options: ProviderOptions) -> ContinueChatProvider:
    """Chat Completions that continue a partial assistant message (vLLM's continue_final_message)."""
    return ContinueChatProvider(
        options.model,
        max_k=openai_max_k(options, OPENAI_CHAT_MAX_TOP_LOGPROBS),
        **openai_provider_kwargs(options),
    )
