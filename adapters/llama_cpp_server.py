"""llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) as a Completions base.

Its ``/v1/completions`` takes prompt *text* only (a list of token ids is refused), so a generation
continued through it is re-sent as text, which the server may re-tokenise differently from the
tokens it generated. Its ``/extras/tokenize`` route (at the server root) tells which ids it reads
for a text: with it, the black-box generator checks every block position and cuts a block where the
text would come back re-tokenised, so speculative output equals one-call-per-token output exactly.

The server's default ``repeat_penalty`` (1.1) makes its greedy token differ from the top of its own
log-probs; this provider sends 1.0 unless told otherwise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import InputError, ProviderError
from .base import ProviderOptions, register_provider
from .continuation import CONTINUE, TOKENIZE, CapabilityError
from .openai_completions import OpenAICompletionsProvider
from .openai_provider import openai_max_k, openai_provider_kwargs
from .vllm import server_root

__all__ = ["LlamaCppServerProvider"]

#: request fields that make the server's greedy token the top of its own log-probs
NO_PENALTY: dict[str, Any] = {"repeat_penalty": 1.0}


class LlamaCppServerProvider(OpenAICompletionsProvider):
    """Completions on llama-cpp-python's server: text prefixes, and the server's own tokenisation.

    Same configuration as :class:`OpenAICompletionsProvider` (``max_k`` defaults to no limit, which
    this server has); ``repeat_penalty=1.0`` is added to every request unless ``extra_params``
    gives another value.
    """

    kind = "llama-cpp-server"
    #: continues text (not ids: the server refuses them) and says how it tokenises a text
    capabilities: frozenset[str] = frozenset({CONTINUE, TOKENIZE})

    def __init__(
        self, model: str, base_url: str | None = None, api_key: str | None = None, **options: Any
    ) -> None:
        options.setdefault("max_k", None)
        extra = dict(options.pop("extra_params", None) or {})
        body = dict(extra.get("extra_body") or {})
        for key, value in NO_PENALTY.items():
            body.setdefault(key, value)
        extra["extra_body"] = body
        super().__init__(model, base_url, api_key, extra_params=extra, **options)
        self._tok_cache: dict[str, tuple[int, ...]] = {}

    def tokenize(self, text: str) -> list[int]:
        """The ids the server reads for ``text`` as a prompt (BOS included where the model adds one)."""
        if not isinstance(text, str) or not text:
            raise InputError(f"{self._where}: nothing to tokenize ({text!r})")
        hit = self._tok_cache.get(text)
        if hit is None:
            hit = tuple(self._tokenize(text))
            if len(self._tok_cache) > 4096:
                self._tok_cache.clear()
            self._tok_cache[text] = hit
        return list(hit)

    def _tokenize(self, text: str) -> list[int]:
        url = server_root(self.transport.base_url) + "/extras/tokenize"
        where = self._where

        def check(body: Mapping[str, Any]) -> None:
            toks = body.get("tokens") if isinstance(body, Mapping) else None
            if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
                raise CapabilityError(
                    f"{where}: /extras/tokenize answered without a token list: not llama-cpp-python's server"
                )

        try:
            body, _ = self.transport.call(
                "tokenize",
                self.model,
                {"model": self.model, "input": text},
                lambda client, p: client.post(url, cast_to=object, body=p),
                check,
            )
        except ProviderError as exc:
            if getattr(exc, "status", None) in (404, 405):
                raise CapabilityError(
                    f"{where} has no /extras/tokenize route (HTTP {exc.status}): not llama-cpp-python's "
                    "server; use provider 'openai-completions' for other servers"
                ) from None
            raise
        return [int(t) for t in body["tokens"]]


@register_provider("llama-cpp-server")
def _llama_cpp_server(options: ProviderOptions) -> LlamaCppServerProvider:
    """llama-cpp-python's server (``blackbox-proxy serve``): Completions plus its /extras/tokenize."""
    return LlamaCppServerProvider(
        options.model,
        max_k=openai_max_k(options, None),
        **openai_provider_kwargs(options),
    )
