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
class LogitsSession(Protocol):
    """One batch of sequences being decoded by one model; the session owns that model's KV cache.

    Rows are fixed at :meth:`FullLogitsModel.open`; every :meth:`feed` appends exactly one token
    to every row (finished rows are fed a filler token and ignored by the caller).
    """

    #: number of rows (sequences) in the batch
    batch_size: int

    def logits(self) -> Any:
        """Next-token logits of every row: float32 ``torch.Tensor`` of shape [batch, model.vocab_size]."""
        ...

    def feed(self, token_ids: Sequence[int]) -> None:
        """Append one token per row and advance the cache, so :meth:`logits` is the next position's."""
        ...

    def close(self) -> None:
        """Release the cache (idempotent); sessions are also context managers."""
        ...


@runtime_checkable
class FullLogitsModel(Protocol):
    """A local model that returns full next-token logits (the white-box case).

    Implementations: ``transformers_local.TransformersModel`` and ``llama_cpp_local.LlamaCppModel``;
    ``blackbox_proxy.decoding`` drives them step by step, one :class:`LogitsSession` per model.

    Vocabulary contract: :meth:`vocab` lists the tokenizer's token texts by id; ``vocab_size`` is the
    width of the logits rows, which may exceed ``len(vocab())`` (Qwen pads its embedding matrix to
    151,936 rows). Columns past the vocabulary are never sampled by the decoder.
    """

    #: display name (the model spec it was loaded from)
    name: str
    #: backend kind, e.g. "transformers" or "llama-cpp"
    kind: str
    #: width of each logits row (>= len(vocab()) for usable models)
    vocab_size: int
    #: token ids that end a generation (tokenizer EOS plus the generation config's)
    eos_token_ids: frozenset[int]

    def vocab(self) -> Sequence[str]:
        """Token text of every id, in id order (used to check that models share one vocabulary)."""
        ...

    def encode(self, text: str) -> list[int]:
        """Token ids of plain ``text``, with the special tokens the tokenizer adds itself (e.g. BOS)."""
        ...

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """Token ids of chat ``messages`` in the model's chat template, ending with the assistant prompt."""
        ...

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` (special tokens dropped)."""
        ...

    def open(self, prompts: Sequence[Sequence[int]]) -> LogitsSession:
        """Evaluate a batch of prompts (token ids, lengths may differ) and return their session."""
        ...
