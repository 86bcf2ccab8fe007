"""The expert pair: a tuned expert and its untuned anti-expert, scoring answer candidates locally.

Both models are :class:`~blackbox_proxy.adapters.base.FullLogitsModel` objects from the one local-model
layer (:func:`blackbox_proxy.models.load_model`), so an expert can run on transformers or on llama.cpp
(a GGUF file, or ``llama-cpp:SPEC``), chosen by its model spec. The same :class:`ExpertPair` drives
full-logit decoding (:mod:`blackbox_proxy.decoding`) and multiple-choice scoring.

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .adapters.base import FullLogitsModel
from .candidates import check_labels, logsumexp
from .errors import CandidateError, InputError, MissingLogprobsError
from .prompts import mc_messages, mc_text, messages_to_text
from .types import MCQuestion

#: What a pair scores per item: completion text, chat messages, or a question (rendered with
#: :func:`mc_messages` or :func:`mc_text` depending on the model's chat template).
PromptLike = Union[str, Sequence[Mapping[str, str]], MCQuestion, "TemplatedQuestion"]  # noqa: UP007
#: A model spec (packaged name, GGUF file, folder, hub id, ``llama-cpp:SPEC``) or a loaded model.
ModelLike = Union[str, "os.PathLike[str]", FullLogitsModel]  # noqa: UP007
#: How a model reads a prompt while decoding: "plain" text, its "chat" template, or a function
#: of the prompt returning the plain text to encode (see :func:`blackbox_proxy.decoding.render_prompt`).
PromptFormat = Union[Literal["plain", "chat"], Callable[[Any], str]]  # noqa: UP007


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

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form for run stores (inverse of :meth:`from_json`)."""
        return {
            "expert": self.expert,
            "anti_expert": self.anti_expert,
            "string_scored": list(self.string_scored),
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> PairScores:
        return cls(
            {k: float(v) for k, v in d["expert"].items()},
            {k: float(v) for k, v in d["anti_expert"].items()},
            tuple(d.get("string_scored") or ()),
        )


@dataclass(frozen=True)
class TemplatedQuestion:
    """A question to be rendered with a given prompt template, in each model's own format."""

    question: MCQuestion
    template: Any = None


@dataclass(frozen=True)
class _Variants:
    """How one candidate is found in one tokenizer."""

    single_ids: tuple[int, ...]
    strings: tuple[tuple[int, ...], ...]


class CandidateScorer:
    """One local model scoring candidate continuations at the end of prompts (batched by length)."""

    def __init__(
        self,
        model: FullLogitsModel,
        *,
        chat_template: bool = True,
        strict_single_token: bool = False,
        batch_size: int = 8,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.name = model.name
        self.use_chat_template = bool(chat_template) and bool(model.has_chat_template)
        self.strict_single_token = strict_single_token
        self.batch_size = batch_size
        self._variants: dict[str, _Variants] = {}
        self._lock = threading.Lock()

    # -- prompts -------------------------------------------------------------------------------
    def render(self, prompt: PromptLike) -> list[int]:
        """Token ids of a prompt in this model's own format (chat template when it has one)."""
        if isinstance(prompt, MCQuestion):
            prompt = TemplatedQuestion(prompt)
        if isinstance(prompt, TemplatedQuestion):
            q, t = prompt.question, prompt.template
            prompt = mc_messages(q, t) if self.use_chat_template else mc_text(q, t)
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("empty prompt")
            ids = self.model.encode(prompt)
        else:
            messages = [dict(m) for m in prompt]
            if not messages:
                raise InputError("empty chat prompt: no messages")
            if self.use_chat_template:
                ids = self.model.encode_chat(messages)
            else:
                ids = self.model.encode(messages_to_text(messages))
        if not ids:
            raise InputError(f"prompt renders to no tokens in {self.name}")
        limit = self.model.max_context
        if len(ids) > limit - 16:
            raise InputError(
                f"prompt has {len(ids)} tokens, more than {self.name}'s context of {limit}: question too long"
            )
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
            ids = tuple(self.model.encode(text, add_special_tokens=False))
            if len(ids) == 1 and ids[0] != self.model.unk_token_id:
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

    def _logprobs(self, seqs: Sequence[Sequence[int]], keep: int, what: str, check: bool = True) -> Any:
        import torch

        lp = self.model.logprobs(seqs, keep)
        if check and torch.isnan(lp).any():
            raise MissingLogprobsError(f"model {self.name} produced NaN log-probs ({what})")
        return lp

    def score(
        self, prompts: Sequence[PromptLike], candidates: Sequence[Sequence[str]], progress: Any = None
    ) -> list[dict[str, float]]:
        """Log-prob of each prompt's candidates as the next answer (pooled variants), batched."""
        if len(prompts) != len(candidates):
            raise InputError(f"{len(prompts)} prompts but {len(candidates)} candidate lists")
        rendered = [self.render(p) for p in prompts]
        cand_vars = [{lab: self.variants(lab) for lab in labs} for labs in candidates]
        out: list[dict[str, float]] = [{} for _ in prompts]
        # multi-token candidates: teacher-forced continuation, sum of token log-probs
        jobs = [
            (i, lab, cont)
            for i, vars_ in enumerate(cand_vars)
            for lab, var in vars_.items()
            if not var.single_ids
            for cont in var.strings
        ]
        with self._lock:  # one scoring pass at a time per model (scorers may be shared across threads)
            self._score_singles(rendered, cand_vars, out, progress)
            string_lps = self._continuations(rendered, jobs)
        for (i, lab), vals in string_lps.items():
            out[i][lab] = logsumexp(vals)
        for i, labs in enumerate(candidates):
            for lab in labs:
                if lab not in out[i] or math.isnan(out[i][lab]):
                    raise MissingLogprobsError(f"model {self.name}: no log-prob (NaN) for candidate {lab!r}")
        return [{lab: out[i][lab] for lab in labs} for i, labs in enumerate(candidates)]

    def _score_singles(
        self,
        rendered: Sequence[Sequence[int]],
        cand_vars: Sequence[Mapping[str, _Variants]],
        out: list[dict[str, float]],
        progress: Any,
    ) -> None:
        """Fill ``out`` with the pooled single-token variants: one forward per batch, last position only."""
        order = sorted(range(len(rendered)), key=lambda i: len(rendered[i]))
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            lp = self._logprobs([rendered[i] for i in idx], 1, f"prompts {idx}")[:, -1, :]
            for row, i in enumerate(idx):
                for lab, var in cand_vars[i].items():
                    if var.single_ids:
                        out[i][lab] = logsumexp(float(lp[row, t]) for t in var.single_ids)
            if progress is not None:
                progress.update(len(idx))

    def _continuations(
        self, rendered: Sequence[Sequence[int]], jobs: Sequence[tuple[int, str, Sequence[int]]]
    ) -> dict[tuple[int, str], list[float]]:
        """Sum of token log-probs of each job's continuation after its prompt, batched by length."""
        out: dict[tuple[int, str], list[float]] = {}
        jobs = sorted(jobs, key=lambda j: len(rendered[j[0]]) + len(j[2]))
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            keep = max(len(c) for _, _, c in chunk) + 1
            seqs = [list(rendered[i]) + list(c) for i, _, c in chunk]
            # the window may reach into a short row's left padding; only each row's own tokens are read
            lp = self._logprobs(seqs, min(keep, max(len(s) for s in seqs)), "string candidates", check=False)
            width = lp.shape[1]
            for row, (i, lab, cont) in enumerate(chunk):
                n = len(cont)
                # logits at position p predict token p+1: the continuation's tokens are the last n
                total = sum(float(lp[row, width - 1 - n + j, t]) for j, t in enumerate(cont))
                if math.isnan(total):
                    raise MissingLogprobsError(
                        f"model {self.name} produced NaN log-probs (string candidates)"
                    )
                out.setdefault((i, lab), []).append(total)
        return out


#: The name of round 1; the scorer now runs on any FullLogitsModel backend.
CausalScorer = CandidateScorer


def _finite_alpha(a: Any) -> float:
    if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a):
        raise InputError(f"alpha must be a finite number, got {a!r}")
    return float(a)


class ExpertPair:
    """A tuned expert and its untuned anti-expert: the one pair class of every path.

    ``expert`` / ``anti_expert`` are model specs (see :mod:`blackbox_proxy.models`; the backend
    follows the spec, or ``backend``) or loaded FullLogitsModels. Specs load on first use, so a
    resumed run that needs no scoring loads nothing. ``alpha`` is the pair's weight where the caller
    does not give one. Multiple choice: ``chat_template=False`` makes both read plain text
    (:func:`~blackbox_proxy.prompts.mc_text`) even when they have a chat template. Decoding:
    ``expert_format`` / ``anti_format`` say how each reads the prompt ("plain", "chat" or a function).
    """

    def __init__(
        self,
        expert: ModelLike,
        anti_expert: ModelLike,
        *,
        alpha: float = 1.0,
        chat_template: bool = True,
        strict_single_token: bool = False,
        batch_size: int = 8,
        backend: str = "auto",
        expert_format: PromptFormat = "plain",
        anti_format: PromptFormat = "plain",
        load_options: Mapping[str, Any] | None = None,
    ) -> None:
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        self.alpha = _finite_alpha(alpha)
        self.expert_spec, self.anti_spec = expert, anti_expert
        self.chat_template = bool(chat_template)
        self.strict_single_token = strict_single_token
        self.batch_size = batch_size
        self.backend = backend
        self.expert_format, self.anti_format = expert_format, anti_format
        self.load_options = dict(load_options or {})
        self._models: dict[str, FullLogitsModel] = {}
        self._scorers: dict[str, CandidateScorer] = {}
        self._lock = threading.Lock()
        if not isinstance(expert, (str, os.PathLike)):
            self._models["expert"] = expert
        if not isinstance(anti_expert, (str, os.PathLike)):
            self._models["anti"] = anti_expert

    # -- models --------------------------------------------------------------------------------
    def _model(self, role: str) -> FullLogitsModel:
        with self._lock:
            if role not in self._models:
                from .models import load_model

                spec = self.expert_spec if role == "expert" else self.anti_spec
                self._models[role] = load_model(spec, self.backend, **self.load_options)
            return self._models[role]

    @property
    def expert(self) -> FullLogitsModel:
        """The expert model (loaded now if needed)."""
        return self._model("expert")

    @property
    def anti_expert(self) -> FullLogitsModel:
        """The anti-expert model (loaded now if needed; the expert itself when both specs are equal)."""
        if self.same_models():
            return self.expert
        return self._model("anti")

    def same_models(self) -> bool:
        """Whether expert and anti-expert are one model (the offset is then exactly zero)."""
        e, a = self.expert_spec, self.anti_spec
        if isinstance(e, (str, os.PathLike)) and isinstance(a, (str, os.PathLike)):
            return str(e) == str(a)
        return e is a

    def scorer(self, role: str) -> CandidateScorer:
        """The candidate scorer of "expert" or "anti" (built on first use)."""
        if role == "anti" and self.same_models():
            role = "expert"
        with self._lock:
            cached = self._scorers.get(role)
        if cached is not None:
            return cached
        model = self.expert if role == "expert" else self.anti_expert
        s = CandidateScorer(
            model,
            chat_template=self.chat_template,
            strict_single_token=self.strict_single_token,
            batch_size=self.batch_size,
        )
        with self._lock:
            return self._scorers.setdefault(role, s)

    def identity(self) -> dict[str, Any]:
        """What the pair's scores depend on (names and settings), without loading anything."""

        def name(m: Any) -> str:
            return str(m) if isinstance(m, (str, os.PathLike)) else str(getattr(m, "name", m))

        return {
            "expert": name(self.expert_spec),
            "anti_expert": name(self.anti_spec),
            "chat_template": self.chat_template,
            "backend": self.backend,
        }

    def digest(self) -> str:
        """A digest of everything the pair's scores depend on: both models' weights and the settings."""
        import hashlib
        import json

        from .models import model_digest

        def one(m: Any) -> str:
            return model_digest(m) if isinstance(m, (str, os.PathLike)) else f"object:{id(m)}"

        ident = {
            **self.identity(),
            "expert_digest": one(self.expert_spec),
            "anti_digest": one(self.anti_spec),
            "strict": self.strict_single_token,
            "load": sorted(self.load_options),
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    @property
    def name(self) -> str:
        """``expert - anti_expert``, for reports."""
        ident = self.identity()
        return f"{ident['expert']} - {ident['anti_expert']}"

    def __repr__(self) -> str:
        return f"ExpertPair({self.name!r}, alpha={self.alpha:g})"

    # -- scoring -------------------------------------------------------------------------------
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
        exp_s, anti_s = self.scorer("expert"), self.scorer("anti")
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=2 * len(prompts), desc="expert pair", unit="prompt", leave=False)
        try:
            exp = exp_s.score(prompts, per_prompt, bar)
            anti = exp if anti_s is exp_s else anti_s.score(prompts, per_prompt, bar)
        finally:
            if bar is not None:
                bar.close()
        out = []
        for labs, e, a in zip(per_prompt, exp, anti, strict=True):
            strs = tuple(
                lab
                for lab in labs
                if not exp_s.variants(lab).single_ids or not anti_s.variants(lab).single_ids
            )
            out.append(PairScores(e, a, strs))
        return out

    def score_options(self, questions: Sequence[MCQuestion], *, calibration: str | None = None) -> list[Any]:
        """Option-text scores of each question (see :mod:`blackbox_proxy.option_scoring`)."""
        from .option_scoring import DEFAULT_CALIBRATION, score_options

        return score_options(self, questions, calibration=calibration or DEFAULT_CALIBRATION)


#: The decoder's name for a pair (one class serves decoding and scoring).
ProxyPair = ExpertPair
