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

from typing import Any

from ..errors import InputError
from .base import ProviderOptions, register_provider
from .continuation import CONTINUE, TOKENIZE
from .openai_completions import OpenAICompletionsProvider
from .openai_provider import openai_max_k, openai_provider_kwargs
from .vllm import tokenize_route

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

    def tokenize(self, text: str) -> list[int]:
        """The ids the server reads for ``text`` as a prompt (BOS included where the model adds one);
        one request each (the black-box generator remembers the last few it needs)."""
        if not isinstance(text, str) or not text:
            raise InputError(f"{self._where}: nothing to tokenize ({text!r})")
        return tokenize_route(
            self.transport,
            self.model,
            self._where,
            route="/extras/tokenize",
            server="llama-cpp-python's server (use provider 'openai-completions' for other servers)",
            needed_for="the re-tokenisation check of black-box generation",
            input=text,
        )


@register_provider("llama-cpp-server")
def _llama_cpp_server(options: ProviderOptions) -> LlamaCppServerProvider:
    """llama-cpp-python's server (``blackbox-proxy serve``): Completions plus its /extras/tokenize."""
    return LlamaCppServerProvider(
        options.model,
        max_k=openai_max_k(options, None),
        **openai_provider_kwargs(options),
    )
