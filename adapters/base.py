"""The protocols every model source plugs in behind, and the provider registry.

* black-box: a :class:`TopLogprobsProvider` returns only the top-k log-probs of the first
  generated token, over HTTP or in-process (hosted APIs, OpenAI-compatible servers);
* white-box: a :class:`FullLogitsModel` returns full next-token logits locally (transformers,
  llama.cpp), for full-vocabulary decoding and for scoring candidates under an expert pair.

A provider is one file: a class following :class:`TopLogprobsProvider` and a
``@register_provider("name")`` factory taking :class:`ProviderOptions`. Third-party packages add
providers through the ``blackbox_proxy.providers`` entry-point group (each entry point names a
factory with the same signature); ``create_provider(name, options)`` finds either kind.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import InputError
from ..types import TopLogprobs

#: A prompt is either plain completion text or a list of chat messages ({"role", "content"}).
Prompt = str | Sequence[Mapping[str, str]]

#: OpenAI's documented limits on the number of returned alternatives.
OPENAI_CHAT_MAX_TOP_LOGPROBS = 20
OPENAI_COMPLETIONS_MAX_LOGPROBS = 5

#: The prompt styles a provider may take: chat messages or completion text.
ENDPOINTS = ("chat", "completions")

#: Entry-point group through which other packages register providers.
ENTRY_POINT_GROUP = "blackbox_proxy.providers"


@runtime_checkable
class TopLogprobsProvider(Protocol):
    """A model that exposes only the top-k log-probs of its next token (the black-box case).

    What callers may rely on, and nothing more:

    * ``endpoint`` is ``"chat"`` (the prompt is chat messages) or ``"completions"`` (prompt text);
    * ``max_k`` is the largest k accepted (None = unlimited); a larger k is an InputError;
    * ``max_concurrency`` is how many requests may usefully be in flight at once (1 = serial);
    * ``capabilities`` names optional features (e.g. ``"continue"``: continue a raw prefix);
    * ``close()`` releases connections or weights and is idempotent.
    """

    #: model name as the provider knows it
    model: str
    #: short provider kind for reports, e.g. "openai-chat", "openai-completions", "llama-cpp-inprocess"
    kind: str
    #: "chat" or "completions": the prompt form this provider takes
    endpoint: str
    #: largest k this provider accepts (None = unlimited)
    max_k: int | None
    #: requests that may usefully run in parallel
    max_concurrency: int
    #: optional features this provider has
    capabilities: frozenset[str]

    def top_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        """Top-k log-probs of the first token the model would generate after ``prompt``."""
        ...

    async def atop_logprobs(self, prompt: Prompt, k: int) -> TopLogprobs:
        """Async twin of :meth:`top_logprobs`."""
        ...

    def close(self) -> None:
        """Release what the provider holds (idempotent)."""
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
    ``blackbox_proxy.decoding`` drives them step by step (one :class:`LogitsSession` per model) and
    ``blackbox_proxy.experts`` scores candidates with :meth:`logprobs`.

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
    #: whether :meth:`encode_chat` can render chat messages
    has_chat_template: bool
    #: the unknown-token id, if the tokenizer has one
    unk_token_id: int | None
    #: the longest token sequence the model accepts
    max_context: int

    def vocab(self) -> Sequence[str]:
        """Token text of every id, in id order (used to check that models share one vocabulary)."""
        ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of plain ``text``; with ``add_special_tokens`` those the tokenizer adds itself (BOS)."""
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

    def logprobs(self, seqs: Sequence[Sequence[int]], keep: int = 1) -> Any:
        """Log-softmax over the vocabulary at the last ``keep`` positions of each sequence.

        A float32 ``torch.Tensor`` [len(seqs), keep, vocab_size]; row ``j`` of a sequence predicts
        the token after its position ``len - keep + j``. No cache is kept (one-shot scoring).
        """
        ...


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class ProviderOptions:
    """Everything a provider factory may use; each factory reads the fields that apply to it.

    ``model`` is the model name (HTTP) or model spec (in-process); the API key is never stored
    here, only the name of the environment variable holding it (``api_key_env``).
    """

    model: str
    base_url: str | None = None
    endpoint: str = "chat"
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout: float = 30.0
    max_retries: int = 5
    max_concurrency: int = 4
    cache: str | os.PathLike[str] | None = None
    #: largest k: "default" lets the provider choose (OpenAI's limits at api.openai.com, none elsewhere)
    max_k: int | None | str = "default"
    threads: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINTS:
            raise InputError(f"unknown endpoint {self.endpoint!r}; choose one of {ENDPOINTS}")

    def api_key(self) -> str | None:
        """The key, read from the environment variable at call time (never kept on the object)."""
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def resolved_base_url(self) -> str | None:
        """``base_url``, else $OPENAI_BASE_URL."""
        return self.base_url or os.environ.get("OPENAI_BASE_URL") or None


ProviderFactory = Callable[[ProviderOptions], TopLogprobsProvider]

_REGISTRY: dict[str, ProviderFactory] = {}
_BUILTIN_MODULES = ("openai_chat", "openai_completions", "llama_cpp_inprocess", "llama_cpp_server", "vllm")
_loaded_builtins = False


def register_provider(name: str, factory: ProviderFactory | None = None) -> Any:
    """Register a provider factory under ``name``; usable as a decorator or called directly.

    Registering a name twice replaces the earlier factory (a test or plugin may override one).
    """
    if not isinstance(name, str) or not name.strip():
        raise InputError(f"a provider name must be a non-empty string, got {name!r}")

    def deco(f: ProviderFactory) -> ProviderFactory:
        _REGISTRY[name] = f
        return f

    return deco(factory) if factory is not None else deco


def unregister_provider(name: str) -> None:
    """Remove a registered provider (no error if absent)."""
    _REGISTRY.pop(name, None)


def _load_builtins() -> None:
    global _loaded_builtins
    if not _loaded_builtins:
        for mod in _BUILTIN_MODULES:
            importlib.import_module(f"{__package__}.{mod}")
        _loaded_builtins = True


def _entry_points() -> dict[str, Any]:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def provider_names() -> list[str]:
    """Every provider name: built-in, registered at run time, and from installed plugins."""
    _load_builtins()
    return sorted(set(_REGISTRY) | set(_entry_points()))


def create_provider(name: str, options: ProviderOptions) -> TopLogprobsProvider:
    """Build the provider registered as ``name`` (a clear error lists the known names)."""
    _load_builtins()
    factory = _REGISTRY.get(name)
    if factory is None:
        ep = _entry_points().get(name)
        if ep is None:
            raise InputError(f"unknown provider {name!r}; known providers: {', '.join(provider_names())}")
        factory = ep.load()
        _REGISTRY[name] = factory
    provider = factory(options)
    missing = [a for a in ("model", "endpoint", "max_k", "max_concurrency") if not hasattr(provider, a)]
    if missing:
        raise InputError(f"provider {name!r} does not follow the protocol: it has no {', '.join(missing)}")
    return provider
