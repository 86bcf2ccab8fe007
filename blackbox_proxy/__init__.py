"""blackbox-proxy: proxy-tune hosted or self-hosted language models at decoding time.

The names below are the public API. Heavy ones (torch, transformers, llama.cpp) load on first use,
so ``import blackbox_proxy`` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

from .combine import combine
from .errors import (
    BlackboxProxyError,
    CacheError,
    CandidateError,
    FatalProviderError,
    InputError,
    LogprobsUnsupportedError,
    MalformedResponseError,
    MissingCandidateError,
    MissingLogprobsError,
    ModelSpecError,
    ProviderError,
    RequestRejectedError,
    TransientMissingLogprobsError,
    TransientProviderError,
    VocabularyMismatchError,
)
from .types import MCQuestion, SteeredAnswer, TokenLogprob, TopLogprobs, Usage

__version__ = "0.1.0"

#: public name -> module that defines it (imported lazily)
_LAZY = {
    "ExpertPair": "blackbox_proxy.experts",
    "Reranker": "blackbox_proxy.rerank",
    "MCRecord": "blackbox_proxy.rerank",
    "derive": "blackbox_proxy.rerank",
    "steer": "blackbox_proxy.rerank",
    "TopLogprobsProvider": "blackbox_proxy.adapters.base",
    "FullLogitsModel": "blackbox_proxy.adapters.base",
    "ProviderOptions": "blackbox_proxy.adapters.base",
    "register_provider": "blackbox_proxy.adapters.base",
    "create_provider": "blackbox_proxy.adapters.base",
    "provider_names": "blackbox_proxy.adapters.base",
    "OpenAIChatProvider": "blackbox_proxy.adapters.openai_chat",
    "OpenAICompletionsProvider": "blackbox_proxy.adapters.openai_completions",
    "LlamaCppTopKProvider": "blackbox_proxy.adapters.llama_cpp_inprocess",
    "LlamaCppServerProvider": "blackbox_proxy.adapters.llama_cpp_server",
    "LocalServer": "blackbox_proxy.server",
    "ResponseCache": "blackbox_proxy.cache",
    "ProxyDecoder": "blackbox_proxy.decoding",
    "ProxyPair": "blackbox_proxy.decoding",
    "GenerationConfig": "blackbox_proxy.decoding",
    "ProxyTuningLogitsProcessor": "blackbox_proxy.logits_processor",
    "train_expert": "blackbox_proxy.training",
    "TrainConfig": "blackbox_proxy.training",
    "build_corpus": "blackbox_proxy.corpus",
    "EvaluationRunner": "blackbox_proxy.evaluation.runner",
    "EvalResult": "blackbox_proxy.evaluation.runner",
    "load_dataset": "blackbox_proxy.evaluation.datasets",
    "load_causal_lm": "blackbox_proxy.models",
    "load_model": "blackbox_proxy.models",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'blackbox_proxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "BlackboxProxyError",
    "CacheError",
    "CandidateError",
    "FatalProviderError",
    "LogprobsUnsupportedError",
    "MalformedResponseError",
    "RequestRejectedError",
    "TransientMissingLogprobsError",
    "TransientProviderError",
    "InputError",
    "MCQuestion",
    "MissingCandidateError",
    "MissingLogprobsError",
    "ModelSpecError",
    "ProviderError",
    "SteeredAnswer",
    "TokenLogprob",
    "TopLogprobs",
    "Usage",
    "VocabularyMismatchError",
    "combine",
    *_LAZY,
]
