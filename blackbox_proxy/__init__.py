"""blackbox-proxy: proxy-tune hosted or self-hosted language models at decoding time."""

from .combine import combine
from .errors import (
    BlackboxProxyError,
    CandidateError,
    InputError,
    MissingCandidateError,
    MissingLogprobsError,
    ModelSpecError,
    ProviderError,
    VocabularyMismatchError,
)
from .types import MCQuestion, SteeredAnswer, TokenLogprob, TopLogprobs, Usage

__version__ = "0.1.0"

__all__ = [
    "BlackboxProxyError",
    "CandidateError",
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
]
