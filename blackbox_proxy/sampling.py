"""Choosing the next token from steered scores, and cutting generated text at stop strings.

Pure helpers shared by :mod:`blackbox_proxy.decoding` and the ``transformers`` interop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError


@dataclass(frozen=True)
class GenerationConfig:
    """How to pick tokens and when to stop.

    Greedy when ``temperature`` is None or 0; otherwise temperature, then top-k, then top-p
    (nucleus) sampling, seeded by ``seed`` for reproducible runs. Generation ends per row at an EOS
    token (``stop_at_eos``), at the first stop string (cut from the text), or after
    ``max_new_tokens``. ``analysis`` records every step's log-probs (see ``decoding.StepRecord``).
    """

    max_new_tokens: int = 128
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = field(default=())
    seed: int | None = None
    stop_at_eos: bool = True
    #: EOS ids to stop at instead of the base model's own
    eos_token_ids: frozenset[int] | None = None
    analysis: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.eos_token_ids is not None:
            object.__setattr__(self, "eos_token_ids", frozenset(int(t) for t in self.eos_token_ids))
        self.validate()

    @property
    def greedy(self) -> bool:
        """True when decoding takes the arg-max token."""
        return not self.temperature

    def validate(self) -> None:
        """Raise InputError naming the first bad setting."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if self.temperature is not None and not (self.temperature >= 0 and self.temperature < float("inf")):
            raise InputError(f"temperature must be >= 0 (0 or None = greedy), got {self.temperature!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.greedy and (self.top_p < 1 or self.top_k > 0):
            raise InputError("top_p / top_k only apply when sampling: also set a temperature > 0")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise InputError(f"stop strings must be non-empty strings, got {s!r}")


def select_tokens(scores: Any, config: GenerationConfig, generator: Any = None) -> Any:
    """Next token id per row (LongTensor [batch]) from unnormalised scores [batch, vocab]."""
    import torch

    if config.greedy:
        return scores.argmax(dim=-1)
    logits = scores / float(config.temperature)
    if config.top_k > 0 and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        drop_sorted = mass_before > config.top_p
        drop_sorted[:, 0] = False  # always keep the most likely token
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index where the earliest stop string starts in ``text``, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def streamable_prefix(text: str, stops: Sequence[str]) -> str:
    """The part of unfinished ``text`` safe to show: no partial UTF-8 character, no possible stop start."""
    cut = len(text)
    while cut > 0 and text[cut - 1] == "\ufffd":
        cut -= 1
    text = text[:cut]
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return text[: len(text) - hold]
