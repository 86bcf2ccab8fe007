"""Letter-bias correction for multiple-choice answers, from the letter log-probs providers return.

A model answering lettered options has a prior over the letters themselves (Qwen-1.5B favours
"A"). Three corrections, each using only per-letter log-probs of the first answer token:

* ``pride`` - PriDe (Zheng et al., ICLR 2024). The observed distribution factors as
  ``p_obs(letter_i | q) ∝ prior(letter_i) * p_debiased(option at i | q)``. On an *estimation set*
  (a ``fraction`` of the questions, at least one per option count, chosen with ``seed``) each
  question is scored under all ``n`` cyclic permutations of its options; its prior is the
  normalised geometric mean over permutations of the observed probability of each letter
  position (every option visits every position once, so the content cancels). The global prior
  is the mean of those per-question priors. Estimation questions get the permutation-averaged
  answer (as ``permute``); every other question gets ``log p_obs - log prior``, renormalised.
  Cost: ``(n - 1)`` extra calls per estimation question.
* ``calibrate`` - content-free calibration (Zhao et al., 2021). The prior is the distribution
  over letters for content-free questions (question and every option ``"N/A"``, then
  ``"[MASK]"``; probabilities averaged), divided out of every question. Cost: one call per
  content-free string per distinct option count.
* ``permute`` - full cyclic-permutation averaging: every question is scored under all ``n``
  cyclic permutations, and each *option's* log-probs (letters mapped back to options) are
  averaged and renormalised. Cost: ``(n - 1)`` extra calls per question.
* ``none`` - the observed distribution, renormalised over the letters. Cost: 0.

Priors are kept per option count ``n`` (a 5-option question has its own prior).

Interface for an engine (it already produces each question's letter log-probs from the base,
possibly with missing candidates filled by the floor policy)::

    p = debias.plan(method, questions, fraction=0.1, seed=0)      # -> DebiasPlan
    # score every p.extra[i].question with the same template, provider and policy as the
    # observed questions, giving {label: logprob} (or None when excluded) per ExtraPrompt.key:
    extra = {e.key: letter_logprobs(e.question) for e in p.extra}
    r = debias.apply(p, observed, extra)                          # -> DebiasResult
    r.probs[qid]      # debiased {label: prob} (None for an excluded question)
    r.letter(qid)     # its argmax letter
    r.prior           # serialisable dict, store it with the run; r.extra_calls: the cost

``observed`` maps question id -> {label: log-prob} (any finite scores that are log-probs up to a
per-question constant; ``-inf`` allowed for a letter, NaN rejected) or None for a question the
missing-candidate policy excluded. :func:`debias` does both steps with a scoring function.
The same functions apply to any per-letter score table (a letter-scored expert pair, or the
steered scores), provided the extra prompts are scored by the same scorer.

A cyclic shift ``s`` puts original option ``j`` at position ``(j - s) mod n`` (see
:func:`cyclic_shift`); :func:`unshift` maps a shifted question's letter scores back to options.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InputError
from .types import LETTERS, MCQuestion

METHODS = ("none", "pride", "calibrate", "permute")
#: Content-free strings used by ``calibrate`` (question and every option set to the string).
DEFAULT_CONTENT_FREE = ("N/A", "[MASK]")
#: Prefix of the ids of content-free questions (never a real question's id).
CONTENT_FREE_PREFIX = "__content_free__"

LetterScores = Mapping[str, float]


class DebiasError(InputError):
    """Bad input to a debiasing method (unknown method, missing scores, no estimation data...)."""


# --------------------------------------------------------------------------- small pure helpers


def check_method(method: str) -> str:
    """``method`` if it is one of :data:`METHODS`, else DebiasError naming them."""
    if method not in METHODS:
        raise DebiasError(f"unknown debias method {method!r}; choose one of {list(METHODS)}")
    return method


def normalize(logprobs: LetterScores, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Probabilities over ``labels`` (default: the keys) from log-scores: softmax, stable."""
    labs = list(labels) if labels is not None else list(logprobs)
    if not labs:
        raise DebiasError("no letters to normalise over")
    vals = []
    for lab in labs:
        if lab not in logprobs:
            raise DebiasError(f"no score for letter {lab!r} (have {sorted(logprobs)})")
        v = float(logprobs[lab])
        if math.isnan(v) or v == math.inf:
            raise DebiasError(f"letter {lab!r} has an unusable score {v!r}")
        vals.append(v)
    m = max(vals)
    if m == -math.inf:
        raise DebiasError(f"every letter of {labs} has log-prob -inf")
    ex = [math.exp(v - m) for v in vals]
    z = sum(ex)
    return {lab: e / z for lab, e in zip(labs, ex, strict=True)}


def log_normalize(logprobs: LetterScores, labels: Sequence[str] | None = None) -> dict[str, float]:
    """Log of :func:`normalize` (``-inf`` where the probability is 0)."""
    return {k: (math.log(p) if p > 0 else -math.inf) for k, p in normalize(logprobs, labels).items()}


def divide_prior(logprobs: LetterScores, prior: Mapping[str, float]) -> dict[str, float]:
    """``p_obs / prior`` renormalised over the prior's letters: PriDe's and Zhao et al.'s correction."""
    labs = list(prior)
    lp = log_normalize(logprobs, labs)
    out = {}
    for lab in labs:
        pr = float(prior[lab])
        if not pr > 0:
            raise DebiasError(f"prior of letter {lab!r} is {pr!r}; it must be positive")
        out[lab] = lp[lab] - math.log(pr)
    return normalize(out, labs)


def cyclic_shift(q: MCQuestion, shift: int) -> MCQuestion:
    """``q`` with its options rotated left by ``shift``: position ``i`` shows option ``(i + shift) mod n``.

    The id becomes ``"<id>#cyc<shift>"`` (unchanged for shift 0), ``answer`` follows the gold
    option, and ``meta`` gains ``source_id`` and ``shift``.
    """
    n = len(q.choices)
    s = shift % n
    if s == 0:
        return q
    choices = tuple(q.choices[(i + s) % n] for i in range(n))
    answer = None if q.answer is None else (q.answer - s) % n
    meta = {**dict(q.meta), "source_id": q.id, "shift": s}
    return MCQuestion(f"{q.id}#cyc{s}", q.question, choices, answer, meta)


def unshift(scores: LetterScores, shift: int, labels: Sequence[str]) -> dict[str, float]:
    """Scores of a question shown with ``cyclic_shift(q, shift)``, keyed by the original option letters."""
    n = len(labels)
    return {labels[j]: float(scores[labels[(j - shift) % n]]) for j in range(n)}


def permutation_average(shifted: Mapping[int, LetterScores], labels: Sequence[str]) -> dict[str, float]:
    """Per-option mean over cyclic shifts of the normalised log-probs, renormalised (``permute``)."""
    if not shifted:
        raise DebiasError("no permutation scores to average")
    acc = dict.fromkeys(labels, 0.0)
    for s, sc in shifted.items():
        lp = unshift(log_normalize(sc, labels), s, labels)
        for lab in labels:
            acc[lab] += lp[lab]
    return normalize({lab: v / len(shifted) for lab, v in acc.items()}, labels)


def question_prior(shifted: Mapping[int, LetterScores], labels: Sequence[str]) -> dict[str, float]:
    """PriDe's prior of one question: normalised geometric mean over shifts of p_obs at each position."""
    n = len(labels)
    if sorted(s % n for s in shifted) != list(range(n)):
        raise DebiasError(f"a question prior needs all {n} cyclic shifts, got {sorted(shifted)}")
    acc = dict.fromkeys(labels, 0.0)
    for sc in shifted.values():
        lp = log_normalize(sc, labels)
        for lab in labels:
            acc[lab] += lp[lab]
    return normalize({lab: v / n for lab, v in acc.items()}, labels)


def mean_prior(priors: Sequence[Mapping[str, float]], labels: Sequence[str]) -> dict[str, float]:
    """The arithmetic mean of per-question priors (PriDe's global prior), renormalised."""
    if not priors:
        raise DebiasError("no question priors to average")
    tot = {lab: sum(float(p[lab]) for p in priors) / len(priors) for lab in labels}
    z = sum(tot.values())
    return {lab: v / z for lab, v in tot.items()}


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class ExtraPrompt:
    """One extra question to score: a cyclic shift of a real question, or a content-free question."""

    key: str
    question: MCQuestion
    kind: str  # "permutation" | "content-free"
    source_id: str | None = None
    shift: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "kind": self.kind,
            "source_id": self.source_id,
            "shift": self.shift,
            "question": self.question.to_dict(),
        }


@dataclass(frozen=True)
class DebiasPlan:
    """What a method needs scored besides the questions themselves (``extra``), and its settings."""

    method: str
    question_ids: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    extra: tuple[ExtraPrompt, ...] = ()
    estimation_ids: tuple[str, ...] = ()
    fraction: float = 0.0
    seed: int = 0
    content_free: tuple[str, ...] = ()

    @property
    def extra_calls(self) -> int:
        """Provider calls on top of one per question."""
        return len(self.extra)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "n_questions": len(self.question_ids),
            "extra_calls": self.extra_calls,
            "estimation_ids": list(self.estimation_ids),
            "fraction": self.fraction,
            "seed": self.seed,
            "content_free": list(self.content_free),
        }


def _check_questions(questions: Sequence[MCQuestion]) -> None:
    if not questions:
        raise DebiasError("no questions to debias")
    seen: set[str] = set()
    for q in questions:
        if q.id in seen:
            raise DebiasError(f"duplicate question id {q.id!r}")
        if q.id.startswith(CONTENT_FREE_PREFIX):
            raise DebiasError(f"question id {q.id!r} uses the reserved prefix {CONTENT_FREE_PREFIX!r}")
        seen.add(q.id)


def _shift_prompts(q: MCQuestion) -> list[ExtraPrompt]:
    return [
        ExtraPrompt(f"{q.id}#cyc{s}", cyclic_shift(q, s), "permutation", q.id, s)
        for s in range(1, len(q.choices))
    ]


def estimation_set(
    questions: Sequence[MCQuestion], fraction: float, seed: int = 0, min_per_group: int = 1
) -> tuple[str, ...]:
    """Ids of PriDe's estimation questions: ``round(fraction * size)`` (at least ``min_per_group``)
    drawn with ``seed`` from each group of questions with the same option count, in input order."""
    if not (0.0 < fraction <= 1.0):
        raise DebiasError(f"the PriDe estimation fraction must be in (0, 1], got {fraction}")
    groups: dict[int, list[str]] = {}
    for q in questions:
        groups.setdefault(len(q.choices), []).append(q.id)
    chosen: set[str] = set()
    for n, ids in sorted(groups.items()):
        k = min(len(ids), max(min_per_group, round(fraction * len(ids))))
        chosen.update(random.Random(f"pride:{seed}:{n}").sample(ids, k))
    return tuple(q.id for q in questions if q.id in chosen)


def content_free_question(n: int, text: str) -> MCQuestion:
    """A question whose text and ``n`` options are all ``text`` (Zhao et al.'s content-free input)."""
    return MCQuestion(f"{CONTENT_FREE_PREFIX}{n}_{text}", text, (text,) * n, None, {"content_free": True})


def plan(
    method: str,
    questions: Sequence[MCQuestion],
    *,
    fraction: float = 0.1,
    seed: int = 0,
    content_free: Sequence[str] = DEFAULT_CONTENT_FREE,
    estimation_ids: Sequence[str] | None = None,
) -> DebiasPlan:
    """The extra prompts ``method`` needs for ``questions`` (their own scores are not included).

    ``fraction`` and ``seed`` pick PriDe's estimation set (:func:`estimation_set`), unless
    ``estimation_ids`` names it; ``content_free`` are the strings ``calibrate`` scores.
    """
    check_method(method)
    _check_questions(questions)
    ids = tuple(q.id for q in questions)
    labels = {q.id: q.labels for q in questions}
    if method == "none":
        return DebiasPlan(method, ids, labels)
    if method == "permute":
        extra = tuple(e for q in questions for e in _shift_prompts(q))
        return DebiasPlan(method, ids, labels, extra)
    if method == "pride":
        by_id = {q.id: q for q in questions}
        if estimation_ids is None:
            est = estimation_set(questions, fraction, seed)
        else:
            unknown = [i for i in estimation_ids if i not in by_id]
            if unknown or not estimation_ids:
                raise DebiasError(f"estimation ids must be non-empty question ids; unknown: {unknown[:5]}")
            est = tuple(q.id for q in questions if q.id in set(estimation_ids))
        extra = tuple(e for i in est for e in _shift_prompts(by_id[i]))
        return DebiasPlan(method, ids, labels, extra, est, fraction, seed)
    cf = tuple(str(t) for t in content_free)
    if not cf or any(not t.strip() for t in cf):
        raise DebiasError(f"content-free strings must be non-empty, got {list(cf)}")
    counts = sorted({len(q.choices) for q in questions})
    extra = tuple(
        ExtraPrompt(content_free_question(n, t).id, content_free_question(n, t), "content-free")
        for n in counts
        for t in cf
    )
    return DebiasPlan(method, ids, labels, extra, content_free=cf)


# --------------------------------------------------------------------------- apply


@dataclass(frozen=True)
class DebiasResult:
    """Debiased letter probabilities per question, the prior used and the calls it cost."""

    method: str
    probs: dict[str, dict[str, float] | None]
    prior: dict[str, Any]
    extra_calls: int
    estimation_ids: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def letter(self, qid: str) -> str | None:
        """The debiased answer of question ``qid`` (None if it was excluded)."""
        p = self.probs[qid]
        return None if p is None else max(p, key=p.__getitem__)  # ties: the first letter

    def letters(self) -> dict[str, str | None]:
        """The debiased answer of every question."""
        return {qid: self.letter(qid) for qid in self.probs}

    def to_dict(self) -> dict[str, Any]:
        """Method, prior, cost and notes (serialisable; the per-question probs are left out)."""
        return {
            "method": self.method,
            "prior": self.prior,
            "extra_calls": self.extra_calls,
            "estimation_ids": list(self.estimation_ids),
            "notes": list(self.notes),
        }


def _shifts_of(p: DebiasPlan, qid: str, observed: LetterScores, extra: Mapping[str, LetterScores | None]):
    """{shift: scores} for question ``qid``: shift 0 observed, the others from ``extra`` (None skipped)."""
    out: dict[int, LetterScores] = {0: observed}
    n = len(p.labels[qid])
    for s in range(1, n):
        key = f"{qid}#cyc{s}"
        if key not in extra:
            raise DebiasError(f"no score for extra prompt {key!r} (score every plan.extra prompt)")
        if extra[key] is not None:
            out[s] = extra[key]  # type: ignore[assignment]
    return out


def apply(
    p: DebiasPlan,
    observed: Mapping[str, LetterScores | None],
    extra: Mapping[str, LetterScores | None] | None = None,
) -> DebiasResult:
    """Debiased probabilities from the questions' own letter scores and the plan's extra scores."""
    extra = dict(extra or {})
    for qid in p.question_ids:
        if qid not in observed:
            raise DebiasError(f"no observed letter scores for question {qid!r}")
    method = p.method
    if method == "none":
        probs = {
            q: (None if observed[q] is None else normalize(observed[q], p.labels[q])) for q in p.question_ids
        }
        return DebiasResult(method, probs, {"method": "none"}, 0)
    if method == "permute":
        return _apply_permute(p, observed, extra)
    if method == "pride":
        return _apply_pride(p, observed, extra)
    return _apply_calibrate(p, observed, extra)


def _apply_permute(p: DebiasPlan, observed, extra) -> DebiasResult:
    probs: dict[str, dict[str, float] | None] = {}
    incomplete = []
    for qid in p.question_ids:
        labs = p.labels[qid]
        if observed[qid] is None:
            sh = {s: sc for s, sc in _shifts_of(p, qid, {}, extra).items() if s != 0}
        else:
            sh = _shifts_of(p, qid, observed[qid], extra)
        if len(sh) < len(labs):
            incomplete.append(qid)
        probs[qid] = permutation_average(sh, labs) if sh else None
    notes = (
        (f"{len(incomplete)} question(s) averaged over fewer than all shifts: {incomplete[:10]}",)
        if incomplete
        else ()
    )
    prior = {"method": "permute", "shifts": "all cyclic", "incomplete": len(incomplete)}
    return DebiasResult("permute", probs, prior, p.extra_calls, notes=notes)


def _apply_pride(p: DebiasPlan, observed, extra) -> DebiasResult:
    per_q: dict[int, list[dict[str, float]]] = {}
    labels_by_n: dict[int, tuple[str, ...]] = {}
    probs: dict[str, dict[str, float] | None] = {}
    used, skipped = [], []
    for qid in p.estimation_ids:
        labs = p.labels[qid]
        if observed[qid] is None:
            skipped.append(qid)
            continue
        sh = _shifts_of(p, qid, observed[qid], extra)
        if len(sh) < len(labs):
            skipped.append(qid)
            continue
        per_q.setdefault(len(labs), []).append(question_prior(sh, labs))
        labels_by_n[len(labs)] = labs
        probs[qid] = permutation_average(sh, labs)
        used.append(qid)
    priors = {n: mean_prior(ps, labels_by_n[n]) for n, ps in per_q.items()}
    for qid in p.question_ids:
        if qid in probs:
            continue
        labs = p.labels[qid]
        if observed[qid] is None:
            probs[qid] = None
            continue
        if len(labs) not in priors:
            raise DebiasError(
                f"PriDe has no prior for {len(labs)}-option questions (no complete estimation question); "
                "raise the fraction"
            )
        probs[qid] = divide_prior(observed[qid], priors[len(labs)])
    prior = {
        "method": "pride",
        "by_n_options": {str(n): priors[n] for n in sorted(priors)},
        "estimation_questions": len(used),
        "fraction": p.fraction,
        "seed": p.seed,
    }
    notes = (
        (f"{len(skipped)} estimation question(s) skipped (excluded or incomplete): {skipped[:10]}",)
        if skipped
        else ()
    )
    return DebiasResult("pride", probs, prior, p.extra_calls, tuple(used), notes)


def _apply_calibrate(p: DebiasPlan, observed, extra) -> DebiasResult:
    priors: dict[int, dict[str, float]] = {}
    counts = sorted({len(labs) for labs in p.labels.values()})
    for n in counts:
        labs = tuple(LETTERS[:n])
        got = []
        for t in p.content_free:
            key = content_free_question(n, t).id
            if key not in extra:
                raise DebiasError(f"no score for content-free prompt {key!r} (score every plan.extra prompt)")
            if extra[key] is not None:
                got.append(normalize(extra[key], labs))
        if not got:
            raise DebiasError(f"every content-free prompt for {n} options was excluded: no prior")
        priors[n] = mean_prior(got, labs)
    probs = {
        q: (None if observed[q] is None else divide_prior(observed[q], priors[len(p.labels[q])]))
        for q in p.question_ids
    }
    prior = {
        "method": "calibrate",
        "by_n_options": {str(n): priors[n] for n in counts},
        "content_free": list(p.content_free),
    }
    return DebiasResult("calibrate", probs, prior, p.extra_calls)


def debias(
    method: str,
    questions: Sequence[MCQuestion],
    score: Callable[[Sequence[MCQuestion]], Sequence[LetterScores | None]],
    *,
    observed: Mapping[str, LetterScores | None] | None = None,
    fraction: float = 0.1,
    seed: int = 0,
    content_free: Sequence[str] = DEFAULT_CONTENT_FREE,
) -> DebiasResult:
    """Plan, score (with ``score``: questions -> letter log-probs each) and apply in one call.

    ``observed`` holds the questions' own scores when the caller already has them; otherwise
    they are scored too (not counted as extra calls).
    """
    p = plan(method, questions, fraction=fraction, seed=seed, content_free=content_free)
    if observed is None:
        observed = dict(zip(p.question_ids, score(list(questions)), strict=True))
    extra_scores = (
        dict(zip((e.key for e in p.extra), score([e.question for e in p.extra]), strict=True))
        if p.extra
        else {}
    )
    return apply(p, observed, extra_scores)


# --------------------------------------------------------------------------- reporting


@dataclass(frozen=True)
class LetterStats:
    """How answers spread over letters, compared with the gold letters."""

    n: int
    accuracy: float
    answer_counts: dict[str, int]
    gold_counts: dict[str, int]
    top_share: float
    kl_from_gold: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "accuracy": self.accuracy,
            "answer_counts": dict(self.answer_counts),
            "gold_counts": dict(self.gold_counts),
            "top_share": self.top_share,
            "kl_from_gold": self.kl_from_gold,
        }


def letter_stats(
    answers: Sequence[str | None],
    gold: Sequence[str],
    labels: Sequence[str] = ("A", "B", "C", "D"),
    smoothing: float = 0.5,
) -> LetterStats:
    """Accuracy, answer counts per letter, share of the most frequent letter, and KL(answers || gold).

    KL uses counts plus ``smoothing`` per letter on both sides (so an unused letter is finite);
    answers outside ``labels`` (e.g. "E" of a 5-option question) count for accuracy only, and None
    (an excluded question) counts as wrong.
    """
    if len(answers) != len(gold):
        raise DebiasError(f"{len(answers)} answers but {len(gold)} gold letters")
    if not answers:
        raise DebiasError("no answers to summarise")
    labs = list(labels)
    ac = {lab: sum(1 for a in answers if a == lab) for lab in labs}
    gc = {lab: sum(1 for g in gold if g == lab) for lab in labs}
    za = sum(ac.values()) + smoothing * len(labs)
    zg = sum(gc.values()) + smoothing * len(labs)
    kl = 0.0
    for lab in labs:
        pa = (ac[lab] + smoothing) / za
        pg = (gc[lab] + smoothing) / zg
        if pa > 0:
            kl += pa * math.log(pa / pg)
    n = len(answers)
    return LetterStats(
        n=n,
        accuracy=sum(1 for a, g in zip(answers, gold, strict=True) if a is not None and a == g) / n,
        answer_counts=ac,
        gold_counts=gc,
        top_share=max((sum(1 for a in answers if a == x) for x in set(answers) - {None}), default=0) / n,
        kl_from_gold=kl,
    )
