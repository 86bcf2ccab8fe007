"""Option-text scoring: the expert pair scores each option's *text* as the answer to a cloze question.

A small expert learns facts as text, not as letters, so asking it for "A-D" loses what it knows.
In ``options`` mode each option text is scored as the continuation of a cloze rendering of the
question (``Question: ...\\nAnswer:`` + " " + text) under the expert and the anti-expert; the base
side stays what a hosted API gives, its letter log-probs, and the offset per letter is
``calibrated(expert) - calibrated(anti)`` of that letter's option.

Raw scores are kept (sum of token log-probs, token counts, and the same option under a
content-free context), so the calibration is chosen when answers are derived, never re-scored:

* ``sum``: the raw sums (the naive form: tracks option length when the anti-expert never saw a name);
* ``mean``: per-token means;
* ``pmi``: domain-conditional PMI (Holtzman et al. 2021): the sum minus the same option's sum under
  the content-free context ``Answer:``, which cancels how likely a string is anywhere;
* ``pmi-mean``: PMI per token.

Expert and anti-expert must share a tokenizer (offsets are compared token for token).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from .errors import InputError, VocabularyMismatchError
from .types import MCQuestion

if TYPE_CHECKING:
    from .experts import CandidateScorer, ExpertPair

SCORING_MODES = ("letters", "options")
CALIBRATIONS = ("sum", "mean", "pmi", "pmi-mean")
DEFAULT_CALIBRATION = "pmi-mean"
#: the cloze rendering of a question for option scoring; ``{question}`` is the question text
CLOZE_TEMPLATE = "Question: {question}\nAnswer:"
#: the content-free context of the ``pmi`` calibrations
CONTENT_FREE = "Answer:"


def cloze_prompt(q: MCQuestion, template: str = CLOZE_TEMPLATE) -> str:
    """The question as a cloze prompt whose continuation is an option's text."""
    return template.format(question=" ".join(str(q.question).split()))


def option_text(choice: str) -> str:
    """An option as a continuation: one leading space, inner whitespace collapsed."""
    return " " + " ".join(str(choice).split())


@dataclass(frozen=True)
class OptionScores:
    """Raw option-text scores of one question under a pair, keyed by option letter."""

    expert: dict[str, float]
    anti_expert: dict[str, float]
    n_tokens: dict[str, int]
    expert_cf: dict[str, float] = field(default_factory=dict)
    anti_cf: dict[str, float] = field(default_factory=dict)
    calibration: str = DEFAULT_CALIBRATION

    def __post_init__(self) -> None:
        if self.calibration not in CALIBRATIONS:
            raise InputError(f"unknown option calibration {self.calibration!r}; choose one of {CALIBRATIONS}")
        if self.calibration.startswith("pmi") and (not self.expert_cf or not self.anti_cf):
            raise InputError("the pmi calibrations need the content-free scores")

    def _calibrated(self, raw: Mapping[str, float], cf: Mapping[str, float]) -> dict[str, float]:
        out = {}
        for lab, v in raw.items():
            x = v - cf[lab] if self.calibration.startswith("pmi") else v
            if self.calibration.endswith("mean"):
                x /= max(1, self.n_tokens[lab])
            out[lab] = x
        return out

    def as_pair(self) -> tuple[dict[str, float], dict[str, float]]:
        """(expert, anti_expert) scores under the calibration, the shape ``combine`` takes."""
        return self._calibrated(self.expert, self.expert_cf), self._calibrated(self.anti_expert, self.anti_cf)

    def offsets(self, alpha: float = 1.0) -> dict[str, float]:
        e, a = self.as_pair()
        return {k: alpha * (e[k] - a[k]) for k in e}

    def with_calibration(self, calibration: str) -> OptionScores:
        return replace(self, calibration=calibration)

    def to_json(self) -> dict[str, Any]:
        return {
            "mode": "options",
            "expert": self.expert,
            "anti_expert": self.anti_expert,
            "n_tokens": self.n_tokens,
            "expert_cf": self.expert_cf,
            "anti_cf": self.anti_cf,
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> OptionScores:
        return cls(
            {k: float(v) for k, v in d["expert"].items()},
            {k: float(v) for k, v in d["anti_expert"].items()},
            {k: int(v) for k, v in d["n_tokens"].items()},
            {k: float(v) for k, v in (d.get("expert_cf") or {}).items()},
            {k: float(v) for k, v in (d.get("anti_cf") or {}).items()},
            str(d.get("calibration") or DEFAULT_CALIBRATION),
        )


def check_shared_tokenizer(pair: ExpertPair) -> None:
    """Option scoring compares token log-probs of the same strings: both models need one tokenizer."""
    if pair.same_models():
        return
    e, a = pair.expert, pair.anti_expert
    probe = "Question: The capital of Veloria is Quintaro, 1984 km² — naïve café."
    ev, av = e.vocab(), a.vocab()
    n = min(len(ev), len(av))
    if e.encode(probe, add_special_tokens=False) != a.encode(probe, add_special_tokens=False) or any(
        ev[i] != av[i] for i in range(0, n, max(1, n // 4096))
    ):
        raise VocabularyMismatchError(
            f"option-text scoring needs an expert and anti-expert with one tokenizer; {e.name!r} and "
            f"{a.name!r} tokenize differently (use --expert-scoring letters for such a pair)"
        )


def _scores(
    scorer: CandidateScorer, prompts: Sequence[str], options: Sequence[Sequence[str]]
) -> tuple[list[list[float]], list[list[int]]]:
    """Sum of token log-probs of every option after its prompt, and its token count."""
    model = scorer.model
    rendered = [model.encode(p) for p in prompts]
    jobs = []
    counts: list[list[int]] = []
    for i, opts in enumerate(options):
        row = []
        for j, text in enumerate(opts):
            ids = model.encode(text, add_special_tokens=False)
            if not ids:
                raise InputError(f"option {text!r} encodes to no tokens in {model.name}")
            jobs.append((i, str(j), ids))
            row.append(len(ids))
        counts.append(row)
    with scorer._lock:
        got = scorer._continuations(rendered, jobs)
    sums = [[got[(i, str(j))][0] for j in range(len(opts))] for i, opts in enumerate(options)]
    for row in sums:
        if any(math.isnan(v) for v in row):
            raise InputError(f"model {model.name}: NaN option score")
    return sums, counts


def score_options(
    pair: ExpertPair,
    questions: Sequence[MCQuestion],
    *,
    calibration: str = DEFAULT_CALIBRATION,
    template: str = CLOZE_TEMPLATE,
) -> list[OptionScores]:
    """Option-text scores of every question under both models (batched by length)."""
    if calibration not in CALIBRATIONS:
        raise InputError(f"unknown option calibration {calibration!r}; choose one of {CALIBRATIONS}")
    check_shared_tokenizer(pair)
    prompts = [cloze_prompt(q, template) for q in questions]
    options = [[option_text(c) for c in q.choices] for q in questions]
    cf_prompts = [CONTENT_FREE] * len(questions)
    exp_s, anti_s = pair.scorer("expert"), pair.scorer("anti")
    e_sum, counts = _scores(exp_s, prompts, options)
    e_cf, _ = _scores(exp_s, cf_prompts, options)
    if anti_s is exp_s:
        a_sum, a_cf = e_sum, e_cf
    else:
        a_sum, _ = _scores(anti_s, prompts, options)
        a_cf, _ = _scores(anti_s, cf_prompts, options)
    out = []
    for i, q in enumerate(questions):
        labs = q.labels
        out.append(
            OptionScores(
                dict(zip(labs, e_sum[i], strict=True)),
                dict(zip(labs, a_sum[i], strict=True)),
                dict(zip(labs, counts[i], strict=True)),
                dict(zip(labs, e_cf[i], strict=True)),
                dict(zip(labs, a_cf[i], strict=True)),
                calibration,
            )
        )
    return out
