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
* ``pmi-mean``: PMI per token;
* ``NAME-gated`` (default ``mean-gated``): the offset of ``NAME`` scaled by a gate in [0, 1] that
  grows with the *lift* of the expert's answer, p_E(top) - p_A(top) over the options: a confident,
  question-specific preference moves the base, a diffuse one (an expert that learned nothing about
  this question) does not. Measured in benchmarks/RESULTS.md ("Fact injection"): ungated offsets
  cost 7-20 points on unrelated ARC/MMLU questions; gated, 0-4.

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
#: the raw calibrations; each also exists gated (``NAME-gated``, see :func:`gate`)
BASE_CALIBRATIONS = ("sum", "mean", "pmi", "pmi-mean")
CALIBRATIONS = (*BASE_CALIBRATIONS, *(f"{c}-gated" for c in BASE_CALIBRATIONS))
DEFAULT_CALIBRATION = "mean-gated"
#: the gate: the offset is scaled by clip((lift - GATE_LOW) / (GATE_HIGH - GATE_LOW), 0, 1), where
#: lift is how much probability the expert's own answer gained over the anti-expert (see :func:`lift`).
#: Chosen on ARC-Challenge + MMLU validation questions (benchmarks/RESULTS.md, "Fact injection").
GATE_LOW = 0.3
GATE_HIGH = 0.6
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

    @property
    def base_calibration(self) -> str:
        """The calibration without its gate."""
        return self.calibration.removesuffix("-gated")

    @property
    def gated(self) -> bool:
        """Whether the offset is gated by the lift of the expert's answer (see :func:`lift`)."""
        return self.calibration.endswith("-gated")

    def _calibrated(self, raw: Mapping[str, float], cf: Mapping[str, float]) -> dict[str, float]:
        cal = self.base_calibration
        out = {}
        for lab, v in raw.items():
            x = v - cf[lab] if cal.startswith("pmi") else v
            if cal.endswith("mean"):
                x /= max(1, self.n_tokens[lab])
            out[lab] = x
        return out

    def gate(self) -> float:
        """The weight in [0, 1] the offset gets (1 when ungated)."""
        if not self.gated:
            return 1.0
        e, a = self._calibrated(self.expert, self.expert_cf), self._calibrated(self.anti_expert, self.anti_cf)
        return gate_weight(lift(e, a))

    def as_pair(self) -> tuple[dict[str, float], dict[str, float]]:
        """(expert, anti_expert) scores under the calibration, the shape ``combine`` takes.

        Gated: the expert's scores stay its own (so its own answer is unchanged) and the anti-expert's
        become ``e - g * (e - a)``, so the offset ``e - a`` is scaled by the gate ``g``.
        """
        e = self._calibrated(self.expert, self.expert_cf)
        a = self._calibrated(self.anti_expert, self.anti_cf)
        if not self.gated:
            return e, a
        g = gate_weight(lift(e, a))
        return e, {k: e[k] - g * (e[k] - a[k]) for k in e}

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


def _softmax(x: Mapping[str, float]) -> dict[str, float]:
    m = max(x.values())
    z = sum(math.exp(v - m) for v in x.values())
    return {k: math.exp(v - m) / z for k, v in x.items()}


def lift(expert: Mapping[str, float], anti: Mapping[str, float]) -> float:
    """How much the expert's own answer gained: p_E(top) - p_A(top), softmax over the options.

    A question the expert learned something about has a confident expert whose answer the
    anti-expert did not favour; a diffuse or shared preference lifts nothing.
    """
    pe, pa = _softmax(expert), _softmax(anti)
    top = max(pe, key=pe.__getitem__)
    return pe[top] - pa[top]


def disagreement(expert: Mapping[str, float], anti: Mapping[str, float]) -> float:
    """Total-variation distance between the two option distributions (softmax over the options)."""
    pe, pa = _softmax(expert), _softmax(anti)
    return 0.5 * sum(abs(pe[k] - pa[k]) for k in pe)


def gate_weight(x: float, low: float | None = None, high: float | None = None) -> float:
    """0 below ``low``, 1 above ``high``, linear between: a diffuse offset moves nothing."""
    low = GATE_LOW if low is None else low
    high = GATE_HIGH if high is None else high
    if high <= low:
        return 1.0 if x >= high else 0.0
    return min(1.0, max(0.0, (x - low) / (high - low)))


def check_shared_tokenizer(pair: ExpertPair) -> None:
    """Option scoring compares token log-probs of the same strings: both models need one tokenizer."""
    if pair.same_models():
        return
    own = getattr(pair, "check_shared_tokenizer", None)  # a pair whose models are not in-process
    if callable(own):
        return own()
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
