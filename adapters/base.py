"""The two small protocols every model source plugs in behind.

* black-box: a :class:`TopLogprobsProvider` returns only the top-k log-probs of the first
  generated token, over HTTP or in-process (hosted APIs, OpenAI-compatible servers);
* white-box: a :class:`FullLogitsModel` returns full next-token logits locally (transformers,
  llama.cpp), for full-vocabulary proxy-tuned decoding.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from ..types import TopLogprobs

#: A prompt is either plain completion text or a list of chat messages ({"role", "content"}).
Prompt = str | Sequence[Mapping[str, str]]

#: OpenAI's documented limits on the number of returned alternatives.
OPENAI_CHAT_MAX_TOP_LOGPROBS = 20
OPENAI_COMPLETIONS_MAX_LOGPROBS = 5


@runtime_checkable
class TopLogprobsProvider(Protocol):
    """A model that exposes only the top-k log-probs of its next token (the black-box case)."""

    #: model name as the provider knows it
    model: str
    #: short provider kind, e.g. "openai-chat", "openai-completions", "llama-cpp-inprocess"
    kind: str
    #: largest k this provider accepts (None = unlimited)
    max_k: int | None

    def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        """Top-k log-probs of the first token the model would generate after ``prompt``."""
        ...

    async def atop_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs`."""
        ...


@runtime_checkable
class FullLogitsModel(Protocol):
    """A local model that returns full next-token logits (the white-box case).

    Owned by the decoding work (issue 5): see ``decoding.py`` for how it is driven.
    """

    vocab_size: int

    def tokenizer_vocab(self) -> Mapping[str, int] | Any:
        """Token text -> id mapping, used to check that models share a vocabulary."""
        ...
