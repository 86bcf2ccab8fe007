"""The proxy-tuning arithmetic over a candidate set, missing-candidate policies and fusion strategies.

For candidates v in C: ``steered(v) = base(v) + sum_i alpha_i * (expert_i(v) - anti_i(v))``, then a
softmax over C (see DESIGN.md). Everything here is pure Python on small dicts and is exact-tested.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .candidates import logsumexp
from .errors import InputError, MissingCandidateError

#: ``exact``: the provider returns every candidate's own log-prob (vLLM); a candidate still missing
#: is then an error, as under ``error``
POLICIES = ("floor", "exclude", "error", "exact")
STRATEGIES = ("proxy", "expert_additive", "interpolate", "entropy_gated")

Scores = Mapping[str, float]
ExpertScores = tuple[Scores, Scores]


@dataclass(frozen=True)
class Combination:
    """Result of combining base and expert scores over one candidate set."""

    labels: tuple[str, ...]
    steered_probs: dict[str, float]
    base_probs: dict[str, float]
    offsets: dict[str, float]
    base_logprobs: dict[str, float]
    missing: tuple[str, ...]
    filled: dict[str, float]
    excluded: bool
    alphas: tuple[float, ...]

    @property
    def letter(self) -> str | None:
        return argmax(self.steered_probs)

    @property
    def base_letter(self) -> str | None:
        return argmax(self.base_probs)


def argmax(probs: Mapping[str, float]) -> str | None:
    """Label with the largest value; ties go to the earliest label. None for an empty mapping."""
    best, best_v = None, -math.inf
    for k, v in probs.items():
        if best is None or v > best_v:
            best, best_v = k, v
    return best


def softmax(scores: Mapping[str, float]) -> dict[str, float]:
    """Softmax over the mapping's values (-inf entries get probability 0)."""
    if not scores:
        return {}
    z = logsumexp(scores.values())
    if z == -math.inf:
        raise InputError("every candidate has score -inf: nothing to normalise")
    return {k: math.exp(v - z) for k, v in scores.items()}


def _check(scores: Mapping[str, float | None], what: str) -> None:
    for k, v in scores.items():
        if v is not None and (math.isnan(v) or v == math.inf):
            raise InputError(f"{what} for candidate {k!r} is {v!r}")


def fill_missing(
    base: Mapping[str, float | None], policy: str, bound: float | None
) -> tuple[dict[str, float], tuple[str, ...], dict[str, float]]:
    """Apply a missing-candidate policy to the base's candidate log-probs.

    Returns (usable log-probs, missing labels, the values filled in). ``floor`` fills each missing
    candidate with ``bound`` (the top-k upper bound on any unseen token), ``exclude`` drops it from the
    candidate set, ``error`` raises MissingCandidateError.
    """
    if policy not in POLICIES:
        raise InputError(f"unknown missing-candidate policy {policy!r}; choose one of {POLICIES}")
    _check(base, "base log-prob")
    missing = tuple(k for k, v in base.items() if v is None)
    present = {k: float(v) for k, v in base.items() if v is not None}
    if not missing:
        return present, missing, {}
    if policy in ("error", "exact"):
        raise MissingCandidateError(
            f"candidates {list(missing)} are not in the base's top log-probs (policy 'error')"
        )
    if policy == "exclude":
        return present, missing, {}
    if bound is None or math.isnan(bound):
        raise InputError("policy 'floor' needs the top-k bound (TopLogprobs.missing_bound())")
    filled = {k: float(bound) for k in missing}
    return {k: (present[k] if k in present else filled[k]) for k in base}, missing, filled


def pair_offsets(
    pairs: Sequence[ExpertScores], alphas: Sequence[float], labels: Sequence[str]
) -> dict[str, float]:
    """``sum_i alpha_i * (expert_i(v) - anti_i(v))`` for each label v."""
    if len(pairs) != len(alphas):
        raise InputError(f"{len(pairs)} expert pairs but {len(alphas)} alphas")
    out = dict.fromkeys(labels, 0.0)
    for (exp, anti), a in zip(pairs, alphas, strict=True):
        if math.isnan(a):
            raise InputError("alpha is NaN")
        _check(exp, "expert log-prob")
        _check(anti, "anti-expert log-prob")
        for lab in labels:
            if lab not in exp or lab not in anti:
                raise InputError(f"expert pair has no score for candidate {lab!r}")
            out[lab] += a * (exp[lab] - anti[lab])
    return out


def entropy_ratio(probs: Mapping[str, float]) -> float:
    """Normalised entropy H(p)/log|C| in [0, 1]; 0 for fewer than two candidates."""
    if len(probs) < 2:
        return 0.0
    h = -sum(p * math.log(p) for p in probs.values() if p > 0)
    return h / math.log(len(probs))


def combine(
    base: Mapping[str, float | None],
    pairs: Sequence[ExpertScores] = (),
    alphas: Sequence[float] | float = 1.0,
    *,
    policy: str = "floor",
    strategy: str = "proxy",
    bound: float | None = None,
) -> Combination:
    """Combine base candidate log-probs (None = missing from top-k) with expert pairs.

    Strategies:
      - ``proxy``: the paper, ``base + sum alpha_i (E_i - A_i)``;
      - ``expert_additive``: ``base + sum alpha_i E_i`` (anti-experts ignored);
      - ``interpolate``: probabilities ``(1 - sum w_i) p_base + sum w_i p_E_i`` with ``w_i = alpha_i``
        (each p over the candidate set; requires ``0 <= w_i`` and ``sum w_i <= 1``);
      - ``entropy_gated``: the paper's formula with ``alpha_i`` scaled by the base's normalised
        entropy over the candidates, so a confident base is steered less.
    """
    if strategy not in STRATEGIES:
        raise InputError(f"unknown fusion strategy {strategy!r}; choose one of {STRATEGIES}")
    labels_all = tuple(base)
    if not labels_all:
        raise InputError("empty candidate set")
    alist = (
        (float(alphas),) * len(pairs) if isinstance(alphas, (int, float)) else tuple(float(a) for a in alphas)
    )
    usable, missing, filled = fill_missing(base, policy, bound)
    labels = tuple(k for k in labels_all if k in usable)
    if not labels:  # every candidate missing under 'exclude'
        return Combination(labels_all, {}, {}, {}, {}, missing, {}, True, alist)
    base_lp = {k: usable[k] for k in labels}
    base_probs = softmax(base_lp)
    if strategy == "entropy_gated":
        g = entropy_ratio(base_probs)
        eff = tuple(a * g for a in alist)
    else:
        eff = alist
    if strategy == "interpolate":
        if any(w < 0 for w in eff) or sum(eff) > 1 + 1e-12:
            raise InputError(f"interpolation weights {eff} must be >= 0 and sum to at most 1")
        offsets = pair_offsets(pairs, eff, labels)
        mix = {k: (1 - sum(eff)) * base_probs[k] for k in labels}
        for (exp, _anti), w in zip(pairs, eff, strict=True):
            pe = softmax({k: exp[k] for k in labels})
            for k in labels:
                mix[k] += w * pe[k]
        steered = mix
    elif strategy == "expert_additive":
        offsets = dict.fromkeys(labels, 0.0)
        for (exp, _anti), a in zip(pairs, eff, strict=True):
            _check(exp, "expert log-prob")
            for k in labels:
                offsets[k] += a * exp[k]
        steered = softmax({k: base_lp[k] + offsets[k] for k in labels})
    else:
        offsets = pair_offsets(pairs, eff, labels)
        steered = softmax({k: base_lp[k] + offsets[k] for k in labels})
    return Combination(labels_all, steered, base_probs, offsets, base_lp, missing, filled, False, eff)
