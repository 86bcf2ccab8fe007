"""Checking that white-box models share one vocabulary before their logits are combined id by id."""

from __future__ import annotations

import re
from collections.abc import Sequence

from .adapters.base import FullLogitsModel
from .errors import VocabularyMismatchError

#: Placeholder entries some converters append to reach the padded embedding size (e.g. "[PAD151665]").
_PADDING = re.compile(r"^(|\[PAD\d*\]|<\|?pad[\w|]*\|?>|<pad_?\d*>)$", re.IGNORECASE)


def is_padding_token(text: str) -> bool:
    """True for an empty or "[PADn]"-style placeholder entry that no tokenizer ever produces."""
    return bool(_PADDING.match(text))


def shared_vocab_size(models: Sequence[FullLogitsModel]) -> int:
    """Size of the vocabulary every model shares, or VocabularyMismatchError naming the first difference.

    Token texts must agree id by id. Lists may differ in length only by trailing padding
    placeholders (a hub Qwen tokenizer has 151,665 tokens, its GGUF conversion lists 151,936);
    the shared size is then the shortest list, and the decoder never samples past it.
    Every model's logits must be at least that wide.
    """
    if not models:
        raise VocabularyMismatchError("no models to compare")
    ref = models[0]
    ref_vocab = list(ref.vocab())
    size = len(ref_vocab)
    for other in models[1:]:
        if other is ref:
            continue
        vocab = list(other.vocab())
        common = min(len(ref_vocab), len(vocab))
        for idx in range(common):
            if ref_vocab[idx] != vocab[idx]:
                raise VocabularyMismatchError(
                    f"models {ref.name!r} and {other.name!r} do not share a vocabulary: first difference at "
                    f"token id {idx}: {ref_vocab[idx]!r} vs {vocab[idx]!r} (full-logit proxy-tuning needs "
                    "identical tokenizers; use the multiple-choice reranker for models with different ones)"
                )
        longer, longer_vocab = (ref, ref_vocab) if len(ref_vocab) > len(vocab) else (other, vocab)
        for idx in range(common, len(longer_vocab)):
            if not is_padding_token(longer_vocab[idx]):
                shorter = other if longer is ref else ref
                raise VocabularyMismatchError(
                    f"model {longer.name!r} has token id {idx} {longer_vocab[idx]!r} that {shorter.name!r} "
                    f"lacks (its vocabulary ends at {common}); the models do not share a vocabulary"
                )
        size = min(size, common)
    for m in models:
        if m.vocab_size < size:
            raise VocabularyMismatchError(
                f"model {m.name!r} returns {m.vocab_size} logits per token but its vocabulary has {size} tokens"
            )
    return size
