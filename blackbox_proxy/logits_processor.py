"""``transformers`` interop: proxy-tuning as a LogitsProcessor for ``base.generate(...)``.

    proc = ProxyTuningLogitsProcessor([ProxyPair(expert, anti, alpha=1.0)], prompts=prompts)
    out = base.generate(**enc, logits_processor=LogitsProcessorList([proc]))

The processor adds ``sum alpha_i * (log_softmax(expert_i) - log_softmax(anti_i))`` to the base's
scores at every step. The pair models keep their own KV caches (opened at the first step of a
``generate`` call and advanced by the token ``generate`` appended since the last step). Greedy
``generate`` with this processor gives the same tokens as :class:`blackbox_proxy.decoding.ProxyDecoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .adapters.base import FullLogitsModel, LogitsSession, Prompt
from .decoding import ProxyPair, pair_offset, render_prompt
from .errors import InputError
from .vocabulary import shared_vocab_size

try:  # subclass the real base class when transformers is importable (it always is with torch here)
    from transformers import LogitsProcessor as _Base
except ImportError:  # pragma: no cover - transformers is a core dependency
    _Base = object  # type: ignore[assignment,misc]


class ProxyTuningLogitsProcessor(_Base):  # type: ignore[misc,valid-type]
    """Apply expert/anti-expert offsets to a base model's scores inside ``generate``.

    ``prompts``: the batch's prompts (one per row, in ``generate``'s row order), rendered for each
    pair model in its own format. Without them, each pair model reads the base's own input ids
    (valid only because vocabularies are shared), with left padding removed by ``attention_mask``
    when given. ``base`` (optional) adds the base to the vocabulary check. Beam search and
    ``num_return_sequences > 1`` are not supported (rows must stay one per prompt).
    """

    def __init__(
        self,
        pairs: ProxyPair | Sequence[ProxyPair],
        prompts: Sequence[Prompt] | None = None,
        *,
        attention_mask: Any = None,
        base: FullLogitsModel | None = None,
    ) -> None:
        self.pairs = (pairs,) if isinstance(pairs, ProxyPair) else tuple(pairs)
        if not self.pairs:
            raise InputError("ProxyTuningLogitsProcessor needs at least one ProxyPair")
        models = ([base] if base is not None else []) + [
            m for p in self.pairs for m in (p.expert, p.anti_expert)
        ]
        #: columns shared by every model; wider base scores are masked past it
        self.vocab_size = shared_vocab_size(models)
        self.prompts = list(prompts) if prompts is not None else None
        self.attention_mask = attention_mask
        self._sessions: list[LogitsSession] = []
        self._seen: Any = None

    def reset(self) -> None:
        """Close the pair models' sessions (the next call starts a new generation)."""
        for s in self._sessions:
            s.close()
        self._sessions = []
        self._seen = None

    def _prompt_ids(self, model: FullLogitsModel, fmt: Any, input_ids: Any) -> list[list[int]]:
        if self.prompts is not None:
            if len(self.prompts) != input_ids.shape[0]:
                raise InputError(
                    f"generate() has {input_ids.shape[0]} rows but the processor got {len(self.prompts)} prompts"
                )
            return [render_prompt(model, p, fmt) for p in self.prompts]
        rows = input_ids.tolist()
        if self.attention_mask is not None:
            mask = self.attention_mask.tolist()
            if len(mask) != len(rows) or any(len(m) != len(r) for m, r in zip(mask, rows, strict=True)):
                raise InputError("attention_mask does not match generate()'s input_ids")
            rows = [
                [t for t, keep in zip(r, m, strict=True) if keep] for r, m in zip(rows, mask, strict=True)
            ]
        return rows

    def _start(self, input_ids: Any) -> None:
        self.reset()
        for p in self.pairs:
            for model, fmt in ((p.expert, p.expert_format), (p.anti_expert, p.anti_format)):
                self._sessions.append(model.open(self._prompt_ids(model, fmt, input_ids)))

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        """Return ``scores`` plus the pairs' offsets, for the position after ``input_ids``."""
        import torch

        seen = self._seen
        continuing = (
            seen is not None
            and input_ids.shape[0] == seen.shape[0]
            and input_ids.shape[1] == seen.shape[1] + 1
            and bool(torch.equal(input_ids[:, :-1], seen))
        )
        if continuing:
            last = [int(t) for t in input_ids[:, -1].tolist()]
            for s in self._sessions:
                s.feed(last)
        else:
            self._start(input_ids)
        self._seen = input_ids.detach().clone()
        n = self.vocab_size
        if scores.shape[-1] < n:
            raise InputError(
                f"base scores have {scores.shape[-1]} columns, fewer than the shared vocabulary ({n})"
            )
        offset = None  # summed exactly as ProxyDecoder sums it, so both routes give identical scores
        for i, p in enumerate(self.pairs):
            if p.alpha == 0:
                continue
            e = torch.log_softmax(self._sessions[2 * i].logits()[:, :n], dim=-1)
            a = torch.log_softmax(self._sessions[2 * i + 1].logits()[:, :n], dim=-1)
            term = pair_offset(e, a, p.alpha)
            offset = term if offset is None else offset + term
        out = scores.clone()
        if offset is not None:
            out[:, :n] = scores[:, :n] + offset.to(scores.dtype)
        if scores.shape[-1] > n:
            out[:, n:] = float("-inf")
        return out
