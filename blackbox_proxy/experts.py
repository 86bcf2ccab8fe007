"""Scoring answer candidates under a local expert / anti-expert pair (transformers, CPU, batched).

Each model reads the prompt in its *own* format (its chat template for chat messages, plain text
otherwise) and each candidate is found in its *own* tokenizer by text: the label ``"A"`` counts as
the tokens ``"A"`` and ``" A"``, pooled by log-sum-exp of log-softmax over the full vocabulary,
the same event the base side pools in :func:`blackbox_proxy.candidates.match_candidates`. A label
with no single-token variant is scored as a string (sum of its teacher-forced token log-probs),
or rejected with :class:`~blackbox_proxy.errors.CandidateError` in strict mode. The expert and the
anti-expert may use different tokenizers: only candidate texts cross between them.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

from .candidates import check_labels, logsumexp
from .errors import CandidateError, InputError, MissingLogprobsError
from .prompts import mc_messages, mc_text, messages_to_text
from .types import MCQuestion

#: What ExpertPair.score accepts per item: completion text, chat messages, or a question
#: (rendered with :func:`mc_messages` or :func:`mc_text` depending on the model's chat template).
PromptLike = Union[str, Sequence[Mapping[str, str]], MCQuestion]  # noqa: UP007 - readable alias
#: A model spec (packaged name, GGUF file, folder, hub id) or an already loaded (model, tokenizer).
ModelLike = Union[str, "os.PathLike[str]", tuple[Any, Any]]  # noqa: UP007

_LOADED: dict[str, tuple[Any, Any]] = {}
_LOAD_LOCK = threading.Lock()


def load_shared(spec: str | os.PathLike[str]) -> tuple[Any, Any]:
    """Load a model spec once per process (pairs sharing an anti-expert share its weights)."""
    from .models import load_causal_lm

    key = str(spec)
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED[key] = load_causal_lm(key)
        return _LOADED[key]


@dataclass(frozen=True)
class PairScores:
    """Log-prob of each candidate under the expert and under the anti-expert, for one prompt."""

    expert: dict[str, float]
    anti_expert: dict[str, float]
    #: candidates that were scored as multi-token strings (no single-token variant) in either model
    string_scored: tuple[str, ...] = field(default=())

    def as_pair(self) -> tuple[dict[str, float], dict[str, float]]:
        """(expert, anti_expert), the shape :func:`blackbox_proxy.combine.combine` takes."""
        return self.expert, self.anti_expert

    def offsets(self, alpha: float = 1.0) -> dict[str, float]:
        """``alpha * (expert - anti_expert)`` per candidate."""
        return {k: alpha * (self.expert[k] - self.anti_expert[k]) for k in self.expert}

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {f"expert_lp_{k}": v for k, v in self.expert.items()}
        row.update({f"anti_lp_{k}": v for k, v in self.anti_expert.items()})
        row["string_scored"] = "".join(self.string_scored)
        return row


@dataclass(frozen=True)
class _Variants:
    """How one candidate is found in one tokenizer."""

    single_ids: tuple[int, ...]
    strings: tuple[tuple[int, ...], ...]


class CausalScorer:
    """One local causal LM scoring candidate continuations at the end of prompts."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        name: str = "",
        *,
        chat_template: bool = True,
        strict_single_token: bool = False,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = (
            name or getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
        )
        self.use_chat_template = bool(chat_template) and bool(getattr(tokenizer, "chat_template", None))
        self.strict_single_token = strict_single_token
        self.batch_size = batch_size
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self._variants: dict[str, _Variants] = {}

    # -- prompts -------------------------------------------------------------------------------
    def render(self, prompt: PromptLike) -> list[int]:
        """Token ids of a prompt in this model's own format (chat template when it has one)."""
        tok = self.tokenizer
        if isinstance(prompt, MCQuestion):
            prompt = mc_messages(prompt) if self.use_chat_template else mc_text(prompt)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            ids = tok(prompt, add_special_tokens=True)["input_ids"]
        else:
            messages = [dict(m) for m in prompt]
            if self.use_chat_template:
                if not messages:
                    raise InputError("empty chat prompt: no messages")
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                ids = tok(text, add_special_tokens=False)["input_ids"]
            else:
                ids = tok(messages_to_text(messages), add_special_tokens=True)["input_ids"]
        if not ids:
            raise InputError(f"prompt renders to no tokens in {self.name}")
        return list(ids)

    # -- candidates ----------------------------------------------------------------------------
    def variants(self, label: str) -> _Variants:
        """Token ids of ``label`` and ``" " + label`` in this tokenizer (single tokens and strings)."""
        if label in self._variants:
            return self._variants[label]
        core = label.strip()
        if not core:
            raise InputError(f"candidate {label!r} is empty")
        singles: list[int] = []
        strings: list[tuple[int, ...]] = []
        for text in dict.fromkeys((core, " " + core)):
            ids = tuple(self.tokenizer.encode(text, add_special_tokens=False))
            if len(ids) == 1 and ids[0] != self.tokenizer.unk_token_id:
                if ids[0] not in singles:
                    singles.append(ids[0])
            elif ids and ids not in strings:
                strings.append(ids)
        if not singles and not strings:
            raise CandidateError(f"candidate {label!r} has no tokens in {self.name}'s tokenizer")
        if not singles and self.strict_single_token:
            raise CandidateError(
                f"candidate {label!r} is not a single token in {self.name}'s tokenizer "
                f"(variants {core!r} / {' ' + core!r} take {[len(s) for s in strings]} tokens); "
                "strict single-token mode is on"
            )
        out = _Variants(tuple(singles), tuple(strings) if not singles else ())
        self._variants[label] = out
        return out

    # -- forward passes ------------------------------------------------------------------------
    def _batch_logprobs(self, seqs: Sequence[Sequence[int]], keep: int) -> Any:
        """Log-softmax over the vocabulary at the last ``keep`` positions of each (left-padded) sequence."""
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        with torch.inference_mode():
            try:
                logits = self.model(**kwargs, logits_to_keep=keep, use_cache=False).logits
            except TypeError:  # models whose forward has no logits_to_keep
                logits = self.model(**kwargs, use_cache=False).logits
            logits = logits[:, -keep:, :].float()
            return torch.log_softmax(logits, dim=-1)

    def _check_nan(self, lp: Any, what: str) -> None:
        import torch

        if torch.isnan(lp).any():
            raise MissingLogprobsError(f"model {self.name} produced NaN log-probs ({what})")

    def score(
        self, prompts: Sequence[PromptLike], candidates: Sequence[Sequence[str]], progress: Any = None
    ) -> list[dict[str, float]]:
        """Log-prob of each prompt's candidates as the next answer (pooled variants), batched."""
        if len(prompts) != len(candidates):
            raise InputError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        rendered = [self.render(p) for p in prompts]
        cand_vars = [{lab: self.variants(lab) for lab in labs} for labs in candidates]
        out: list[dict[str, float]] = [{} for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
        # single-token candidates: one forward per batch, last position only
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lp = self._batch_logprobs([rendered[i] for i in idx], keep=1)[:, -1, :]
            self._check_nan(lp, f"prompts {idx}")
            for row, i in enumerate(idx):
                for lab, var in cand_vars[i].items():
                    if var.single_ids:
                        out[i][lab] = logsumexp(float(lp[row, t]) for t in var.single_ids)
            if progress is not None:
                progress.update(len(idx))
        # multi-token candidates: teacher-forced continuation, sum of token log-probs
        jobs = [
            (i, lab, cont)
            for i, vars_ in enumerate(cand_vars)
            for lab, var in vars_.items()
            if not var.single_ids
            for cont in var.strings
        ]
        string_lps: dict[tuple[int, str], list[float]] = {}
        jobs.sort(key=lambda j: len(rendered[j[0]]) + len(j[2]))
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            keep = max(len(c) for _, _, c in chunk) + 1
            lp = self._batch_logprobs([rendered[i] + list(c) for i, _, c in chunk], keep=keep)
            self._check_nan(lp, "string candidates")
            for row, (i, lab, cont) in enumerate(chunk):
                n = len(cont)
                # logits at position p predict token p+1: the continuation's tokens are the last n
                total = sum(float(lp[row, keep - 1 - n + j, t]) for j, t in enumerate(cont))
                string_lps.setdefault((i, lab), []).append(total)
        for (i, lab), vals in string_lps.items():
            out[i][lab] = logsumexp(vals)
        for i, labs in enumerate(candidates):
            for lab in labs:
                v = out[i][lab]
                if math.isnan(v):
                    raise MissingLogprobsError(f"model {self.name}: NaN log-prob for candidate {lab!r}")
        return [{lab: out[i][lab] for lab in labs} for i, labs in enumerate(candidates)]


def _as_scorer(m: ModelLike, **opts: Any) -> CausalScorer:
    if isinstance(m, tuple):
        if len(m) != 2:
            raise InputError("a loaded model must be given as a (model, tokenizer) tuple")
        return CausalScorer(m[0], m[1], **opts)
    model, tok = load_shared(m)
    return CausalScorer(model, tok, name=str(m), **opts)


class ExpertPair:
    """A tuned expert and its untuned anti-expert, scoring answer candidates locally.

    ``expert`` / ``anti_expert`` are model specs (see :mod:`blackbox_proxy.models`) or loaded
    ``(model, tokenizer)`` tuples. ``chat_template=False`` makes both read plain text
    (:func:`~blackbox_proxy.prompts.mc_text`) even when they have a chat template.
    """

    def __init__(
        self,
        expert: ModelLike,
        anti_expert: ModelLike,
        *,
        chat_template: bool = True,
        strict_single_token: bool = False,
        batch_size: int = 8,
    ) -> None:
        opts = {
            "chat_template": chat_template,
            "strict_single_token": strict_single_token,
            "batch_size": batch_size,
        }
        self.expert = _as_scorer(expert, **opts)
        same = anti_expert is expert or (
            not isinstance(expert, tuple)
            and not isinstance(anti_expert, tuple)
            and str(expert) == str(anti_expert)
        )
        self.anti_expert = self.expert if same else _as_scorer(anti_expert, **opts)
        self.batch_size = batch_size

    @property
    def name(self) -> str:
        """``expert - anti_expert``, for reports."""
        return f"{self.expert.name} - {self.anti_expert.name}"

    def score(
        self,
        prompts: Sequence[PromptLike],
        candidates: Sequence[str] | Sequence[Sequence[str]],
        *,
        progress: bool = False,
    ) -> list[PairScores]:
        """Candidate log-probs under both models for each prompt.

        ``candidates`` is one label list shared by every prompt, or one list per prompt.
        """
        prompts = list(prompts)
        if not prompts:
            return []
        if candidates and all(isinstance(c, str) for c in candidates):
            per_prompt: list[tuple[str, ...]] = [tuple(candidates)] * len(prompts)  # type: ignore[arg-type]
        else:
            per_prompt = [tuple(c) for c in candidates]
        if len(per_prompt) != len(prompts):
            raise InputError(f"{len(prompts)} prompts but {len(per_prompt)} candidate lists")
        for labs in per_prompt:
            check_labels(labs)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=2 * len(prompts), desc="expert pair", unit="prompt", leave=False)
        try:
            exp = self.expert.score(prompts, per_prompt, bar)
            anti = (
                exp if self.anti_expert is self.expert else self.anti_expert.score(prompts, per_prompt, bar)
            )
        finally:
            if bar is not None:
                bar.close()
        out = []
        for labs, e, a in zip(per_prompt, exp, anti, strict=True):
            strs = tuple(
                lab
                for lab in labs
                if not self.expert.variants(lab).single_ids or not self.anti_expert.variants(lab).single_ids
            )
            out.append(PairScores(e, a, strs))
        return out
