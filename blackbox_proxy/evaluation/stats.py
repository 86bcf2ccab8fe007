"""Accuracy with confidence intervals and paired significance tests for evaluation tables.

Everything here is exact arithmetic on small inputs (no scipy needed): Wilson score intervals,
McNemar's exact (binomial) test, a seeded paired bootstrap, and grouped breakdowns.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from ..errors import InputError

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    """Accuracy of one system: ``correct`` of ``n``, with a Wilson interval at ``level``."""

    name: str
    correct: int
    n: int
    accuracy: float
    ci_low: float
    ci_high: float
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class McNemarResult:
    """McNemar's exact test on paired outcomes: ``b`` = only A right, ``c`` = only B right."""

    b: int
    c: int
    n: int
    p_value: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BootstrapResult:
    """Paired bootstrap of the accuracy difference B - A: observed value, percentile CI, two-sided p."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    n_boot: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _bools(x: Sequence[Any], what: str) -> np.ndarray:
    arr = np.asarray(list(x), dtype=object)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in arr):
        raise InputError(f"{what}: outcomes contain missing values; drop or score them first")
    return arr.astype(bool)


def wilson_interval(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``correct / n`` (``(0, 1)`` when n = 0)."""
    if n < 0 or correct < 0 or correct > n:
        raise InputError(f"need 0 <= correct <= n, got correct={correct}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # the interval always holds p itself (rounding can put centre - half a hair above 0 when p = 0)
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def accuracy(correct: Sequence[Any], name: str = "", level: float = 0.95) -> Accuracy:
    """Accuracy of a sequence of booleans with a Wilson interval (two-sided, ``level``)."""
    arr = _bools(correct, name or "accuracy")
    k, n = int(arr.sum()), int(arr.size)
    z = _z(level)
    lo, hi = wilson_interval(k, n, z)
    return Accuracy(name, k, n, (k / n) if n else float("nan"), lo, hi, level)


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise InputError(f"confidence level must be in (0, 1), got {level}")
    if abs(level - 0.95) < 1e-12:
        return Z95
    from statistics import NormalDist

    return NormalDist().inv_cdf(0.5 + level / 2)


def binom_two_sided_p(k: int, n: int) -> float:
    """Exact two-sided p of k successes in n fair coin flips: ``min(1, 2 P(X <= min(k, n-k)))``."""
    if n == 0:
        return 1.0
    m = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(m + 1)) / 2**n
    return min(1.0, 2 * tail)


def mcnemar_exact(a_correct: Sequence[Any], b_correct: Sequence[Any]) -> McNemarResult:
    """McNemar's exact test of paired correctness (e.g. base vs proxy on the same questions)."""
    a, b = _bools(a_correct, "system A"), _bools(b_correct, "system B")
    if a.shape != b.shape:
        raise InputError(f"paired outcomes differ in length: {a.size} vs {b.size}")
    only_a = int((a & ~b).sum())
    only_b = int((~a & b).sum())
    return McNemarResult(only_a, only_b, int(a.size), binom_two_sided_p(only_a, only_a + only_b))


def paired_bootstrap(
    a_correct: Sequence[Any],
    b_correct: Sequence[Any],
    *,
    n_boot: int = 10_000,
    seed: int = 0,
    level: float = 0.95,
) -> BootstrapResult:
    """Paired bootstrap of ``acc(B) - acc(A)``: resample questions, percentile CI, two-sided p.

    The p-value is twice the smaller share of resampled differences on either side of zero
    (ties count half), capped at 1.
    """
    a, b = _bools(a_correct, "system A"), _bools(b_correct, "system B")
    if a.shape != b.shape:
        raise InputError(f"paired outcomes differ in length: {a.size} vs {b.size}")
    if a.size == 0:
        raise InputError("paired bootstrap of zero questions")
    if n_boot < 1:
        raise InputError(f"n_boot must be positive, got {n_boot}")
    d = b.astype(np.int8) - a.astype(np.int8)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, d.size, size=(n_boot, d.size))
    diffs = d[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(diffs, [alpha, 1 - alpha])
    below = (diffs < 0).mean() + 0.5 * (diffs == 0).mean()
    above = (diffs > 0).mean() + 0.5 * (diffs == 0).mean()
    p = min(1.0, 2 * min(below, above))
    return BootstrapResult(float(d.mean()), float(lo), float(hi), float(p), n_boot, seed)


def breakdown(df: pd.DataFrame, by: str, columns: Sequence[str], level: float = 0.95) -> pd.DataFrame:
    """Accuracy (with Wilson CIs) of each boolean column in ``columns``, per value of ``by``.

    One row per (group, system); e.g. ``by="week"`` or ``by="source"`` for RealtimeQA.
    """
    if by not in df.columns:
        raise InputError(f"no column {by!r} to group by (have {list(df.columns)})")
    rows = []
    for key, g in df.groupby(by, sort=True):
        for col in columns:
            if col not in g.columns:
                raise InputError(f"no outcome column {col!r}")
            acc = accuracy(g[col].tolist(), col, level)
            rows.append({by: key, **acc.to_dict()})
    return pd.DataFrame(rows)


def missing_rates(df: pd.DataFrame) -> dict[str, float]:
    """Share of questions with at least one / every candidate missing from the base's top-k."""
    for c in ("n_missing", "n_choices"):
        if c not in df.columns:
            raise InputError(f"results table has no {c!r} column")
    n = len(df)
    if n == 0:
        return {
            "questions": 0,
            "any_missing": float("nan"),
            "all_missing": float("nan"),
            "mean_missing": float("nan"),
        }
    return {
        "questions": n,
        "any_missing": float((df["n_missing"] > 0).mean()),
        "all_missing": float((df["n_missing"] >= df["n_choices"]).mean()),
        "mean_missing": float(df["n_missing"].mean()),
    }
